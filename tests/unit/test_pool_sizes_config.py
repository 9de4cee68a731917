"""The daemon's pool sizes, cgroup_pool_size and namespace_pool_size: each a whole number from
0 (no pool) to its pool's MAX_SIZE (default 4), from the config file or its flag."""

from __future__ import annotations

import argparse

import pytest

from corral.runtime.cli import daemon as daemon_cli
from corral.runtime.config import load
from corral.sandbox.errors import InvalidSpec

SETTINGS = ("cgroup_pool_size", "namespace_pool_size")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("value", ['"4"', "-1", "65", "true", "2.5"])
def test_a_bad_size_is_refused_naming_the_setting(tmp_path, setting, value):
    path = tmp_path / "corral.toml"
    path.write_text(f"{setting} = {value}\n")
    with pytest.raises(InvalidSpec) as exc:
        load(str(path), {})
    assert exc.value.field == setting
    assert "is not a whole number from 0 to 64" in str(exc.value)


@pytest.mark.parametrize("setting", SETTINGS)
def test_default_is_four_and_a_flag_wins_over_the_file(tmp_path, setting):
    path = tmp_path / "corral.toml"
    path.write_text(f"{setting} = 2\n")
    assert getattr(load(None, {}), setting) == 4
    assert getattr(load(str(path), {}), setting) == 2
    assert getattr(load(str(path), {setting: 8}), setting) == 8


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_flag_sets_it(setting):
    parser = argparse.ArgumentParser()
    daemon_cli.add_parsers(parser.add_subparsers())
    flag = "--" + setting.replace("_", "-")
    assert getattr(parser.parse_args(["daemon", flag, "0"]), setting) == 0
