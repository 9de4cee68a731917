"""mounts.plan's templates: a policy's plan is made once and filled in per sandbox.

Every filled plan must equal the plan made anew for the same arguments (the oracle is
mounts._make_plan, the uncached steps), whatever the sandbox's own paths and descriptor.
"""

from __future__ import annotations

import pytest

from corral.sandbox import BindMount, SandboxSpec, contain, mounts

SUPPORT = contain.support_files()


def _fresh(spec, root, workspace, detached, scratch=None):
    empty = root.rsplit("/", 1)[0] + "/empty"
    return mounts._make_plan(spec, root, workspace, mounts.HostView(), detached, SUPPORT, None,
                             empty, scratch)


@pytest.mark.parametrize("spec", [
    SandboxSpec(),
    SandboxSpec(hostname="other", tmp_bytes=16 << 20),
    SandboxSpec(devices=("/dev/loop0",)),
    SandboxSpec(uid_base=300000, labels={"team": "a"}),
], ids=["default", "hostname-tmp", "device", "other-ids"])
@pytest.mark.parametrize("shape", ["detached", "by-path", "scratch"])
def test_a_filled_template_is_the_plan_made_anew(spec, shape):
    scratch = "size=1048576,nr_inodes=64" if shape == "scratch" else None
    for n in range(3):  # the first call makes the template, the others fill it
        root = f"/run/corral/sandboxes/sbx-{n}/root"
        workspace = None if scratch else f"/run/corral/ws/sbx-{n}"
        fds = {workspace: 40 + n} if shape == "detached" else {}
        got = mounts.plan(spec, root, workspace, detached=fds, support=SUPPORT, scratch=scratch)
        assert got == _fresh(spec, root, workspace, fds, scratch)
        assert not any("\0" in (op.target + (op.source or "")) for op in got)


def test_a_scratch_workspace_is_a_capped_tmpfs_of_the_sandbox():
    ops = mounts.plan(SandboxSpec(), "/r/s/root", None, support=SUPPORT,
                      scratch="size=4096,nr_inodes=8")
    mount = [op for op in ops if op.target == "/r/s/root/workspace" and op.kind == "mount"]
    assert mount == [mounts.MountOp("mount", "/r/s/root/workspace", source="tmpfs",
                                    fstype="tmpfs", flags=mounts.MS_NOSUID | mounts.MS_NODEV,
                                    data="mode=0755,size=4096,nr_inodes=8")]
    assert not any(op.kind == "attach" for op in ops)
    with pytest.raises(ValueError, match="^a sandbox with no workspace directory needs "
                                         "scratch options$"):
        mounts.plan(SandboxSpec(), "/r/s/root", None, support=SUPPORT)


def test_sandboxes_of_one_policy_share_one_template():
    mounts._PLANS._templates.clear()
    for n, uid_base in enumerate((100000, 165536, 231072)):
        spec = SandboxSpec(uid_base=uid_base)
        mounts.plan(spec, f"/r/sbx-{n}/root", f"/w/sbx-{n}", detached={f"/w/sbx-{n}": 5},
                    support=SUPPORT)
    assert len(mounts._PLANS._templates) == 1
    mounts.plan(SandboxSpec(hostname="elsewhere"), "/r/x/root", "/w/x", detached={"/w/x": 5},
                support=SUPPORT)
    assert len(mounts._PLANS._templates) == 2


def test_user_binds_are_planned_anew(tmp_path):
    mounts._PLANS._templates.clear()
    source = tmp_path / "data"
    source.mkdir()
    spec = SandboxSpec(binds=(BindMount(str(source), "/data", writable=False),))
    got = mounts.plan(spec, "/r/b/root", "/w/b", support=SUPPORT)
    assert got == _fresh(spec, "/r/b/root", "/w/b", {})
    assert any(op.target == "/r/b/root/data" and op.source == str(source) for op in got)
    assert mounts._PLANS._templates == {}
    source.rmdir()  # the host changed: the next plan sees it (a missing source is left out)
    assert not any(op.target == "/r/b/root/data" for op in mounts.plan(
        spec, "/r/b/root", "/w/b", support=SUPPORT))


def test_the_cache_is_bounded():
    mounts._PLANS._templates.clear()
    for n in range(mounts._PLANS.SIZE + 5):
        mounts.plan(SandboxSpec(hostname=f"h{n}"), "/r/s/root", "/w/s", support=SUPPORT)
    assert len(mounts._PLANS._templates) == mounts._PLANS.SIZE
