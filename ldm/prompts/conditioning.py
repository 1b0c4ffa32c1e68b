"""Prompts -> the UNet's conditioning, with prompts longer than the text encoder's window and (optionally) emphasis.

Each prompt is split into chunks of 75 token vectors (`chunking`), each chunk gets the encoder's start and end
tokens and padding and goes through the model's own `get_learned_conditioning` (textual-inversion placeholders
included), and the chunks' outputs are concatenated along the sequence: c [B, 77 k, width]. Every row of a batch,
and the negative prompts too, gets the batch's largest chunk count k, the missing chunks being the encoding of an
empty chunk (the empty prompt's), as the web UIs do. A prompt of one chunk gives exactly the original's
conditioning.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional, Sequence

import torch

from ldm.prompts.chunking import BREAK, COMMA_BACKTRACK, Chunk, Token, split_into_chunks, vectors
from ldm.prompts.parsing import parse_prompt, shortened
from ldm.prompts.encoders import ChunkFormat, chunk_format, content_vectors, placeholder_widths
from ldm.prompts.weighting import emphasize

logger = logging.getLogger(__name__)


def prompt_chunks(prompt: str, form: ChunkFormat, widths: dict[int, int], weighting: bool = False,
                  truncate: bool = False) -> list[Chunk]:
    """The chunks of one prompt; with `truncate` only the first, cut at the capacity (the rest dropped, with a
    warning), without the comma preference."""
    tokens: list[Optional[Token]] = []
    for segment in parse_prompt(prompt, weighting):
        if segment.is_break:
            tokens.append(BREAK)
            continue
        tokens += [Token(token, segment.weight, widths.get(token, 1))
                   for token in form.content_ids(segment.text)]
    chunks = split_into_chunks(tokens, form.capacity, form.comma_id,
                               comma_backtrack=0 if truncate else COMMA_BACKTRACK)
    if truncate and len(chunks) > 1:
        _warn_truncated(prompt, sum(vectors(chunk) for chunk in chunks[1:]), form.capacity)
        chunks = chunks[:1]
    return chunks


@functools.lru_cache(maxsize=None)
def _warn_truncated(prompt: str, dropped: int, capacity: int) -> None:
    logger.warning("--truncate_prompts: the prompt %s is cut at %d tokens; its last %d tokens are ignored",
                   shortened(prompt), capacity, dropped)


def encode_chunks(model: Any, form: ChunkFormat, batch: Sequence[Sequence[Chunk]], count: int) -> torch.Tensor:
    """The conditioning [B, length * count, width] of a batch of chunked prompts, each padded to `count` chunks
    with empty ones; chunk i of every prompt goes through `model.get_learned_conditioning` together."""
    outputs = []
    for index in range(count):
        chunks = [prompt[index] if index < len(prompt) else [] for prompt in batch]
        ids = torch.tensor([form.ids(chunk) for chunk in chunks], dtype=torch.long)
        z = model.get_learned_conditioning(ids)
        weights = torch.tensor([form.weights(chunk) for chunk in chunks], device=z.device)
        outputs.append(emphasize(z, weights))
    return torch.cat(outputs, dim=1)


def encode_prompt_pair(model: Any, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None,
                       weighting: bool = False, truncate: bool = False
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(c, uc): the conditioning of `prompts` and of `negative_prompts` (None when not given: no guidance), with
    the same number of chunks. `weighting` reads the emphasis syntax; `truncate` keeps one chunk per prompt, and
    without `weighting` is exactly the original (`get_learned_conditioning` on the text, cut at 77 tokens)."""
    prompts = list(prompts)
    negatives = None if negative_prompts is None else list(negative_prompts)
    if truncate and not weighting:
        return _truncated_pair(model, prompts, negatives)
    form, widths = chunk_format(model.cond_stage_model), placeholder_widths(model)
    batches = [[prompt_chunks(text, form, widths, weighting, truncate) for text in texts]
               for texts in (prompts, negatives) if texts is not None]
    count = max(len(chunks) for batch in batches for chunks in batch)
    c = encode_chunks(model, form, batches[0], count)
    uc = None if negatives is None else encode_chunks(model, form, batches[1], count)
    return c, uc


def _truncated_pair(model: Any, prompts: list[str], negatives: Optional[list[str]]
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    form, widths = chunk_format(model.cond_stage_model), placeholder_widths(model)
    for text in dict.fromkeys(prompts + (negatives or [])):
        dropped = content_vectors(form, widths, [text]) - form.capacity
        if dropped > 0:
            _warn_truncated(text, dropped, form.capacity)
    c = model.get_learned_conditioning(prompts)
    uc = None if negatives is None else model.get_learned_conditioning(negatives)
    return c, uc
