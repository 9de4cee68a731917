"""A policy's mount plan converted to C once (_spawn.MountTable) and shared by the ChildPlans
of every sandbox of that policy, each giving its own directories (mount_bases) and workspace
descriptor (attach_fd); contain.init_plan's InitMounts names the filled ops on demand.

The oracle is mounts.plan, whose filled templates equal plans made anew
(test_mounts_plan_cache.py): what init_plan reports must be exactly that plan.
"""

from __future__ import annotations

import pytest

from corral.ext import _spawn
from corral.sandbox import BindMount, SandboxSpec, contain, mounts
from corral.sandbox.mounts import Template

SUPPORT = contain.support_files()
ROOTS = ("/run/corral/sandboxes/sbx-a/root", "/run/corral/sandboxes/sbx-b/root")


def _init_plan(spec, root, workspace, detached):
    prepared = contain.prepare(spec.with_ids(400000, 65536), cgroup=False)
    return contain.init_plan(prepared, root=root, workspace=workspace, init_fd=9,
                             cgroup_fds=(), status_fd=8, detached=detached)


@pytest.mark.parametrize("shape", ["scratch", "detached", "by-path"])
def test_init_plan_reports_the_plan_mounts_makes_and_shares_one_table(shape):
    spec = SandboxSpec(hostname=f"table-{shape}")  # a template of this test's own
    tables = []
    for n, root in enumerate(ROOTS):
        workspace = None if shape == "scratch" else f"/run/corral/ws/{n}"
        detached = {workspace: 40 + n} if shape == "detached" else {}
        _, made = _init_plan(spec, root, workspace, detached)
        scratch = contain.scratch_workspace_options() if workspace is None else None
        expected = mounts.plan(spec.with_ids(400000, 65536), root, workspace,
                               detached=detached, support=SUPPORT, scratch=scratch)
        assert made.ops() == expected
        assert made.setup_files == mounts.setup_files(expected, root)
        assert "etc/passwd" in made.setup_files and "dev/null" in made.setup_files
        template = mounts.template(spec, workspace, detached=detached, support=SUPPORT,
                                   scratch=scratch)
        tables.append(template.compiled)
    assert isinstance(tables[0], _spawn.MountTable)
    assert tables[0] is tables[1]  # converted once for the policy
    assert len(tables[0]) == len(made.ops())


def test_a_plan_with_user_binds_is_made_anew_without_a_table(tmp_path):
    spec = SandboxSpec(binds=(BindMount(str(tmp_path), "/mnt/data"),))
    _, made = _init_plan(spec, ROOTS[0], None, {})
    assert any(op.target == ROOTS[0] + "/mnt/data" for op in made.ops())
    assert mounts.template(spec, None, support=SUPPORT, scratch="size=1") is None


def test_a_table_needs_exactly_its_placeholders_values():
    table = _spawn.MountTable([("mkdir", None, Template.ROOT + "/x", None, 0, None, 0o755)],
                              bases=Template.PLACEHOLDERS)
    assert table.bases == 3
    _spawn.ChildPlan(argv=["x"], mount_ops=table, mount_bases=("/r", "/w", "/e"))
    with pytest.raises(ValueError, match="has 3 placeholders, 1 values were given"):
        _spawn.ChildPlan(argv=["x"], mount_ops=table, mount_bases=("/r",))
    with pytest.raises(ValueError, match="mount_bases go with a MountTable"):
        _spawn.ChildPlan(argv=["x"], mount_ops=[], mount_bases=("/r",))
    with pytest.raises(ValueError, match="at most 3 placeholders"):
        _spawn.MountTable([], bases=("\0a", "\0b", "\0c", "\0d"))


def test_a_path_that_only_looks_like_a_placeholder_is_refused():
    """A placeholder counts only whole or before a "/": anything else keeps its NUL, which
    no path may hold."""
    with pytest.raises(ValueError, match="contains a NUL byte"):
        _spawn.MountTable([("mkdir", None, Template.ROOT + "x", None, 0, None, 0)],
                          bases=Template.PLACEHOLDERS)
    with pytest.raises(ValueError, match="contains a NUL byte"):
        _spawn.ChildPlan(argv=["x"], mount_ops=[("mkdir", None, Template.ROOT + "/x", None, 0,
                                                 None, 0)])


def test_the_attach_placeholder_takes_the_plans_descriptor_in_the_fd_cut():
    """A table's workspace attach moves the plan's attach_fd (its flags are the
    placeholder -2): the launcher must keep that descriptor below its cut."""
    table = _spawn.MountTable([("attach", None, Template.WORKSPACE, None,
                                Template.WORKSPACE_FD, None, 0)], bases=Template.PLACEHOLDERS)
    plan = _spawn.ChildPlan(argv=["x"], mount_ops=table, mount_bases=("/r", "/w", "/e"),
                            attach_fd=700)
    assert _spawn.plan_fd_cut(plan) == 701
