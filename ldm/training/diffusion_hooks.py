"""The Lightning hooks of the diffusion models (`DDPM`, `LatentDiffusion`): training and validation steps, the EMA
update, the `scale_by_std` estimate and `log_images` (DDIM samples for the image logger).

They need a `LightningModule` (`self.log`, `self.global_step`, its `optimizer_step`) and a sampler, so they live
here, not in the model: `ldm.lightning.as_lightning_module` mixes the class that `hooks_for` names into a model.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Mapping, Optional

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.util import default, log_txt_as_img

logger = logging.getLogger(__name__)


class DDPMHooks:
    """Lightning hooks of `DDPM`; mixed in ahead of the model's class and `LightningModule`."""

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(self.apply_ucg(batch))
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, logger=True, on_step=True,
                     on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        self.log_dict(loss_dict_no_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update, so that a checkpoint taken after the batch holds both."""
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.model)


class LatentDiffusionHooks(DDPMHooks):
    """Lightning hooks of `LatentDiffusion`: those of `DDPM`, `scale_by_std` and the image logs."""

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int, *args: Any) -> None:
        """With `scale_by_std`, set scale_factor = 1 / std(z) from the first batch (Rombach et al. 2022, sec. 4.3.2)."""
        if (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            del self.scale_factor
            self.register_buffer("scale_factor", 1.0 / z.flatten().std())
            logger.info("setting scale_factor to %.5f", self.scale_factor.item())

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int = 50, ddim_eta: float = 0.0, plot_progressive_rows: bool = True,
                   plot_diffusion_rows: bool = True, unconditional_guidance_scale: float = 1.0,
                   unconditional_guidance_label: Optional[Any] = None, use_ema_scope: bool = True,
                   **kwargs: Any) -> dict[str, Any]:
        """Inputs, reconstructions, the conditioning, a diffusion row and DDIM samples, for the image logger."""
        log: dict[str, Any] = {}
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N = min(x.shape[0], N)
        n_row = min(x.shape[0], n_row)
        log["inputs"] = x
        log["reconstruction"] = xrec
        if self.model.conditioning_key is not None and isinstance(xc, (list, tuple)):
            log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), list(xc)[:N]).to(x.device)
        if plot_diffusion_rows:
            rows = []
            z_start = z[:n_row]
            for t in range(self.num_timesteps):
                if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                    t_batch = torch.full((n_row,), t, device=self.device, dtype=torch.long)
                    rows.append(self.decode_first_stage(self.q_sample(z_start, t_batch)))
            log["diffusion_row"] = torch.stack(rows, dim=1).flatten(0, 1)
        if sample:
            scope = self.ema_scope if use_ema_scope else nullcontext
            sampler = DDIMSampler(self)
            shape = (self.channels, self.image_size, self.image_size)
            with scope("Plotting"):
                samples, intermediates = sampler.sample(ddim_steps, N, shape, c, eta=ddim_eta, verbose=False)
            log["samples"] = self.decode_first_stage(samples)
            if unconditional_guidance_scale > 1.0:
                label = default(unconditional_guidance_label, [""] * N)
                uc = self.get_learned_conditioning(label)
                if isinstance(c, dict):  # hybrid conditioning (inpainting): the same concat, the empty prompt
                    uc = {**c, "c_crossattn": [uc]}
                with scope("Sampling with classifier-free guidance"):
                    samples_cfg, _ = sampler.sample(ddim_steps, N, shape, c, eta=ddim_eta, verbose=False,
                                                    unconditional_guidance_scale=unconditional_guidance_scale,
                                                    unconditional_conditioning=uc)
                log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)
            if plot_progressive_rows:
                steps = [self.decode_first_stage(step[:n_row]) for step in intermediates["pred_x0"]]
                log["progressive_row"] = torch.stack(steps, dim=1).flatten(0, 1)
        return log


_HOOKS: dict[type, type] = {LatentDiffusion: LatentDiffusionHooks, DDPM: DDPMHooks}


def hooks_for(cls: type) -> Optional[type]:
    """The hooks class of `cls` (that of its nearest base with hooks here), or None for a model that brings its
    own (the autoencoders)."""
    return next((_HOOKS[base] for base in cls.__mro__ if base in _HOOKS), None)
