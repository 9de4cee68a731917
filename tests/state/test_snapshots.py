"""Snapshots and forks on real overlays through the native backend: a fork sees its parent's
files and only its own writes, siblings diverge, deletions and owners carry over, the store
refuses to remove what is used, and a snapshot keeps the image it was taken on."""

from __future__ import annotations

import os

import pytest

from corral.sandbox import CorralError, InvalidSpec, Sandbox, SandboxSpec
from corral.sandbox.state.snapshots import SnapshotInUse, SnapshotNotFound

from ..linux.test_image_run import image  # noqa: F401 (the fixture)


def sh(sandbox: Sandbox, script: str) -> tuple[int, str]:
    proc = sandbox.exec(["/bin/sh", "-c", script])
    out, err = proc.communicate()
    return proc.returncode, out.decode() + err.decode()


def fork(store, snapshot_id: str, **fields) -> Sandbox:
    return Sandbox(SandboxSpec(snapshot=snapshot_id, **fields), snapshot_store=store)


def test_a_fork_sees_the_parents_files_and_only_its_own_writes(store):
    with Sandbox(SandboxSpec()) as parent:
        assert sh(parent, "echo base > f; mkdir d; echo deep > d/x; ln -s f link")[0] == 0
        snap = parent.snapshot(store, name="base")
        assert sh(parent, "echo later > parent-only")[0] == 0  # it keeps running
        with fork(store, snap.id) as child:
            assert sh(child, "cat f d/x; readlink link") == (0, "base\ndeep\nf\n")
            assert sh(child, "echo mine > child-only; echo changed > f")[0] == 0
            assert sh(child, "ls; cat f") == (0, "child-only\nd\nf\nlink\nchanged\n")
            assert sh(parent, "ls; cat f") == (0, "d\nf\nlink\nparent-only\nbase\n")
    assert (snap.name, snap.parent, snap.files, snap.size_bytes) == ("base", "", 4, 10)


def test_ten_siblings_diverge_independently(store):
    with Sandbox(SandboxSpec()) as parent:
        sh(parent, "echo 0 > n")
        snap = parent.snapshot(store)
    siblings = [fork(store, snap.id) for _ in range(10)]
    try:
        for sb in siblings:
            sb.start()
        assert store.in_use(snap.id) == 10
        for i, sb in enumerate(siblings):
            assert sh(sb, f"echo {i} > n; touch only-{i}")[0] == 0
        for i, sb in enumerate(siblings):
            assert sh(sb, "cat n; ls") == (0, f"{i}\nn\nonly-{i}\n")
    finally:
        for sb in siblings:
            sb.destroy()
    assert store.in_use(snap.id) == 0


def test_deletions_and_owners_carry_down_a_chain(store):
    with Sandbox(SandboxSpec()) as first:
        sh(first, "echo a > a; echo b > b; mkdir -p dir/sub; echo c > dir/sub/c; chmod 750 b")
        # no capability to chown inside: the host gives a file to the sandbox's uid 1000
        base = first.spec.uid_base
        os.chown(os.path.join(first.workspace, "a"), base + 1000, base + 1001)
        one = first.snapshot(store)
    with fork(store, one.id) as second:
        assert sh(second, "rm a; rm -r dir; mkdir dir; echo new > dir/fresh")[0] == 0
        two = second.snapshot(store)
    assert two.parent == one.id
    with fork(store, two.id) as third:
        assert third.spec.uid_base != second.spec.uid_base  # another id range
        assert sh(third, "ls; ls dir; stat -c %a b") == (0, "b\ndir\nfresh\n750\n")
    with fork(store, one.id) as sibling:  # the first snapshot is unchanged
        assert sh(sibling, "stat -c %u:%g a; ls dir/sub") == (0, "1000:1001\nc\n")


def test_remove_is_refused_while_used_or_a_parent(store):
    with Sandbox(SandboxSpec()) as parent:
        sh(parent, "echo x > x")
        snap = parent.snapshot(store, name="keep", tenant="t1")
        with fork(store, snap.id) as child:
            with pytest.raises(SnapshotInUse, match=rf"^snapshot {snap.id} is in use by "
                                                    rf"{child.id}$"):
                store.remove(snap.id)
            top = child.snapshot(store, tenant="t1")
    with pytest.raises(SnapshotInUse, match=rf"is the parent of {top.id}; remove those"):
        store.remove("keep", tenant="t1")
    assert store.usage("t1") == (2, snap.size_bytes + top.size_bytes)
    with pytest.raises(SnapshotNotFound):
        store.remove("keep", tenant="t2")  # another tenant's name
    store.remove(top.id)
    assert store.remove("keep", tenant="t1").id == snap.id
    assert store.list() == [] and os.listdir(os.path.join(store.root, "layers/sha256")) == []


def test_names_are_unique_per_tenant_and_checked(store):
    with Sandbox(SandboxSpec()) as sb:
        store_one = sb.snapshot(store, name="n", tenant="a")
        assert sb.snapshot(store, name="n", tenant="b").name == "n"
        with pytest.raises(InvalidSpec, match=r"^name: tenant 'a' already has a snapshot "
                                              r"named 'n'$"):
            sb.snapshot(store, name="n", tenant="a")
        with pytest.raises(InvalidSpec, match=r"^name: 'a b' must be"):
            sb.snapshot(store, name="a b")
    assert store.get("n", tenant="a") == store_one
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_same_state_same_digest_and_layers_stored_once(store):
    with Sandbox(SandboxSpec()) as sb:
        sh(sb, "echo same > f; touch -d @1000000000 f")
        one = sb.snapshot(store)
        two = sb.snapshot(store)
    assert one.workspace_digest == two.workspace_digest
    assert len(os.listdir(os.path.join(store.root, "layers/sha256"))) == 1


def test_a_snapshot_over_its_quota_keeps_nothing(store):
    with Sandbox(SandboxSpec()) as sb:
        sh(sb, "head -c 3000 /dev/zero | tr '\\0' x > big")
        from corral.sandbox.errors import ResourceExhausted

        with pytest.raises(ResourceExhausted, match=r"larger than the 1000 bytes"):
            sb.snapshot(store, max_bytes=1000)
        assert sh(sb, "wc -c < big") == (0, "3000\n")  # thawed: it still runs
    assert store.list() == [] and os.listdir(os.path.join(store.root, "tmp")) == []


def test_an_image_snapshot_forks_on_its_image(store, image):  # noqa: F811
    with Sandbox(SandboxSpec(image=image)) as parent:
        sh(parent, "echo state > /workspace/w")
        snap = parent.snapshot(store)
    assert snap.image == image and snap.root_digest.startswith("sha256:")
    with fork(store, snap.id) as child:
        assert child.spec.image == image
        assert sh(child, "cat /image-only-file /workspace/w; cat /gone") == (
            1, "from the image\nstate\ncat: /gone: No such file or directory\n")
    with pytest.raises(InvalidSpec, match=r"^image: snapshot snap-[0-9a-f]{12} is on image "):
        fork(store, snap.id, image="other:latest").start()


def test_an_unknown_snapshot_fails_the_start_cleanly(store):
    sb = fork(store, "snap-000000000000")
    with pytest.raises(SnapshotNotFound, match=r"^no snapshot 'snap-000000000000'$"):
        sb.start()
    assert sb.state == "destroyed"


def test_a_paused_sandbox_is_captured_and_stays_paused(store):
    with Sandbox(SandboxSpec()) as sb:
        sh(sb, "echo kept > f")
        assert sb.pause()
        snap = sb.snapshot(store)
        assert sb.state == "paused"
        with open(f"/sys/fs/cgroup/freezer/corral/{sb.id}/freezer.state") as f:
            assert f.read().strip() == "FROZEN"
        sb.resume()
        assert sh(sb, "cat f") == (0, "kept\n")
    with fork(store, snap.id) as child:
        assert sh(child, "cat f") == (0, "kept\n")


def test_a_host_directory_workspace_is_captured_with_its_owner_as_root(store, tmp_path):
    host = tmp_path / "project"
    host.mkdir()
    (host / "src").write_text("code\n")
    os.chown(host, 1000, 1000)
    os.chown(host / "src", 1000, 1000)
    with Sandbox(SandboxSpec(workspace=str(host))) as sb:
        snap = sb.snapshot(store)
    with fork(store, snap.id) as child:
        assert sh(child, "stat -c %u:%g . src; cat src") == (0, "0:0\n0:0\ncode\n")
        sh(child, "echo fork > src")
    assert (host / "src").read_text() == "code\n"  # the fork never writes the host's


def test_only_a_started_sandbox_is_captured(store):
    sb = Sandbox(SandboxSpec())
    with pytest.raises(CorralError, match=r"^sandbox sbx-[0-9a-f]+ is new; cannot snapshot"):
        sb.snapshot(store)
