"""Pickled payloads that a weights-only loader must refuse."""
from __future__ import annotations

import os


class RunsCode:
    """Unpickles by calling `os.system` (touching `marker`, so a test can see whether it ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
