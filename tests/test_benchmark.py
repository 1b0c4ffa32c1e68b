"""scripts/benchmark.py on the tiny model: every part runs, prints its table and writes JSON."""
import json

import pytest
import torch

from tests.cli_support import load_script
from tests.model_factory import TINY_SD_CONFIG

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmark.py")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_timings_of_the_same_weights_agree(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--tiny", "--resolution", "64", "--warmup", "0", "--repeats", "1", "--steps", "2",
                    "--threads", "1", "--skip", "load,memory", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [row["measure"] for row in report["rows"]] == ["UNet step fp32", "UNet step bf16", "txt2img 2 steps fp32"]
    for row in report["rows"]:
        assert row["ours"][0] > 0 and row["diffusers"][0] > 0
        # The same weights and inputs through both implementations give the same numbers.
        assert row["relative_difference"] < (3e-2 if "bf16" in row["measure"] else 1e-4)
    assert report["environment"]["diffusers"]
    assert "UNet step fp32" in capsys.readouterr().out


def test_load_and_render_workers(benchmark, tmp_path):
    paths = benchmark.write_checkpoints(benchmark.build_random_model(TINY_SD_CONFIG), tmp_path)
    job = {"config": str(TINY_SD_CONFIG), "device": "cpu", "resolution": 64, "steps": 1, "threads": 1,
           "lowvram": False}
    for impl in benchmark.IMPLEMENTATIONS:
        rendered = benchmark.worker({**job, "kind": "render", "impl": impl, "checkpoint": str(paths["safetensors"])})
        assert rendered["seconds"] > 0 and rendered["peak_rss_render_mib"] > 0
    offloaded = benchmark.worker({**job, "kind": "render", "impl": "ours", "lowvram": True,
                                  "checkpoint": str(paths["safetensors"])})
    assert offloaded["peak_rss_render_mib"] > 0
    loaded = benchmark.run_worker({**job, "kind": "load", "impl": "ours", "checkpoint": str(paths["ckpt"])})
    assert loaded["seconds"] > 0 and loaded["peak_rss_mib"] >= loaded["rss_before_mib"] > 0
    through_library = benchmark.worker({**job, "kind": "load", "impl": benchmark.LIBRARY_READER,
                                        "checkpoint": str(paths["safetensors"])})
    assert through_library["seconds"] > 0


def test_the_safetensors_reader_comparison_is_reported(benchmark):
    row = {"measure": "load .safetensors", "weights_mib": 10.0, "ours": [0.2, 0.4], "diffusers": [0.5, 0.5],
           benchmark.LIBRARY_READER: [0.4, 0.4],
           "peak_rss_increase_mib": {"ours": 1.0, "diffusers": 2.0, benchmark.LIBRARY_READER: 1.0}}
    assert benchmark.mapped_over_library(row) == 0.75
    assert "safetensors load_file 0.400s, ldm.safetensors_mmap / it 0.75" in benchmark.table([row])


def test_compiled_rows_are_labelled(benchmark, monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    out = tmp_path / "bench.json"
    benchmark.main(["--tiny", "--resolution", "64", "--warmup", "0", "--repeats", "1", "--threads", "1",
                    "--dtypes", "fp32", "--skip", "txt2img,load,memory", "--compile", "--json", str(out)])
    assert [row["measure"] for row in json.loads(out.read_text())["rows"]] == ["UNet step fp32 (ours compiled)"]
    assert len(compiled) == 1


@pytest.mark.parametrize("flags,name,guided", [([], "UNet step fp32", True),
                                                (["--distinct_latents"], "UNet step fp32 (distinct latents)", False)])
def test_unet_step_is_a_guided_step_unless_latents_are_distinct(benchmark, monkeypatch, tmp_path, flags, name,
                                                                guided):
    batches = []
    unet_copy = benchmark.unet_copy

    def spied_copy(*args):
        unet = unet_copy(*args)
        unet.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0]))
        return unet

    monkeypatch.setattr(benchmark, "unet_copy", spied_copy)
    out = tmp_path / "bench.json"
    benchmark.main(["--tiny", "--resolution", "64", "--warmup", "0", "--repeats", "1", "--threads", "1",
                    "--dtypes", "fp32", "--skip", "txt2img,load,memory", "--json", str(out), *flags])
    assert [row["measure"] for row in json.loads(out.read_text())["rows"]] == [name]
    x = batches[0]
    assert x.shape[0] == 2 and torch.equal(x[0], x[1]) == guided


def test_tiled_decode_row(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--tiny", "--threads", "1", "--skip", "unet,txt2img,load,memory", "--tiled_decode_resolution",
                    "640", "--json", str(out)])
    [row] = json.loads(out.read_text())["rows"]
    assert row["measure"] == "VAE decode, tiled" and row["resolution"] == 640
    assert row["ours"][0] > 0 and row["diffusers"][0] > 0
    assert set(row["peak_increase_mib"]) == {"ours", "diffusers", "ours_whole"}
    assert all(peak > 0 for peak in row["peak_increase_mib"].values())
    assert "ours untiled" in capsys.readouterr().out


def test_ratio_pairs_the_repeats(benchmark):
    """The ratio is the median of the back-to-back pairs, not the ratio of the columns' medians."""
    row = {"measure": "UNet step fp32", "resolution": 64, "batch": 2, "relative_difference": 0.0,
           "ours": [1.0, 2.0, 4.0], "diffusers": [2.0, 8.0, 8.0]}
    assert benchmark.paired_ratio(row) == 0.5  # pairs 0.5, 0.25, 0.5; the medians 2.0 / 8.0 would say 0.25
    assert " 0.50  " in benchmark.table([row])
