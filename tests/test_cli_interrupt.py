"""Ctrl-C ends a sampling run within seconds even inside one long native step, and leaves no partial file."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.cli_support import SCRIPTS, script_env, write_tiny_checkpoint
from tests.model_factory import TINY_SD_CONFIG
from tests.slow_unet import STARTED_FILE

WAIT_FOR_STEP = 90  # seconds for the run to load and reach its first step on a busy machine
LATENCY = 10  # seconds from Ctrl-C to exit: the interrupt's 3 s grace and the process's exit


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is a POSIX signal")
def test_ctrl_c_inside_a_long_native_step_exits_within_seconds(tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text(TINY_SD_CONFIG.read_text().replace(
        "ldm.modules.diffusionmodules.openaimodel.UNetModel", "tests.slow_unet.SlowUNet"))
    checkpoint, started, outdir = write_tiny_checkpoint(tmp_path / "tiny.safetensors"), tmp_path / "started", tmp_path / "out"
    env = script_env(tmp_path, **{STARTED_FILE: str(started)})
    # A process started as a background job ignores SIGINT, and its children inherit that (POSIX): the run gets
    # Python's own handler instead, as it would when started from a terminal (exec resets a handled signal).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = subprocess.Popen([sys.executable, "-X", "faulthandler", str(SCRIPTS / "txt2img.py"), "--config",
                                str(config), "--ckpt", str(checkpoint), "--H", "64", "--W", "64", "--ddim_steps", "2",
                                "--no_safety_checker", "--outdir", str(outdir)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if inherited is not None:  # None: a handler installed outside Python, which stays
            signal.signal(signal.SIGINT, inherited)
    try:
        deadline = time.monotonic() + WAIT_FOR_STEP
        while not started.exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the run never reached its first step"
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the native computation
        interrupted = time.monotonic()
        run.send_signal(signal.SIGINT)
        try:
            _, stderr = run.communicate(timeout=LATENCY + 20)
        except subprocess.TimeoutExpired:
            if run.poll() is not None:
                pytest.fail(f"the run ended (exit code {run.returncode}) but a process it started kept its output open")
            run.send_signal(signal.SIGABRT)  # under -X faulthandler: every thread's stack on stderr
            pytest.fail(f"the run still went on {LATENCY + 20} s after Ctrl-C; where its threads were:\n"
                        f"{run.communicate(timeout=30)[1][-6000:]}")
        latency = time.monotonic() - interrupted
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    assert latency < LATENCY, f"Ctrl-C took {latency:.1f} s"
    assert "interrupted" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert not any(path.is_file() for path in outdir.rglob("*")), "a run stopped before any sample saves nothing"
