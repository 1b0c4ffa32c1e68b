"""The two numbers of Gal et al. 2022 ("An Image is Worth One Word", sec. 5) for the images an embedding
evaluation stored (ldm.evaluation.textual_inversion), recomputed from disk on every run:

- image similarity (reconstruction): the mean CLIP cosine between the images of the reconstruction prompt (the
  first, "a photo of S*") and the training images;
- text similarity (editability): for each editing prompt, the mean CLIP cosine between its images and the prompt
  with the placeholder left out ("a photo of on the moon"), averaged over the editing prompts.

Both are given for the learned word and for the baseline word, and per prompt, in results.json and results.csv."""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

from ldm.errors import UserInputError
from ldm.evaluation.clip_score import CLIPEmbedder, image_image_similarity, text_image_similarity, without_placeholder
from ldm.evaluation.files import atomic_write_text
from ldm.evaluation.files import IMAGE_SUFFIXES, image_files
from ldm.evaluation.textual_inversion import VARIANTS, WORD, EmbeddingProtocol, image_paths

CSV_FIELDS = ("variant", "word", "prompt", "image_similarity", "text_similarity")


def training_images(data_root: str | Path) -> list[Path]:
    """The image files directly inside `data_root` (the embedding's training images), sorted."""
    folder = Path(data_root)
    if not folder.is_dir():
        raise UserInputError(f"--data_root {folder} is not a folder")
    paths = image_files(folder)
    if not paths:
        raise UserInputError(f"--data_root {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def score(outdir: Path, protocol: EmbeddingProtocol, clip: CLIPEmbedder, training: Sequence[Path]
          ) -> list[dict[str, Any]]:
    """One record per variant: its word, the two summary similarities and the per-prompt ones."""
    training_embeddings = clip.images(list(training))
    texts = clip.texts([without_placeholder(template, WORD) for template in protocol.prompts])
    editing = range(1, len(protocol.prompts)) if len(protocol.prompts) > 1 else range(1)
    records = []
    for variant, word in enumerate(protocol.words):
        prompts = []
        for index, template in enumerate(protocol.prompts):
            generated = clip.images(image_paths(outdir, protocol, variant, index))
            prompts.append({"prompt": protocol.prompt(variant, index),
                            "image_similarity": image_image_similarity(generated, training_embeddings),
                            "text_similarity": text_image_similarity(generated, texts[index])})
        records.append({"variant": VARIANTS[variant], "word": word,
                        "image_similarity": prompts[0]["image_similarity"],
                        "text_similarity": sum(prompts[i]["text_similarity"] for i in editing) / len(editing),
                        "prompts": prompts})
    return records


def demo_concept_accuracy(outdir: Path, protocol: EmbeddingProtocol, records: Sequence[dict[str, Any]],
                          concept: tuple[str, str] = ("purple", "star")) -> None:
    """For the demo model (ldm.data.shapes), numbers that mean something without CLIP, added to `records`:
    the share of each prompt's images that show the concept (colour, shape; read back with
    ldm.data.shapes_analysis), and where the prompt asks for a background ("on a green background"), the share
    that show the concept on it."""
    from PIL import Image

    from ldm.data.shapes_analysis import read_image

    for variant, record in enumerate(records):
        for index, row in enumerate(record["prompts"]):
            background = re.search(r"on an? (\w+) background", protocol.prompts[index])
            readings = []
            for path in image_paths(outdir, protocol, variant, index):
                with Image.open(path) as image:
                    readings.append(read_image(image))
            shown = [(r.color, r.shape) == concept for r in readings]
            row["concept_accuracy"] = sum(shown) / len(shown)
            if background:
                row["edit_accuracy"] = sum(s and r.background == background.group(1)
                                           for s, r in zip(shown, readings)) / len(shown)
        edits = [row["edit_accuracy"] for row in record["prompts"] if "edit_accuracy" in row]
        record["concept_accuracy"] = record["prompts"][0]["concept_accuracy"]
        if edits:
            record["edit_accuracy"] = sum(edits) / len(edits)


def write_results(outdir: Path, protocol: EmbeddingProtocol, records: Sequence[dict[str, Any]],
                  clip_model: str, training: Sequence[Path]) -> None:
    """results.json (protocol, CLIP model, training images, records) and results.csv (one row per variant and
    prompt, then one summary row per variant with the prompt "all"), each written atomically."""
    summary = {"protocol": json.loads(protocol.to_json()), "clip_model": clip_model,
               "training_images": [p.name for p in training], "results": list(records)}
    atomic_write_text(outdir / "results.json", json.dumps(summary, indent=1) + "\n")
    table = io.StringIO()
    fields = CSV_FIELDS + tuple(key for key in ("concept_accuracy", "edit_accuracy") if key in records[0])
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        for row in record["prompts"]:
            writer.writerow({"variant": record["variant"], "word": record["word"], **row})
    for record in records:
        writer.writerow({key: record.get(key) for key in fields if key != "prompt"} | {"prompt": "all"})
    atomic_write_text(outdir / "results.csv", table.getvalue())
