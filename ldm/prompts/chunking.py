"""Weighted tokens -> chunks of at most `capacity` (75) token vectors, as the web UIs split long prompts.

A chunk is full at `capacity` vectors; when the token that does not fit is not a comma and the chunk's last comma
lies within its last `comma_backtrack` (20) vectors, the tokens after that comma move to the next chunk, so that
the comma-separated phrase is not cut (AUTOMATIC1111's "comma padding backtrack"). A break ends the current chunk,
even an empty one. A textual-inversion placeholder that stands for several vectors (`Token.width`) is never split:
if it does not fit, it starts the next chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ldm.errors import UserInputError

CHUNK_CAPACITY = 75
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class Token:
    """One token id of a prompt, the weight of its output vectors and how many vectors it stands for."""

    id: int
    weight: float = 1.0
    width: int = 1


BREAK = None  # in a token sequence: the current chunk ends here
Chunk = list[Token]


class _ChunkBuilder:
    def __init__(self, capacity: int, comma_id: Optional[int], comma_backtrack: int):
        self.capacity, self.comma_id, self.comma_backtrack = capacity, comma_id, comma_backtrack
        self.chunks: list[Chunk] = []
        self.current: Chunk = []
        self.used = 0  # vectors in the current chunk
        self.after_comma: Optional[tuple[int, int]] = None  # (tokens, vectors) up to and including the last comma

    def end_chunk(self) -> None:
        self.chunks.append(self.current)
        self.current, self.used, self.after_comma = [], 0, None

    def add(self, token: Token) -> None:
        if token.width > self.capacity:
            raise UserInputError(f"a textual-inversion placeholder of {token.width} vectors does not fit in a "
                                 f"prompt chunk of {self.capacity}")
        if token.id == self.comma_id:
            self.after_comma = (len(self.current) + 1, self.used + token.width)
        elif self.used == self.capacity and self._comma_is_near():
            kept = self.after_comma[0]
            moved = self.current[kept:]
            self.current = self.current[:kept]
            self.end_chunk()
            self.current, self.used = moved, sum(t.width for t in moved)
        if self.used + token.width > self.capacity:
            self.end_chunk()
        self.current.append(token)
        self.used += token.width

    def _comma_is_near(self) -> bool:
        return (self.comma_backtrack > 0 and self.after_comma is not None
                and self.capacity - (self.after_comma[1] - 1) <= self.comma_backtrack)


def split_into_chunks(tokens: Sequence[Optional[Token]], capacity: int = CHUNK_CAPACITY,
                      comma_id: Optional[int] = None, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of `tokens` (`BREAK` entries end a chunk); at least one, empty for an empty prompt."""
    builder = _ChunkBuilder(capacity, comma_id, comma_backtrack)
    for token in tokens:
        if token is BREAK:
            builder.end_chunk()
        else:
            builder.add(token)
    if builder.current or not builder.chunks:
        builder.end_chunk()
    return builder.chunks


def vectors(chunk: Chunk) -> int:
    """How many token vectors `chunk` holds."""
    return sum(token.width for token in chunk)
