"""main.py's config mistakes, in-process: each is one line and exit code 2, before any model is built."""
from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

import main
from tests.model_factory import TESTS_DIR

TINY_SD = str(TESTS_DIR / "configs" / "tiny-sd.yaml")
TINY_TRAIN = str(TESTS_DIR / "configs" / "tiny-train.yaml")


def tiny_sd_with(tmp_path, name: str, change) -> str:
    """tiny-sd.yaml after `change(config)`, written to tmp_path/name."""
    config = OmegaConf.load(TINY_SD)
    change(config)
    path = tmp_path / name
    OmegaConf.save(config, path)
    return str(path)


def never_build(config) -> None:
    raise AssertionError("the model was built before the mistake was reported")


EXPECTED = {
    "missing_unet": "model.params.unet_config is missing: ldm.models.diffusion.ddpm.LatentDiffusion needs it",
    "missing_first_stage": "model.params.first_stage_config is missing: ldm.models.diffusion.ddpm.LatentDiffusion",
    "empty_unet": "model.params.unet_config is empty: ldm.models.diffusion.ddpm.LatentDiffusion needs a section",
    "trainer_typo": "lightning.trainer.max_stepz is not a Lightning Trainer option: did you mean max_steps",
    "trainer_set_by_main": "lightning.trainer.logger is set by main.py itself",
    "nan_override": "model.base_learning_rate=nan: NaN and infinity are not accepted",
    "inf_override": "lightning.trainer.gradient_clip_val=-inf: NaN and infinity are not accepted",
    "nan_in_file": "model.params.linear_start is nan: NaN and infinity are not accepted",
    "nothing_to_do": "nothing to do: without -t main.py only tests, and the config has no test data",
}


@pytest.mark.parametrize("case", EXPECTED)
def test_config_mistake_is_one_line_exit_2_before_the_model_is_built(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(main, "build_model", never_build)
    configs = [TINY_SD, TINY_TRAIN]
    extra = {"trainer_typo": ["lightning.trainer.max_stepz=2"],
             "trainer_set_by_main": ["lightning.trainer.logger=false"],
             "empty_unet": ["model.params.unet_config=null"],
             "nan_override": ["model.base_learning_rate=nan"],
             "inf_override": ["lightning.trainer.gradient_clip_val=-inf"]}.get(case, [])
    if case == "missing_unet":
        configs[0] = tiny_sd_with(tmp_path, "no_unet.yaml", lambda c: c.model.params.pop("unet_config"))
    elif case == "missing_first_stage":
        configs[0] = tiny_sd_with(tmp_path, "no_ae.yaml", lambda c: c.model.params.pop("first_stage_config"))
    elif case == "nan_in_file":
        configs[0] = tiny_sd_with(tmp_path, "nan.yaml", lambda c: setattr(c.model.params, "linear_start", float("nan")))
    train_flag = [] if case == "nothing_to_do" else ["-t"]

    assert main.main(["--base", *configs, *train_flag, *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("main.py: error:")]
    assert len(errors) == 1 and EXPECTED[case] in errors[0], errors
    assert not (tmp_path / "logs").exists()
