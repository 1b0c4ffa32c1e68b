"""scripts/evaluate_embedding.py (Gal et al. 2022's evaluation of an embedding) on the demo model, offline: the
whole run at tiny counts, its numbers against a direct CLIP computation, resuming without sampling twice, another
protocol refused, and bad input as one line with exit code 2."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

import ldm.evaluation.textual_inversion as ti
from ldm.cli.common import run_cli
from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG, DEMO_EMBEDDING
from ldm.evaluation.clip_score import tiny_clip
from tests.cli_support import load_script, snapshot

FAST = ("--n", "2", "--steps", "2", "--batch_size", "2", "--device", "cpu", "--precision", "full")


@pytest.fixture(scope="module")
def script():
    return load_script("evaluate_embedding.py")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No download: a missing weights file fails at once; caches under tmp_path."""
    def refuse(url, destination, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def run(script, capsys, *args) -> tuple[int, str]:
    try:
        code = run_cli(script.main, [str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def count_samples(monkeypatch) -> list[int]:
    written: list[int] = []
    sample_missing = ti.sample_missing

    def counted(*args, **kwargs):
        written.append(sample_missing(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(ti, "sample_missing", counted)
    return written


def test_demo_end_to_end_resumes_and_refuses_another_protocol(script, capsys, tmp_path, monkeypatch):
    outdir = tmp_path / "eval"
    written = count_samples(monkeypatch)
    code, err = run(script, capsys, "--demo", *FAST, "--outdir", outdir)
    assert code == 0, err
    assert written == [2 * len(ti.DEMO_PROMPTS) * 2]  # learned and baseline, each prompt, 2 images
    results = json.loads((outdir / "results.json").read_text())
    assert results["protocol"]["words"] == ["*", "purple star"] and results["protocol"]["steps"] == 2
    learned, baseline = results["results"]
    assert (learned["variant"], baseline["variant"]) == ("learned", "baseline")
    assert [p["prompt"] for p in learned["prompts"]] == [t.format("*") for t in ti.DEMO_PROMPTS]
    assert baseline["prompts"][1]["prompt"] == "a purple star on a green background"
    assert all(0 <= record[key] <= 1 for record in (learned, baseline) for key in ("concept_accuracy", "edit_accuracy"))

    clip = tiny_clip()  # the numbers, recomputed directly from the files
    training = clip.images(sorted((outdir / "training_images").glob("*.png")))
    reconstruction = clip.images(sorted((outdir / "learned" / "prompt_00").glob("*.png")))
    assert learned["image_similarity"] == pytest.approx(float((reconstruction @ training.T).mean()), abs=1e-5)
    texts = clip.texts([" ".join(t.replace("{}", "").split()) for t in ti.DEMO_PROMPTS[1:]])
    editing = [float((clip.images(sorted((outdir / "learned" / f"prompt_{p:02d}").glob("*.png"))) @ texts[p - 1])
                     .mean()) for p in range(1, len(ti.DEMO_PROMPTS))]
    assert learned["text_similarity"] == pytest.approx(sum(editing) / len(editing), abs=1e-5)
    rows = list(csv.DictReader((outdir / "results.csv").open()))
    assert len(rows) == 2 * len(ti.DEMO_PROMPTS) + 2 and rows[-2]["prompt"] == "all"

    images = snapshot(outdir / "learned")
    assert run(script, capsys, "--demo", *FAST, "--outdir", outdir)[0] == 0
    assert written == [12] and snapshot(outdir / "learned") == images  # nothing missing: no model, no sampling
    (outdir / "learned" / "prompt_01" / "0001.png").unlink()
    truncated = outdir / "learned" / "prompt_00" / "0000.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    assert run(script, capsys, "--demo", *FAST, "--outdir", outdir)[0] == 0
    assert written == [12, 2] and snapshot(outdir / "learned") == images  # the same pixels again

    before = snapshot(outdir)
    code, err = run(script, capsys, "--demo", *FAST[:-2], "--precision", "full", "--steps", "3", "--outdir", outdir)
    assert code == 2 and "other settings (steps 2 there, 3 now)" in err.strip().splitlines()[-1]
    assert snapshot(outdir) == before


def concept_folder(tmp_path, count: int = 2):
    folder = tmp_path / "concept"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (32, 32), (150, 40, 200)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing embedding", "embedding file not found"),
    ("empty image folder", "holds no images"),
    ("not a number", "--scale: invalid finite_float value: 'five'"),
    ("n not a number", "--n: invalid positive_int value: 'many'"),
    ("prompt without a slot", "every line needs {} once"),
    ("no data root", "give --embedding_path and --data_root"),
])
def test_bad_input_is_one_line_and_exit_2(script, capsys, tmp_path, case, message):
    args = {"--embedding_path": DEMO_EMBEDDING, "--data_root": concept_folder(tmp_path), "--ckpt": DEMO_CHECKPOINT,
            "--config": DEMO_CONFIG, "--outdir": tmp_path / "out"}
    if case == "missing embedding":
        args["--embedding_path"] = tmp_path / "nothing.pt"
    elif case == "empty image folder":
        (tmp_path / "empty").mkdir()
        args["--data_root"] = tmp_path / "empty"
    elif case == "not a number":
        args["--scale"] = "five"
    elif case == "n not a number":
        args["--n"] = "many"
    elif case == "prompt without a slot":
        (tmp_path / "prompts.txt").write_text("a photo of {}\nan oil painting\n")
        args["--prompts"] = tmp_path / "prompts.txt"
    else:
        del args["--data_root"]
    code, err = run(script, capsys, *[str(x) for pair in args.items() for x in pair])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_offline_the_clip_weights_are_named_before_any_sampling(script, capsys, tmp_path):
    outdir = tmp_path / "out"
    code, err = run(script, capsys, "--embedding_path", DEMO_EMBEDDING, "--data_root", concept_folder(tmp_path),
                    "--ckpt", DEMO_CHECKPOINT, "--config", DEMO_CONFIG, *FAST, "--outdir", outdir)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "ViT-B-32.pt" in line and str(tmp_path / "home" / ".cache" / "clip") in line, err
    assert not (outdir / "learned").exists()


def test_a_checkpoint_that_does_not_load_leaves_the_outdir_untouched(script, capsys, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, err = run(script, capsys, "--demo", "--ckpt", bad, *FAST, "--outdir", tmp_path / "out")
    assert code == 2 and err.strip().splitlines()[-1].count("error:") == 1, err
    assert snapshot(tmp_path / "out") == {}
