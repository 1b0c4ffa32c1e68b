"""What fixes an evaluation's images, recorded in `outdir/protocol.json`: a rerun into the same folder must have
the same protocol (else its images would mix with others), and may add checkpoints and guidance scales."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ldm.errors import UserInputError
from ldm.evaluation.files import atomic_write_text

PROTOCOL_FILE = "protocol.json"
FORMAT = 1


@dataclass(frozen=True)
class Protocol:
    """The settings every image of an output folder shares. `checkpoints` (name -> file size in bytes, None for
    a folder) and `scales` grow as runs add them."""

    sampler: str
    schedule: str
    steps: int
    eta: float
    H: int
    W: int
    n: int
    seed: int
    precision: str
    captions_sha256: str
    config_sha256: str
    checkpoints: dict[str, Optional[int]] = field(default_factory=dict)
    scales: tuple[float, ...] = ()

    def fixed(self) -> dict[str, Any]:
        """The settings that must match between runs (all but checkpoints and scales)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("checkpoints", "scales")}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self), "scales": list(self.scales)}, indent=1) + "\n"


def read_protocol(outdir: Path) -> Optional[Protocol]:
    """The protocol recorded in `outdir`, None if there is none; an unreadable file is an error."""
    path = outdir / PROTOCOL_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("format")
        return Protocol(**{**data, "scales": tuple(data["scales"])})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{path} is not a protocol file of scripts/evaluate.py ({error}); use another "
                             "--outdir") from error


def check_outdir(outdir: Path, protocol: Protocol) -> Protocol:
    """The protocol `outdir` will have after this run: a new folder must be empty or hold nothing of ours; an
    existing evaluation must have the same fixed settings and no other checkpoint under a name of this run's.
    Raises UserInputError in one line naming the first difference; writes nothing."""
    recorded = read_protocol(outdir)
    if recorded is None:
        if outdir.exists() and any(outdir.iterdir()):
            raise UserInputError(f"--outdir {outdir} is not empty and holds no {PROTOCOL_FILE}: give a new or empty "
                                 "folder")
        return protocol
    old, new = recorded.fixed(), protocol.fixed()
    changed = [name for name in new if old[name] != new[name]]
    if changed:
        details = ", ".join(f"{name} {old[name]!r} there, {new[name]!r} now" for name in changed)
        raise UserInputError(f"--outdir {outdir} holds an evaluation with another protocol ({details}); use another "
                             "--outdir, or the same settings to resume or extend it")
    for name, size in protocol.checkpoints.items():
        if name in recorded.checkpoints and recorded.checkpoints[name] != size:
            raise UserInputError(f"--outdir {outdir} already holds the samples of another checkpoint named {name!r} "
                                 f"({recorded.checkpoints[name]} bytes, this one {size}); rename the file or use "
                                 "another --outdir")
    return Protocol(**{**new, "checkpoints": {**recorded.checkpoints, **protocol.checkpoints},
                       "scales": tuple(sorted(set(recorded.scales) | set(protocol.scales)))})


def write_protocol(outdir: Path, protocol: Protocol) -> None:
    atomic_write_text(outdir / PROTOCOL_FILE, protocol.to_json())
