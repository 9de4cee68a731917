"""cpu_weight: a sandbox's share of contended CPU, the lever that lets deep tasks yield to
real-time sessions. Plans for both cgroup versions (v2's as data: this host is v1), the
spec and config checks, the policy digest of sandboxes that do not set it, and the task
spec the scheduler hands its runner."""

from __future__ import annotations

import dataclasses

import pytest

from corral.runtime.config import DaemonConfig
from corral.runtime.tasks.model import TaskSpec
from corral.runtime.tasks.scheduler import sandbox_limits
from corral.sandbox import SandboxSpec
from corral.sandbox.backends.base import policy_digest
from corral.sandbox.cgroups import CgroupLimits, Write, plan, shares_of_weight
from corral.sandbox.errors import InvalidSpec

from .test_cgroups_plan import V1, V2


@pytest.mark.parametrize(("weight", "shares"), [(100, 1024), (10, 102), (1, 10), (10_000, 102_400)])
def test_v1_shares_follow_the_v2_weight(weight, shares):
    assert shares_of_weight(weight) == shares
    assert CgroupLimits(cpu_weight=weight).cpu_shares == shares


def test_v1_plan_writes_cpu_shares_and_v2_plan_cpu_weight():
    v1 = plan(V1, "sb1", CgroupLimits(cpu_weight=10))
    assert Write("/sys/fs/cgroup/cpu/corral/sb1/cpu.shares", "102") in v1
    v2 = plan(V2, "sb1", CgroupLimits(cpu_weight=10))
    assert [op for op in v2 if isinstance(op, Write) and op.path.endswith("cpu.weight")] == [
        Write("/sys/fs/cgroup/corral/sb1/cpu.weight", "10")]


def test_no_weight_writes_nothing_of_it():
    for layout in (V1, V2):
        written = [op.path for op in plan(layout, "sb1", CgroupLimits()) if isinstance(op, Write)]
        assert not [p for p in written if p.endswith(("cpu.shares", "cpu.weight"))]


@pytest.mark.parametrize("bad", [0, -1, 10_001, 1.5, True, "10"])
def test_bad_weights_are_refused_naming_the_field(bad):
    with pytest.raises(InvalidSpec, match="cpu_weight"):
        CgroupLimits(cpu_weight=bad)
    with pytest.raises(InvalidSpec, match="cpu_weight"):
        SandboxSpec(cpu_weight=bad)
    with pytest.raises(InvalidSpec, match="task_cpu_weight"):
        DaemonConfig(task_cpu_weight=bad).validate()


#: policy_digest(SandboxSpec(), "s") as computed before cpu_weight existed.
DIGEST_BEFORE_THE_FIELD = "b2bfbb130e931dc70d5c189459759e9a71cd33783010144fb785b30e40f30c1d"


def test_a_spec_without_a_weight_keeps_its_digest_and_one_with_it_differs():
    spec = SandboxSpec()
    assert policy_digest(spec, "s") == DIGEST_BEFORE_THE_FIELD
    assert policy_digest(dataclasses.replace(spec, cpu_weight=10), "s") != DIGEST_BEFORE_THE_FIELD


def test_the_spec_round_trips_through_its_durable_form():
    spec = SandboxSpec(cpu_weight=25)
    assert spec.to_fields() == {"cpu_weight": 25}
    assert SandboxSpec.from_fields(spec.to_fields()) == spec


def test_the_scheduler_gives_a_task_the_daemons_weight():
    spec = TaskSpec(argv=["true"])
    assert sandbox_limits(spec, 10).cpu_weight == 10
    assert sandbox_limits(spec).cpu_weight is None
    own = dataclasses.replace(spec, sandbox=SandboxSpec(cpu_weight=50))
    assert sandbox_limits(own, 10).cpu_weight == 50
