"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word", arXiv:2208.01618): pseudo-words
whose embedding vectors are learned while the whole text-to-image model stays frozen.

`EmbeddingManager` holds one or more vectors per placeholder string (e.g. "*") and is called by the
text encoder right after its token lookup: every occurrence of the placeholder's token is replaced
by its vectors (several vectors are inserted in place of one token, shifting the rest of the prompt).

Embedding files keep the original format, `{"string_to_token": {str: id}, "string_to_param": {str:
tensor [n, width]}}`, written with plain dictionaries so that weights-only loaders read them. Files of
the original code (a pickled `ParameterDict`), of the popular web UIs (`string_to_param` with "*",
`.pt` or `.safetensors`) and of diffusers (`{"<name>": tensor}`) load too.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ldm.errors import UserInputError, describe_pickle_refusal, first_line
from ldm.placeholder_tokens import per_img_token_list

logger = logging.getLogger(__name__)

DEFAULT_PLACEHOLDER_TOKEN = ["*"]
PROGRESSIVE_SCALE = 2000  # with progressive_words, one more vector is used every 2000 training calls
SAFETENSORS_VECTOR_KEY = "emb_params"  # the single tensor of web-UI .safetensors embeddings

PaddedIds = Callable[[Sequence[str]], list[list[int]]]


def content_token_ids(padded_ids: PaddedIds, text: str) -> list[int]:
    """Token ids of `text` without the start, end and padding tokens (those of the empty prompt)."""
    special = set(padded_ids([""])[0])
    return [token for token in padded_ids([text])[0] if token not in special]


def single_token(padded_ids: PaddedIds, string: str, unk_token_id: Optional[int] = None) -> int:
    """The one token `string` maps to; `UserInputError` if it maps to several or to none."""
    tokens = content_token_ids(padded_ids, string)
    if len(tokens) != 1 or tokens[0] == unk_token_id:
        problem = "unknown to the tokenizer" if tokens == [unk_token_id] else f"{len(tokens)} tokens, not one"
        raise UserInputError(f"placeholder {string!r} is {problem} for this text encoder; use a string that is a "
                             "single token, such as '*'")
    return tokens[0]


class EmbeddingManager(nn.Module):
    """Learned vectors for placeholder strings, spliced into the text encoder's token embeddings.

    `embedder` is the model's text encoder (`FrozenCLIPEmbedder` or `BERTEmbedder`): its tokenizer maps
    placeholders to tokens and its token embeddings give the starting vectors of `initializer_words`
    (placeholder i starts from word i; placeholders without one start from uniform noise). The embedder
    is not a submodule: its weights belong to the model. `per_image_tokens` adds one placeholder per
    training image (`per_img_token_list`); `progressive_words` starts with one vector and adds one every
    `PROGRESSIVE_SCALE` training calls up to `num_vectors_per_token`.
    """

    def __init__(self, embedder: nn.Module, placeholder_strings: Optional[Sequence[str]] = None,
                 initializer_words: Optional[Sequence[str]] = None, per_image_tokens: bool = False,
                 num_vectors_per_token: int = 1, progressive_words: bool = False, **kwargs: Any):
        super().__init__()
        if kwargs:
            logger.warning("EmbeddingManager ignores the unsupported options %s", sorted(kwargs))
        if num_vectors_per_token < 1:
            raise UserInputError(f"num_vectors_per_token must be at least 1, got {num_vectors_per_token}")
        if not hasattr(embedder, "token_ids"):
            raise UserInputError(f"{type(embedder).__name__} has no tokenizer; textual inversion needs a text encoder")
        object.__setattr__(self, "embedder", embedder)
        self.string_to_token_dict: dict[str, int] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()  # the initializer words' vectors; not optimised
        self.initializer_words: dict[str, str] = {}
        self.max_vectors_per_token = num_vectors_per_token
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        strings = list(placeholder_strings if placeholder_strings is not None else DEFAULT_PLACEHOLDER_TOKEN)
        if per_image_tokens:
            strings += per_img_token_list
        words = list(initializer_words or [])
        for index, string in enumerate(strings):
            if index < len(words):
                vectors = self._initial_vectors(words[index], num_vectors_per_token)
                self.initializer_words[string] = words[index]
            else:
                vectors = torch.rand(num_vectors_per_token, self.token_dim)
            self.add_placeholder(string, vectors)
            if string in self.initializer_words:
                self.initial_embeddings[string] = nn.Parameter(vectors.clone(), requires_grad=False)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embedder.transformer.get_input_embeddings()

    @property
    def token_dim(self) -> int:
        return self.token_embedding.embedding_dim

    def _padded_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.embedder.token_ids(list(texts))

    def token_for_string(self, string: str) -> int:
        return single_token(self._padded_ids, string, getattr(self.embedder, "unk_token_id", None))

    @torch.no_grad()
    def _initial_vectors(self, word: str, rows: int) -> torch.Tensor:
        """`rows` vectors from `word`'s token embeddings: token i for vector i when the counts agree, else
        their mean (a word of several tokens works, unlike in the original)."""
        tokens = content_token_ids(self._padded_ids, word)
        if not tokens or getattr(self.embedder, "unk_token_id", None) in tokens:
            raise UserInputError(f"the initializer word {word!r} cannot be encoded by this text encoder's "
                                 "tokenizer; use a common word such as 'sculpture'")
        weight = self.token_embedding.weight
        vectors = weight[torch.tensor(tokens, device=weight.device)].float()
        if hasattr(self.embedder.transformer, "text_model"):
            # CLIP: the original read these through the embedding layer, which adds position 0's embedding.
            vectors = vectors + self.embedder.transformer.text_model.embeddings.position_embedding.weight[0].float()
        if len(tokens) != rows:
            vectors = vectors.mean(0, keepdim=True).repeat(rows, 1)
        return vectors

    @torch.no_grad()
    def initialize_from_embedder(self) -> None:
        """Re-derive the vectors of placeholders with an initializer word from the embedder's current
        token embeddings (call after loading checkpoint weights into a model built without them)."""
        for string, word in self.initializer_words.items():
            if string not in self.string_to_param_dict:
                continue
            param = self.string_to_param_dict[string]
            vectors = self._initial_vectors(word, param.shape[0]).to(param)
            param.copy_(vectors)
            if string in self.initial_embeddings:
                self.initial_embeddings[string].copy_(vectors)

    def add_placeholder(self, string: str, vectors: torch.Tensor) -> None:
        """Make `string` (one token) stand for `vectors` [n, width]; replaces an existing entry."""
        if vectors.ndim != 2 or vectors.shape[1] != self.token_dim:
            raise UserInputError(f"embedding for {string!r} has shape {tuple(vectors.shape)}, but this text encoder "
                                 f"needs vectors of width {self.token_dim} (the file was made for another model)")
        token = self.token_for_string(string)
        param = nn.Parameter(vectors.detach().float().clone().to(self.token_embedding.weight.device))
        try:
            self.string_to_param_dict[string] = param
        except KeyError as error:
            raise UserInputError(f"{string!r} cannot name a placeholder (it contains '.' or is a reserved name); "
                                 "use another single-token string") from error
        self.string_to_token_dict[string] = token

    def _vectors(self, string: str) -> torch.Tensor:
        vectors = self.string_to_param_dict[string]
        if self.progressive_words:
            vectors = vectors[: 1 + self.progressive_counter // PROGRESSIVE_SCALE]
        return vectors

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, N, width] with each placeholder token replaced by its vectors (truncated to N)."""
        if self.training and self.progressive_words:
            self.progressive_counter += 1
        by_token = {token: self._vectors(string).to(embedded_text)
                    for string, token in self.string_to_token_dict.items()}
        if all(vectors.shape[0] == 1 for vectors in by_token.values()):
            for token, vectors in by_token.items():
                embedded_text = torch.where((tokenized_text == token)[..., None], vectors[0], embedded_text)
            return embedded_text
        rows = [_splice(ids.tolist(), row, by_token) for ids, row in zip(tokenized_text, embedded_text)]
        return torch.stack(rows)

    def embedding_parameters(self) -> Any:
        """The learned vectors: the only parameters the frozen configs optimise."""
        return self.string_to_param_dict.parameters()

    def embedding_to_coarse_loss(self) -> torch.Tensor:
        """Squared distance of each learned vector set to its initializer word's (the optional
        regulariser `embedding_reg_weight`), as the original: sum of (v - v0)(v - v0)^T / #placeholders."""
        loss = torch.zeros((), device=self.token_embedding.weight.device)
        for string, coarse in self.initial_embeddings.items():
            optimized = self.string_to_param_dict[string] if string in self.string_to_param_dict else None
            if optimized is None or optimized.shape != coarse.shape:
                continue
            difference = optimized - coarse.to(optimized)
            loss = loss + difference @ difference.T / len(self.initial_embeddings)
        return loss

    def save(self, ckpt_path: str | os.PathLike) -> None:
        """Write the original file format (plain dicts of tensors), atomically."""
        data = {"string_to_token": {s: torch.tensor(t) for s, t in self.string_to_token_dict.items()},
                "string_to_param": {s: p.detach().cpu().clone() for s, p in self.string_to_param_dict.items()}}
        save_embedding_file(data, ckpt_path)

    def load(self, ckpt_path: str | os.PathLike) -> None:
        """Replace every placeholder by those of an embedding file (the original's `load`)."""
        vectors = read_embedding_file(ckpt_path)
        self.string_to_token_dict = {}
        self.string_to_param_dict = nn.ParameterDict()
        for string, value in vectors.items():
            self.add_placeholder(string, value)


def _splice(ids: list[int], row: torch.Tensor, by_token: dict[int, torch.Tensor]) -> torch.Tensor:
    """One prompt's embeddings with every placeholder position replaced by all of its vectors."""
    pieces, start = [], 0
    for column, token in enumerate(ids):
        if token in by_token:
            pieces += [row[start:column], by_token[token]]
            start = column + 1
    if not pieces:
        return row
    pieces.append(row[start:])
    return torch.cat(pieces)[: row.shape[0]]


def save_embedding_file(data: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    torch.save(data, temporary)
    os.replace(temporary, path)


def _load_embedding_data(path: Path) -> Any:
    with open(path, "rb") as handle:
        head = handle.read(9)
    try:
        if len(head) == 9 and head[8:9] == b"{":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # The original saved a pickled ParameterDict; allow that class, refuse anything that runs code.
        with torch.serialization.safe_globals([nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        refused = describe_pickle_refusal(error)
        if refused is not None:
            raise UserInputError(f"refused to load embedding file {path}: {refused}. Embeddings are loaded as "
                                 "weights only, never as code: use a file from a trusted source, or one saved as "
                                 ".safetensors") from error
        raise UserInputError(f"cannot read embedding file {path}: it is corrupt or not an embedding file "
                             f"({first_line(error)})") from error


def _vectors_by_string(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        raise UserInputError(f"{path} is not an embedding file (it holds no placeholder vectors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        return dict(getattr(params, "_parameters", params))
    if "state_dict" in data:
        raise UserInputError(f"{path} is a model checkpoint, not an embedding file; give embeddings.pt from a "
                             "textual-inversion run")
    prefixed = {k[len("string_to_param."):]: v for k, v in data.items() if k.startswith("string_to_param.")}
    if prefixed:
        return prefixed
    if set(data) == {SAFETENSORS_VECTOR_KEY}:
        return {DEFAULT_PLACEHOLDER_TOKEN[0]: data[SAFETENSORS_VECTOR_KEY]}
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}  # diffusers: {"<name>": vectors}


def read_embedding_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Placeholder string -> vectors [n, width] of an embedding file in any supported format."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"embedding file not found: {path}")
    vectors = _vectors_by_string(_load_embedding_data(path), path)
    result = {}
    for string, value in vectors.items():
        if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
            raise UserInputError(f"{path}: the entry for {string!r} is not a vector or a matrix of vectors")
        result[str(string)] = value.detach().float().reshape(-1, value.shape[-1])
    if not result:
        raise UserInputError(f"{path} is not an embedding file (it holds no placeholder vectors)")
    return result


def attach_embeddings(model: nn.Module, paths: Sequence[str | os.PathLike]) -> list[str]:
    """Load embedding files into `model`'s embedding manager (created if the model has none, e.g. a model
    of v1-inference.yaml); returns the placeholder strings the prompts may now use."""
    embedder = getattr(model, "cond_stage_model", None)
    if embedder is None:
        raise UserInputError("this model has no text encoder, so it cannot use textual-inversion embeddings")
    manager = getattr(model, "embedding_manager", None)
    if manager is None:
        manager = EmbeddingManager(embedder, placeholder_strings=[])
        model.embedding_manager = manager
    sources: dict[str, str] = {}
    for path in paths:
        for string, vectors in read_embedding_file(path).items():
            if string in sources:
                raise UserInputError(f"placeholder {string!r} is in both {sources[string]} and {path}; merge them "
                                     "with scripts/merge_embeddings.py --rename NEW")
            manager.add_placeholder(string, vectors)
            sources[string] = str(path)
    return list(sources)
