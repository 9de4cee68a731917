"""Sandbox state through the daemon (issue 14): snapshots and forks, copy-on-write
workspaces with diff/apply/discard, tenant isolation and quotas, and what survives a
daemon restart."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2 as pb

from .daemon_harness import collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value)


def _sh(c, sandbox_id: str, script: str) -> bytes:
    result = collect_exec(c.exec(sandbox_id, ["sh", "-c", script]))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _tenant(daemon, prefix: str):
    return daemon.client(tenant=f"{prefix}-{secrets.token_hex(3)}")


def test_forks_see_the_snapshot_and_only_their_own_changes(daemon):
    c = _tenant(daemon, "fork")
    parent = c.create_sandbox()
    _sh(c, parent.id, "echo base > /workspace/a && mkdir /workspace/d && echo x > /workspace/d/x")
    snap = c.snapshot(parent.id, name="base")
    assert snap.id.startswith("snap-") and snap.name == "base" and snap.source_sandbox == parent.id
    assert snap.files >= 2 and snap.size_bytes >= len("base\nx\n")
    forks = [c.create_sandbox(snapshot="base").id for _ in range(3)]  # by name
    forks.append(c.create_sandbox(snapshot=snap.id).id)  # and by id
    for i, fork in enumerate(forks):
        assert _sh(c, fork, "cat /workspace/a /workspace/d/x") == b"base\nx\n"
        _sh(c, fork, f"echo fork{i} > /workspace/a && echo {i} > /workspace/only{i}")
    _sh(c, parent.id, "echo parent > /workspace/a")
    for i, fork in enumerate(forks):  # each diverged alone: no sibling's or parent's change
        assert _sh(c, fork, "cat /workspace/a; ls /workspace") == (
            f"fork{i}\na\nd\nonly{i}\n".encode())
    assert _sh(c, parent.id, "cat /workspace/a; ls /workspace") == b"parent\na\nd\n"
    assert c.get_snapshot("base").in_use == 4
    code, message = _code(lambda: c.remove_snapshot("base"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "in use" in message
    # a snapshot of a fork is a child of the first: the first cannot go before it
    child = c.snapshot(forks[0])
    assert child.parent == snap.id
    for fork in forks:
        c.destroy_sandbox(fork)
    code, message = _code(lambda: c.remove_snapshot(snap.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and child.id in message
    grandchild = c.create_sandbox(snapshot=child.id)
    assert _sh(c, grandchild.id, "cat /workspace/a /workspace/only0") == b"fork0\n0\n"
    c.destroy_sandbox(grandchild.id)
    c.remove_snapshot(child.id)
    c.remove_snapshot(snap.id)
    assert c.list_snapshots() == []
    c.destroy_sandbox(parent.id)
    kinds = [r.kind for r in daemon.records() if r.kind.startswith("snapshot.")
             and r.tenant == snap.tenant]
    assert kinds == ["snapshot.create", "snapshot.create", "snapshot.remove", "snapshot.remove"]


def test_a_snapshot_of_a_paused_sandbox_leaves_it_paused(daemon):
    c = _tenant(daemon, "psnap")
    sb = c.create_sandbox()
    _sh(c, sb.id, "echo kept > /workspace/f")
    c.pause(sb.id)
    snap = c.snapshot(sb.id)
    assert c.get_sandbox(sb.id).state == pb.SANDBOX_STATE_PAUSED
    c.resume(sb.id)
    fork = c.create_sandbox(snapshot=snap.id)
    assert _sh(c, fork.id, "cat /workspace/f") == b"kept\n"
    for s in (fork.id, sb.id):
        c.destroy_sandbox(s)
    c.remove_snapshot(snap.id)


def test_snapshots_belong_to_their_tenant_and_count_against_its_quota(make_daemon):
    d = make_daemon("quota", config="[policy]\nmax_snapshots = 1\n").start()
    a, b = d.client(tenant="acme"), d.client(tenant="globex")
    sb = a.create_sandbox()
    snap = a.snapshot(sb.id, name="one")
    code, _ = _code(lambda: a.snapshot(sb.id))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for attempt in (lambda: b.get_snapshot(snap.id), lambda: b.get_snapshot("one"),
                    lambda: b.create_sandbox(snapshot=snap.id),
                    lambda: b.remove_snapshot(snap.id)):
        assert _code(attempt)[0] == grpc.StatusCode.NOT_FOUND
    assert b.list_snapshots() == [] and [s.id for s in a.list_snapshots()] == [snap.id]
    code, message = _code(lambda: a.snapshot(sb.id, name="bad/name"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    a.destroy_sandbox(sb.id)
    assert d.stop() == 0


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "keep.txt").write_text("one\ntwo\nthree\n")
    (root / "gone.txt").write_text("bye\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "tool.sh", 0o644)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    return root


CHANGE = ("cd /workspace && printf 'one\\n2\\nthree\\nfour\\n' > keep.txt && rm gone.txt && "
          "chmod 755 tool.sh && printf '\\0\\1\\2' > blob.bin && mkdir -p new/deep && "
          "echo made > new/deep/file && mv keep.txt moved.txt && cp moved.txt keep.txt")


def test_a_cow_workspace_leaves_the_host_alone_until_apply(daemon, project):
    c = daemon.client()  # the operator: any host directory
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    sb = c.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    _sh(c, sb.id, CHANGE)
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before  # untouched
    changes = {ch.path: ch for ch in c.diff(sb.id, patch=True)}
    assert {p: pb.ChangeKind.Name(ch.kind) for p, ch in changes.items()} == {
        "keep.txt": "CHANGE_KIND_MODIFIED", "gone.txt": "CHANGE_KIND_DELETED",
        "tool.sh": "CHANGE_KIND_MODE", "blob.bin": "CHANGE_KIND_MODIFIED",
        "moved.txt": "CHANGE_KIND_ADDED", "new": "CHANGE_KIND_ADDED",
        "new/deep": "CHANGE_KIND_ADDED", "new/deep/file": "CHANGE_KIND_ADDED"}
    keep = changes["keep.txt"]
    assert "-two\n+2\n" in keep.patch and (keep.lines_added, keep.lines_removed) == (2, 1)
    assert changes["blob.bin"].binary and not changes["blob.bin"].patch
    assert (changes["tool.sh"].old_mode, changes["tool.sh"].new_mode) == (0o644, 0o755)
    done = c.apply(sb.id)
    assert sorted(done.removed) == ["gone.txt"]
    assert (project / "keep.txt").read_text() == "one\n2\nthree\nfour\n"
    assert (project / "moved.txt").read_text() == "one\n2\nthree\nfour\n"
    assert (project / "blob.bin").read_bytes() == b"\0\1\2"
    assert (project / "new/deep/file").read_text() == "made\n"
    assert not (project / "gone.txt").exists()
    assert os.stat(project / "tool.sh").st_mode & 0o7777 == 0o755
    owner = os.stat(project)
    for path in project.rglob("*"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid), path
    assert list(c.diff(sb.id)) == []  # applied: nothing left to show
    c.destroy_sandbox(sb.id)


def test_apply_refuses_a_conflicting_host_change_unless_forced(daemon, project):
    c = daemon.client()
    sb = c.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    _sh(c, sb.id, "echo sandbox > /workspace/keep.txt && echo new > /workspace/other.txt")
    (project / "keep.txt").write_text("edited on the host\n")
    assert [ch.path for ch in c.diff(sb.id) if ch.conflict] == ["keep.txt"]
    code, message = _code(lambda: c.apply(sb.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'keep.txt'" in message
    assert (project / "keep.txt").read_text() == "edited on the host\n"
    assert not (project / "other.txt").exists()  # a refused apply writes nothing
    c.apply(sb.id, force=True)
    assert (project / "keep.txt").read_text() == "sandbox\n"
    c.destroy_sandbox(sb.id)


def test_changes_outlive_the_sandbox_and_the_daemon_and_discard_drops_them(make_daemon,
                                                                          project):
    d = make_daemon("cow").start()
    c = d.client()
    sb = c.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    _sh(c, sb.id, "echo later > /workspace/late.txt")
    c.destroy_sandbox(sb.id)
    assert [ch.path for ch in c.diff(sb.id)] == ["late.txt"]
    assert d.stop() == 0
    d.start()
    c = d.client()
    assert [ch.path for ch in c.diff(sb.id)] == ["late.txt"]
    other = d.client(tenant="stranger")
    for attempt in (lambda: list(other.diff(sb.id)), lambda: other.apply(sb.id),
                    lambda: other.discard(sb.id)):
        assert _code(attempt)[0] == grpc.StatusCode.NOT_FOUND
    assert c.discard(sb.id) == 1
    assert _code(lambda: list(c.diff(sb.id)))[0] == grpc.StatusCode.NOT_FOUND
    assert not (project / "late.txt").exists()
    # a live sandbox is destroyed by its discard
    live = c.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    _sh(c, live.id, "echo x > /workspace/x")
    assert c.discard(live.id) == 1
    assert live.id in [s.id for s in c.list_sandboxes(state=pb.SANDBOX_STATE_DESTROYED)]
    assert d.stop() == 0


def test_a_host_directory_needs_the_tenants_policy(make_daemon, project):
    d = make_daemon("hostdirs", config=(
        f'[tenants.acme]\ntoken = "{"a" * 32}"\nhost_dirs = ["{project}"]\n')).start()
    stranger = d.client(tenant="globex")
    code, message = _code(lambda: stranger.create_sandbox(workspace_dir=str(project)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "host_dirs" in message
    acme = d.client(tenant="acme")
    sb = acme.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    assert _sh(acme, sb.id, "cat /workspace/gone.txt") == b"bye\n"
    code, _ = _code(lambda: acme.create_sandbox(workspace_dir=str(project.parent)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    acme.destroy_sandbox(sb.id)
    acme.discard(sb.id)
    assert d.stop() == 0


def _corral(daemon, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, env=env, timeout=120, check=False, text=True)


def test_the_cli_verbs_a_developer_types(daemon, project):
    made = _corral(daemon, "create", "--workspace", str(project), "--cow")
    assert made.returncode == 0, made.stderr
    sb = made.stdout.strip()
    assert _corral(daemon, "exec", sb, "--", "sh", "-c",
                   "echo changed > /workspace/keep.txt").returncode == 0
    paused = _corral(daemon, "pause", sb)
    assert (paused.returncode, paused.stdout) == (0, f"{sb} paused\n")
    refused = _corral(daemon, "exec", sb, "--", "true")
    assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr
    assert "paused" in refused.stderr
    resumed = _corral(daemon, "resume", sb)
    assert resumed.returncode == 0 and resumed.stdout.startswith(f"{sb} running, expires ")
    snap = _corral(daemon, "snapshot", sb, "--name", f"cli-{sb}")
    assert snap.returncode == 0 and snap.stdout.startswith("snap-"), snap.stderr
    listed = _corral(daemon, "snapshot", "ls")
    assert f"cli-{sb}" in listed.stdout
    fork = _corral(daemon, "create", "--from", f"cli-{sb}").stdout.strip()
    seen = _corral(daemon, "exec", fork, "--", "cat", "/workspace/keep.txt")
    assert seen.stdout == "changed\n"
    stat = _corral(daemon, "diff", sb, "--stat")
    assert stat.returncode == 0 and stat.stdout.splitlines() == [
        "modified keep.txt | +1 -3", "1 paths changed, +1 -3 lines"]
    patch = _corral(daemon, "diff", sb).stdout
    assert "-one\n-two\n-three\n+changed\n" in patch
    applied = _corral(daemon, "apply", sb)
    assert (applied.returncode, applied.stdout) == (0, "1 written, 0 removed\n"), applied.stderr
    assert (project / "keep.txt").read_text() == "changed\n"
    assert _corral(daemon, "discard", sb).stdout == "0 changed paths discarded\n"
    assert _corral(daemon, "destroy", fork).returncode == 0
    assert _corral(daemon, "snapshot", "rm", f"cli-{sb}").returncode == 0
    usage = _corral(daemon, "snapshot", "inspect")
    assert usage.returncode == 2 and "usage: corral snapshot" in usage.stderr
    cow_alone = _corral(daemon, "create", "--cow")
    assert cow_alone.returncode == 2 and "--cow needs --workspace" in cow_alone.stderr
