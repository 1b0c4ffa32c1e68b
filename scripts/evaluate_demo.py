"""Measure whether the demo model draws what it is asked for.

Renders prompts like "a red circle on a blue background" with fixed seeds and reads each image
back with simple image analysis (ldm.data.shapes_analysis): foreground colour, shape and
background colour. Prints the three accuracies. With --concept (textual inversion) it renders
one prompt such as "a photo of *" and reports how often the expected colour and shape appear.

    python scripts/evaluate_demo.py --n 200
    python scripts/evaluate_demo.py --prompt "a photo of *" --embedding_path models/demo/purple-star.pt \
        --concept purple star --n 50

--sweep scores every sampler of --sampler at every step count of --steps, loading the model once, on the
same prompts and start noise (image i starts from seed + i); one JSON line per case, also written to
--results, and --plot draws accuracy against steps (needs matplotlib: pip install -e .[eval]):

    python scripts/evaluate_demo.py --sweep --sampler all dpmpp_2m:karras --steps 5 10 20 50 \
        --results sweep.json --plot sweep.png

A sampler is NAME or NAME:SCHEDULE (default, karras, exponential; the schedule of the k-diffusion
samplers, --schedule where not given), optionally @STEPS to run it at that step count only
(`dpmpp_2m:karras@20`); `all` is every sampler. --timing times the cases instead of scoring them: one
batch each, taking turns for --rounds rounds, as ratios to the first case:

    python scripts/evaluate_demo.py --timing --sampler ddim@50 dpmpp_2m:karras@20 euler_ancestral@20
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG  # noqa: E402
from ldm.data.shapes import COLORS, SHAPES  # noqa: E402
from ldm.data.shapes_analysis import read_image  # noqa: E402
from ldm.errors import UserInputError  # noqa: E402
from ldm.models.diffusion.sampler_names import SAMPLER_NAMES, SCHEDULES, sampler_label, takes_sigmas  # noqa: E402

SAMPLERS = SAMPLER_NAMES
ACCURACIES = ("foreground_color", "shape", "background_color")


class UsageError(Exception):
    """A mistake in the command line, reported in one line (exit code 2) before the model loads."""


class Case(NamedTuple):
    """One sampler at one step count (a NamedTuple: the script is also loaded without a module entry, where a
    dataclass could not resolve its annotations)."""

    sampler: str
    schedule: str
    steps: int

    @property
    def label(self) -> str:
        return sampler_label(self.sampler, self.schedule)

    def __str__(self) -> str:
        return f"{self.label} {self.steps}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="model config (default: the demo model's)")
    parser.add_argument("--ckpt", default=str(DEMO_CHECKPOINT), help="checkpoint (default: the shipped demo model)")
    parser.add_argument("--n", type=int, default=200, help="number of images to render and read back")
    parser.add_argument("--sampler", nargs="+", default=["ddim"], metavar="SAMPLER",
                        help=f"sampler(s): {', '.join(SAMPLER_NAMES)} or all (with a schedule other than default: "
                             "every k-diffusion sampler); NAME:SCHEDULE picks the schedule of a k-diffusion sampler, "
                             "NAME@STEPS a step count of its own (several need --sweep or --timing)")
    parser.add_argument("--schedule", default="default",
                        help=f"sigma schedule of the k-diffusion samplers: {', '.join(SCHEDULES)} (default: default)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50], help="sampling steps (several with --sweep)")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (txt2img's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=25, help="images rendered at once")
    parser.add_argument("--prompt", default=None, help="render this one prompt N times (e.g. 'a photo of *')")
    parser.add_argument("--concept", nargs=2, metavar=("COLOR", "SHAPE"), default=None,
                        help="with --prompt: the colour and shape the prompt should show")
    parser.add_argument("--embedding_path", nargs="+", default=None, help="textual-inversion embedding file(s)")
    parser.add_argument("--outdir", default=None, help="also save a grid of the renders and the readings here "
                                                       "(with --sweep: one folder per case)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--sweep", action="store_true",
                        help="score every sampler of --sampler at every step count of --steps, loading the model "
                             "once; one JSON line per case, with its label and network calls per image")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="with --sweep or --timing: write the records to FILE (a JSON list, rewritten "
                             "atomically after every case; records of other cases or settings already there are "
                             "kept, those of the same case and settings replaced)")
    parser.add_argument("--resume", action="store_true",
                        help="with --results: skip the cases FILE already holds with the same settings")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="with --sweep: draw accuracy against steps, one line per sampler (with the records of "
                             "--results of the same settings), DDIM 50 steps as the reference; needs matplotlib")
    parser.add_argument("--timing", action="store_true",
                        help="time the cases instead of scoring them: one batch of --batch_size prompts each, "
                             "taking turns for --rounds rounds after one untimed round; prints each case's median "
                             "time per image as a ratio to the first case's")
    parser.add_argument("--rounds", type=int, default=5, help="with --timing: timed rounds (default 5)")
    return parser.parse_args(argv)


def parse_cases(specs: list[str], schedule: str, steps: list[int]) -> list[Case]:
    """The cases of --sampler specs (NAME, NAME:SCHEDULE, either with @STEPS, or all) at --schedule and --steps,
    in order and without repeats; raises UsageError for an unknown name, a schedule a sampler does not take or
    a step count below 1."""
    for n in steps:
        if n < 1:
            raise UsageError(f"--steps must be at least 1, got {n}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown --schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    cases: list[Case] = []
    for spec in specs:
        head, at, own_steps = spec.partition("@")
        if at:
            try:
                spec_steps = [int(own_steps)]
            except ValueError:
                raise UsageError(f"--sampler {spec!r}: the steps after @ must be an integer") from None
            if spec_steps[0] < 1:
                raise UsageError(f"--sampler {spec!r}: steps must be at least 1, got {spec_steps[0]}")
        else:
            spec_steps = steps
        name, colon, spec_schedule = head.partition(":")
        spec_schedule = spec_schedule if colon else schedule
        if spec_schedule not in SCHEDULES:
            raise UsageError(f"--sampler {spec!r}: unknown schedule {spec_schedule!r}; choose from "
                             f"{', '.join(SCHEDULES)}")
        if name == "all":
            names = [s for s in SAMPLER_NAMES if spec_schedule == "default" or takes_sigmas(s)]
        elif name in SAMPLER_NAMES:
            names = [name]
        else:
            raise UsageError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)} or all")
        for sampler in names:
            if spec_schedule != "default" and not takes_sigmas(sampler):
                raise UsageError(
                    f"the {sampler} sampler runs on the model's timesteps and takes no schedule; the "
                    f"{spec_schedule} schedule is for the k-diffusion samplers "
                    f"({', '.join(s for s in SAMPLER_NAMES if takes_sigmas(s))})")
            for n in spec_steps:
                case = Case(sampler, spec_schedule, n)
                if case not in cases:
                    cases.append(case)
    return cases


def check_args(args: argparse.Namespace) -> list[Case]:
    """Every check that needs no model: the cases, and the flags that go together. Raises UsageError."""
    cases = parse_cases(args.sampler, args.schedule, args.steps)
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.prompt and not args.concept:
        raise UsageError("--prompt needs --concept COLOR SHAPE")
    if args.sweep and args.timing:
        raise UsageError("--sweep scores the cases and --timing times them: choose one")
    if len(cases) > 1 and not (args.sweep or args.timing):
        raise UsageError(f"--sampler and --steps name {len(cases)} cases; add --sweep to score them all "
                         "(or --timing to time them)")
    if args.results and not (args.sweep or args.timing):
        raise UsageError("--results goes with --sweep or --timing")
    if args.resume and not args.sweep:
        raise UsageError("--resume goes with --sweep")
    if args.resume and not args.results:
        raise UsageError("--resume needs --results FILE (the cases to skip are read from it)")
    if args.plot and not args.sweep:
        raise UsageError("--plot draws the accuracies of a --sweep")
    if args.plot and args.prompt:
        raise UsageError("--plot draws foreground, shape and background accuracy, which a --prompt run does not have")
    if args.timing and args.outdir:
        raise UsageError("--outdir keeps the renders of a scoring run; --timing keeps none")
    if args.timing and args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install -e .[eval]")
    if args.results:
        read_results(args.results)  # refuse a file that is not ours before the model loads
    return cases


def prompts_to_render(n: int) -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, background) for every combination, cycled in a fixed shuffled order."""
    combos = [(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, COLORS) if c != b and (c, s) != ("purple", "star")]
    order = np.random.default_rng(1234).permutation(len(combos))
    chosen = [combos[i] for i in itertools.islice(itertools.cycle(order), n)]
    return [(f"a {c} {s} on a {b} background", c, s, b) for c, s, b in chosen]


def batch_generator(seed: int, start: int, device: Any = "cpu") -> torch.Generator:
    """The generator (on `device`, where the samplers draw their noise) of the stochastic samplers' noise for
    the batch whose first image is `start`: seeded from (seed, start) through numpy's SeedSequence, so that it
    is the same for every sampler and repeats no image's start-noise stream (those are seeded seed + i)."""
    seed_of_batch = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed_of_batch)


def render(model, prompts: list[str], seeds: list[int], sampler_name: str, steps: int, scale: float,
           schedule: str = "default", generator: Optional[torch.Generator] = None) -> list[Image.Image]:
    from ldm.models.diffusion.registry import make_sampler

    sampler = make_sampler(sampler_name, model, schedule)
    shape = (model.channels, model.image_size, model.image_size)
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(model.device)
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
        z, _ = sampler.sample(steps, len(prompts), shape, c, unconditional_guidance_scale=scale,
                              unconditional_conditioning=uc, x_T=x_T, verbose=False, generator=generator)
        images = ((model.decode_first_stage(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]


class NetworkCalls:
    """Counts the model's network calls (`apply_model`, each one evaluation of the whole batch, the guided
    pair included) while in use."""

    def __init__(self, model: Any):
        self.model = model
        self.calls = 0

    def __enter__(self) -> "NetworkCalls":
        original = self.model.apply_model

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        self.model.apply_model = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.apply_model


def jobs_of(args: argparse.Namespace) -> list[tuple[str, str, str, Optional[str]]]:
    if args.prompt:
        return [(args.prompt, args.concept[0], args.concept[1], None)] * args.n
    return prompts_to_render(args.n)


def evaluate(model: Any, case: Case, jobs: list, args: argparse.Namespace) -> tuple[dict, list, list, float | int]:
    """Render and read back every job with `case`; returns (accuracies, images, readings, network calls per image)."""
    readings, images, calls = [], [], []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        with NetworkCalls(model) as counter:
            batch_images = render(model, [j[0] for j in batch], seeds, case.sampler, case.steps, args.scale,
                                  case.schedule, batch_generator(args.seed, start, model.device))
        calls.append(counter.calls)
        images.extend(batch_images)
        readings.extend(read_image(image) for image in batch_images)
        print(f"rendered {len(images)}/{len(jobs)}" + (f" ({case})" if args.sweep else ""), file=sys.stderr)
    accuracies = {"foreground_color": float(np.mean([r.color == j[1] for r, j in zip(readings, jobs)])),
                  "shape": float(np.mean([r.shape == j[2] for r, j in zip(readings, jobs)]))}
    if args.prompt:
        accuracies["concept"] = float(np.mean([r.color == j[1] and r.shape == j[2] for r, j in zip(readings, jobs)]))
    else:
        accuracies["background_color"] = float(np.mean([r.background == j[3] for r, j in zip(readings, jobs)]))
    per_image = float(np.mean(calls))
    return accuracies, images, readings, int(per_image) if per_image.is_integer() else per_image


def save_outputs(outdir: Path, images: list, readings: list, jobs: list) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    columns = 10
    grid = Image.new("RGB", (64 * columns, 64 * ((len(images) + columns - 1) // columns)))
    for i, image in enumerate(images):
        grid.paste(image.resize((64, 64)), ((i % columns) * 64, (i // columns) * 64))
    grid.save(outdir / "grid.png")
    (outdir / "readings.json").write_text(json.dumps(
        [{"prompt": j[0], "read": vars(r)} for j, r in zip(jobs, readings)], indent=1))


# --- records and the results file ------------------------------------------------------------------------------

SETTING_KEYS = ("n", "seed", "scale", "batch_size", "prompt", "concept", "embedding_path", "ckpt", "config")
"""What besides the case decides a record's numbers (the last five only where given: a record without them
is of the demo model's prompts)."""


def settings_of(args: argparse.Namespace) -> dict:
    settings = {"n": args.n, "seed": args.seed, "scale": args.scale, "batch_size": args.batch_size}
    if args.prompt:
        settings.update(prompt=args.prompt, concept=list(args.concept))
    if args.embedding_path:
        settings["embedding_path"] = list(args.embedding_path)
    if args.ckpt != str(DEMO_CHECKPOINT):
        settings["ckpt"] = args.ckpt
    if args.config != str(DEMO_CONFIG):
        settings["config"] = args.config
    return settings


def record_key(record: dict) -> tuple:
    return tuple(json.dumps(record.get(key)) for key in ("kind", "sampler", "schedule", "steps", "rounds",
                                                         *SETTING_KEYS))


def same_settings(record: dict, settings: dict) -> bool:
    return all(record.get(key) == settings.get(key) for key in SETTING_KEYS)


def read_results(path: str) -> list[dict]:
    """The records of a results file; [] when it does not exist. Raises UsageError for anything else."""
    file = Path(path)
    if not file.exists():
        return []
    try:
        records = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--results {path}: cannot read it as JSON ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "kind" in r for r in records):
        raise UsageError(f"--results {path}: not a results file of this script (a JSON list of records)")
    return records


def write_results(path: str, records: list[dict]) -> None:
    """Write the records as a JSON list, one record a line, atomically (a temporary file, then os.replace)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Results:
    """The records of this run merged into those of --results (same case and settings replaced), rewritten
    after every case."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records = read_results(path) if path else []

    def has(self, record: dict) -> bool:
        return any(record_key(r) == record_key(record) for r in self.records)

    def add(self, record: dict) -> None:
        key = record_key(record)
        for i, existing in enumerate(self.records):
            if record_key(existing) == key:
                self.records[i] = record
                break
        else:
            self.records.append(record)
        if self.path:
            write_results(self.path, self.records)


def case_record(kind: str, case: Case, settings: dict) -> dict:
    return {"kind": kind, "sampler": case.sampler, "schedule": case.schedule, "label": case.label,
            "steps": case.steps, **settings}


def mean_accuracy(record: dict) -> float:
    return float(np.mean([record[key] for key in ACCURACIES]))


# --- the plot ----------------------------------------------------------------------------------------------------

SAMPLER_COLOURS = {
    "ddim": "black", "plms": "tab:gray", "dpm_solver": "tab:brown", "lms": "tab:pink", "euler": "tab:blue",
    "euler_ancestral": "tab:cyan", "heun": "tab:orange", "dpm_2": "tab:olive", "dpm_2_ancestral": "#e6ab02",
    "dpmpp_2s_ancestral": "tab:purple", "dpmpp_2m": "tab:red", "dpmpp_sde": "tab:green", "dpmpp_2m_sde": "navy",
}
SCHEDULE_STYLES = {"default": "-", "karras": "--", "exponential": ":"}
ZOOM_FLOOR = 85.0
"""The lowest accuracy (%) the three zoomed panels show."""


def plot_accuracy(records: list[dict], path: str) -> None:
    """Accuracy against steps, one line per sampler and schedule (karras dashed, exponential dotted, in the
    sampler's colour), in four panels: the mean of the three accuracies over their whole range, then each of
    them zoomed to the top (from ZOOM_FLOOR); DDIM 50 steps as a grey line with a band of 1 point either side,
    where the records have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = [r for r in records if r["kind"] == "accuracy" and all(key in r for key in ACCURACIES)]
    if not accuracy:
        raise UsageError("--plot: no accuracy records to draw (a --prompt run has no background accuracy)")
    reference = next((r for r in accuracy if (r["sampler"], r["schedule"], r["steps"]) == ("ddim", "default", 50)),
                     None)
    if reference is None:
        print("note: no DDIM 50-step record among the results; the plot has no reference line", file=sys.stderr)
    lines: dict[tuple[str, str], list[dict]] = {}
    for record in accuracy:
        lines.setdefault((record["sampler"], record["schedule"]), []).append(record)
    order = {name: i for i, name in enumerate(SAMPLER_NAMES)}
    keys = sorted(lines, key=lambda k: (SCHEDULES.index(k[1]), order.get(k[0], len(order))))
    markers = "os^vD<>pXh*Pd"
    panels = [("mean of the three accuracies", mean_accuracy, None),
              ("foreground colour", lambda r: r["foreground_color"], ZOOM_FLOOR),
              ("shape", lambda r: r["shape"], ZOOM_FLOOR),
              ("background colour", lambda r: r["background_color"], ZOOM_FLOOR)]
    figure, axes = plt.subplots(2, 2, figsize=(13, 9.5), sharex=True)
    # Tick the step counts that most lines have; a few lines measured in between still show as points.
    steps_seen = sorted(s for s in {r["steps"] for r in accuracy}
                        if 2 * sum(any(r["steps"] == s for r in lines[key]) for key in keys) >= len(keys))
    for axis, (title, value, floor) in zip(axes.flat, panels):
        if reference is not None:
            level = 100 * value(reference)
            axis.axhspan(level - 1, level + 1, color="0.85", linewidth=0)
            axis.axhline(level, color="0.45", linewidth=1.2, linestyle=(0, (1, 1.5)), label="DDIM 50 steps ± 1 point")
        for key in keys:
            points = sorted(lines[key], key=lambda r: r["steps"])
            axis.plot([r["steps"] for r in points], [100 * value(r) for r in points], SCHEDULE_STYLES[key[1]],
                      color=SAMPLER_COLOURS.get(key[0], "black"), marker=markers[order.get(key[0], 0) % len(markers)],
                      markersize=4, linewidth=1.3, label=sampler_label(*key))
        if floor is not None:
            axis.set_ylim(floor, 100.5)
            title += f" (from {floor:g} %)"
        else:
            axis.set_ylim(0, 101)
        axis.set_title(title)
        axis.set_xscale("log")
        axis.set_xticks(steps_seen, [str(s) for s in steps_seen])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
        axis.set_ylabel("accuracy (%)")
    for axis in axes[1]:
        axis.set_xlabel("sampling steps (log scale)")
    first = accuracy[0]
    figure.suptitle(f"Demo model, accuracy per sampling step: {first['n']} prompts, seeds {first['seed']}-"
                    f"{first['seed'] + first['n'] - 1}, guidance scale {first['scale']:g}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.82, 0.5), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0, 0.82, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- the runs ----------------------------------------------------------------------------------------------------

def run_single(model: Any, case: Case, args: argparse.Namespace) -> None:
    """One sampler at one step count, printed as before the sweep existed."""
    jobs = jobs_of(args)
    accuracies, images, readings, _ = evaluate(model, case, jobs, args)
    result = {"n": len(jobs), "sampler": case.sampler, "steps": case.steps, "scale": args.scale}
    if case.schedule != "default":
        result["schedule"] = case.schedule
    result.update({"foreground_color": accuracies["foreground_color"], "shape": accuracies["shape"]})
    result.update({k: v for k, v in accuracies.items() if k not in result})
    if args.outdir:
        save_outputs(Path(args.outdir), images, readings, jobs)
    print(json.dumps(result))


def run_sweep(model: Any, cases: list[Case], args: argparse.Namespace, results: Results) -> None:
    jobs = jobs_of(args)
    settings = settings_of(args)
    for case in cases:
        record = case_record("accuracy", case, settings)
        if args.resume and results.has(record):
            print(f"skipped {case}: in {args.results}", file=sys.stderr)
            continue
        accuracies, images, readings, calls = evaluate(model, case, jobs, args)
        record.update(network_calls=calls, **accuracies)
        if "background_color" in record:
            record["mean_accuracy"] = mean_accuracy(record)
        results.add(record)
        if args.outdir:
            save_outputs(Path(args.outdir) / f"{case.sampler}-{case.schedule}-{case.steps}", images, readings, jobs)
        print(json.dumps(record), flush=True)
    if args.plot:
        plot_accuracy([r for r in results.records if r.get("kind") == "accuracy" and same_settings(r, settings)],
                      args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


def run_timing(model: Any, cases: list[Case], args: argparse.Namespace, results: Results) -> None:
    """Each case renders the same batch (the first --batch_size prompts); one untimed round, then --rounds
    rounds in which the cases take turns (the order rotating every round). A case's time ratio in a round is its
    time over the first case's in that round; the median over the rounds is reported, with the extremes."""
    jobs = jobs_of(args)[:args.batch_size]
    prompts = [j[0] for j in jobs]
    seeds = [args.seed + i for i in range(len(jobs))]
    calls: dict[Case, int] = {}

    def one(case: Case) -> float:
        with NetworkCalls(model) as counter:
            started = time.perf_counter()
            render(model, prompts, seeds, case.sampler, case.steps, args.scale, case.schedule,
                   batch_generator(args.seed, 0, model.device))
            elapsed = time.perf_counter() - started
        calls[case] = counter.calls
        return elapsed

    for case in cases:
        one(case)
    times: dict[Case, list[float]] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            times[case].append(one(case))
        print(f"timing round {round_index + 1}/{args.rounds}", file=sys.stderr)
    reference = cases[0]
    settings = {**settings_of(args), "n": len(jobs), "rounds": args.rounds, "threads": torch.get_num_threads()}
    for case in cases:
        ratios = [t / r for t, r in zip(times[case], times[reference])]
        record = case_record("timing", case, settings)
        record.update(network_calls=calls[case], reference=str(reference), time_ratio=statistics.median(ratios),
                      time_ratio_min=min(ratios), time_ratio_max=max(ratios))
        results.add(record)
        print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = check_args(args)
        results = Results(args.results)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from ldm import accel
    from ldm.checkpoint import load_model_from_config

    try:
        model = accel.optimize(load_model_from_config(args.config, args.ckpt, device=args.device), args.device)
        if args.embedding_path:
            from ldm.modules.embedding_manager import attach_embeddings

            attach_embeddings(model, args.embedding_path)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.timing:
            run_timing(model, cases, args, results)
        elif args.sweep:
            run_sweep(model, cases, args, results)
        else:
            run_single(model, cases[0], args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
