"""Numbered PNGs that never overwrite (also when written at once), grids and the `parameters` chunk."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ldm.cli.outputs import describe_numbered, infotext, make_grid, parse_infotext, png_parameters, save_numbered
from ldm.cli.writer import ImageWriter
from tests.model_factory import REPO_DIR


def test_concurrent_writers_each_get_their_own_numbers(tmp_path):
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda image: save_numbered(image, tmp_path), images))
    assert sorted(p.name for p in paths) == [f"{i:05}.png" for i in range(40)]
    assert sorted(Image.open(p).getpixel((0, 0))[0] for p in paths) == list(range(40))
    assert not list(tmp_path.glob(".partial-*"))


def test_two_processes_writing_into_one_directory_lose_nothing(tmp_path):
    code = ("import sys; from PIL import Image; from ldm.cli.outputs import save_numbered\n"
            "for i in range(30): save_numbered(Image.new('RGB', (4, 4), (int(sys.argv[1]), i, 0)), sys.argv[2])")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(k), str(tmp_path)], cwd=REPO_DIR) for k in (1, 2)]
    assert all(writer.wait(timeout=60) == 0 for writer in writers)
    pixels = {Image.open(p).getpixel((0, 0))[:2] for p in tmp_path.glob("*.png")}
    assert len(list(tmp_path.glob("*.png"))) == 60 and len(pixels) == 60


def test_numbers_are_described_as_runs():
    assert describe_numbered(["00008.png", "00003.png", "00004.png", "00005.png", "00010.png", "00011.png"]) == \
        "00003-00005.png, 00008.png, 00010-00011.png"
    assert describe_numbered(["00009.png", "00010.png"]) == "00009-00010.png"
    assert describe_numbered(["99999.png", "100000.png"]) == "99999-100000.png"


def test_summary_names_only_this_runs_files_when_another_run_writes_in_between(tmp_path):
    """Two runs writing into one outdir at the same time: each summary lists exactly its own files."""
    ours, theirs = (ImageWriter(tmp_path, skip_grid=True) for _ in range(2))
    ours.prepare()
    pixels = np.zeros((1, 4, 4, 3))
    fields = [{"Seed": 0}]
    for writer in (ours, ours, theirs, ours, theirs, theirs, ours):
        writer.add(pixels, ["a prompt"], fields)
    samples = tmp_path / "samples"
    assert ours.summary(None).endswith(f"4 images in {samples} (00000-00001.png, 00003.png, 00006.png)")
    assert theirs.summary(None).endswith(f"3 images in {samples} (00002.png, 00004-00005.png)")
    alone = ImageWriter(tmp_path / "alone", skip_grid=True)
    alone.prepare()
    alone.add(np.zeros((3, 4, 4, 3)), ["a prompt"] * 3, fields * 3)
    assert alone.summary(None).endswith(f"3 images in {tmp_path / 'alone' / 'samples'} (00000-00002.png)")


def test_numbering_continues_after_the_highest_existing_number(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "00007.png")
    (tmp_path / "notes.png").write_text("")
    assert save_numbered(Image.new("RGB", (4, 4)), tmp_path).name == "00008.png"


def test_grid_layout():
    tiles = [np.full((4, 6, 3), i + 1, np.uint8) for i in range(5)]
    grid = make_grid(tiles, columns=2)
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert grid[2, 2, 0] == 1 and grid[2, 10, 0] == 2 and grid[14, 2, 0] == 5 and grid[14, 10, 0] == 0


def test_parameters_round_trip_through_a_png(tmp_path):
    fields = {"Steps": 50, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 42, "Size": "512x512",
              "Model hash": "fe4efff1e1", "Note": 'a, "quoted": value', "Skipped": None}
    text = infotext("a cat,\nin a hat", "blurry, dark", fields)
    assert text.splitlines()[-1].startswith("Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png", pnginfo=png_parameters(text))
    prompt, negative, parsed = parse_infotext(Image.open(tmp_path / "x.png").text["parameters"])
    assert (prompt, negative) == ("a cat,\nin a hat", "blurry, dark")
    assert parsed["Note"] == 'a, "quoted": value' and parsed["Seed"] == "42" and "Skipped" not in parsed
