"""What chunking needs from a model's text encoder and its tokenizer: the ids of a piece of text without special
tokens, the start, end and padding ids and the sequence length (read from the tokenizer's own padded output of
the empty prompt, so they are the encoder's conventions: CLIP's start/end padded with end, BERT's [CLS]/[SEP]
padded with [PAD]), the comma, and how many vectors each textual-inversion placeholder stands for."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ldm.errors import UserInputError
from ldm.modules.encoders.bert import BERTEmbedder
from ldm.prompts.chunking import Chunk


@dataclass(frozen=True)
class ChunkFormat:
    """How a chunk of tokens becomes the encoder's input: start, tokens, end, padding to `length` ids."""

    content_ids: Callable[[str], list[int]]
    start_id: int
    end_id: int
    pad_id: int
    length: int
    comma_id: Optional[int]

    @property
    def capacity(self) -> int:
        """Token vectors per chunk (75 for both SD v1's CLIP and the LDM BERT encoder)."""
        return self.length - 2

    def ids(self, chunk: Chunk) -> list[int]:
        """The encoder's input for `chunk`. A placeholder of n vectors is one id here: the embedding manager puts in
        its n vectors and cuts the row back to `length`, which drops n - 1 padding ids at the end."""
        ids = [self.start_id, *(token.id for token in chunk), self.end_id]
        return ids + [self.pad_id] * (self.length - len(ids))

    def weights(self, chunk: Chunk) -> list[float]:
        """The weight of each of the encoder's `length` output vectors for `chunk` (1 for start, end and padding)."""
        weights = [1.0, *(token.weight for token in chunk for _ in range(token.width))]
        return weights + [1.0] * (self.length - len(weights))


def chunk_format(embedder: Any) -> ChunkFormat:
    """The chunk format of a model's text encoder (`cond_stage_model`): FrozenCLIPEmbedder or BERTEmbedder."""
    if isinstance(embedder, BERTEmbedder) and embedder.use_tknz_fn:
        bert = embedder.tknz_fn.tokenizer

        def content_ids(text: str) -> list[int]:
            return list(bert(text, add_special_tokens=False)["input_ids"])

        comma_id = bert.get_vocab().get(",")
    elif hasattr(getattr(embedder, "tokenizer", None), "tokenize") and hasattr(embedder, "token_ids"):
        content_ids = embedder.tokenizer.tokenize
        commas = content_ids(",")
        comma_id = commas[0] if len(commas) == 1 else None
    else:
        raise UserInputError(f"chunked and weighted prompts need a text encoder with a tokenizer; "
                             f"{type(embedder).__name__} has none")
    empty = embedder.token_ids([""])[0]
    return ChunkFormat(content_ids=content_ids, start_id=empty[0], end_id=empty[1], pad_id=empty[2],
                       length=len(empty), comma_id=comma_id)


def placeholder_widths(model: Any) -> dict[int, int]:
    """Token id -> vectors, for the textual-inversion placeholders of `model`'s embedding manager (none without)."""
    manager = getattr(model, "embedding_manager", None)
    if manager is None:
        return {}
    return {token: len(manager.string_to_param_dict[string])
            for string, token in manager.string_to_token_dict.items()}


def content_vectors(form: ChunkFormat, widths: dict[int, int], texts: Sequence[str]) -> int:
    """How many token vectors `texts` make together (placeholders count their vectors)."""
    return sum(widths.get(token, 1) for text in texts for token in form.content_ids(text))
