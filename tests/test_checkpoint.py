"""Checkpoint loading: formats, key layouts, EMA, safety and clear errors."""
import os
import pickle
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

import ldm.checkpoint
from ldm.checkpoint import load_model_from_config, no_weight_init, read_checkpoint
from ldm.errors import CheckpointError, describe_pickle_refusal
from ldm.util import instantiate_from_config
from tests.model_factory import random_tiny_model, tiny_config
from tests.pickles import RunsCode

TEXT = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def reference_model():
    return random_tiny_model(seed=11)


@pytest.fixture(scope="module")
def original_state(reference_model):
    """The state dict as the original code saved it: text keys under `text_model.`, plus position_ids."""
    state = {k: v.clone() for k, v in reference_model.state_dict().items()}
    assert any(k.startswith(TEXT + "text_model.") for k in state)
    state[TEXT + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def assert_same_weights(model, reference):
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key].to(value.dtype), value), key


def test_lightning_ckpt_loads_with_no_missing_keys(tmp_path, original_state, reference_model, caplog):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state, "global_step": 470000, "epoch": 5}, path)
    with caplog.at_level("WARNING"):
        model = load_model_from_config(tiny_config(), path)
    assert "missing" not in caplog.text and "unexpected" not in caplog.text
    assert_same_weights(model, reference_model)
    assert not model.training


def test_safetensors_loads(tmp_path, original_state, reference_model):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original_state.items()}, str(path))
    assert_same_weights(load_model_from_config(tiny_config(), path), reference_model)


def test_bare_state_dict_and_transformers5_text_layout(tmp_path, original_state, reference_model):
    state = {k.replace(TEXT + "text_model.", TEXT): v for k, v in original_state.items()}
    path = tmp_path / "bare.ckpt"
    torch.save(state, path)
    assert_same_weights(load_model_from_config(tiny_config(), path), reference_model)


def test_full_checkpoint_honours_use_ema(tmp_path, original_state, reference_model):
    ema_source = random_tiny_model(seed=12, config=_with_ema(tiny_config()))
    full = dict(original_state)
    full.update({k: v for k, v in ema_source.state_dict().items() if k.startswith("model_ema.")})
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": full}, path)
    without_ema = load_model_from_config(tiny_config(), path)
    assert_same_weights(without_ema, reference_model)
    assert not hasattr(without_ema, "model_ema")
    with_ema = load_model_from_config(_with_ema(tiny_config()), path)
    with with_ema.ema_scope():
        weight = with_ema.model.diffusion_model.out[2].weight.clone()
    expected = ema_source.model_ema.diffusion_modelout2weight
    assert torch.equal(weight, expected)


def _with_ema(config):
    config.model.params.use_ema = True
    return config


def test_ema_is_seeded_from_loaded_weights_when_checkpoint_has_none(tmp_path, original_state, reference_model):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state}, path)
    model = load_model_from_config(_with_ema(tiny_config()), path)
    with model.ema_scope():
        assert torch.equal(model.model.diffusion_model.out[2].weight,
                           reference_model.model.diffusion_model.out[2].weight)


def test_lightning_1x_callback_key_is_allowed(tmp_path, original_state, monkeypatch):
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(module_name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module_name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module_name, fake)
    path = tmp_path / "pl1.ckpt"
    torch.save({"state_dict": original_state, "global_step": 1,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "dirpath": "x"}}}, path)
    monkeypatch.delitem(sys.modules, module_name)
    assert "state_dict" in read_checkpoint(path)


class _UnknownClass:
    """A class no checkpoint loader knows: pickled by reference as tests.test_checkpoint._UnknownClass."""


def assert_clean_refusal(message: str, callable_name: str) -> None:
    """A refusal in words: it names what the file asks to call and quotes none of torch's advice."""
    assert message.startswith("refused to load ") and f"it asks to call {callable_name}." in message
    assert "weights_only=False" not in message and "`" not in message and "\x1b" not in message
    assert "\n" not in message and "(" not in message


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    assert_clean_refusal(str(info.value), os.system.__module__ + ".system")


def test_legacy_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil-legacy.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not marker.exists()
    assert_clean_refusal(str(info.value), os.system.__module__ + ".system")


def test_pickle_of_an_unknown_class_is_refused_by_name(tmp_path):
    path = tmp_path / "object.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": _UnknownClass()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert_clean_refusal(str(info.value), "tests.test_checkpoint._UnknownClass")


def test_pickle_protocol_4_is_refused_by_its_instruction(tmp_path):
    """torch's weights-only unpickler reads no protocol-4 framing; it reports the opcode's number (149)."""
    path = tmp_path / "protocol4.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": RunsCode(tmp_path / "pwned")}, handle, protocol=4)
    with pytest.raises(CheckpointError) as info, pytest.warns(UserWarning, match="protocol 4"):
        read_checkpoint(path)
    message = str(info.value)
    assert "the pickle instruction FRAME" in message and "149" not in message
    assert "weights_only=False" not in message


@pytest.mark.parametrize("torch_message, words", [
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, "
     "but it can result in arbitrary code execution.Do it only if you get the file from a trusted source. "
     "WeightsUnpickler error: Unsupported class posix.system", "it asks to call posix.system"),
    ("Weights only load failed.\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.",
     "it asks to call posix.system"),
    ("Weights only load failed. WeightsUnpickler error: Unsupported global: GLOBAL eval was not an allowed global "
     "by default. Please use `torch.serialization.add_safe_globals([eval])`", "it asks to call eval"),
    ("Weights only load failed. WeightsUnpickler error: Can only build Tensor, Parameter, OrderedDict or types "
     "allowlisted via `add_safe_globals`, but got <class 'shady.Thing'>", "it asks to build or call shady.Thing"),
    ("Weights only load failed. WeightsUnpickler error: Unsupported operand 149",
     "it uses the pickle instruction FRAME, which loading weights only does not read"),
    ("Weights only load failed. WeightsUnpickler error: something new",
     "it holds Python objects other than tensors and plain containers"),
])
def test_refusals_across_torch_versions_are_put_in_words(torch_message, words):
    assert describe_pickle_refusal(pickle.UnpicklingError(torch_message)) == words


def test_corrupt_files_are_not_described_as_refusals():
    assert describe_pickle_refusal(RuntimeError("PytorchStreamReader failed reading zip archive")) is None
    assert describe_pickle_refusal(EOFError()) is None
    # A text file read as a pickle: its first byte, "n" (110), is no pickle instruction.
    assert describe_pickle_refusal(pickle.UnpicklingError("Weights only load failed. Unsupported operand 110")) is None


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_checkpoint_gives_a_clear_error(tmp_path, original_state, suffix):
    path = tmp_path / ("model" + suffix)
    if suffix == ".ckpt":
        torch.save({"state_dict": original_state}, path)
    else:
        save_file({k: v.contiguous() for k, v in original_state.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_from_config(tiny_config(), path)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n" * 10])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_wrong_architecture_names_a_few_mismatched_tensors(tmp_path):
    config = tiny_config()
    config.model.params.unet_config.params.model_channels = 64
    other = random_tiny_model(seed=1, config=config)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(tiny_config(), path)
    message = str(info.value)
    assert "does not fit" in message and "model.diffusion_model." in message and "(64" in message
    assert "\n" not in message and len(message) < 1000


def test_checkpoint_of_an_unrelated_model(tmp_path):
    path = tmp_path / "classifier.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(3, 3) for i in range(20)}, str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_from_config(tiny_config(), path)


# Initialisers that write a weight: nn.init's (which a torch function mode sees whole) and the tensor methods that
# the rest of nn.init calls.
WRITING_INITIALISERS = frozenset({nn.init.kaiming_uniform_, nn.init.uniform_, nn.init.normal_, nn.init.constant_,
                                  torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.fill_,
                                  torch.Tensor.zero_})


class InitialiserSpy(TorchFunctionMode):
    """Records the initialisers that write a tensor with storage (not one on the meta device)."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WRITING_INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            if not tensor.is_meta:
                self.writes.append((func.__name__, tuple(tensor.shape)))
        return func(*args, **kwargs)


def test_loading_writes_no_weight_with_an_initialiser(tmp_path, original_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state}, path)
    with InitialiserSpy() as spy:
        load_model_from_config(tiny_config(), path)
    assert spy.writes == []
    with InitialiserSpy() as spy:
        nn.Linear(3, 2)
    assert [name for name, _ in spy.writes] == ["kaiming_uniform_", "uniform_"], "the spy sees initialisers"


LAYER_CLASSES = (nn.Module, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding,
                 nn.LayerNorm, nn.GroupNorm)


def torch_globals() -> dict:
    """What a process-wide patch of the layers would change: their constructors, initialisers, `__setattr__` and
    `register_parameter`."""
    names = ("__init__", "reset_parameters", "__setattr__", "register_parameter")
    return {(cls, name): cls.__dict__.get(name) for cls in LAYER_CLASSES for name in names}


def test_building_on_meta_changes_nothing_outside_its_thread():
    before = torch_globals()
    with no_weight_init():
        during = torch_globals()
        here = nn.Linear(3, 2)
        with ThreadPoolExecutor(1) as pool:
            elsewhere = pool.submit(nn.Linear, 3, 2).result()
    assert during == before
    assert here.weight.is_meta
    assert not elsewhere.weight.is_meta and elsewhere.weight.abs().sum() > 0, "built and initialised as usual"
    assert torch_globals() == before


def test_two_threads_loading_at_once_both_get_their_weights(tmp_path, original_state, reference_model, monkeypatch):
    other = random_tiny_model(seed=12)
    paths = [tmp_path / "first.ckpt", tmp_path / "second.safetensors"]
    torch.save({"state_dict": original_state}, paths[0])
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(paths[1]))
    before = torch_globals()
    both_building = threading.Barrier(2, timeout=120)
    build = ldm.checkpoint.instantiate_from_config

    def build_together(config):
        both_building.wait()  # each thread is inside `no_weight_init` while the other builds
        model = build(config)
        both_building.wait()
        return model

    monkeypatch.setattr(ldm.checkpoint, "instantiate_from_config", build_together)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda path: load_model_from_config(tiny_config(), path), paths)
    assert_same_weights(first, reference_model)
    assert_same_weights(second, other)
    assert torch_globals() == before
    assert not nn.Linear(2, 2).weight.is_meta


def test_numpy_scalars_in_a_checkpoint_are_allowed(tmp_path, original_state):
    """Lightning 1.x checkpoints keep numpy scalars (a callback's best score, say) beside the weights."""
    path = tmp_path / "numpy.ckpt"
    torch.save({"state_dict": original_state, "best_model_score": np.float64(0.25), "epoch": np.int64(3)}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint["best_model_score"] == 0.25 and checkpoint["epoch"] == 3


def test_parameters_registered_while_building_still_reach_global_registration_hooks():
    seen = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append(name))
    try:
        with no_weight_init():
            torch.nn.Linear(3, 2)
    finally:
        handle.remove()
    assert seen == ["weight", "bias"]


def test_missing_keys_are_initialised_not_left_as_garbage(tmp_path, original_state, caplog):
    state = {k: v for k, v in original_state.items() if "time_embed" not in k}
    path = tmp_path / "partial.ckpt"
    torch.save({"state_dict": state}, path)
    with caplog.at_level("WARNING"):
        model = load_model_from_config(tiny_config(), path)
    assert "missing" in caplog.text
    weight = model.model.diffusion_model.time_embed[0].weight
    assert torch.isfinite(weight).all() and 0 < weight.abs().max() < 1


def test_models_are_built_without_weight_memory_and_loaded_with_none_left_empty(tmp_path, original_state):
    with no_weight_init():
        empty = instantiate_from_config(tiny_config().model)
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())
    assert not torch.nn.Linear(2, 2).weight.is_meta  # only inside the context
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state}, path)
    model = load_model_from_config(tiny_config(), path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_missing_bias_is_zeroed_and_its_module_keeps_the_loaded_weight(tmp_path, original_state, caplog):
    key = "model.diffusion_model.out.2"
    state = {k: v for k, v in original_state.items() if k != f"{key}.bias"}
    path = tmp_path / "partial.ckpt"
    torch.save({"state_dict": state}, path)
    with caplog.at_level("WARNING"):
        model = load_model_from_config(tiny_config(), path)
    assert f"{key}.bias" in caplog.text
    out = model.model.diffusion_model.out[2]
    assert torch.equal(out.weight, original_state[f"{key}.weight"])
    assert torch.equal(out.bias, torch.zeros_like(out.bias))


def test_dtype_casts_weights_but_keeps_the_schedule_in_float32(tmp_path, original_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state}, path)
    model = load_model_from_config(tiny_config(), path, dtype=torch.bfloat16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32


def test_kernels_copied_by_a_cast_come_out_channels_last_and_others_keep_the_file_layout(tmp_path, original_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state}, path)
    conv_key = "model.diffusion_model.input_blocks.0.0.weight"
    cast = load_model_from_config(tiny_config(), path, dtype=torch.bfloat16)
    kernel = cast.state_dict()[conv_key]
    assert kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()
    assert torch.equal(kernel, original_state[conv_key].to(torch.bfloat16))
    assert all(t.is_contiguous() for t in cast.state_dict().values() if t.ndim != 4)
    as_stored = load_model_from_config(tiny_config(), path)
    assert all(t.is_contiguous() for t in as_stored.state_dict().values())
