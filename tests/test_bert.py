"""The LDM text2img-large text encoder (BERTEmbedder): the released checkpoint's keys and shapes, the
BERT tokenizer offline from a local vocabulary with clear errors, and textual inversion on it."""
from __future__ import annotations

import json

import pytest
import torch

from ldm.data.personalized import per_img_token_list
from ldm.errors import UserInputError
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer
from tests.model_factory import DATA_DIR

WORDS = ["a", "photo", "of", "the", "*", "sculpture", "teddy", "bear", "##s", "cat", *per_img_token_list]


@pytest.fixture()
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def test_keys_and_shapes_match_the_released_checkpoint():
    expected = json.loads((DATA_DIR / "ldm-text2img-large-state-dict.json").read_text())["tensors"]
    expected = {k[len("cond_stage_model."):]: v for k, v in expected.items() if k.startswith("cond_stage_model.")}
    with torch.device("meta"):
        model = BERTEmbedder(n_embed=1280, n_layer=32)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_tokenizer_from_a_local_vocabulary(vocab, monkeypatch):
    tokenizer = BERTTokenizer(vq_interface=False, max_length=8, vocab_file=str(vocab))
    assert tokenizer(["a photo of teddy bears"]).tolist() == [[2, 5, 6, 7, 11, 12, 13, 3]]
    assert tokenizer("cat").tolist() == [[2, 14, 3, 0, 0, 0, 0, 0]]
    monkeypatch.setenv("LDM_BERT_VOCAB", str(vocab.parent))
    assert BERTTokenizer(max_length=4).encode("cat")[2][2].tolist() == [[2, 14, 3, 0]]


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="not found"):
        BERTTokenizer(vocab_file=str(tmp_path / "missing.txt")).token_ids("a")
    empty = tmp_path / "vocab.txt"
    empty.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(UserInputError, match="cannot load the bert-base-uncased tokenizer"):
        BERTTokenizer(vocab_file=str(empty)).token_ids("a")
    monkeypatch.delenv("LDM_BERT_VOCAB", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserInputError, match="LDM_BERT_VOCAB"):
        BERTTokenizer().token_ids("a")


def tiny_bert(vocab) -> BERTEmbedder:
    torch.manual_seed(0)
    return BERTEmbedder(n_embed=16, n_layer=2, vocab_size=len(WORDS) + 5, vocab_file=str(vocab)).eval()


def test_forward_shape_and_padding_is_attended(vocab):
    model = tiny_bert(vocab)
    with torch.no_grad():
        out = model(["a photo of a cat", "cat"])
    assert out.shape == (2, 77, 16)
    assert not torch.allclose(out[0, -1], out[1, -1])  # padding positions see the prompt


def test_textual_inversion_on_bert(vocab):
    model = tiny_bert(vocab)
    manager = EmbeddingManager(model, placeholder_strings=["*"], initializer_words=["sculpture"],
                               per_image_tokens=True)
    assert list(manager.string_to_token_dict) == ["*", *per_img_token_list]
    torch.testing.assert_close(manager.string_to_param_dict["*"][0], model.transformer.token_emb.weight[10])
    with torch.no_grad():
        torch.testing.assert_close(model(["a photo of *"], embedding_manager=manager), model(["a photo of sculpture"]))
    with pytest.raises(UserInputError, match="cannot be encoded"):
        EmbeddingManager(model, placeholder_strings=["*"], initializer_words=["zebra"])
    with pytest.raises(UserInputError, match="unknown to the tokenizer"):
        EmbeddingManager(model, placeholder_strings=["zebra"])
    with pytest.raises(UserInputError, match="2 tokens, not one"):
        EmbeddingManager(model, placeholder_strings=["teddy bear"])
