"""The CLIP byte-pair-encoding tokenizer (Radford et al. 2021), offline: `open_clip`'s `SimpleTokenizer` (the
BPE of OpenAI's CLIP repository, with the same merge table) under Stable Diffusion's padding.

Two things differ from using `open_clip` as it comes:
* its module is loaded from its file, without the `open_clip` package (whose import also loads timm and
  transformers' model code, seconds this tokenizer does not need);
* its start and end tokens are renamed back to OpenAI's `<|startoftext|>` / `<|endoftext|>`, which the
  original CLIP and transformers' `CLIPTokenizer` (the one Stable Diffusion used) read as the special
  tokens when a prompt contains them; open_clip calls them `<start_of_text>` / `<end_of_text>`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional, Sequence

import regex

from ldm.errors import UserInputError

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
_OPENAI_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def _open_clip_directory() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the CLIP tokenizer was not found: install open-clip-torch (pip install open-clip-torch)")
    return Path(list(spec.submodule_search_locations)[0])


def default_vocab_path() -> Path:
    """Where the CLIP merge table lies: $LDM_CLIP_BPE_PATH, else the copy inside the open_clip package."""
    override = os.environ.get("LDM_CLIP_BPE_PATH")
    return Path(override) if override else _open_clip_directory() / VOCAB_FILE_NAME


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip/tokenizer.py, loaded on its own (its imports: ftfy, regex, numpy, torch)."""
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", _open_clip_directory() / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a release whose tokenizer imports from its package: take the whole package
        module = importlib.import_module("open_clip.tokenizer")
    return module


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(path: Path) -> Any:
    """open_clip's SimpleTokenizer of the merge table at `path`, with OpenAI's names for the special tokens;
    read once per process and shared by every `CLIPTokenizer`."""
    module = _open_clip_tokenizer_module()
    try:
        tokenizer = module.SimpleTokenizer(str(path))
    except (OSError, EOFError, ValueError) as error:
        raise UserInputError(f"cannot read the CLIP vocabulary {path}: {error}") from error
    if tokenizer.vocab_size != VOCAB_SIZE:
        raise UserInputError(f"{path} is not CLIP's merge table: it gives {tokenizer.vocab_size} tokens, "
                             f"not {VOCAB_SIZE}")
    encoder = {token: index for token, index in tokenizer.encoder.items() if index < SOT_TOKEN_ID}
    tokenizer.encoder = {**encoder, START_OF_TEXT: SOT_TOKEN_ID, END_OF_TEXT: EOT_TOKEN_ID}
    tokenizer.cache = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
    tokenizer.pat = _OPENAI_PATTERN
    return tokenizer


class CLIPTokenizer:
    """Text -> CLIP token ids; `encode` pads with the end token to `max_length` like Stable Diffusion.

    The merge table is read on first use and shared by every tokenizer of the process, so building a
    model costs nothing here."""

    def __init__(self, vocab_path: Optional[str | os.PathLike] = None):
        self.path = Path(vocab_path) if vocab_path else default_vocab_path()
        if not self.path.is_file():
            raise UserInputError(f"cannot read the CLIP vocabulary {self.path}: no such file")
        self.sot_token_id = SOT_TOKEN_ID
        self.eot_token_id = EOT_TOKEN_ID
        self.vocab_size = VOCAB_SIZE

    @property
    def bpe(self) -> Any:
        """open_clip's SimpleTokenizer doing the work."""
        return _simple_tokenizer(self.path)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without start, end or padding tokens."""
        return self.bpe.encode(text)

    def encode(self, text: str, max_length: Optional[int] = 77, pad: bool = True) -> list[int]:
        """[start] + ids + [end], truncated to `max_length` (end kept last) and padded with the end token."""
        ids = [self.sot_token_id, *self.tokenize(text), self.eot_token_id]
        if max_length is None:
            return ids
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + [self.eot_token_id]
        if pad:
            ids += [self.eot_token_id] * (max_length - len(ids))
        return ids

    def __call__(self, texts: str | Iterable[str], max_length: int = 77) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        return [self.encode(text, max_length) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.bpe.decode([i for i in ids if i not in (self.sot_token_id, self.eot_token_id)]).strip()
