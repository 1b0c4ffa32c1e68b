"""main.py end to end: training runs as subprocesses on tiny configs, their log layout, resuming (after a
SIGKILL too, with and without -t), validation intervals longer than an epoch, metrics kept through a SIGKILL,
two-process DDP, bad input; in-process, overfitting a fixed batch and the Lightning hooks that training adds to a
model (image logs, scale_by_std)."""
from __future__ import annotations

import csv
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.model_factory import REPO_DIR, TESTS_DIR

TINY_SD = str(TESTS_DIR / "configs" / "tiny-sd.yaml")
TINY_TRAIN = str(TESTS_DIR / "configs" / "tiny-train.yaml")
TINY_AE = str(TESTS_DIR / "configs" / "tiny-autoencoder.yaml")
MAIN = str(REPO_DIR / "main.py")


def main_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(REPO_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_main(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAIN, *args], cwd=cwd, env=main_env(), capture_output=True, text=True,
                          timeout=timeout)


def only_run(cwd: Path) -> Path:
    runs = [Path(p) for p in glob.glob(str(cwd / "logs" / "*")) if not p.endswith("debug_runs")]
    assert len(runs) == 1, runs
    return runs[0]


def metric_steps(run: Path, column: str) -> list[tuple[int, float]]:
    rows = []
    for path in sorted(run.glob("csv/*/metrics.csv")):
        with open(path) as handle:
            rows += [(int(row["step"]), float(row[column])) for row in csv.DictReader(handle) if row.get(column)]
    return rows


def test_latent_diffusion_training_leaves_the_log_layout(tmp_path):
    result = run_main(["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "tiny"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    assert run.name.endswith("_tiny")
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (run / "configs").iterdir()) == ["lightning.yaml", "project.yaml"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    state = checkpoint["state_dict"]
    assert any(key.startswith("model.diffusion_model.") for key in state)
    assert any(key.startswith("model_ema.") for key in state)
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in state)
    assert {"inputs", "reconstruction", "samples", "conditioning", "progressive_row"} <= {
        p.name.split("_gs-")[0] for p in (run / "images" / "train").glob("*.png")}
    assert metric_steps(run, "train/loss_simple_step")
    assert not list(run.rglob(".tmp-*")), "no temporary files are left behind"
    assert f"run saved in {os.path.join('logs', run.name)}" in result.stdout

    project_config = next((run / "configs").glob("*-project.yaml"))
    render = subprocess.run(
        [sys.executable, str(REPO_DIR / "scripts" / "txt2img.py"), "--config", str(project_config),
         "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--prompt", "a red circle on a blue background",
         "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
         "--outdir", str(tmp_path / "out"), "--no_safety_checker"],
        cwd=tmp_path, env=dict(main_env(), HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=240)
    assert render.returncode == 0, render.stderr[-3000:]
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


def test_autoencoder_training_with_discriminator(tmp_path):
    result = run_main(["--base", TINY_AE, "-t", "-n", "ae"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(key.startswith("loss.discriminator.") for key in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2
    assert metric_steps(run, "train/disc_loss"), "the discriminator trains once disc_start is reached"
    assert {"inputs", "reconstructions", "samples"} <= {p.name.split("_gs-")[0]
                                                        for p in (run / "images" / "train").glob("*.png")}


def test_loss_goes_down_when_overfitting_a_fixed_batch():
    from ldm.data.shapes import SyntheticShapes
    from tests.model_factory import random_tiny_model

    torch.manual_seed(0)
    model = random_tiny_model().train()
    data = SyntheticShapes(size=64, length=2, seed=0)
    batch = {"jpg": torch.stack([torch.from_numpy(data[i]["image"]) for i in range(2)]),
             "txt": [data[i]["caption"] for i in range(2)]}
    z, c = model.get_input(batch, "jpg")
    t = torch.tensor([300, 600])
    noise = torch.randn_like(z)
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss, _ = model.p_losses(z, c, t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def shapes_batch() -> dict:
    from ldm.data.shapes import SyntheticShapes

    data = SyntheticShapes(size=64, length=2, seed=0)
    return {"jpg": torch.stack([torch.from_numpy(data[i]["image"]) for i in range(2)]),
            "txt": [data[i]["caption"] for i in range(2)]}


def test_lightning_hooks_and_image_logs_come_with_the_lightning_module():
    from ldm.lightning import as_lightning_module
    from tests.model_factory import random_tiny_model

    model = random_tiny_model()
    hooks = ("training_step", "validation_step", "optimizer_step", "on_train_batch_start", "log_images")
    assert not any(hasattr(model, hook) for hook in hooks), "the model itself is plain PyTorch"
    model = as_lightning_module(model)
    assert all(callable(getattr(model, hook)) for hook in hooks)
    images = model.log_images(shapes_batch(), N=2, ddim_steps=2, unconditional_guidance_scale=3.0)
    assert set(images) == {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples",
                           "samples_cfg_scale_3.00", "progressive_row"}
    assert images["samples"].shape == images["inputs"].shape == (2, 3, 64, 64)


def test_scale_by_std_sets_the_scale_factor_from_the_first_batch():
    from ldm.lightning import as_lightning_module
    from tests.model_factory import random_tiny_model, tiny_config

    config = tiny_config()
    config.model.params.scale_by_std = True
    model = as_lightning_module(random_tiny_model(config=config))
    batch = shapes_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(batch["jpg"].permute(0, 3, 1, 2)))
    torch.manual_seed(0)
    model.on_train_batch_start(batch, 0)
    torch.testing.assert_close(model.scale_factor, 1.0 / z.flatten().std(), rtol=1e-4, atol=0)
    assert "scale_factor" in model.state_dict()


@pytest.mark.slow
def test_run_killed_mid_way_resumes_where_its_last_checkpoint_stopped(tmp_path):
    args = ["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "killed", "lightning.trainer.max_steps=400",
            "lightning.modelcheckpoint.params.every_n_train_steps=5", "lightning.trainer.limit_val_batches=0",
            "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    process = subprocess.Popen([sys.executable, MAIN, *args], cwd=tmp_path, env=main_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            last = glob.glob(str(tmp_path / "logs" / "*" / "checkpoints" / "last.ckpt"))
            if last and torch.load(last[0], weights_only=True)["global_step"] >= 10:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint within 180 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    run = only_run(tmp_path)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    saved_step = saved["global_step"]
    adam_step = next(iter(saved["optimizer_states"][0]["state"].values()))["step"].item()
    assert adam_step == saved_step

    target = saved_step + 6
    result = run_main(["-r", str(run), "-t", f"lightning.trainer.max_steps={target}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == target
    assert not list((run / "checkpoints").glob("last-v*.ckpt")), "last.ckpt is overwritten in place"
    assert next(iter(resumed["optimizer_states"][0]["state"].values()))["step"].item() == target
    assert resumed["lr_schedulers"][0]["last_epoch"] == target
    assert resumed["state_dict"]["model_ema.num_updates"].item() == target
    sessions = sorted((run / "csv").iterdir())
    assert len(sessions) == 2, "each session keeps its own metrics file"


QUICK = ["lightning.trainer.limit_val_batches=0", "lightning.callbacks.image_logger.params.batch_frequency=1000"]


@pytest.fixture(scope="module")
def two_step_logs(tmp_path_factory) -> Path:
    """The logs/ folder of a finished two-step training run (copy it before resuming it)."""
    cwd = tmp_path_factory.mktemp("two_steps")
    result = run_main(["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "two", "lightning.trainer.max_steps=2", *QUICK],
                      cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "logs"


@pytest.mark.parametrize("train_flag", [[], ["-t"]], ids=["without_t", "with_t"])
def test_resume_trains_on_with_or_without_t(tmp_path, two_step_logs, train_flag):
    shutil.copytree(two_step_logs, tmp_path / "logs")
    run = only_run(tmp_path)
    result = run_main(["-r", str(run), *train_flag, "lightning.trainer.max_steps=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert ("training goes on" in result.stdout) == (not train_flag)


def test_resume_with_t_false_and_no_test_data_says_there_is_nothing_to_do(tmp_path, two_step_logs):
    shutil.copytree(two_step_logs, tmp_path / "logs")
    line = one_line_error(run_main(["-r", str(only_run(tmp_path)), "-t", "false"], tmp_path))
    assert "nothing to do" in line and "pass -t to train" in line


def test_val_check_interval_longer_than_an_epoch_validates_across_epochs(tmp_path):
    result = run_main(["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "val", "lightning.trainer.max_steps=6",
                       "lightning.trainer.val_check_interval=3", "data.params.train.params.length=4",
                       "lightning.callbacks.image_logger.params.batch_frequency=1000"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    validation_steps = [step for step, _ in metric_steps(run, "val/loss_simple")]
    assert validation_steps == [2, 5], "after batches 3 and 6, in epochs of 2 batches"


class KillAtCheckpoint(pl.Callback):
    """SIGKILLs its own training process in the middle of saving the first checkpoint at or after `step`."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sigkilled_run_keeps_the_metrics_logged_before_its_checkpoint(tmp_path):
    result = run_main(["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "csv", "lightning.trainer.max_steps=400",
                       "lightning.modelcheckpoint.params.every_n_train_steps=3", *QUICK,
                       "lightning.callbacks.kill.target=tests.test_main.KillAtCheckpoint",
                       "lightning.callbacks.kill.params.step=3"], tmp_path)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    learning_rate_steps = [step for step, _ in metric_steps(only_run(tmp_path), "lr-AdamW")]
    assert learning_rate_steps == [0, 1, 2], "the learning rate logged at the start of the checkpoint's step is kept"


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    result = run_main(["--base", TINY_SD, TINY_TRAIN, "-t", "-n", "ddp", "lightning.trainer.devices=2",
                       "lightning.trainer.strategy=ddp", "lightning.trainer.max_steps=2",
                       "lightning.trainer.val_check_interval=2"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert "Setting learning rate to 4.00e-04 = 1 (accumulate_grad_batches) * 2 (devices)" in result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("main.py: error:"), lines
    return lines[-1]


@pytest.mark.parametrize("case", ["missing_config", "bad_yaml", "bad_target", "bad_params", "missing_data_dir",
                                  "resume_not_a_run",
                                  "unknown_option", "gpus_without_gpu"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    bad_target = tmp_path / "target.yaml"
    bad_target.write_text("model:\n  target: ldm.nothing.Here\ndata:\n  target: main.DataModuleFromConfig\n"
                          "  params: {batch_size: 1}\n")
    missing_data = tmp_path / "data.yaml"
    missing_data.write_text("data:\n  target: main.DataModuleFromConfig\n  params:\n    batch_size: 1\n    train:\n"
                            f"      target: ldm.data.captioned.CaptionedImages\n      params: {{data_root: {tmp_path / 'nope'}}}\n")
    (tmp_path / "not_a_run").mkdir()
    args = {
        "missing_config": ["--base", str(tmp_path / "missing.yaml"), "-t"],
        "bad_yaml": ["--base", str(bad_yaml), "-t"],
        "bad_target": ["--base", str(bad_target), "-t"],
        "bad_params": ["--base", TINY_SD, TINY_TRAIN, "-t", "data.params.train.params.colour=red"],
        "missing_data_dir": ["--base", TINY_SD, str(missing_data), "-t"],
        "resume_not_a_run": ["-r", str(tmp_path / "not_a_run"), "-t"],
        "unknown_option": ["--base", TINY_SD, TINY_TRAIN, "-t", "--max_stepz", "3"],
        "gpus_without_gpu": ["--base", TINY_SD, TINY_TRAIN, "-t", "--gpus", "0,"],
    }[case]
    if case == "gpus_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    line = one_line_error(run_main(args, tmp_path, timeout=120))
    expected = {"missing_config": "config not found", "bad_yaml": "cannot parse config", "bad_target": "cannot be imported",
                "bad_params": "unexpected keyword argument 'colour'",
                "missing_data_dir": "data directory not found", "resume_not_a_run": "not a training run",
                "unknown_option": "unrecognised argument", "gpus_without_gpu": "leave --gpus out"}[case]
    assert expected in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
