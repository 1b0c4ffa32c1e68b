"""Evaluating checkpoints and embeddings the way Stable Diffusion v1 and Textual Inversion were evaluated: images
sampled per caption and guidance scale, then FID, CLIP score or (offline, for the demo model) prompt accuracy.
See docs/evaluation.md."""
