"""The KL-autoencoder loss of latent diffusion (Rombach et al. 2022, appendix G; Esser et al. 2021,
eq. 7): L1 + LPIPS reconstruction under a learned log-variance, a KL term, and a PatchGAN hinge loss
whose weight adapts to the ratio of the reconstruction and adversarial gradients at the last layer."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ldm.modules.losses.discriminator import NLayerDiscriminator, adopt_weight, hinge_d_loss, vanilla_d_loss

D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class LPIPSWithDiscriminator(nn.Module):
    """`forward(inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer, split)` gives
    the autoencoder loss (optimizer_idx 0) or the discriminator loss (1), with a dict of logs."""

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge"):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(D_LOSSES)}, got {disc_loss!r}")
        if use_actnorm or disc_conditional:
            raise ValueError("use_actnorm and disc_conditional are not supported by this loss")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss: Optional[nn.Module] = None
        if perceptual_weight > 0:
            from ldm.modules.losses.lpips import LPIPS

            self.perceptual_loss = LPIPS().eval()
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers)
        self.discriminator_iter_start = disc_start
        self.disc_loss = D_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at this step (so the discriminator needs training)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start) > 0

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """lambda = |grad nll| / (|grad g| + 1e-4) at the decoder's last layer (Esser et al. 2021, eq. 7)."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: Any, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                split: str = "train", weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 1:
            logits_real = self.discriminator(inputs.contiguous().detach())
            logits_fake = self.discriminator(reconstructions.contiguous().detach())
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            return d_loss, {f"{split}/disc_loss": d_loss.clone().detach().mean(),
                            f"{split}/logits_real": logits_real.detach().mean(),
                            f"{split}/logits_fake": logits_fake.detach().mean()}

        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(inputs.contiguous(),
                                                                                reconstructions.contiguous())
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        batch = nll_loss.shape[0]
        weighted_nll_loss = torch.sum(weighted_nll_loss) / batch
        nll_loss = torch.sum(nll_loss) / batch
        kl_loss = torch.sum(posteriors.kl()) / batch

        if disc_factor > 0:
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            try:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
            except RuntimeError:
                if self.training:
                    raise
                d_weight = torch.tensor(0.0)
        else:
            g_loss = torch.zeros((), device=inputs.device)
            d_weight = torch.tensor(0.0)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        return loss, {f"{split}/total_loss": loss.clone().detach().mean(), f"{split}/logvar": self.logvar.detach(),
                      f"{split}/kl_loss": kl_loss.detach().mean(), f"{split}/nll_loss": nll_loss.detach().mean(),
                      f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
                      f"{split}/disc_factor": torch.tensor(disc_factor), f"{split}/g_loss": g_loss.detach().mean()}


class DummyLoss(nn.Module):
    """A loss with no parameters, for autoencoders used only for inference (taming-transformers' `DummyLoss`,
    which the original reached as `ldm.modules.losses.contperceptual.DummyLoss` through a star import; the LDM
    inpainting config names it there)."""
