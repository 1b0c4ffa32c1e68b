"""Turn a training checkpoint into a small inference checkpoint.

Keeps only the model's weights (no optimizer state), puts the EMA weights in place of the
training weights when the checkpoint has them (as the released "EMA-only" SD checkpoints do),
optionally casts to fp16, and writes `.safetensors` (or `.ckpt`) atomically.

    python scripts/export_checkpoint.py logs/<run>/checkpoints/last.ckpt models/demo/model.safetensors --half
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import read_state_dict  # noqa: E402
from ldm.errors import UserInputError  # noqa: E402
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS  # noqa: E402

EMA_PREFIX = "model_ema."
FLOAT32_KEYS = frozenset(SCHEDULE_BUFFERS) | {"scale_factor"}


def ema_into_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every `model.*` weight by its EMA copy (`model_ema.<name without dots>`) and drop the EMA."""
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    out = {}
    for key, value in state.items():
        if key.startswith(EMA_PREFIX):
            continue
        shadow = key[len("model."):].replace(".", "") if key.startswith("model.") else None
        out[key] = ema[shadow] if shadow in ema else value
    return out


def export(source: str, target: str, half: bool, keep_training_weights: bool) -> Path:
    state = read_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)} if keep_training_weights \
        else ema_into_model(state)
    if half:
        state = {k: v.half() if v.is_floating_point() and k not in FLOAT32_KEYS else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    target_path = Path(target)
    if target_path.exists():
        raise UserInputError(f"{target_path} exists; choose another output path (nothing is overwritten)")
    target_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target_path.parent, suffix=".part")
    os.close(handle)
    try:
        if target_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, temporary)
        else:
            torch.save({"state_dict": state}, temporary)
        os.replace(temporary, target_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="training checkpoint (.ckpt or .safetensors)")
    parser.add_argument("target", help="output file (.safetensors or .ckpt); must not exist")
    parser.add_argument("--half", action="store_true", help="store floating weights as fp16 (schedule stays fp32)")
    parser.add_argument("--keep_training_weights", action="store_true",
                        help="keep the training weights instead of the EMA weights")
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.target, args.half, args.keep_training_weights)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
