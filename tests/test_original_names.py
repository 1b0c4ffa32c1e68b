"""ldm.original_names: the diffusers -> original key mappings, traced through diffusers' own conversion and kept on
disk, so that a later run does not import diffusers' conversion code (seconds) for them."""
from __future__ import annotations

import pytest

from ldm import original_names
from tests.model_factory import random_tiny_model

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def key_ndims():
    state = random_tiny_model(seed=0).state_dict()
    return original_names.ndims(state, [key for key in state if key.startswith("cond_stage_model.transformer.")])


def test_a_traced_mapping_is_reused_until_its_keys_or_diffusers_change(key_ndims, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    traced = []

    def make_convert():
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        traced.append(1)
        return convert_ldm_clip_checkpoint

    first = original_names.cached_trace("text", None, key_ndims, make_convert)
    assert first == original_names.trace_conversion(make_convert(), key_ndims) and len(traced) == 2
    assert first["text_model.final_layer_norm.weight"] == "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert original_names.cached_trace("text", None, key_ndims, make_convert) == first and len(traced) == 2

    fewer = dict(list(key_ndims.items())[:-2])
    assert original_names.cached_trace("text", None, fewer, make_convert) != first and len(traced) == 3
    monkeypatch.setattr(original_names, "_diffusers_version", lambda: "0.0.1")
    original_names.cached_trace("text", None, key_ndims, make_convert)
    assert len(traced) == 4


def test_a_damaged_cache_file_is_traced_again(key_ndims, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = original_names.text_encoder_names(key_ndims)
    [cached] = (tmp_path / "latent-diffusion-sd").glob("original-names-text-*.json")
    cached.write_text('{"text_model.final_layer_norm.weight": "not one of the keys"}')
    assert original_names.text_encoder_names(key_ndims) == first
    cached.write_text("{truncated")
    assert original_names.text_encoder_names(key_ndims) == first
