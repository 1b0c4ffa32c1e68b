"""Training data: captioned folders and metadata files, EXIF orientation, unreadable files, empty sets,
the image transform, and DataModuleFromConfig."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.data.base import ImageTransform
from ldm.data.captioned import CaptionedImages
from ldm.errors import UserInputError


def save_image(path, size=(40, 24), color=(255, 0, 0), exif_orientation=None):
    image = Image.new("RGB", size, color)
    image.paste((0, 0, 255), (0, 0, size[0] // 2, size[1]))
    if exif_orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)


def test_folder_with_caption_files(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red and blue flag\n")
    (tmp_path / "sub").mkdir()
    save_image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("another flag")
    (tmp_path / "notes.md").write_text("not an image")
    data = CaptionedImages(str(tmp_path), size=16, flip_p=0.0)
    assert len(data) == 2
    example = data[0]
    assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.float32
    assert -1.0 <= example["image"].min() and example["image"].max() <= 1.0
    assert sorted(data[i]["caption"] for i in range(2)) == ["a red and blue flag", "another flag"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_metadata_files(tmp_path, suffix):
    save_image(tmp_path / "x.png")
    save_image(tmp_path / "y.png", color=(0, 255, 0))
    rows = [{"file_name": "x.png", "text": "first"}, {"file_name": "y.png", "text": "second"}]
    meta = tmp_path / f"meta{suffix}"
    if suffix == ".jsonl":
        meta.write_text("\n".join(json.dumps(row) for row in rows))
    else:
        meta.write_text("file_name,text\n" + "\n".join(f"{r['file_name']},{r['text']}" for r in rows))
    data = CaptionedImages(str(tmp_path), size=8, metadata=meta.name, repeats=3)
    assert len(data) == 6
    assert [data[i]["caption"] for i in range(2)] == ["first", "second"]


def test_exif_orientation_is_applied(tmp_path):
    save_image(tmp_path / "rotated.jpg", size=(40, 24), exif_orientation=6)
    data = CaptionedImages(str(tmp_path), size=24, crop="none", flip_p=0.0, caption_key=None)
    image = (data[0]["image"] + 1) * 127.5
    # Orientation 6 turns the image 90 degrees clockwise: the blue left half ends up at the top.
    assert image[2, 12, 2] > 200 and image[-3, 12, 0] > 200


def test_unreadable_files_are_skipped_with_a_count(tmp_path, caplog):
    save_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = CaptionedImages(str(tmp_path), size=8)
    assert len(data) == 1
    assert "skipped 2 of 3 image files" in caplog.text


@pytest.mark.parametrize("layout", ["missing", "empty", "only_broken"])
def test_no_usable_images_is_a_clear_error(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "only_broken":
        (root / "broken.png").write_bytes(b"nope")
    with pytest.raises(UserInputError, match="data directory not found|no images found|can be read"):
        CaptionedImages(str(root), size=8)


def test_transform_crops_and_flips():
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 15, 10))
    centre = ImageTransform(10, crop="center", flip_p=0.0)(image)
    assert centre.shape == (10, 10, 3)
    flipped = ImageTransform(10, crop="none", flip_p=1.0)(image)
    plain = ImageTransform(10, crop="none", flip_p=0.0)(image)
    np.testing.assert_allclose(flipped, plain[:, ::-1])
    with pytest.raises(UserInputError):
        ImageTransform(10, crop="diagonal")


def test_data_module_builds_loaders(tmp_path):
    from ldm.training.data_module import DataModuleFromConfig

    config = {"target": "ldm.data.shapes.SyntheticShapes", "params": {"size": 16, "length": 6}}
    data = DataModuleFromConfig(batch_size=4, train=config, validation=config, num_workers=0, wrap=True)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 16, 16, 3) and len(batch["caption"]) == 4
    assert data.has("validation") and not data.has("test")
    empty = DataModuleFromConfig(batch_size=1, train={**config, "params": {"size": 16, "length": 0}}, num_workers=0)
    with pytest.raises(UserInputError, match="empty"):
        empty.setup()
