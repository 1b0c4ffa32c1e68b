"""Under pytest-xdist (the README's `-n 2`), each worker computes on one thread: two workers then fill two cores
without oversubscribing them (torch's worker threads spin while they wait, and two 2-thread processes on two
cores run many times slower than one). Script runs already get one thread (tests/cli_support.script_env)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
