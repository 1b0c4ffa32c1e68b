"""Conditioning encoders: the CLIP text encoder of Stable Diffusion v1 and a class embedder."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextModel
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

DEFAULT_CLIP_VERSION = "openai/clip-vit-large-patch14"
_BUILTIN_TEXT_CONFIGS = {
    "openai/clip-vit-large-patch14": CLIPTextConfig(),
    "openai/clip-vit-base-patch32": CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
}


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """Class label -> learned embedding [B, 1, embed_dim] (class-conditional LDMs)."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, torch.Tensor], key: Optional[str] = None) -> torch.Tensor:
        labels = batch[key or self.key][:, None]
        return self.embedding(labels)


def _state_dict_from_transformers(version: str) -> dict[str, torch.Tensor]:
    """Pretrained CLIP text weights from a hub id or local directory, in this module's key layout."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    state = HFCLIPTextModel.from_pretrained(version).state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


class FrozenCLIPEmbedder(AbstractEncoder):
    """Prompt -> CLIP ViT-L/14 last hidden state [B, 77, 768] (Stable Diffusion v1's text encoder).

    Works offline: the architecture of the default `version` is built in, the tokenizer's
    vocabulary ships with `open_clip`, and the weights come from the Stable Diffusion checkpoint.
    `pretrained=True` loads the weights of `version` (hub id or local directory) through
    `transformers` instead; `text_config` overrides the architecture (smaller models).
    """

    def __init__(self, version: str = DEFAULT_CLIP_VERSION, device: Any = None, max_length: int = 77,
                 text_config: Optional[Mapping[str, Any]] = None, pretrained: bool = False, freeze: bool = True):
        super().__init__()
        self.version = version
        self.max_length = max_length
        config = self._text_config(version, text_config)
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the text encoder's {config.max_position_embeddings} positions")
        self.tokenizer = self._tokenizer(version)
        self.transformer = CLIPTextModel(config)
        if pretrained:
            self.transformer.load_state_dict(_state_dict_from_transformers(version))
        if freeze:
            self.freeze()

    @staticmethod
    def _text_config(version: str, overrides: Optional[Mapping[str, Any]]) -> CLIPTextConfig:
        if overrides is not None:
            return CLIPTextConfig.from_dict(overrides)
        if version in _BUILTIN_TEXT_CONFIGS:
            return _BUILTIN_TEXT_CONFIGS[version]
        from transformers import CLIPTextConfig as HFCLIPTextConfig

        try:
            hf = HFCLIPTextConfig.from_pretrained(version)
        except OSError as error:
            raise UserInputError(f"cannot read the CLIP text config of {version!r} ({error}); use a local directory "
                                 f"or one of {sorted(_BUILTIN_TEXT_CONFIGS)}") from error
        return CLIPTextConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                              intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
                              num_attention_heads=hf.num_attention_heads,
                              max_position_embeddings=hf.max_position_embeddings, layer_norm_eps=hf.layer_norm_eps,
                              hidden_act=hf.hidden_act)

    @staticmethod
    def _tokenizer(version: str) -> Any:
        if os.path.isdir(version) and os.path.exists(os.path.join(version, "vocab.json")):
            return _DirectoryTokenizer(version)
        return CLIPTokenizer()

    def freeze(self) -> None:
        self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def token_ids(self, text: str | Sequence[str]) -> list[list[int]]:
        """Token ids as lists (no tensor, no device): start, BPE ids, end, padded with the end token."""
        return self.tokenizer([text] if isinstance(text, str) else list(text), self.max_length)

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length] on the weights' device."""
        return torch.tensor(self.token_ids(text), dtype=torch.long, device=self.device)

    def forward(self, text: str | Sequence[str] | torch.Tensor, embedding_manager: Optional[Callable] = None
                ) -> torch.Tensor:
        """Prompts, or token ids [B, N] already tokenized (long prompts: ldm.prompts), -> [B, N, width]."""
        tokens = text.to(self.device) if isinstance(text, torch.Tensor) else self.tokenize(text)
        return self.transformer(tokens, embedding_manager=embedding_manager)

    def encode(self, text: str | Sequence[str], **kwargs) -> torch.Tensor:
        return self(text, **kwargs)


class _DirectoryTokenizer:
    """transformers' CLIPTokenizer of a local model directory, called like `CLIPTokenizer`."""

    def __init__(self, directory: str):
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        self.hf = HFCLIPTokenizer.from_pretrained(directory)

    def __call__(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        return self.hf(list(texts), truncation=True, max_length=max_length, padding="max_length")["input_ids"]

    def tokenize(self, text: str) -> list[int]:
        """Token ids without start, end or padding tokens."""
        return self.hf(text, add_special_tokens=False)["input_ids"]


# The LDM text2img-large encoder, at the module path of the original configs.
from ldm.modules.encoders.bert import BERTEmbedder, BERTTokenizer, TransformerEmbedder  # noqa: E402,F401
