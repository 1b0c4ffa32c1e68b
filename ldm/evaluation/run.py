"""One evaluation run, in every process of it: sample this process's share of the missing images, wait for the
others, then (first process only) compute the metrics from disk and write results.json, results.csv and the plot."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ldm import accel
from ldm.cli.runtime import load_model, precision_context, select_device
from ldm.evaluation.captions import Captions
from ldm.evaluation.distributed import Ranks, barrier, join, leave, rank_device
from ldm.evaluation.metric_set import build_metrics, fetch_weights
from ldm.evaluation.plot import PLOT_FILE, plot_results
from ldm.evaluation.protocol import Protocol, write_protocol
from ldm.evaluation.results import compute_records, merge_records, read_records, write_results
from ldm.evaluation.sampling import SamplingJob, sample_batches
from ldm.evaluation.work import all_batches, shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """A checked evaluation: `protocol` is what outdir/protocol.json holds after the run (this run's checkpoints
    and scales added), `checkpoints` maps this run's checkpoint names to their files."""

    protocol: Protocol
    checkpoints: Mapping[str, str]
    scales: Sequence[float]
    config: Mapping[str, Any]
    captions: Captions
    outdir: Path
    latent_shape: tuple[int, int, int]
    batch_size: int
    metrics: Sequence[str]
    device: str = "auto"
    accel: bool = True
    sample: bool = True
    reference_dir: Optional[str] = None
    cache_dir: Optional[Path] = None
    title: str = "FID against CLIP score"


def run_evaluation(evaluation: Evaluation, ranks: Ranks) -> Optional[list[dict[str, Any]]]:
    """Run `evaluation` as process `ranks.rank`; returns every record of results.json on the first process
    (None on the others, and when no metrics are asked for)."""
    device = rank_device(ranks, select_device(evaluation.device))
    precision_context(evaluation.protocol.precision, device)  # a precision the device lacks is refused here
    if evaluation.metrics and ranks.main:
        fetch_weights(evaluation.metrics)  # offline and missing: an error now, not after hours of sampling
    join(ranks, device)
    try:
        if evaluation.sample:
            _sample(evaluation, ranks, device)
        barrier(ranks, device)
        if not ranks.main:
            return None
        if evaluation.sample:
            write_protocol(evaluation.outdir, evaluation.protocol)
        return _score(evaluation, device) if evaluation.metrics else None
    finally:
        leave(ranks)


def _sample(evaluation: Evaluation, ranks: Ranks, device: Any) -> None:
    protocol = evaluation.protocol
    batches = shard(all_batches(list(evaluation.checkpoints), evaluation.scales, protocol.n, evaluation.batch_size),
                    ranks.rank, ranks.world_size)

    def load(name: str) -> Any:
        model = load_model(evaluation.config, evaluation.checkpoints[name], device, precision=protocol.precision)
        if evaluation.accel:
            accel.optimize(model, device)
        write_protocol(evaluation.outdir, protocol)  # once a model loaded: a checkpoint that fails leaves no trace
        return model

    job = SamplingJob(protocol, evaluation.captions.texts, evaluation.outdir, evaluation.latent_shape, device)
    written = sample_batches(job, batches, load, show_progress=ranks.main)
    logger.info("%s%d images written", f"rank {ranks.rank}: " if ranks.distributed else "", written)


def _score(evaluation: Evaluation, device: Any) -> list[dict[str, Any]]:
    metrics = build_metrics(evaluation.metrics, device, evaluation.reference_dir, evaluation.cache_dir)
    new = compute_records(evaluation.outdir, evaluation.protocol, list(evaluation.checkpoints), evaluation.scales,
                          evaluation.captions.texts, metrics)
    records = merge_records(read_records(evaluation.outdir), new)
    write_results(evaluation.outdir, evaluation.protocol, records)
    if records:
        plot_results(records, evaluation.outdir / PLOT_FILE, evaluation.title)
    return records


