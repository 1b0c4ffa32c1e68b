"""The LDM text encoder's numbers against the original `x-transformers` code the text2img-large
checkpoint was trained with: offline from a saved fixture (tests/data/make_bert_reference.py,
x-transformers 0.10.2), and live when a compatible x-transformers is installed."""
from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.modules.encoders.modules import BERTEmbedder, TransformerEmbedder
from tests.model_factory import DATA_DIR

FIXTURE = DATA_DIR / "bert-x-transformers-reference.safetensors"
PREFIX = "state_dict."


def load_fixture() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    tensors = load_file(FIXTURE)
    state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return state, tensors["input_ids"], tensors["expected"]


def test_fixture_provenance():
    with safe_open(FIXTURE, "pt") as f:
        assert f.metadata()["x_transformers"] == "0.10.2"


def test_matches_the_saved_x_transformers_output():
    state, ids, expected = load_fixture()
    vocab, dim = state["token_emb.weight"].shape
    depth = len({k.split(".")[2] for k in state if k.startswith("attn_layers.layers.")}) // 2
    embedder = TransformerEmbedder(n_embed=dim, n_layer=depth, vocab_size=vocab).eval()
    embedder.transformer.load_state_dict(state, strict=True)
    bert = BERTEmbedder(n_embed=dim, n_layer=depth, vocab_size=vocab, use_tokenizer=False,
                        embedding_dropout=0.1).eval()
    bert.transformer.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(embedder(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bert(ids), expected, atol=1e-5, rtol=1e-5)


def _compatible(release: str) -> bool:
    """0.8.4 - 0.17.10 have the checkpoint's layout and unscaled absolute positions."""
    parts = tuple(int(p) for p in release.split(".")[:3])
    return (0, 8, 4) <= parts <= (0, 17, 10)


def test_matches_live_x_transformers():
    x_transformers = pytest.importorskip("x_transformers")
    release = version("x-transformers")
    if not _compatible(release):
        pytest.skip(f"x-transformers {release} differs from the LDM text encoder (0.8.4 - 0.17.10 match)")
    torch.manual_seed(1)
    original = x_transformers.TransformerWrapper(num_tokens=100, max_seq_len=77,
                                                 attn_layers=x_transformers.Encoder(dim=64, depth=3)).eval()
    with torch.no_grad():
        for param in original.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ours = TransformerEmbedder(n_embed=64, n_layer=3, vocab_size=100).eval()
    ours.transformer.load_state_dict(original.state_dict(), strict=True)
    ids = torch.randint(0, 100, (4, 77))
    ids[1, 12:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), original(ids, return_embeddings=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids[:, :9]), original(ids[:, :9], return_embeddings=True),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.transformer(ids), original(ids), atol=1e-5, rtol=1e-5)
