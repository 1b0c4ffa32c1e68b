"""Metrics per (checkpoint, scale) from the images on disk, kept in `results.json` (the records of earlier runs
of other checkpoints and scales stay) and `results.csv`."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from ldm.evaluation.files import atomic_write_text, is_complete_png
from ldm.evaluation.metric import Metric, Sample
from ldm.evaluation.protocol import Protocol
from ldm.evaluation.work import image_path

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
KEY_COLUMNS = ("checkpoint", "scale", "n")


def group_samples(outdir: Path, checkpoint: str, scale: float, captions: Sequence[str]) -> list[Sample]:
    return [Sample(image_path(outdir, checkpoint, scale, i), caption, i, scale) for i, caption in enumerate(captions)]


def compute_records(outdir: Path, protocol: Protocol, checkpoints: Sequence[str], scales: Sequence[float],
                    captions: Sequence[str], metrics: Sequence[Metric]) -> list[dict[str, Any]]:
    """One record per complete (checkpoint, scale) group: its metrics over all its images. A group with missing
    images is left out, with a warning."""
    records = []
    size = (protocol.W, protocol.H)
    for checkpoint in checkpoints:
        for scale in scales:
            samples = group_samples(outdir, checkpoint, scale, captions)
            missing = sum(not is_complete_png(sample.path, size) for sample in samples)
            if missing:
                logger.warning("%s at scale %g: %d of %d images are missing; no metrics for it (sample them first: "
                               "run without --metrics_only)", checkpoint, scale, missing, len(samples))
                continue
            record: dict[str, Any] = {"checkpoint": checkpoint, "scale": scale, "n": len(samples)}
            for metric in metrics:
                logger.info("%s of %s at scale %g", metric.name, checkpoint, scale)
                record[metric.name] = float(metric.compute(samples))
            records.append(record)
    return records


def read_records(outdir: Path) -> list[dict[str, Any]]:
    """The records of results.json; none if it is missing or unreadable."""
    path = outdir / RESULTS_JSON
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("%s cannot be read (%s); it is rewritten with this run's results", path, error)
        return []


def merge_records(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`old` with each group's metrics updated from `new` (new groups appended), in checkpoint then scale order
    of first appearance and value."""
    merged: dict[tuple[str, float], dict[str, Any]] = {}
    for record in [*old, *new]:
        key = (record["checkpoint"], float(record["scale"]))
        merged[key] = {**merged.get(key, {}), **record}
    order = list(dict.fromkeys(checkpoint for checkpoint, _ in merged))
    return [merged[key] for key in sorted(merged, key=lambda k: (order.index(k[0]), k[1]))]


def write_results(outdir: Path, protocol: Protocol, records: Sequence[dict[str, Any]]) -> None:
    """results.json (the protocol and the records) and results.csv (one row per record), atomically."""
    document = {"protocol": json.loads(protocol.to_json()), "results": list(records)}
    atomic_write_text(outdir / RESULTS_JSON, json.dumps(document, indent=1) + "\n")
    columns = [*KEY_COLUMNS, *sorted({key for record in records for key in record} - set(KEY_COLUMNS))]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(outdir / RESULTS_CSV, text.getvalue())


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as a Markdown table, metrics to 4 significant digits."""
    metrics = sorted({key for record in records for key in record} - set(KEY_COLUMNS))
    lines = ["| checkpoint | scale | n | " + " | ".join(metrics) + " |",
             "|---|---:|---:|" + "---:|" * len(metrics)]
    for record in records:
        values = " | ".join(f"{record[m]:.4g}" if m in record else "" for m in metrics)
        lines.append(f"| {record['checkpoint']} | {record['scale']:g} | {record['n']} | {values} |")
    return "\n".join(lines)
