"""Prompts beyond the text encoder's 77 tokens and the web UIs' emphasis syntax, above the model: parsing
(`parsing`), chunking (`chunking`), the encoder's chunk format (`encoders`), emphasis (`weighting`) and the
conditioning of a batch (`conditioning`). docs/prompts.md describes the behaviour."""
from ldm.prompts.conditioning import encode_prompt_pair

__all__ = ["encode_prompt_pair"]
