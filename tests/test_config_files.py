"""Configs read as plain containers hold what OmegaConf reads, with the same errors for bad files."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config_files import load_config, read_plain_config
from ldm.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*REPO.glob("configs/**/*.yaml"), *REPO.glob("tests/configs/**/*.yaml")])


def test_there_are_configs_to_compare():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_plain_config_equals_omegaconf_resolved(path):
    assert read_plain_config(path) == OmegaConf.to_container(load_config(path), resolve=True)


def test_yaml_typing_and_interpolations_follow_omegaconf(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rate: 1e-4\n  size: 64\n  name: x\n  twice: ${model.size}\n")
    config = read_plain_config(path)
    assert config == {"model": {"rate": 1e-4, "size": 64, "name": "x", "twice": 64}}
    assert isinstance(config["model"]["rate"], float)


@pytest.mark.parametrize("content,message", [(None, "not found"), ("a: [1, 2\n", "cannot parse"),
                                             ("- 1\n- 2\n", "not a YAML mapping")])
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    for read in (read_plain_config, load_config):
        with pytest.raises(UserInputError, match=message):
            read(path)


def test_installed_omegaconf_is_the_pinned_one():
    """`read_plain_config` parses with OmegaConf's private YAML loader (`omegaconf._yaml`, new in 2.4; 2.3 kept it
    elsewhere), so pyproject.toml pins the versions that have it, and the installed one is among them."""
    import re

    from packaging.specifiers import SpecifierSet

    import omegaconf

    pin = SpecifierSet(re.search(r'"omegaconf([^"]*)"', (REPO / "pyproject.toml").read_text()).group(1))
    assert omegaconf.__version__ in pin
    assert "2.3.0" not in pin and "2.5.0" not in pin


def test_yaml_edge_cases_are_read_as_omegaconf_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a:\n  rate: 1e-4\n  plain: 1.5\n  day: 2022-08-01\n  flag: true\n  none: null\n  inf: .inf\n"
                    "  words: [x, 'y', 3]\n  anchor: &size 64\n  again: *size\n")
    assert read_plain_config(path) == OmegaConf.to_container(load_config(path), resolve=True)
    assert read_plain_config(path)["a"]["day"] == "2022-08-01"
    path.write_text("a: 1\na: 2\n")
    for read in (read_plain_config, load_config):
        with pytest.raises(UserInputError, match="cannot parse"):
            read(path)
