"""Latent diffusion models: Stable Diffusion v1 and Textual Inversion."""

__version__ = "1.0.0"
