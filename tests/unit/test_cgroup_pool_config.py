"""The daemon's cgroup_pool_size setting: a whole number from 0 (no pool) to
cgroup_pool.MAX_SIZE (default 4), from the config file or --cgroup-pool-size."""

from __future__ import annotations

import pytest

from corral.runtime.config import load
from corral.sandbox.errors import InvalidSpec


@pytest.mark.parametrize("value", ['"4"', "-1", "65", "true", "2.5"])
def test_a_bad_size_is_refused_naming_the_setting(tmp_path, value):
    path = tmp_path / "corral.toml"
    path.write_text(f"cgroup_pool_size = {value}\n")
    with pytest.raises(InvalidSpec) as exc:
        load(str(path), {})
    assert exc.value.field == "cgroup_pool_size"
    assert "is not a whole number from 0 to 64" in str(exc.value)


def test_default_is_four_and_a_flag_wins_over_the_file(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text("cgroup_pool_size = 2\n")
    assert load(None, {}).cgroup_pool_size == 4
    assert load(str(path), {}).cgroup_pool_size == 2
    assert load(str(path), {"cgroup_pool_size": 8}).cgroup_pool_size == 8
