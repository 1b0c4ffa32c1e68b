"""The captions an evaluation samples: chosen from a COCO captions file (one caption per image, by a seeded random
choice) or read from a plain text file (one caption per line), or generated for the demo model; and the check
that the reference images of the chosen COCO captions are in the image folder."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ldm.errors import UserInputError
from ldm.evaluation.files import IMAGE_SUFFIXES, image_files

DEMO_EXCLUDED = (("purple", "star"),)  # held out of the demo model's training set (textual inversion learns it)


@dataclass(frozen=True)
class Captions:
    """The chosen captions in sampling order (index i is sampled with seed `seed + i`), the reference image file
    name of each where the source names one (COCO), and the SHA-256 of their source."""

    texts: tuple[str, ...]
    image_files: Optional[tuple[str, ...]]
    source_sha256: str


def choose_coco(annotations: Sequence[tuple[int, str]], n: int, seed: int) -> list[tuple[int, str]]:
    """`n` (image_id, caption) pairs: the images in a seeded random order, a random one of each image's captions;
    only if `n` exceeds the number of images does a second round (another caption of each image) follow."""
    by_image: dict[int, list[str]] = {}
    for image_id, caption in annotations:
        by_image.setdefault(image_id, []).append(caption)
    rng = np.random.default_rng(seed)
    ids = sorted(by_image)
    order = [ids[i] for i in rng.permutation(len(ids))]
    shuffled = {image_id: [by_image[image_id][i] for i in rng.permutation(len(by_image[image_id]))]
                for image_id in order}
    chosen: list[tuple[int, str]] = []
    for round_index in range(max(len(c) for c in shuffled.values())):
        for image_id in order:
            if len(chosen) == n:
                return chosen
            if round_index < len(shuffled[image_id]):
                chosen.append((image_id, shuffled[image_id][round_index]))
    return chosen


def read_captions(path: str, n: int, seed: int) -> Captions:
    """The first `n` captions of a COCO captions file (chosen by `choose_coco`) or a text file (its first `n`
    non-blank lines, in order). Fewer captions than `n` is an error."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"captions file {'is a directory' if file.is_dir() else 'not found'}: {path}")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(f"captions file {path} is not UTF-8 text: {error}") from error
    if file.suffix.lower() == ".json":
        texts, files = _coco_captions(path, text, n, seed)
    else:
        texts, files = [line.strip() for line in text.splitlines() if line.strip()][:n], None
    if len(texts) < n:
        raise UserInputError(f"captions file {path} has {len(texts)} captions, fewer than --n {n}")
    return Captions(tuple(texts), files, digest)


def _coco_captions(path: str, text: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    try:
        data: Any = json.loads(text)
        annotations = [(int(a["image_id"]), " ".join(str(a["caption"]).split())) for a in data["annotations"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"captions file {path} is not a COCO captions file (a JSON object whose 'annotations' "
                             f"have 'image_id' and 'caption'): {error}") from error
    if not annotations:
        raise UserInputError(f"captions file {path} has no annotations")
    names = {int(image["id"]): str(image["file_name"]) for image in data.get("images", [])
             if isinstance(image, dict) and "id" in image and "file_name" in image}
    chosen = choose_coco(annotations, n, seed)
    return [caption for _, caption in chosen], [names.get(image_id, f"{image_id:012d}.jpg") for image_id, _ in chosen]


def demo_captions(n: int, seed: int) -> Captions:
    """`n` captions of the demo data set (ldm.data.shapes: colour, shape and background through its templates),
    item i of the seed's SyntheticShapes; never the held-out purple star."""
    from ldm.data.shapes import SyntheticShapes

    shapes = SyntheticShapes(seed=seed, exclude=DEMO_EXCLUDED)
    texts = tuple(shapes.spec(i)[1] for i in range(n))
    digest = hashlib.sha256(json.dumps(["ldm.data.shapes", seed, texts]).encode()).hexdigest()
    return Captions(texts, None, digest)


def check_reference_images(folder: str, captions: Captions) -> None:
    """The image folder exists and has images; for COCO captions, the image of every chosen caption."""
    directory = Path(folder)
    if not directory.is_dir():
        raise UserInputError(f"image folder {'is a file' if directory.exists() else 'not found'}: {folder}")
    present = {p.name for p in image_files(directory)}
    if not present:
        raise UserInputError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); FID needs the "
                             "reference images (e.g. COCO's val2017)")
    if captions.image_files is not None:
        missing = sorted({name for name in captions.image_files if name not in present})
        if missing:
            raise UserInputError(f"{len(missing)} images of the chosen captions are not in {folder} (e.g. "
                                 f"{missing[0]}): give the image folder of the captions file (val2017 for "
                                 "captions_val2017.json)")
