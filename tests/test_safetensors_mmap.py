"""The memory-mapped .safetensors reader: same tensors as the safetensors library, never writes the file,
refuses broken files, and leaves what it does not handle to the library."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import read_state_dict
from ldm.errors import CheckpointError
from ldm.safetensors_mmap import SafetensorsFormatError, load_mapped


@pytest.fixture()
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(3, 5, 2, generator=generator),
        "half": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "steps": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


def _write_raw(path, header, data):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_same_tensors_as_the_library(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    mapped = load_mapped(path)
    reference = load_file(str(path))
    assert mapped.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype and mapped[name].shape == tensor.shape
        assert torch.equal(mapped[name], tensor), name
        assert mapped[name].is_contiguous()


def test_writing_to_a_tensor_leaves_the_file_alone(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    mapped = load_mapped(path)
    mapped["weight"].fill_(7.0)
    assert path.read_bytes() == before
    assert torch.equal(load_mapped(path)["weight"], tensors["weight"])


def test_each_tensor_has_its_own_storage(tmp_path, tensors):
    """Saving part of a loaded model writes that part only, and safetensors accepts the tensors again."""
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    mapped = load_mapped(path)
    assert mapped["half"].untyped_storage().nbytes() == tensors["half"].numel() * 2
    saved = tmp_path / "half.pt"
    torch.save({"half": mapped["half"]}, saved)
    assert saved.stat().st_size < 2000
    again = tmp_path / "again.safetensors"
    save_file(mapped, str(again))
    assert torch.equal(load_file(str(again))["weight"], tensors["weight"])


def test_misaligned_data_is_left_to_the_library(tmp_path):
    data = b"\x01" + struct.pack("<f", 1.5)
    header = {"byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "value": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]}}
    path = tmp_path / "odd.safetensors"
    _write_raw(path, header, data)
    assert load_mapped(path) is None
    assert read_state_dict(path)["value"].item() == 1.5


def test_an_unmapped_dtype_is_left_to_the_library(tmp_path):
    path = tmp_path / "fp8.safetensors"
    save_file({"x": torch.ones(4).to(torch.float8_e4m3fn)}, str(path))
    assert load_mapped(path) is None
    assert read_state_dict(path)["x"].float().tolist() == [1.0] * 4


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8, "truncated"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\x00" * 16, "does not match its shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12, "overlap"),
    ({"x": {"dtype": "F32", "shape": [2]}}, b"\x00" * 8, "malformed"),
])
def test_broken_files_are_refused(tmp_path, header, data, message):
    path = tmp_path / "broken.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(SafetensorsFormatError, match=message):
        load_mapped(path)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_corrupt_header_is_refused(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!" + b"\x00" * 8)
    with pytest.raises(CheckpointError, match="header is corrupt"):
        read_state_dict(path)
