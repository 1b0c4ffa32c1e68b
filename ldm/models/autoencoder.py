"""The autoencoders that map images to the latent space of latent diffusion (Rombach et al. 2022, sec. 3.1):
x [B,3,H,W] in [-1,1] <-> z [B,embed_dim,H/f,W/f], KL-regularised (`AutoencoderKL`) or vector-quantised
(`VQModel`, `VQModelInterface`: VQGAN, Esser et al. 2021, with the codebook of van den Oord et al. 2017).

Training of `AutoencoderKL` (LPIPS + patch discriminator, two optimisers) follows the original and runs under
Lightning's manual optimisation; see `main.py`. The VQ models are for inference (the LDM inpainting model).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: True (mean and log-variance)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.automatic_optimization = False
        self.learning_rate = 4.5e-6
        self.decode_tile: Optional[tuple[int, int]] = None  # (tile size, overlap) in latent pixels; see enable_tiling
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        from ldm.checkpoint import load_state_dict_into

        load_state_dict_into(self, path, ignore_prefixes=ignore_keys)

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z|x) over latents of shape [B, embed_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (approximately) from an unscaled latent; tile by tile after `enable_tiling`."""
        if self.decode_tile is not None:
            from ldm.models.tiled_decode import tiled_decode

            tile_size, overlap = self.decode_tile
            return tiled_decode(self._decode, z, tile_size, overlap)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def enable_tiling(self, tile_size: int = 64, overlap: int = 16) -> None:
        """Decode latents larger than `tile_size` (latent pixels; 64 = 512 image pixels) in tiles that overlap by
        `overlap` and are cross-faded, so a 1024x1024 or larger image needs the memory of a 512x512 decode."""
        if not 0 < overlap < tile_size:
            raise ValueError(f"the overlap ({overlap}) must be positive and smaller than the tile size ({tile_size})")
        self.decode_tile = (tile_size, overlap)

    def disable_tiling(self) -> None:
        self.decode_tile = None

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """Images from a batch: NHWC (as the datasets give them) to contiguous NCHW float."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One autoencoder step then, once the adversarial loss has started, one discriminator step (manual
        optimisation; Lightning 2 counts each optimizer step in `global_step`)."""
        opt_ae, opt_disc = self.optimizers()
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)

        aeloss, log_dict_ae = self.loss(inputs, reconstructions, posterior, 0, self.global_step,
                                        last_layer=self.get_last_layer(), split="train")
        opt_ae.zero_grad()
        self.manual_backward(aeloss)
        opt_ae.step()

        self.log("aeloss", aeloss, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log_dict(log_dict_ae, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        discriminator_active = getattr(self.loss, "discriminator_active", None)
        if discriminator_active is not None and not discriminator_active(self.global_step):
            return
        discloss, log_dict_disc = self.loss(inputs, reconstructions.detach(), posterior, 1, self.global_step,
                                            last_layer=self.get_last_layer(), split="train")
        opt_disc.zero_grad()
        self.manual_backward(discloss)
        opt_disc.step()
        self.log("discloss", discloss, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log_dict(log_dict_disc, prog_bar=False, logger=True, on_step=True, on_epoch=False)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        aeloss, log_dict_ae = self.loss(inputs, reconstructions, posterior, 0, self.global_step,
                                        last_layer=self.get_last_layer(), split="val")
        _, log_dict_disc = self.loss(inputs, reconstructions, posterior, 1, self.global_step,
                                     last_layer=self.get_last_layer(), split="val")
        self.log("val/rec_loss", log_dict_ae["val/rec_loss"])
        self.log_dict({**log_dict_ae, **log_dict_disc})
        return log_dict_ae

    def configure_optimizers(self):
        lr = self.learning_rate
        autoencoder_params = [*self.encoder.parameters(), *self.decoder.parameters(),
                              *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]
        opt_ae = torch.optim.Adam(autoencoder_params, lr=lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc], []

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], only_inputs: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions and decoded prior samples, for the image logger."""
        log: dict[str, torch.Tensor] = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            reconstructions, posterior = self(x)
            if x.shape[1] > 3:
                x, reconstructions = self.to_rgb(x), self.to_rgb(reconstructions)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = reconstructions
        log["inputs"] = x
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a segmentation map to RGB with a fixed random colouring."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class VQModel(nn.Module):
    """VQGAN's autoencoder (Esser et al. 2021): encoder, 1x1 `quant_conv` to `embed_dim`, the codebook `quantize`
    of `n_embed` entries, 1x1 `post_quant_conv`, decoder. Arguments and state-dict keys are the original
    `ldm.models.autoencoder.VQModel`'s (the codebook is taming's `VectorQuantizer2` with beta 0.25).

    Inference only: the training options (`batch_resize_range`, `scheduler_config`, `lr_g_factor`) are kept
    for the configs' sake, and `use_ema: True` (an EMA of the whole autoencoder) is refused.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: int, embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None,
                 batch_resize_range: Optional[Sequence[int]] = None,
                 scheduler_config: Optional[Mapping[str, Any]] = None, lr_g_factor: float = 1.0,
                 remap: Optional[str] = None, sane_index_shape: bool = False, use_ema: bool = False):
        super().__init__()
        if use_ema:
            raise ValueError("VQModel(use_ema=True) is not supported (this VQ autoencoder is for inference); "
                             "set use_ema: false")
        if ddconfig.get("double_z", True):
            raise ValueError("VQModel needs ddconfig.double_z: False (the encoder gives z_channels, not moments)")
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.batch_resize_range = batch_resize_range
        self.use_ema = False
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        from ldm.checkpoint import load_state_dict_into

        load_state_dict_into(self, path, ignore_prefixes=ignore_keys)

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous latent before the codebook, [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(z_q, codebook loss, (None, None, indices)) of the quantised latent."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (approximately) from a quantised latent."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Image from codebook indices [B, h, w]."""
        batch, height, width = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(batch, height, width, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, indices) = self.encode(input)
        decoded = self.decode(quant)
        return (decoded, diff, indices) if return_pred_indices else (decoded, diff)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """Images from a batch: NHWC (as the datasets give them) to contiguous NCHW float."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


class VQModelInterface(VQModel):
    """The VQ autoencoder as latent diffusion's first stage (the original's `VQModelInterface`): `encode` gives
    the latent before the codebook (diffusion runs on it, Rombach et al. 2022, sec. 3.1), `decode` quantises it
    first unless `force_not_quantize`."""

    def __init__(self, embed_dim: int, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (pixel-space diffusion)."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x
