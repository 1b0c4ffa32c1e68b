"""Denoising diffusion (Ho et al. 2020, arXiv:2006.11239) and latent diffusion (Rombach et al.
2022, arXiv:2112.10752): the forward process q(x_t | x_0), the eps-prediction training loss,
and the latent model that wraps the autoencoder, the text encoder and the UNet.

Names of classes, arguments, buffers and methods follow the original `ldm` package.
The models are plain `nn.Module`s: the hooks that need Lightning (`training_step`, `validation_step`, the EMA
update, `scale_by_std`, `log_images`) are in `ldm.training.diffusion_hooks`, added when `main.py` turns a model
into a LightningModule (`ldm.lightning`); `configure_optimizers` stays here, as it needs no Lightning.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.inpainting_checkpoint import EMA_INPUT_CONV_KEY, INPUT_CONV_KEY
from ldm.models.autoencoder import VQModelInterface
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.schedule_buffers import SCHEDULE_BUFFERS
from ldm.util import default, exists, instantiate_from_config

logger = logging.getLogger(__name__)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `.train()` that keeps a frozen module in eval mode."""
    return self


class DDPM(nn.Module):
    """Gaussian diffusion in pixel space with an eps- or x0-predicting network (`self.model`)."""

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: str = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 clip_denoised: bool = True, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: Optional[str] = None, parameterization: str = "eps",
                 scheduler_config: Optional[Mapping[str, Any]] = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0,
                 ucg_training: Optional[Mapping[str, Mapping[str, Any]]] = None):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        self.parameterization = parameterization
        self.cond_stage_model: Optional[nn.Module] = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.monitor = monitor
        self.ucg_training = dict(ucg_training or {})
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), logvar_init)
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.logvar = logvar
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """Buffers of the forward process and of the posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 4-7)."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        to_torch = partial(torch.tensor, dtype=torch.float32)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, to_torch(values[name]))
        with np.errstate(divide="ignore"):
            if self.parameterization == "eps":
                lvlb_weights = betas ** 2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
            else:
                lvlb_weights = 0.5 * np.sqrt(alphas_cumprod) / (2.0 * (1 - alphas_cumprod))
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", to_torch(lvlb_weights), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into the model."""
        if not self.use_ema:
            yield None
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            self.model_ema.restore(self.model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        from ldm.checkpoint import load_state_dict_into

        load_state_dict_into(self.model if only_model else self, path, ignore_prefixes=ignore_keys,
                             strip_prefix="model." if only_model else "")

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (Ho et al. 2020, eq. 4)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        model_out = self.model(x, t)
        x_recon = self.predict_start_from_noise(x, t=t, noise=model_out) if self.parameterization == "eps" else model_out
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 repeat_noise: bool = False) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2)."""
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        noise = noise_like(x.shape, x.device, repeat_noise)
        nonzero_mask = (t != 0).float().reshape(x.shape[0], *((1,) * (x.ndim - 1)))
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int], return_intermediates: bool = False):
        img = torch.randn(shape, device=self.betas.device)
        intermediates = [img]
        for i in reversed(range(self.num_timesteps)):
            img = self.p_sample(img, torch.full((shape[0],), i, device=img.device, dtype=torch.long),
                                clip_denoised=self.clip_denoised)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False):
        return self.p_sample_loop((batch_size, self.channels, self.image_size, self.image_size),
                                  return_intermediates=return_intermediates)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_out = self.model(x_noisy, t)
        target = noise if self.parameterization == "eps" else x_start
        loss = self.get_loss(model_out, target, mean=False).mean(dim=[1, 2, 3])
        prefix = "train" if self.training else "val"
        loss_simple = loss.mean() * self.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * loss).mean()
        loss = loss_simple + self.original_elbo_weight * loss_vlb
        return loss, {f"{prefix}/loss_simple": loss_simple, f"{prefix}/loss_vlb": loss_vlb, f"{prefix}/loss": loss}

    def forward(self, x: torch.Tensor, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """Images of a batch as NCHW float; the datasets give NHWC in [-1, 1]."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]):
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def apply_ucg(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Unconditional-guidance training: replace a batch key's entries by `val` with probability `p`."""
        if not self.ucg_training:
            return batch
        batch = dict(batch)
        for key, setting in self.ucg_training.items():
            p, value = float(setting["p"]), setting["val"]
            entries = list(batch[key])
            drop = torch.rand(len(entries)) < p
            batch[key] = [value if dropped else entry for entry, dropped in zip(entries, drop.tolist())]
        return batch

    def configure_optimizers(self):
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return torch.optim.AdamW(params, lr=self.learning_rate)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned on a (frozen) text encoder."""

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Any,
                 num_timesteps_cond: Optional[int] = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False,
                 personalization_config: Optional[Mapping[str, Any]] = None, embedding_reg_weight: float = 0.0,
                 unfreeze_model: bool = False, model_lr: float = 0.0, *args, **kwargs):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        if self.num_timesteps_cond != 1:
            raise ValueError("num_timesteps_cond other than 1 (a shortened conditioning schedule) is not supported")
        self.scale_by_std = scale_by_std
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True
        self.embedding_reg_weight = embedding_reg_weight
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        self.embedding_manager: Optional[nn.Module] = None
        if personalization_config is not None:
            self.instantiate_embedding_manager(personalization_config)

    def instantiate_embedding_manager(self, config: Mapping[str, Any]) -> None:
        """Textual inversion (Gal et al. 2022): freeze the UNet and the text encoder (unless `unfreeze_model`)
        and build the embedding manager over the text encoder, as the original LatentDiffusion."""
        if not self.unfreeze_model:
            for module in (self.model, self.cond_stage_model):
                module.eval()
                module.train = partial(disabled_train, module)
                for param in module.parameters():
                    param.requires_grad = False
        if not self.cond_stage_trainable:
            logger.warning("personalization_config without cond_stage_trainable: true: prompts are encoded without "
                           "gradients, so the embedding cannot learn")
        params = dict(config.get("params") or {})
        embedding_manager_ckpt = params.pop("embedding_manager_ckpt", None)
        self.embedding_manager = instantiate_from_config(
            {"target": config["target"], "params": {**params, "embedder": self.cond_stage_model}})
        if embedding_manager_ckpt:
            self.embedding_manager.load(embedding_manager_ckpt)

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = partial(disabled_train, self.first_stage_model)
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        elif not self.cond_stage_trainable:
            model = instantiate_from_config(config).eval()
            model.train = partial(disabled_train, model)
            for param in model.parameters():
                param.requires_grad = False
            self.cond_stage_model = model
        else:
            self.cond_stage_model = instantiate_from_config(config)

    def get_learned_conditioning(self, c: Any, **kwargs) -> torch.Tensor:
        """Encode conditioning (prompts for Stable Diffusion) into the UNet's context [B, 77, 768]."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c, **kwargs)
        if self.embedding_manager is not None:
            kwargs.setdefault("embedding_manager", self.embedding_manager)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c, **kwargs)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c, **kwargs)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """A latent from the encoder output, multiplied by `scale_factor`."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior)} not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Image in [-1, 1] from a scaled latent; a VQ first stage quantises it first unless `force_not_quantize`."""
        return self.differentiable_decode_first_stage(z, predict_cids=predict_cids,
                                                      force_not_quantize=force_not_quantize)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        if predict_cids:
            raise ValueError("predict_cids (latents given as codebook logits) is not supported")
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z / self.scale_factor, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: Optional[str] = None, return_original_cond: bool = False,
                  bs: Optional[int] = None):
        """Latent of the batch's images and its conditioning (encoded unless the text encoder trains)."""
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = cond_key or self.cond_stage_key
            if cond_key != self.first_stage_key:
                xc = batch[cond_key] if cond_key in ("caption", "coordinates_bbox", "txt") else super().get_input(
                    batch, cond_key).to(self.device)
            else:
                xc = x
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else list(xc)
                                                  if isinstance(xc, tuple) else xc)
            else:
                c = xc
            if bs is not None:
                c = c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping[str, Any], **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False, *,
                    guided_pair: bool = False) -> torch.Tensor:
        """eps_theta(x_t, t, c): the UNet's prediction for a batch of noisy latents. `guided_pair` says that the
        batch is a classifier-free guidance step's (the same x and t twice, under two conditionings); the result
        is the same either way (see `UNetModel.forward`)."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond, guided_pair=guided_pair)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """The training loss: simple (Ho et al. 2020, eq. 14), optionally over a learned log-variance,
        plus `original_elbo_weight` times the variational bound term."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        prefix = "train" if self.training else "val"
        target = noise if self.parameterization == "eps" else x_start
        loss_simple = self.get_loss(model_output, target, mean=False).mean([1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self.logvar.to(self.device)[t]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        loss_vlb = (self.lvlb_weights[t] * loss_vlb).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        if self.embedding_reg_weight > 0:
            loss_embedding_reg = self.embedding_manager.embedding_to_coarse_loss().mean()
            loss_dict[f"{prefix}/loss_emb_reg"] = loss_embedding_reg
            loss = loss + self.embedding_reg_weight * loss_embedding_reg
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def configure_optimizers(self):
        if self.embedding_manager is not None:
            optimizer = self._embedding_optimizer()
        else:
            params = list(self.model.parameters())
            if self.cond_stage_trainable:
                params += list(self.cond_stage_model.parameters())
            if self.learn_logvar:
                params.append(self.logvar)
            optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
        if not self.use_scheduler:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]

    def _embedding_optimizer(self) -> torch.optim.Optimizer:
        """Textual inversion: only the placeholder vectors learn; with `unfreeze_model` the UNet and the text
        encoder learn too, at `model_lr`."""
        embedding_params = list(self.embedding_manager.embedding_parameters())
        if not self.unfreeze_model:
            return torch.optim.AdamW(embedding_params, lr=self.learning_rate)
        model_params = list(self.cond_stage_model.parameters()) + list(self.model.parameters())
        return torch.optim.AdamW([{"params": embedding_params, "lr": self.learning_rate}, {"params": model_params}],
                                 lr=self.model_lr)


class LatentInpaintDiffusion(LatentDiffusion):
    """Latent diffusion for inpainting: the UNet also sees the mask and the masked image (conditioning_key "hybrid").

    The class of Stable Diffusion's inpainting checkpoints (RunwayML's sd-v1-5-inpainting, Stability's SD 2
    `ldm.models.diffusion.ddpm.LatentInpaintDiffusion`): the UNet's input is cat([z_t (4), mask at latent size (1),
    latent of the masked image (4)]) along channels (in_channels 9, the order of `concat_keys`), with the prompt's
    CLIP context through cross-attention. The mask is 1 where the image is to be repainted; the masked image is
    image * (mask < 0.5), in [-1, 1], so the repainted region is 0 (grey).

    Training starts from a text-to-image checkpoint (`ckpt_path`): tensors named in `finetune_keys` whose input
    channels are fewer than the model's keep their first `keep_finetune_dims` channels (those of z_t) and the
    extra ones start at zero, so the model begins as the text-to-image model (as the released checkpoints were made).
    The original requires `ckpt_path` whenever `finetune_keys` is set; here `finetune_keys` only act on a
    checkpoint given by `ckpt_path`, so RunwayML's v1 inference config (which leaves them at their default) builds.
    """

    def __init__(self, concat_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image",
                 finetune_keys: Optional[Sequence[str]] = (INPUT_CONV_KEY, EMA_INPUT_CONV_KEY),
                 keep_finetune_dims: int = 4, c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, *args, **kwargs):
        if masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} must be one of concat_keys {list(concat_keys)}")
        if kwargs.get("cond_stage_trainable", False):
            raise ValueError("LatentInpaintDiffusion encodes prompts without gradients (as the original): set "
                             "cond_stage_trainable: false")
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, **kwargs)
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.finetune_keys = tuple(finetune_keys) if finetune_keys is not None else None
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start = c_concat_log_start
        self.c_concat_log_end = c_concat_log_end
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load `path`, widening a text-to-image checkpoint's `finetune_keys` tensors to the model's input channels:
        the first `keep_finetune_dims` channels are the checkpoint's, the others zero (the original's
        `LatentFinetuneDiffusion.init_from_ckpt`). Without EMA tensors in the checkpoint, the EMA starts from the
        loaded weights."""
        from ldm.checkpoint import load_state_dict_into, read_state_dict

        state_dict = read_state_dict(path)
        state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_keys)}
        own = self.state_dict()
        for key in self.finetune_keys or ():
            if key in state_dict and key in own:
                state_dict[key] = self._widened(key, state_dict[key], own[key].shape)
        target = self.model if only_model else self
        missing, _ = load_state_dict_into(target, state_dict, strip_prefix="model." if only_model else "")
        if self.use_ema and not only_model and any(key.startswith("model_ema.") for key in missing):
            logger.info("%s has no EMA weights: the EMA starts from the loaded weights", path)
            self.model_ema = LitEma(self.model)

    def _widened(self, key: str, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if tuple(tensor.shape) == tuple(shape):
            return tensor
        if (tensor.ndim != len(shape) or tensor.shape[0] != shape[0] or tuple(tensor.shape[2:]) != tuple(shape[2:])
                or tensor.shape[1] < self.keep_dims or tensor.shape[1] > shape[1]):
            return tensor  # not a narrower input convolution: the loader reports the mismatch
        logger.info("%s: keeping the checkpoint's first %d of %d input channels, the other %d start at zero", key,
                    self.keep_dims, shape[1], shape[1] - self.keep_dims)
        widened = torch.zeros(tuple(shape), dtype=tensor.dtype)
        widened[:, :self.keep_dims] = tensor[:, :self.keep_dims]
        return widened

    def _c_concat(self, masks: Mapping[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        """cat over `concat_keys`: the masked image's latent as it is, the other inputs (the mask) resized to the
        latent grid by nearest-neighbour interpolation (`F.interpolate`'s default, as in the original and diffusers)."""
        return torch.cat([latent if key == self.masked_image_key
                          else F.interpolate(masks[key].to(latent.dtype), size=latent.shape[-2:])
                          for key in self.concat_keys], dim=1)

    @torch.no_grad()
    def inpainting_concat(self, image: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None,
                          sample_posterior: bool = True) -> torch.Tensor:
        """The UNet's extra input for inpainting `image` [B, 3, H, W] (in [-1, 1]) where `mask` [B, 1, H, W] (in
        [0, 1]) is 1: [B, 5, H/8, W/8], the mask binarised at 0.5 and resized (nearest) to the latent grid, then
        the latent of image * (mask < 0.5), as the original's inpainting script and diffusers'
        StableDiffusionInpaintPipeline build it. Their latent is a sample of the encoder's posterior; `generator`
        draws it (`sample_posterior=False` takes the posterior's mode). Sample with
        `{"c_concat": [concat], "c_crossattn": [context]}`, the unconditional branch sharing c_concat."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {list(image.shape)}")
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"mask must be [B, 1, H, W] matching the image {list(image.shape)}, "
                             f"got {list(mask.shape)}")
        weight = next(self.first_stage_model.parameters())
        image = image.to(device=weight.device, dtype=weight.dtype)
        mask = (mask.to(device=weight.device) >= 0.5).to(weight.dtype)
        posterior = self.encode_first_stage(image * (mask < 0.5))
        if isinstance(posterior, DiagonalGaussianDistribution):
            latent = posterior.sample(generator) if sample_posterior else posterior.mode()
        else:
            latent = posterior
        masks = {key: mask for key in self.concat_keys if key != self.masked_image_key}
        return self._c_concat(masks, self.scale_factor * latent)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: Optional[str] = None, return_original_cond: bool = False,
                  bs: Optional[int] = None):
        """Latent of the batch's images and {"c_concat": [mask, masked-image latent], "c_crossattn": [context]}
        (the original's `LatentInpaintDiffusion.get_input`). The batch carries `mask` ([B, H, W, 1] or [B, H, W],
        1 = repaint); `masked_image` is image * (mask < 0.5) when the batch lacks it."""
        out = super().get_input(batch, k, return_first_stage_outputs=return_first_stage_outputs, force_c_encode=True,
                                cond_key=cond_key, return_original_cond=return_original_cond, bs=bs)
        c = out[1]
        masks = {key: DDPM.get_input(self, batch, key)[:bs].to(self.device)
                 for key in self.concat_keys if key != self.masked_image_key}
        if self.masked_image_key in batch:
            masked_image = DDPM.get_input(self, batch, self.masked_image_key)[:bs].to(self.device)
        elif len(masks) == 1:
            masked_image = DDPM.get_input(self, batch, k)[:bs].to(self.device) * (next(iter(masks.values())) < 0.5)
        else:
            raise KeyError(f"the batch has no {self.masked_image_key!r} and no single mask to make it from")
        latent = self.get_first_stage_encoding(self.encode_first_stage(masked_image))
        out[1] = {"c_concat": [self._c_concat(masks, latent)], "c_crossattn": [c]}
        return out


class DiffusionWrapper(nn.Module):
    """Routes the conditioning to the UNet: concatenated to the input, as cross-attention context, or both."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None, guided_pair: bool = False) -> torch.Tensor:
        """The UNet on x (with `c_concat` concatenated) under `c_crossattn`; `guided_pair` reaches the UNet where
        only the cross-attention context differs between the batch's halves."""
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), guided_pair=guided_pair)
        if self.conditioning_key == "hybrid":
            if not c_concat or not c_crossattn:
                raise ValueError("conditioning_key 'hybrid' (an inpainting UNet) needs both c_concat and c_crossattn: "
                                 "pass {'c_concat': [model.inpainting_concat(image, mask)], 'c_crossattn': [context]}")
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])
