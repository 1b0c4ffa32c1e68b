"""Autoencoder training losses: LPIPS + PatchGAN discriminator (Esser et al. 2021; Rombach et al. 2022)."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
