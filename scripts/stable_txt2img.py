#!/usr/bin/env python
"""The textual-inversion repository's name for txt2img: runs scripts/txt2img.py with the same arguments
(load embeddings with --embedding_path)."""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("txt2img.py")), run_name="__main__")
