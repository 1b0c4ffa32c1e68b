"""The CLIP byte-pair-encoding tokenizer (Radford et al. 2021), offline.

The BPE merge table is the one OpenAI published with CLIP; it is read from the copy
that `open_clip` ships (`bpe_simple_vocab_16e6.txt.gz`) without importing that package,
so tokenizing needs neither the network nor a hub cache.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import ftfy
import regex

from ldm.errors import UserInputError

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def default_vocab_path() -> Path:
    """Where the CLIP merge table lies: $LDM_CLIP_BPE_PATH, else the copy inside the open_clip package."""
    override = os.environ.get("LDM_CLIP_BPE_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the CLIP vocabulary was not found: install open-clip-torch (pip install open-clip-torch) "
                             "or set LDM_CLIP_BPE_PATH to bpe_simple_vocab_16e6.txt.gz")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE_NAME


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters (GPT-2 BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescape, collapse whitespace, lower-case: CLIP's text normalisation."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class _BPETables:
    """The vocabulary and merge ranks read from a merge table (49152 tokens: 256 bytes, 256 word-final bytes,
    48894 merges, start and end)."""

    def __init__(self, path: Path):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                lines = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
        except OSError as error:
            raise UserInputError(f"cannot read the CLIP vocabulary {path}: {error}") from error
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + [line.replace(" ", "") for line in lines]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        if len(vocab) != VOCAB_SIZE:
            raise UserInputError(f"{path} is not CLIP's merge table: it gives {len(vocab)} tokens, not {VOCAB_SIZE}")
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(lines)}  # keyed "first second"


@lru_cache(maxsize=4)
def _read_tables(path: Path) -> _BPETables:
    return _BPETables(path)


class CLIPTokenizer:
    """Text -> CLIP token ids; `encode` pads with the end token to `max_length` like Stable Diffusion.

    The merge table is read on first use and shared by every tokenizer of the process, so building a
    model costs nothing here."""

    def __init__(self, vocab_path: Optional[str | os.PathLike] = None):
        self.path = Path(vocab_path) if vocab_path else default_vocab_path()
        if not self.path.is_file():
            raise UserInputError(f"cannot read the CLIP vocabulary {self.path}: no such file")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.cache = {START_OF_TEXT: START_OF_TEXT, END_OF_TEXT: END_OF_TEXT}
        self.sot_token_id = SOT_TOKEN_ID
        self.eot_token_id = EOT_TOKEN_ID
        self.vocab_size = VOCAB_SIZE

    @functools.cached_property
    def _tables(self) -> _BPETables:
        return _read_tables(self.path)

    @property
    def encoder(self) -> dict[str, int]:
        return self._tables.encoder

    @property
    def bpe_ranks(self) -> dict[str, int]:
        return self._tables.bpe_ranks

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        return {index: token for token, index in self.encoder.items()}

    def bpe(self, token: str) -> str:
        """Merge the characters of one word by BPE ranks; returns space-separated sub-words."""
        if token in self.cache:
            return self.cache[token]
        ranks = self.bpe_ranks
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {f"{word[i]} {word[i + 1]}" for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best.split(" ")
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without start, end or padding tokens."""
        ids: list[int] = []
        for piece in _TOKEN_PATTERN.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sub] for sub in self.bpe(piece).split(" "))
        return ids

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
        text = "".join(self.decoder[i] for i in ids if i not in (self.sot_token_id, self.eot_token_id))
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()
