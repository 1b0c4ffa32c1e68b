"""EmbeddingManager (textual inversion, Gal et al. 2022) on the tiny CLIP model: placeholder splicing,
several vectors per token, initializer words, progressive words, the regulariser, file formats and
attach_embeddings' errors."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoint import load_state_dict_into, no_weight_init
from ldm.errors import UserInputError
from ldm.modules.embedding_manager import (PROGRESSIVE_SCALE, EmbeddingManager, attach_embeddings,
                                           read_embedding_file)
from ldm.util import instantiate_from_config
from tests.cli_support import load_script
from tests.model_factory import random_tiny_model, tiny_config
from tests.pickles import RunsCode

WIDTH = 32  # the tiny CLIP's width


def personalized_config(**params):
    config = tiny_config()
    config.model.params.cond_stage_trainable = True  # prompts are encoded in the step, as in v1-finetune.yaml
    config.model.params.personalization_config = {
        "target": "ldm.modules.embedding_manager.EmbeddingManager",
        "params": {"placeholder_strings": ["*"], "initializer_words": ["sculpture"], **params}}
    return config


def personalized_model(**params):
    """The tiny model with random weights; its placeholder vectors derived from them afterwards."""
    model = random_tiny_model(config=personalized_config(**params))
    model.embedding_manager.initialize_from_embedder()
    return model


@pytest.fixture(scope="module")
def model():
    return personalized_model()


def token_vectors(embedder, word: str) -> torch.Tensor:
    ids = embedder.tokenize([word])[0, 1:-1]
    ids = ids[ids != embedder.tokenize([""])[0, -1]]
    return embedder.transformer.get_input_embeddings().weight[ids].detach()


def position_zero(embedder) -> torch.Tensor:
    return embedder.transformer.text_model.embeddings.position_embedding.weight[0].detach()


def test_only_the_placeholder_vectors_learn(model):
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable == ["embedding_manager.string_to_param_dict.*"]
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    assert [p for group in optimizer.param_groups for p in group["params"]] == list(
        model.embedding_manager.embedding_parameters())
    assert not model.model.training and not model.cond_stage_model.training
    model.train()
    assert not model.model.training, "the frozen UNet stays in eval mode"
    model.eval()


def test_initializer_word_as_the_original(model):
    embedder, manager = model.cond_stage_model, model.embedding_manager
    expected = token_vectors(embedder, "sculpture") + position_zero(embedder)  # read through the embedding layer
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), expected)
    torch.testing.assert_close(manager.initial_embeddings["*"].detach(), expected)


def test_placeholder_stands_for_its_vector():
    model = personalized_model()
    embedder, manager = model.cond_stage_model, model.embedding_manager
    manager.add_placeholder("*", token_vectors(embedder, "sculpture"))
    with torch.no_grad():
        learned = model.get_learned_conditioning(["a photo of *", "a plain prompt"])
        reference = embedder(["a photo of sculpture", "a plain prompt"])
    torch.testing.assert_close(learned, reference)


def test_several_vectors_are_inserted_in_place_of_one_token():
    model = personalized_model(num_vectors_per_token=2, initializer_words=["teddy bear"])
    embedder, manager = model.cond_stage_model, model.embedding_manager
    words = token_vectors(embedder, "teddy bear")
    assert words.shape == (2, WIDTH)
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), words + position_zero(embedder))
    manager.add_placeholder("*", words)
    with torch.no_grad():
        learned = model.get_learned_conditioning(["a * in a photo of *", "no placeholder"])
        reference = embedder(["a teddy bear in a photo of teddy bear", "no placeholder"])
    torch.testing.assert_close(learned, reference)


def test_a_long_insertion_is_truncated_to_the_context_length(model):
    embedder = model.cond_stage_model
    manager = EmbeddingManager(embedder, placeholder_strings=["*"], num_vectors_per_token=3)
    with torch.no_grad():
        out = embedder([" ".join(["*"] * 40)], embedding_manager=manager)
    assert out.shape == (1, 77, WIDTH)


def test_multi_token_initializer_word_with_one_vector_takes_the_mean(model):
    embedder = model.cond_stage_model
    manager = EmbeddingManager(embedder, placeholder_strings=["*"], initializer_words=["teddy bear"])
    expected = token_vectors(embedder, "teddy bear").mean(0, keepdim=True) + position_zero(embedder)
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), expected)


def test_placeholders_without_initializer_start_from_uniform_noise(model):
    manager = EmbeddingManager(model.cond_stage_model, placeholder_strings=["*", "@"], initializer_words=["cat"])
    noise = manager.string_to_param_dict["@"]
    assert noise.shape == (1, WIDTH) and 0 <= noise.min() and noise.max() < 1
    assert list(manager.initial_embeddings) == ["*"]


def test_progressive_words_add_a_vector_every_scale_steps(model):
    embedder = model.cond_stage_model
    manager = EmbeddingManager(embedder, placeholder_strings=["*"], initializer_words=["cat"],
                               num_vectors_per_token=3, progressive_words=True).train()
    ids = embedder.tokenize(["a * b"])
    base = embedder.transformer.get_input_embeddings()(ids).detach()
    assert manager._vectors("*").shape[0] == 1
    manager(ids, base)
    assert manager.progressive_counter == 1
    manager.progressive_counter = PROGRESSIVE_SCALE
    assert manager._vectors("*").shape[0] == 2
    manager.progressive_counter = 10 * PROGRESSIVE_SCALE
    assert manager._vectors("*").shape[0] == 3
    manager.eval()(ids, base)
    assert manager.progressive_counter == 10 * PROGRESSIVE_SCALE, "only training calls count"


def test_embedding_regulariser_and_loss_term():
    model = personalized_model()
    model.embedding_reg_weight = 0.5
    manager = model.embedding_manager
    assert manager.embedding_to_coarse_loss().item() == 0
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(0.1)
    torch.testing.assert_close(manager.embedding_to_coarse_loss(), torch.tensor([[0.01 * WIDTH]]))
    x = torch.randn(1, 4, 8, 8)
    c = model.get_learned_conditioning(["a photo of *"])
    loss, logged = model.p_losses(x, c, torch.tensor([10]))
    assert "val/loss_emb_reg" in logged
    torch.testing.assert_close(loss, logged["val/loss_simple"] + 0.5 * logged["val/loss_emb_reg"])


def test_gradients_reach_only_the_embedding():
    model = personalized_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("embedding_manager")}
    model.learning_rate = 0.1
    optimizer = model.configure_optimizers()
    model.train()
    loss, _ = model(torch.randn(2, 4, 8, 8), ["a photo of *", "a rendering of *"])
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.embedding_manager.string_to_param_dict["*"], model.embedding_manager.initial_embeddings["*"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_initialize_from_embedder_after_loading_weights(tmp_path):
    trained = personalized_model()
    with no_weight_init():
        model = instantiate_from_config(personalized_config().model)
    released = {k: v for k, v in trained.state_dict().items() if not k.startswith("embedding_manager.")}
    load_state_dict_into(model, released, assign=True)
    model.embedding_manager.initialize_from_embedder()
    torch.testing.assert_close(model.embedding_manager.string_to_param_dict["*"],
                               trained.embedding_manager.string_to_param_dict["*"])
    torch.testing.assert_close(model.embedding_manager.initial_embeddings["*"],
                               trained.embedding_manager.initial_embeddings["*"])


def test_save_load_round_trip_gives_the_same_conditioning(model, tmp_path):
    manager = model.embedding_manager
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(torch.randn(1, WIDTH))
    manager.save(tmp_path / "embeddings.pt")
    data = torch.load(tmp_path / "embeddings.pt", weights_only=True)
    assert data["string_to_token"] == {"*": torch.tensor(265)} and data["string_to_param"]["*"].shape == (1, WIDTH)
    fresh = random_tiny_model(config=tiny_config())
    assert attach_embeddings(fresh, [str(tmp_path / "embeddings.pt")]) == ["*"]
    fresh.cond_stage_model.load_state_dict(model.cond_stage_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.get_learned_conditioning(["a photo of *"]),
                                   model.get_learned_conditioning(["a photo of *"]))
    other = EmbeddingManager(model.cond_stage_model, placeholder_strings=["@"])
    other.load(tmp_path / "embeddings.pt")
    assert list(other.string_to_token_dict) == ["*"]
    torch.testing.assert_close(other.string_to_param_dict["*"], manager.string_to_param_dict["*"])


@pytest.mark.parametrize("layout", ["original", "webui-pt", "webui-safetensors", "flat-safetensors", "diffusers"])
def test_embedding_file_formats(tmp_path, layout):
    vectors = torch.randn(2, WIDTH)
    path = tmp_path / ("e.safetensors" if "safetensors" in layout else "e.pt")
    if layout == "original":  # what the original code wrote: a pickled ParameterDict of Parameters
        params = nn.ParameterDict({"*": nn.Parameter(vectors.clone())})
        torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    elif layout == "webui-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "concept",
                    "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "sd-v1-4"}, path)
    elif layout == "webui-safetensors":
        save_file({"emb_params": vectors}, str(path))
    elif layout == "flat-safetensors":
        save_file({"string_to_param.*": vectors}, str(path))
    else:
        torch.save({"*": vectors}, path)
    loaded = read_embedding_file(path)
    assert list(loaded) == ["*"]
    torch.testing.assert_close(loaded["*"], vectors)


def test_attach_several_files_and_conflicts(tmp_path):
    model = random_tiny_model(config=tiny_config())
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}}, tmp_path / "a.pt")
    torch.save({"string_to_param": {"@": torch.randn(3, WIDTH)}}, tmp_path / "b.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}}, tmp_path / "c.pt")
    with torch.no_grad():
        plain = model.get_learned_conditioning(["a photo of * and @", "no placeholder here"])
        assert attach_embeddings(model, [tmp_path / "a.pt", tmp_path / "b.pt"]) == ["*", "@"]
        learned = model.get_learned_conditioning(["a photo of * and @", "no placeholder here"])
    assert not torch.allclose(learned[0], plain[0])
    torch.testing.assert_close(learned[1], plain[1])
    with pytest.raises(UserInputError, match="merge_embeddings"):
        attach_embeddings(model, [tmp_path / "a.pt", tmp_path / "c.pt"])


def bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}}, path)
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "garbage":
        path.write_bytes(b"not an embedding at all")
    elif kind == "wide":
        torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, path)
    elif kind == "multi-token":
        torch.save({"string_to_param": {"two words": torch.randn(1, WIDTH)}}, path)
    elif kind == "checkpoint":
        torch.save({"state_dict": {"model.x": torch.zeros(1)}}, path)
    elif kind == "code":
        torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}, "x": copy.copy}, path)
    return path


@pytest.mark.parametrize("kind, message", [("corrupt", "cannot read"), ("garbage", "cannot read"),
                                           ("wide", "width 32"), ("multi-token", "not one"),
                                           ("checkpoint", "model checkpoint"), ("code", "asks to call copy.copy"),
                                           ("missing", "not found")])
def test_attach_bad_files(tmp_path, kind, message):
    model = random_tiny_model(config=tiny_config())
    with pytest.raises(UserInputError, match=message) as error:
        attach_embeddings(model, [bad_file(tmp_path, kind)])
    assert "\n" not in str(error.value)


class _UnknownClass:
    """A class no embedding loader knows: pickled by reference as tests.test_embedding_manager._UnknownClass."""


@pytest.mark.parametrize("payload, callable_name", [
    (RunsCode, os.system.__module__ + ".system"), (lambda marker: _UnknownClass(), __name__ + "._UnknownClass")])
def test_embedding_that_asks_for_code_is_refused_in_words(tmp_path, payload, callable_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}, "payload": payload(marker)}, path)
    with pytest.raises(UserInputError) as error:
        read_embedding_file(path)
    message = str(error.value)
    assert not marker.exists()
    assert message.startswith(f"refused to load embedding file {path}: it asks to call {callable_name}.")
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize("params, message", [({"placeholder_strings": ["two words"]}, "not one"),
                                             ({"placeholder_strings": ["."]}, "cannot name"),
                                             ({"initializer_words": ["   "]}, "cannot be encoded")])
def test_bad_placeholders_and_initializer_words(model, params, message):
    with pytest.raises(UserInputError, match=message):
        EmbeddingManager(model.cond_stage_model, **{"placeholder_strings": ["*"], **params})


def merge_script():
    return load_script("merge_embeddings.py").main


@pytest.mark.parametrize("rename, placeholders", [([], None), (["&"], ["*", "@", "&"]), (["two words"], None),
                                                  (["&", "%"], None)])
def test_merge_embeddings(tmp_path, capsys, rename, placeholders):
    vectors = {name: torch.randn(n, WIDTH) for name, n in (("a", 1), ("b", 2), ("c", 1))}
    torch.save({"string_to_param": {"*": vectors["a"]}}, tmp_path / "a.pt")
    torch.save({"string_to_param": {"@": vectors["b"]}}, tmp_path / "b.pt")
    torch.save({"string_to_param": {"*": vectors["c"]}}, tmp_path / "c.pt")
    args = ["--manager_ckpts", *(str(tmp_path / f"{n}.pt") for n in "abc"), "--output_path",
            str(tmp_path / "merged.pt"), "-sd"]
    code = merge_script()(args + (["--rename", *rename] if rename else []))
    if placeholders is None:
        assert code == 2 and not (tmp_path / "merged.pt").exists()
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("merge_embeddings.py: error:")
        return
    assert code == 0
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert list(merged["string_to_param"]) == placeholders
    assert int(merged["string_to_token"]["*"]) == 265
    torch.testing.assert_close(merged["string_to_param"]["&"], vectors["c"])
    model = random_tiny_model(config=tiny_config())
    assert attach_embeddings(model, [str(tmp_path / "merged.pt")]) == placeholders


def test_merge_without_conflicts(tmp_path):
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}}, tmp_path / "a.pt")
    torch.save({"string_to_param": {"@": torch.randn(1, WIDTH)}}, tmp_path / "b.pt")
    assert merge_script()(["--manager_ckpts", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--output_path",
                           str(tmp_path / "m.pt"), "-sd"]) == 0
    assert list(read_embedding_file(tmp_path / "m.pt")) == ["*", "@"]
