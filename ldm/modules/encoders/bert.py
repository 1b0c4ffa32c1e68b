"""The text encoder of the LDM text2img-large model (Rombach et al. 2022, sec. 4.3): a BERT
WordPiece tokenizer (bert-base-uncased) followed by a transformer encoder trained from scratch
with the diffusion model (1280 wide, 32 layers), in the layout of the `x-transformers` classes
the original checkpoint was saved from (`transformer.token_emb`, `transformer.attn_layers.layers.N...`).

Pre-norm layers alternate bidirectional self-attention ('a') and a GELU feed-forward ('f'); the
output is the final-LayerNorm hidden state [B, 77, 1280] that conditions the UNet. Padding tokens
are attended to, as in the original.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserInputError, first_line

DEFAULT_BERT_VERSION = "bert-base-uncased"
BERT_VOCAB_ENV = "LDM_BERT_VOCAB"
DEFAULT_DIM_HEAD = 64


class BERTTokenizer(nn.Module):
    """Text -> bert-base-uncased token ids [B, max_length] ([CLS] ... [SEP], padded with [PAD]).

    The `transformers` tokenizer is built on first use, so a model can be built (e.g. on the meta
    device) without the vocabulary. It is read from `vocab_file` (a vocab.txt or a directory holding
    one), else from $LDM_BERT_VOCAB, else from the Hugging Face hub / cache (`bert-base-uncased`).
    """

    def __init__(self, device: Any = None, vq_interface: bool = True, max_length: int = 77,
                 vocab_file: Optional[str | os.PathLike] = None):
        super().__init__()
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.vocab_file = vocab_file
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = _load_bert_tokenizer(self.vocab_file or os.environ.get(BERT_VOCAB_ENV))
        return self._tokenizer

    @property
    def unk_token_id(self) -> int:
        return int(self.tokenizer.unk_token_id)

    def token_ids(self, text: str | Sequence[str]) -> list[list[int]]:
        """Padded ids as lists (no tensor, no device)."""
        if isinstance(text, str):
            text = [text]
        encoding = self.tokenizer(list(text), truncation=True, max_length=self.max_length,
                                  return_overflowing_tokens=False, padding="max_length")
        return [list(ids) for ids in encoding["input_ids"]]

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        return torch.tensor(self.token_ids(text), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode(self, text: str | Sequence[str]) -> Any:
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text: Any) -> Any:
        return text


def _load_bert_tokenizer(source: Optional[str | os.PathLike]) -> Any:
    from transformers import BertTokenizerFast

    if source:
        path = Path(source)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise UserInputError(f"BERT vocabulary not found: {path} (set {BERT_VOCAB_ENV} or vocab_file to a "
                                 "bert-base-uncased vocab.txt or a directory holding one)")
        # Positional: transformers 5 ignores a `vocab_file=` keyword and gives a tokenizer without words.
        tokenizer, reason = BertTokenizerFast(str(path)), f"{path} has no words"
    else:
        try:
            tokenizer, reason = BertTokenizerFast.from_pretrained(DEFAULT_BERT_VERSION), "not in the cache (offline?)"
        except OSError as error:
            tokenizer, reason = None, first_line(error)
    if tokenizer is None or tokenizer.vocab_size <= len(tokenizer.all_special_ids):
        raise UserInputError(f"cannot load the {DEFAULT_BERT_VERSION} tokenizer ({reason}); download it once with "
                             f"network access, or set {BERT_VOCAB_ENV} to its vocab.txt")
    return tokenizer


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions, added unscaled like CompVis's copy of x-transformers 0.10 that the checkpoint
    was trained with (releases from 0.17.11 on scale them by dim ** -0.5; tests/test_bert_reference.py)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb.weight[None, : x.shape[1]]


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(dim_head)) v, no bias on q/k/v."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = DEFAULT_DIM_HEAD):
        super().__init__()
        self.heads = heads
        inner_dim = heads * dim_head
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear, `mult` times wider inside."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Residual(nn.Module):
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class Encoder(nn.Module):
    """`depth` pre-norm blocks of (self-attention, feed-forward), each with a residual connection."""

    def __init__(self, dim: int, depth: int, heads: int = 8, attn_dim_head: int = DEFAULT_DIM_HEAD,
                 ff_mult: int = 4):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for layer_type in self.layer_types:
            block = Attention(dim, heads=heads, dim_head=attn_dim_head) if layer_type == "a" else FeedForward(
                dim, mult=ff_mult)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block, residual in self.layers:
            x = residual(block(norm(x)), x)
        return x


class TransformerWrapper(nn.Module):
    """Token + absolute position embeddings -> `attn_layers` -> LayerNorm (-> logits)."""

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: Encoder, emb_dropout: float = 0.0):
        super().__init__()
        dim = attn_layers.dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_emb

    def forward(self, x: torch.Tensor, return_embeddings: bool = False,
                embedding_manager: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                ) -> torch.Tensor:
        """Hidden states [B, N, dim] with `return_embeddings`, else logits [B, N, num_tokens].

        `embedding_manager(ids, embeddings)` may replace token embeddings before positions are added
        (textual inversion)."""
        embedded = self.token_emb(x)
        if embedding_manager is not None:
            embedded = embedding_manager(x, embedded)
        h = self.emb_dropout(embedded + self.pos_emb(embedded).to(embedded.dtype))
        h = self.norm(self.attn_layers(h))
        return h if return_embeddings else self.to_logits(h)


def _weights_device(module: nn.Module) -> torch.device:
    return module.token_emb.weight.device


class TransformerEmbedder(nn.Module):
    """Token ids -> transformer hidden states (no tokenizer)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: Any = None):
        super().__init__()
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(_weights_device(self.transformer)), return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class BERTEmbedder(nn.Module):
    """Prompt -> BERT tokens -> transformer hidden states [B, 77, n_embed] (LDM text2img-large).

    `device` is accepted for config compatibility; tokens always follow the weights' device.
    `vocab_file` is passed to `BERTTokenizer`.
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: Any = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 vocab_file: Optional[str] = None):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if self.use_tknz_fn:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, vocab_file=vocab_file)
        self.max_length = max_seq_len
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    @property
    def device(self) -> torch.device:
        return _weights_device(self.transformer)

    @property
    def unk_token_id(self) -> int:
        """The id of [UNK], for words the vocabulary cannot encode."""
        return self.tknz_fn.unk_token_id

    def token_ids(self, text: str | Sequence[str]) -> list[list[int]]:
        """Padded token ids as lists (no tensor, no device)."""
        return self.tknz_fn.token_ids(text)

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length] on the weights' device."""
        return self.tknz_fn(text).to(self.device)

    def forward(self, text: Any, embedding_manager: Optional[Callable] = None) -> torch.Tensor:
        """Prompts, or token ids [B, N] already tokenized (long prompts: ldm.prompts), -> [B, N, n_embed]."""
        tokenized = isinstance(text, torch.Tensor) or not self.use_tknz_fn
        tokens = text.to(self.device) if tokenized else self.tokenize(text)
        return self.transformer(tokens, return_embeddings=True, embedding_manager=embedding_manager)

    def encode(self, text: Any, **kwargs: Any) -> torch.Tensor:
        return self(text, **kwargs)
