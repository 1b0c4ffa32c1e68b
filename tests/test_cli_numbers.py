"""Numbers typed on the sampling command lines: NaN and infinity refused, and image sizes checked against
what the device can hold, before the model loads."""
from __future__ import annotations

import pytest
import torch

from ldm.cli.common import run_cli
from ldm.cli.geometry import read_geometry
from ldm.cli.memory import GIB, SizeRequest, check_size_fits, largest_pixels, peak_bytes
from ldm.config_files import read_plain_config
from ldm.errors import UserInputError
from tests.cli_support import FAST, load_script
from tests.model_factory import REPO_DIR, TINY_SD_CONFIG

IMG2IMG = ["--config", str(TINY_SD_CONFIG), "--ddim_steps", "2"]
SD = read_geometry(read_plain_config(REPO_DIR / "configs/stable-diffusion/v1-inference.yaml"))


def _error_line(capsys, tmp_path, script: str, args: list[str]) -> str:
    """The one stderr line of a run that must stop before its model loads: its checkpoint is not one, and
    no error may say so."""
    checkpoint = tmp_path / "not-a-checkpoint.safetensors"
    checkpoint.write_text("never loaded\n")
    outdir = tmp_path / "out"
    try:
        code = run_cli(load_script(script).main, [*args, "--ckpt", str(checkpoint), "--outdir", str(outdir)])
    except SystemExit as exit:  # argparse's errors exit from inside the parser
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not outdir.exists()
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--scale", "nan"), ("--scale", "inf"), ("--scale", "-inf"),
                                        ("--ddim_eta", "nan"), ("--ddim_eta", "inf")])
@pytest.mark.parametrize("script", ["txt2img.py", "img2img.py"])
def test_nan_and_infinity_are_refused(capsys, tmp_path, script, flag, value):
    args = [*IMG2IMG, "--init-img", "x.png"] if script == "img2img.py" else FAST
    line = _error_line(capsys, tmp_path, script, [*args, f"{flag}={value}"])
    assert f"{flag}: must be a finite number, got {value}" in line


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_strength_nan_and_infinity_are_refused(capsys, tmp_path, value):
    line = _error_line(capsys, tmp_path, "img2img.py", [*IMG2IMG, "--init-img", "x.png", f"--strength={value}"])
    assert "--strength: must be" in line and value in line


def test_an_absurd_size_is_refused_with_the_largest_that_fits(capsys, tmp_path):
    side = 2 ** 20  # a 2**40-pixel image: petabytes, on any machine
    line = _error_line(capsys, tmp_path, "txt2img.py", [*FAST, "--H", str(side), "--W", str(side),
                                                        "--no_safety_checker"])
    assert f"--H {side} --W {side} with --n_samples 3 needs about" in line
    assert "the largest square image that fits is --H" in line and "--max_pixels N overrides" in line


def test_max_pixels_replaces_the_estimate(capsys, tmp_path):
    line = _error_line(capsys, tmp_path, "txt2img.py", [*FAST, "--max_pixels", "1000", "--no_safety_checker"])
    assert "--H 64 --W 64 is 4,096 pixels, more than --max_pixels 1,000" in line
    assert "--H 16 --W 16" in line  # the largest square of whole multiples of the tiny model's 16


def test_img2img_checks_the_init_image_size(capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (128, 64), "red").save(tmp_path / "init.png")
    line = _error_line(capsys, tmp_path, "img2img.py", [*IMG2IMG, "--init-img", str(tmp_path / "init.png"),
                                                        "--max_pixels", "4096", "--no_safety_checker"])
    assert "--H 64 --W 128 is 8,192 pixels, more than --max_pixels 4,096" in line


def test_the_estimate_fits_stable_diffusion_where_it_runs():
    """SD v1 at 512x512: three guided samples fit in 16 GiB with a 4 GiB checkpoint; 1024x1024 fits one sample
    with a tiled decode in 8 GiB; the largest size found is where the estimate meets the memory."""
    weights = 4 * GIB
    request = SizeRequest(height=512, width=512, n_samples=3, guided=True, element_size=4)
    assert peak_bytes(request, 512 * 512, SD, weights) < 16 * GIB
    largest = largest_pixels(request, 16 * GIB, SD, weights)
    assert peak_bytes(request, largest, SD, weights) <= 16 * GIB < peak_bytes(request, largest + 64, SD, weights)
    tiled = SizeRequest(height=1024, width=1024, n_samples=1, guided=True, element_size=4,
                        decode_tile_pixels=512 * 512)
    assert peak_bytes(tiled, 1024 * 1024, SD, weights) < 8 * GIB
    assert largest_pixels(tiled, 8 * GIB, SD, weights) > largest_pixels(
        SizeRequest(height=1024, width=1024, n_samples=1, guided=True, element_size=4), 8 * GIB, SD, weights)
    assert largest_pixels(request, 2 * GIB, SD, weights) == 0
    with pytest.raises(UserInputError, match="not even the smallest image fits"):
        check_size_fits(request, SD, None, torch.device("cpu"), 2 * GIB, weights)
