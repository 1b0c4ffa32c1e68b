"""scripts/evaluate_demo.py: its command-line checks refuse a bad sampler, schedule or step count in one line
(exit code 2) before the model loads; a tiny --sweep writes its records and plot, counts the network calls of
each sampler exactly, and --timing reports ratios to its first case."""
from __future__ import annotations

import importlib.util
import json

import pytest

import ldm.checkpoint
from ldm.models.diffusion.k_sampler import K_SAMPLERS
from tests.cli_support import REPO_DIR

SCRIPT = REPO_DIR / "scripts" / "evaluate_demo.py"


@pytest.fixture(scope="module")
def evaluate_demo():
    spec = importlib.util.spec_from_file_location("evaluate_demo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ldm.checkpoint, "load_model_from_config", refuse)


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ddim", "--schedule", "karras"], "the ddim sampler runs on the model's timesteps"),
    (["--sampler", "plms:exponential"], "the plms sampler runs on the model's timesteps"),
    (["--sweep", "--sampler", "dpmpp_2m", "dpm_solver", "--schedule", "karras"], "the dpm_solver sampler"),
    (["--sampler", "euler", "--schedule", "kerras"], "unknown --schedule 'kerras'"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--sweep", "--steps", "5", "-3"], "--steps must be at least 1, got -3"),
    (["--sweep", "--sampler", "euler@0"], "steps must be at least 1"),
    (["--sampler", "eulr"], "unknown sampler 'eulr'"),
    (["--steps", "10", "20"], "add --sweep"),
    (["--sampler", "ddim", "euler"], "add --sweep"),
    (["--plot", "x.png"], "--plot draws the accuracies of a --sweep"),
    (["--sweep", "--resume"], "--resume needs --results"),
    (["--timing", "--resume", "--results", "r.json"], "--resume goes with --sweep"),
    (["--sweep", "--plot", "x.png", "--prompt", "a photo of *", "--concept", "purple", "star"], "--prompt run"),
])
def test_bad_arguments_exit_2_in_one_line_before_the_model_loads(evaluate_demo, no_model_load, capsys, args,
                                                                 message):
    assert evaluate_demo.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err


def test_plot_without_matplotlib_says_how_to_install_it(evaluate_demo, no_model_load, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert evaluate_demo.main(["--sweep", "--plot", "x.png"]) == 2
    assert "pip install -e .[eval]" in capsys.readouterr().err


def test_cases_cross_samplers_and_steps(evaluate_demo):
    cases = evaluate_demo.parse_cases(["all", "dpmpp_2m:karras", "ddim@50", "ddim"], "default", [5, 50])
    assert len(cases) == 2 * len(evaluate_demo.SAMPLER_NAMES) + 2
    assert cases[-2:] == [evaluate_demo.Case("dpmpp_2m", "karras", 5), evaluate_demo.Case("dpmpp_2m", "karras", 50)]
    assert str(cases[-1]) == "DPM++ 2M Karras 50"
    karras = evaluate_demo.parse_cases(["all"], "karras", [10])
    assert [c.sampler for c in karras] == list(K_SAMPLERS)


def test_tiny_sweep_writes_results_and_plot(evaluate_demo, tmp_path, capsys):
    results = tmp_path / "results.json"
    args = ["--sweep", "--n", "2", "--batch_size", "2", "--steps", "1", "2", "--sampler", "ddim", "heun",
            "--results", str(results)]
    assert evaluate_demo.main(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = json.loads(results.read_text())
    assert records == printed
    assert [(r["sampler"], r["steps"], r["network_calls"]) for r in records] == [
        ("ddim", 1, 1), ("ddim", 2, 2), ("heun", 1, 1), ("heun", 2, 2 * K_SAMPLERS["heun"].calls_per_step - 1)]
    for record in records:
        assert record["kind"] == "accuracy" and record["n"] == 2 and record["label"] in ("DDIM", "Heun")
        assert 0 <= record["mean_accuracy"] <= 1
    assert not list(tmp_path.glob(".*.tmp"))

    pytest.importorskip("matplotlib")
    plot = tmp_path / "accuracy.png"
    assert evaluate_demo.main([*args, "--resume", "--plot", str(plot)]) == 0  # everything skipped: only the plot
    assert capsys.readouterr().out == ""
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(results.read_text()) == records


def test_timing_reports_ratios_to_the_first_case(evaluate_demo, tmp_path, capsys):
    args = ["--timing", "--rounds", "1", "--batch_size", "1", "--sampler", "ddim@2", "dpmpp_sde:karras@2"]
    assert evaluate_demo.main(args) == 0
    reference, other = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert reference["time_ratio"] == 1.0 and reference["reference"] == "DDIM 2"
    assert other["label"] == "DPM++ SDE Karras" and other["network_calls"] == 3 and other["time_ratio"] > 0
