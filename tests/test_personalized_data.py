"""The textual-inversion datasets (Gal et al. 2022): template captions, repeats, per-image tokens, crop,
resize, flip, EXIF orientation, non-images skipped, clear errors for an empty or missing folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import personalized, personalized_style
from ldm.errors import UserInputError


@pytest.fixture()
def root(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    for index in range(3):
        image = np.zeros((40, 60, 3), dtype=np.uint8)
        image[:, :30] = (255, 0, 0)  # left half red, right half black
        image[0, 0] = (index, 0, 0)
        Image.fromarray(image).save(folder / f"{index}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_length_repeats_and_non_images_skipped(root):
    train = personalized.PersonalizedBase(str(root), repeats=7, set="train")
    assert train.num_images == 3 and len(train) == 21
    assert [p.rsplit("/", 1)[-1] for p in train.image_paths] == ["0.png", "1.png", "2.png"]
    assert len(personalized.PersonalizedBase(str(root), set="val")) == 3


def test_captions_use_the_object_and_style_templates(root):
    torch.manual_seed(0)
    data = personalized.PersonalizedBase(str(root), placeholder_token="*", set="val")
    captions = {data[i % 3]["caption"] for i in range(60)}
    assert captions <= {t.format("*") for t in personalized.imagenet_templates_small} and len(captions) > 5
    style = personalized_style.PersonalizedBase(str(root), set="val")
    assert style[0]["caption"] in {t.format("*") for t in personalized_style.imagenet_templates_small}
    coarse = personalized.PersonalizedBase(str(root), set="val", coarse_class_text="dog")
    assert "dog *" in coarse[0]["caption"]


def test_per_image_tokens_mix_in_the_image_token(root):
    torch.manual_seed(0)
    data = personalized.PersonalizedBase(str(root), set="val", per_image_tokens=True, mixing_prob=1.0)
    assert data[1]["caption"] in {t.format("*", personalized.per_img_token_list[1])
                                  for t in personalized.imagenet_dual_templates_small}


def test_size_center_crop_and_range(root):
    item = personalized.PersonalizedBase(str(root), size=16, center_crop=True, flip_p=0.0, set="val")[0]
    image = item["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert image.min() >= -1 and image.max() <= 1
    # The centre 40x40 crop of a 60-wide image whose left 30 columns are red: left 10 columns red.
    assert image[8, 1, 0] > 0.9 and image[8, 14, 0] < -0.9


def test_flip(root):
    plain = personalized.PersonalizedBase(str(root), size=20, flip_p=0.0, set="val")[0]["image"]
    flipped = personalized.PersonalizedBase(str(root), size=20, flip_p=1.0, set="val")[0]["image"]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), "black")
    image.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    item = personalized.PersonalizedBase(str(tmp_path), flip_p=0.0, set="val")[0]["image"]
    assert item.shape == (60, 40, 3)
    assert item[2, 20, 0] > 0.8 and item[-3, 20, 0] < -0.8  # the red half is now on top


@pytest.mark.parametrize("case", ["empty", "only_text", "missing"])
def test_a_folder_without_images_is_a_clear_error(tmp_path, case):
    folder = tmp_path / "images"
    if case != "missing":
        folder.mkdir()
    if case == "only_text":
        (folder / "a.txt").write_text("x")
    with pytest.raises(UserInputError, match="no images|not a directory"):
        personalized.PersonalizedBase(str(folder))
