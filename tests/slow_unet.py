"""A UNet whose every step first runs one long native computation (a key derivation in OpenSSL, which does
not return to Python for minutes), as a huge convolution would: the test model for Ctrl-C latency."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel

STARTED_FILE = "LDM_TEST_SLOW_STEP_STARTED"  # environment variable: a file touched when the long step starts


class SlowUNet(UNetModel):
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, y=None, **kwargs) -> torch.Tensor:
        Path(os.environ[STARTED_FILE]).touch()
        hashlib.pbkdf2_hmac("sha256", b"a long step", b"salt", 2 ** 31 - 1)  # the most OpenSSL takes: minutes on any CPU
        return super().forward(x, timesteps, context=context, y=y, **kwargs)
