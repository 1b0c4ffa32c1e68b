"""The shipped configs build the models they describe."""
from __future__ import annotations

import glob

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from tests.model_factory import REPO_DIR

AUTOENCODERS = sorted(glob.glob(str(REPO_DIR / "configs" / "autoencoder" / "autoencoder_kl_*.yaml")))


@pytest.mark.parametrize("path", AUTOENCODERS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_autoencoder_configs_give_their_latent_shape(path):
    config = OmegaConf.load(path)
    config.model.params.lossconfig.params.perceptual_weight = 0.0
    size, channels = map(int, path.rsplit("_", 1)[-1].removesuffix(".yaml").split("x")[1:])
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
        posterior = model.encode(torch.empty(1, 3, 256, 256))
    assert tuple(posterior.mean.shape) == (1, channels, size, size)
    assert config.data.target == "main.DataModuleFromConfig"


def test_there_are_four_autoencoder_configs():
    assert len(AUTOENCODERS) == 4
