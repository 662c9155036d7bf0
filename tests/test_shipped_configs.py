"""Every shipped YAML config parses, and documents exactly its method's defaults."""

import dataclasses
from pathlib import Path

import pytest

from knowpatch.config import build_config, load_yaml
from knowpatch.methods import get_method

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_matches_defaults(path):
    values = load_yaml(path)
    module = get_method(values.pop("method"))
    assert build_config(module.Config, values) == module.Config()
    assert set(values) == {f.name for f in dataclasses.fields(module.Config)}


ACCELERATE = sorted((Path(__file__).parent.parent / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    values = load_yaml(path)
    assert values["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert values["num_processes"] >= 2


def test_all_four_accelerate_setups_are_shipped():
    assert {p.stem for p in ACCELERATE} == {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}
