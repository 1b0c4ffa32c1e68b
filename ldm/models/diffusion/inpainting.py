"""Inpainting with any sampler: the masked region of an image sampled under a prompt, the rest kept.

Two ways, by the model:
* a text-to-image model: the latent outside the (latent) mask is replaced at every step by the init latent noised
  to that step, through the samplers' `mask`/`x0` (the original DDIM API; Lugmayr et al. 2022, RePaint's
  known-region replacement);
* an inpainting model (`LatentInpaintDiffusion`, 9 input channels): the UNet is conditioned on the mask and the
  masked image's latent, concatenated to its input, for both branches of classifier-free guidance.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# (prompts, negative prompts or None) -> (c, uc or None), e.g. ldm.prompts.encode_prompt_pair bound to a model
PromptEncoder = Callable[[list[str], Optional[list[str]]], tuple[torch.Tensor, Optional[torch.Tensor]]]


def is_inpainting_model(model: Any) -> bool:
    """Whether the model takes the mask and masked image as conditioning (a 9-channel inpainting model)."""
    return hasattr(model, "inpainting_concat")


def latent_keep_mask(repaint: torch.Tensor, factor: int) -> torch.Tensor:
    """The samplers' mask (1 = keep the init latent) from a pixel mask (1 = repaint): a latent pixel is repainted
    when any of its factor x factor pixels is."""
    return 1.0 - F.max_pool2d(repaint, factor)


@torch.no_grad()
def inpaint(model: Any, sampler: Any, image: torch.Tensor, repaint: torch.Tensor, prompts: Sequence[str],
            steps: int, guidance_scale: float = 7.5, negative_prompt: str = "", strength: float = 1.0,
            factor: int = 8, verbose: bool = True, encode_prompts: Optional[PromptEncoder] = None,
            **sampler_options: Any) -> torch.Tensor:
    """Latents of `image` (1 or len(prompts), 3, H, W) in [-1, 1] with the region where `repaint` (the same batch,
    1 channel) is 1 sampled under each prompt, in `steps` steps of `sampler` (any sampler class of this package).
    `strength` below 1 starts from the image's own latent noised to step int(strength * steps), as img2img; `factor`
    is the autoencoder's downsampling factor. `encode_prompts` encodes the prompts (default: the model's
    `get_learned_conditioning`, the original's). `sampler_options` go to the sampler (e.g. DDIM's eta)."""
    n = len(prompts)
    if image.shape[0] != n:
        image, repaint = image.expand(n, -1, -1, -1), repaint.expand(n, -1, -1, -1)
    latent = model.get_first_stage_encoding(model.encode_first_stage(image))
    negatives = n * [negative_prompt] if guidance_scale != 1.0 else None
    if encode_prompts is None:
        c = model.get_learned_conditioning(list(prompts))
        uc = None if negatives is None else model.get_learned_conditioning(negatives)
    else:
        c, uc = encode_prompts(list(prompts), negatives)
    if is_inpainting_model(model):
        concat = model.inpainting_concat(image, repaint)
        c = {"c_concat": [concat], "c_crossattn": [c]}
        uc = None if uc is None else {"c_concat": [concat], "c_crossattn": [uc]}
        mask: dict[str, Optional[torch.Tensor]] = {}
    else:
        mask = {"mask": latent_keep_mask(repaint, factor), "x0": latent}
    guidance = {"unconditional_guidance_scale": guidance_scale, "unconditional_conditioning": uc}
    if strength == 1.0:
        samples, _ = sampler.sample(S=steps, conditioning=c, batch_size=n, shape=latent.shape[1:], verbose=verbose,
                                    **guidance, **mask, **sampler_options)
        return samples
    return sampler.img2img(steps, latent, strength, c, verbose=verbose, **guidance, **mask, **sampler_options)
