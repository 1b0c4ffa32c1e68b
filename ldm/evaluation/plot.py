"""The evaluation's plot: FID against CLIP score, one curve per checkpoint and one labelled point per guidance
scale, as on the Stable Diffusion v1 model card; without both, each metric against the scale. Needs matplotlib
(pip install -e .[eval])."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from ldm.evaluation.files import atomic_write

PLOT_FILE = "fid_vs_clip.png"
LABELS = {"fid": "FID (lower is better)", "clip_score": "CLIP score (ViT-L/14)", "accuracy": "prompt accuracy"}


def plot_results(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Draw the records' curves into `path` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({key for record in records for key in record} - {"checkpoint", "scale", "n"})
    versus_clip = "fid" in metrics and "clip_score" in metrics
    panels = [("clip_score", "fid")] if versus_clip else [("scale", metric) for metric in metrics]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for axis, (x_key, y_key) in zip(axes[0], panels):
        for checkpoint in dict.fromkeys(record["checkpoint"] for record in records):
            points = sorted((r for r in records if r["checkpoint"] == checkpoint and x_key in r and y_key in r),
                            key=lambda r: r["scale"])
            if not points:
                continue
            axis.plot([r[x_key] for r in points], [r[y_key] for r in points], marker="o", label=checkpoint)
            if versus_clip:
                for r in points:
                    axis.annotate(f"{r['scale']:g}", (r[x_key], r[y_key]), textcoords="offset points",
                                  xytext=(4, 4), fontsize=8)
        axis.set_xlabel("guidance scale" if x_key == "scale" else LABELS.get(x_key, x_key))
        axis.set_ylabel(LABELS.get(y_key, y_key))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))
