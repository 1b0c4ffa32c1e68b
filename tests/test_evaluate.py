"""scripts/evaluate.py and ldm.evaluation's harness: caption choice and seeds, batches that do not depend on the
number of processes, protocol.json, refusals of bad input (one line, exit code 2, nothing written), resume that
samples nothing twice, a two-process torchrun run equal to one process, and the demo end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.cli.runtime
import ldm.evaluation.run
import ldm.evaluation.sampling
from ldm.cli.common import run_cli
from ldm.data.shapes import SyntheticShapes, parse_caption, render
from ldm.errors import UserInputError
from ldm.evaluation.captions import choose_coco, demo_captions, read_captions
from ldm.evaluation.distributed import Ranks, ranks_from_env
from ldm.evaluation.files import is_complete_png
from ldm.evaluation.metric import Metric, Sample
from ldm.evaluation.protocol import Protocol, check_outdir, write_protocol
from ldm.evaluation.results import merge_records
from ldm.evaluation.shapes_accuracy import ShapesAccuracy
from ldm.evaluation.work import all_batches, image_path, image_seed, scale_name, shard
from tests.cli_support import SCRIPTS, load_script, script_env, snapshot

DEMO = ["--demo", "--n", "4", "--scales", "1.5,3", "--steps", "3", "--batch_size", "2"]


@pytest.fixture(scope="module")
def evaluate():
    return load_script("evaluate.py")


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def run(evaluate, capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of the script's main (argparse errors included)."""
    try:
        code = run_cli(evaluate.main, [*map(str, args)])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error line of stderr, which must be its only one and its last (info lines may come before it)."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def coco(tmp_path, images=("000000000001.jpg", "000000000002.jpg", "000000000003.jpg")):
    annotations = [{"image_id": i + 1, "id": 10 * i + k, "caption": f"image {i + 1} caption {k}"}
                   for i in range(3) for k in range(5)]
    files = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg"} for i in range(3)]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": files, "annotations": annotations}))
    folder = tmp_path / "val2017"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (8, 8)).save(folder / name)
    return path, folder


def protocol(**changes) -> Protocol:
    fields = dict(sampler="plms", schedule="default", steps=50, eta=0.0, H=512, W=512, n=10, seed=0,
                  precision="autocast", captions_sha256="c", config_sha256="m", checkpoints={"a": 1}, scales=(2.0,))
    return Protocol(**{**fields, **changes})


# --- seeds, captions, batches --------------------------------------------------------------------------------------

def test_seeds_come_from_the_caption_index_and_scales_name_their_folder(tmp_path):
    assert [image_seed(7, i) for i in (0, 1, 5)] == [7, 8, 12]
    assert image_seed(2 ** 32 - 1, 1) == 0
    assert [scale_name(s) for s in (1.5, 2.0, 7.5)] == ["scale_1.5", "scale_2", "scale_7.5"]
    assert image_path(tmp_path, "sd", 2.0, 12) == tmp_path / "sd" / "scale_2" / "00012.png"


def test_batches_are_cut_alike_for_any_number_of_processes():
    batches = all_batches(["a", "b"], [1.5, 3.0], n=5, batch_size=2)
    assert len(batches) == 2 * 2 * 3 and batches[0].indices == range(0, 2) and batches[-1].indices == range(4, 5)
    for world in (1, 2, 3, 7):
        shards = [shard(batches, rank, world) for rank in range(world)]
        assert sorted(map(repr, sum(shards, []))) == sorted(map(repr, batches))


def test_coco_captions_one_per_image_by_a_seeded_choice_then_a_second_round(tmp_path):
    pairs = [(image, f"{image}-{k}") for image in (5, 6, 7) for k in range(4)]
    chosen = choose_coco(pairs, 3, seed=1)
    assert sorted(image for image, _ in chosen) == [5, 6, 7] and chosen == choose_coco(pairs, 3, seed=1)
    assert choose_coco(pairs, 3, seed=2) != chosen
    five = choose_coco(pairs, 5, seed=1)
    assert five[:3] == chosen and len({caption for _, caption in five}) == 5
    path, _ = coco(tmp_path)
    captions = read_captions(str(path), 2, seed=0)
    assert len(captions.texts) == 2 and captions.image_files[0].endswith(".jpg")
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\n a dog \nthird\n")
    assert read_captions(str(text), 2, seed=0).texts == ("a cat", "a dog")
    with pytest.raises(UserInputError, match="fewer than --n 9"):
        read_captions(str(text), 9, seed=0)


def test_demo_captions_are_shapes_prompts_without_the_held_out_purple_star():
    captions = demo_captions(50, seed=0)
    assert captions == demo_captions(50, seed=0) and captions.texts[0] == SyntheticShapes(seed=0).spec(0)[1]
    parsed = [parse_caption(text) for text in captions.texts]
    assert None not in parsed and ("purple", "star") not in {(c, s) for c, s, _ in parsed}


def test_ranks_come_from_torchrun_variables():
    assert ranks_from_env({}) == Ranks(0, 1, 0) and not Ranks().distributed
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(UserInputError):
        ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})


# --- files, protocol, results ------------------------------------------------------------------------------------

def test_a_truncated_png_is_not_complete(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    assert is_complete_png(path, (32, 32)) and not is_complete_png(path, (64, 64))
    path.write_bytes(path.read_bytes()[:-20])
    assert not is_complete_png(path) and not is_complete_png(tmp_path / "missing.png")


def test_the_protocol_may_grow_by_checkpoints_and_scales_but_not_change(tmp_path):
    assert check_outdir(tmp_path / "new", protocol()) == protocol()
    write_protocol(tmp_path, protocol())
    grown = check_outdir(tmp_path, protocol(checkpoints={"b": 2}, scales=(1.5, 2.0)))
    assert grown.checkpoints == {"a": 1, "b": 2} and grown.scales == (1.5, 2.0)
    with pytest.raises(UserInputError, match=r"another protocol \(steps 50 there, 20 now\)"):
        check_outdir(tmp_path, protocol(steps=20))
    with pytest.raises(UserInputError, match="another checkpoint named 'a'"):
        check_outdir(tmp_path, protocol(checkpoints={"a": 5}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        check_outdir(other, protocol())


def test_results_of_earlier_runs_are_kept_and_updated():
    old = [{"checkpoint": "a", "scale": 2.0, "n": 4, "fid": 30.0}, {"checkpoint": "a", "scale": 3.0, "n": 4}]
    new = [{"checkpoint": "a", "scale": 2.0, "n": 4, "clip_score": 25.0}, {"checkpoint": "b", "scale": 1.5, "n": 4}]
    assert merge_records(old, new) == [{"checkpoint": "a", "scale": 2.0, "n": 4, "fid": 30.0, "clip_score": 25.0},
                                       old[1], new[1]]


def test_shapes_accuracy_reads_the_caption_back_from_the_image(tmp_path):
    samples = []
    shapes = SyntheticShapes(size=32, seed=3)
    for index in range(6):
        spec, caption = shapes.spec(index)
        path = tmp_path / f"{index}.png"
        render(spec, 32).save(path)
        samples.append(Sample(path, caption if index < 3 else f"a {spec.color} {spec.shape} on a "
                                                              f"{'red' if spec.background != 'red' else 'blue'} "
                                                              "background", index, 2.0))
    metric = ShapesAccuracy()
    assert isinstance(metric, Metric) and metric.name == "accuracy" and metric.higher_is_better
    assert metric.compute(samples) == 0.5


# --- the command line --------------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch, one_process):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ldm.cli.runtime, "load_model", refuse)
    monkeypatch.setattr(ldm.evaluation.run, "load_model", refuse)


@pytest.mark.parametrize("case, message", [
    ("no captions file", "captions file not found"),
    ("no image folder", "image folder not found"),
    ("empty image folder", "has no images"),
    ("captions without their images", "1 images of the chosen captions are not in"),
    ("checkpoint missing", "checkpoint not found"),
    ("scales not numbers", "--scales: 'SCALES' is not a comma-separated list of finite numbers"),
    ("scale nan", "--scales: 'SCALES' is not a comma-separated list of finite numbers"),
    ("scale inf", "--scales: 'SCALES' is not a comma-separated list of finite numbers"),
    ("stochastic eta", "deterministic sampling only"),
    ("fp16 on the cpu", "--precision fp16 needs a CUDA device"),
])
def test_bad_input_is_one_line_and_exit_2_before_the_model_loads(evaluate, capsys, tmp_path, no_model_load, case,
                                                                 message):
    captions, images = coco(tmp_path, images=("000000000001.jpg", "000000000002.jpg"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    args = {"--ckpt": ckpt, "--captions": captions, "--images": images, "--n": "2", "--outdir": tmp_path / "out"}
    if case == "no captions file":
        args["--captions"] = tmp_path / "nothing.json"
    elif case == "no image folder":
        args["--images"] = tmp_path / "nothing"
    elif case == "empty image folder":
        (tmp_path / "empty").mkdir()
        args["--images"] = tmp_path / "empty"
    elif case == "captions without their images":
        args["--n"] = "3"
    elif case == "checkpoint missing":
        args["--ckpt"] = tmp_path / "nothing.ckpt"
    elif case.startswith("scale"):
        args["--scales"] = {"scales not numbers": "1.5,two", "scale nan": "2,nan", "scale inf": "inf"}[case]
    elif case == "stochastic eta":
        args.update({"--sampler": "ddim", "--eta": "0.5"})
    else:
        args.update({"--precision": "fp16", "--device": "cpu", "--metrics": "accuracy"})
    code, err = run(evaluate, capsys, *[str(x) for pair in args.items() for x in pair])
    message = message.replace("SCALES", args.get("--scales", ""))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_load_leaves_the_outdir_untouched(evaluate, capsys, tmp_path, one_process):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    code, err = run(evaluate, capsys, *DEMO, "--ckpt", bad, "--outdir", tmp_path / "out")
    assert code == 2 and "is not a checkpoint" in one_error_line(err)
    assert snapshot(tmp_path / "out") == {}


def test_missing_metric_weights_offline_stop_the_run_before_sampling(evaluate, capsys, tmp_path, monkeypatch,
                                                                    one_process):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    _, images = coco(tmp_path)
    code, err = run(evaluate, capsys, *DEMO, "--metrics", "fid", "--images", images, "--outdir", tmp_path / "out")
    assert code == 2 and "the FID Inception-v3 weights" in one_error_line(err) and "save it as" in err
    assert snapshot(tmp_path / "out") == {}


def count_renders(monkeypatch) -> list[int]:
    calls: list[int] = []
    render_batch = ldm.evaluation.sampling.render_batch

    def counted(model, sampler, job, batch):
        calls.append(batch.start)
        return render_batch(model, sampler, job, batch)

    monkeypatch.setattr(ldm.evaluation.sampling, "render_batch", counted)
    return calls


def test_demo_end_to_end_resumes_without_sampling_twice_and_refuses_another_protocol(evaluate, capsys, tmp_path,
                                                                                     monkeypatch, one_process):
    outdir = tmp_path / "eval"
    calls = count_renders(monkeypatch)
    code, err = run(evaluate, capsys, *DEMO, "--outdir", outdir)
    assert code == 0, err
    assert len(calls) == 4  # 2 scales x 2 batches of 2 captions
    results = json.loads((outdir / "results.json").read_text())
    assert [(r["checkpoint"], r["scale"], r["n"]) for r in results["results"]] == [("model", 1.5, 4), ("model", 3, 4)]
    assert all(0 <= r["accuracy"] <= 1 for r in results["results"])
    assert results["protocol"]["steps"] == 3 and results["protocol"]["H"] == 32
    assert (outdir / "results.csv").read_text().splitlines()[0] == "checkpoint,scale,n,accuracy"
    assert is_complete_png(outdir / "fid_vs_clip.png")
    images = snapshot(outdir / "model")
    assert len(images) == 8

    calls.clear()
    assert run(evaluate, capsys, *DEMO, "--outdir", outdir)[0] == 0
    assert calls == [] and snapshot(outdir / "model") == images

    (outdir / "model" / "scale_3" / "00003.png").unlink()
    corrupt = outdir / "model" / "scale_1.5" / "00000.png"
    corrupt.write_bytes(corrupt.read_bytes()[:50])
    assert run(evaluate, capsys, *DEMO, "--outdir", outdir)[0] == 0
    assert sorted(calls) == [0, 2] and snapshot(outdir / "model") == images

    before = snapshot(outdir)
    code, err = run(evaluate, capsys, *DEMO[:-4], "--steps", "4", "--batch_size", "2", "--outdir", outdir)
    assert code == 2 and "another protocol (steps 3 there, 4 now)" in one_error_line(err)
    assert snapshot(outdir) == before


def test_two_processes_under_torchrun_give_the_images_and_results_of_one(evaluate, capsys, tmp_path, one_process):
    """Each process on one thread, as torchrun runs several (bitwise equality needs the same thread count: a CPU
    matrix product splits its sums by thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(evaluate, capsys, *DEMO, "--outdir", tmp_path / "one")[0] == 0
    finally:
        torch.set_num_threads(threads)
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
         str(SCRIPTS / "evaluate.py"), *DEMO, "--outdir", str(tmp_path / "two")],
        cwd=tmp_path, env={**script_env(tmp_path), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=180)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "rank 1: 4 images written" in process.stderr
    assert snapshot(tmp_path / "two" / "model") == snapshot(tmp_path / "one" / "model")
    for name in ("results.json", "results.csv", "protocol.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


class MeanPixel:
    """A stand-in metric under a real metric's name: the mean pixel value of the group."""

    def __init__(self, name: str):
        self.name, self.higher_is_better = name, name != "fid"

    def compute(self, samples) -> float:
        return float(sum(np.asarray(Image.open(s.path)).mean() for s in samples) / len(samples))


def test_no_metrics_then_metrics_only_gives_fid_against_clip_score(evaluate, capsys, tmp_path, monkeypatch,
                                                                   one_process):
    monkeypatch.setattr(ldm.evaluation.run, "build_metrics", lambda names, *args: [MeanPixel(n) for n in names])
    monkeypatch.setattr(ldm.evaluation.run, "fetch_weights", lambda names: None)
    _, images = coco(tmp_path)
    outdir = tmp_path / "eval"
    args = ["--demo", "--n", "2", "--scales", "2,4", "--steps", "2", "--metrics", "fid,clip_score", "--images", images,
            "--outdir", outdir]
    code, err = run(evaluate, capsys, *args, "--metrics_only")
    assert code == 2 and "holds none (no protocol.json)" in one_error_line(err)
    calls = count_renders(monkeypatch)
    assert run(evaluate, capsys, *args, "--no_metrics")[0] == 0
    assert len(calls) == 2 and not (outdir / "results.json").exists()
    assert run(evaluate, capsys, *args, "--metrics_only")[0] == 0
    assert len(calls) == 2
    rows = (outdir / "results.csv").read_text().splitlines()
    assert rows[0] == "checkpoint,scale,n,clip_score,fid" and len(rows) == 3
    assert is_complete_png(outdir / "fid_vs_clip.png")
