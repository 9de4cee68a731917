"""Sandbox.set_cpu_weight on a live native sandbox, read back from its cgroup as the host
sees it (v1 cpu.shares here; v2 cpu.weight), and a spec's weight applied at birth."""

from __future__ import annotations

import pytest

from corral.sandbox import Sandbox, SandboxSpec, cgroups
from corral.sandbox.errors import InvalidSpec, InvalidTransition

from ..tasks.test_task_cpu_weight import _as_written, _weight_file

pytestmark = pytest.mark.skipif(
    cgroups.delegation_problem(cgroups.detect()) is not None,
    reason="needs a cgroup of the sandbox's own (root, or a delegated v2 subtree)")


def _read(sandbox_id: str) -> str:
    with open(_weight_file(sandbox_id, cgroups.CORRAL_DIR)) as f:
        return f.read().strip()


def test_a_spec_weight_applies_at_birth_and_changes_live():
    with Sandbox.create(SandboxSpec(cpu_weight=25)) as sb:
        assert _read(sb.id) == _as_written(25)
        assert sb.set_cpu_weight(10) is True
        assert (_read(sb.id), sb.spec.cpu_weight) == (_as_written(10), 10)
        assert sb.set_cpu_weight(None) is True  # the ordinary weight again
        assert (_read(sb.id), sb.spec.cpu_weight) == (_as_written(100), None)
        with pytest.raises(InvalidSpec, match="cpu_weight"):
            sb.set_cpu_weight(0)
        assert _read(sb.id) == _as_written(100)  # a refused weight changes nothing


def test_a_paused_sandbox_takes_a_weight_and_a_destroyed_one_refuses():
    sb = Sandbox.create(SandboxSpec())
    try:
        assert _read(sb.id) == _as_written(100)
        sb.pause()
        assert sb.set_cpu_weight(10) is True
        sb.resume()
        assert _read(sb.id) == _as_written(10)
    finally:
        sb.destroy()
    with pytest.raises(InvalidTransition):
        sb.set_cpu_weight(10)
