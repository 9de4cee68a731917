"""Copy-on-write workspaces on real overlays: the host directory is untouched while the
sandbox works; diff and apply round-trip text, binary, deletions, renames and permissions;
a host change since the start is a conflict; the changes outlive the sandbox; hostile
content in an upper layer is never applied as such; the upper layer is capped."""

from __future__ import annotations

import os
import stat

import pytest

from corral.sandbox import Sandbox, SandboxSpec, workspace_fs
from corral.sandbox.errors import FailedPrecondition, SandboxSetupError
from corral.sandbox.state import changes as changes_mod
from corral.sandbox.state.changes import ChangeSet, ChangesNotFound
from corral.sandbox.state.diff import ApplyConflict, apply, diff

from ..processes import wait_until

OWNER = (1000, 1000)


def sh(sandbox: Sandbox, script: str) -> tuple[int, str]:
    proc = sandbox.exec(["/bin/sh", "-c", script])
    out, err = proc.communicate()
    return proc.returncode, out.decode() + err.decode()


def make_host(tmp_path) -> str:
    """A project owned by uid 1000: text, binary, a directory to delete, files to rename
    and to chmod."""
    host = tmp_path / "project"
    (host / "src").mkdir(parents=True)
    (host / "old").mkdir()
    (host / "README").write_text("one\ntwo\n")
    (host / "src" / "blob.bin").write_bytes(b"\0\1\2\3")
    (host / "old" / "x").write_text("x\n")
    (host / "rename-me").write_text("same\n")
    (host / "run.sh").write_text("echo hi\n")
    for path in [host, *host.rglob("*")]:
        os.chown(path, *OWNER)
    return str(host)


def snapshot_of(path: str) -> dict[str, tuple]:
    """Every entry below path: type, mode, owner, content."""
    out = {}
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(top, name)
            st = os.lstat(full)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
            out[os.path.relpath(full, path)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                st.st_uid, st.st_gid, data)
    return out


def cow(host: str, changes_root: str) -> Sandbox:
    return Sandbox(SandboxSpec(workspace=host, workspace_cow=True), changes_root=changes_root,
                   tenant="t1")


EDITS = ("echo three >> README; printf '\\4\\5' > src/blob.bin; rm -r old; "
         "mv rename-me renamed; chmod 755 run.sh; mkdir new; echo n > new/file")


def test_diff_and_apply_round_trip(tmp_path, changes_root):
    host = make_host(tmp_path)
    before = snapshot_of(host)
    with cow(host, changes_root) as sb:
        assert sh(sb, EDITS) == (0, "")
        assert sh(sb, "cat README; ls") == (0, "one\ntwo\nthree\nREADME\nnew\nrenamed\n"
                                               "run.sh\nsrc\n")
        assert snapshot_of(host) == before  # nothing reaches the host while it works
        live = diff(sb.changes)  # also while it runs
        with pytest.raises(FailedPrecondition, match=rf"^sandbox {sb.id} still runs on these "
                                                     rf"changes; destroy it before"):
            apply(sb.changes)
        sandbox_id = sb.id
    changes = ChangeSet.open(changes_root, sandbox_id)  # as after a daemon restart
    assert changes.tenant == "t1" and changes.host_dir == host
    found = {c.path: c for c in diff(changes, patch=True)}
    assert [(c.path, c.kind) for c in live] == [(p, c.kind) for p, c in found.items()]
    assert {p: (c.kind, c.type) for p, c in found.items()} == {
        "README": ("modified", "file"), "new": ("added", "dir"),
        "new/file": ("added", "file"), "old": ("deleted", "dir"),
        "rename-me": ("deleted", "file"), "renamed": ("added", "file"),
        "run.sh": ("mode", "file"), "src/blob.bin": ("modified", "file")}
    readme = found["README"]
    assert (readme.lines_added, readme.lines_removed, readme.binary) == (1, 0, False)
    assert readme.patch == ("--- a/README\n+++ b/README\n@@ -1,2 +1,3 @@\n one\n two\n"
                            "+three\n")
    assert found["src/blob.bin"].binary and found["src/blob.bin"].patch == ""
    assert (found["run.sh"].old_mode, found["run.sh"].new_mode) == (0o644, 0o755)
    assert not any(c.conflict for c in found.values())

    result = apply(changes)
    assert sorted(result.removed) == ["old", "rename-me"] and result.skipped == []
    after = snapshot_of(host)
    assert after["README"][4] == b"one\ntwo\nthree\n"
    assert after["src/blob.bin"][4] == b"\4\5"
    assert after["renamed"][4] == b"same\n" and "rename-me" not in after and "old" not in after
    assert after["run.sh"][1] == 0o755
    assert all(entry[2:4] == OWNER for entry in after.values())  # the directory's owner
    assert diff(changes) == []
    assert changes.discard() == 0  # all applied: nothing left to drop
    with pytest.raises(ChangesNotFound):
        ChangeSet.open(changes_root, sandbox_id)


def conflicting(tmp_path, changes_root) -> tuple[str, ChangeSet]:
    """A change set that rewrote README and added other, and a host README edited since."""
    host = make_host(tmp_path)
    with cow(host, changes_root) as sb:
        sh(sb, "echo sandbox > README; echo ok > other")
        changes = sb.changes
    with open(os.path.join(host, "README"), "a") as f:
        f.write("edited on the host\n")
    return host, changes


def test_a_host_change_since_the_start_is_refused_naming_it(tmp_path, changes_root):
    host, changes = conflicting(tmp_path, changes_root)
    assert [c.path for c in diff(changes) if c.conflict] == ["README"]
    with pytest.raises(ApplyConflict, match=r"^the host copy of 1 path\(s\) changed since the "
                                            r"sandbox started: 'README'; apply with force"):
        apply(changes)
    assert not os.path.exists(os.path.join(host, "other"))  # nothing written
    assert changes.discard() == 2  # README and other, dropped


def test_force_writes_over_a_conflict(tmp_path, changes_root):
    host, changes = conflicting(tmp_path, changes_root)
    assert apply(changes, force=True).written == ["README", "other"]
    with open(os.path.join(host, "README")) as f:
        assert f.read() == "sandbox\n"
    changes.discard()


def test_hostile_upper_content_is_never_applied_as_such(tmp_path, changes_root):
    host = make_host(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(host, "escape"))  # a host link out
    with cow(host, changes_root) as sb:
        sandbox_id = sb.id
    changes = ChangeSet.open(changes_root, sandbox_id)
    changes.mount()  # plant what a sandbox with more privileges could have left
    try:
        upper = changes.upper
        with open(os.path.join(upper, "suid"), "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(os.path.join(upper, "suid"), 0o6755)
        os.mkfifo(os.path.join(upper, "fifo"))
        os.mknod(os.path.join(upper, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.symlink("/etc/shadow", os.path.join(upper, "abs-link"))
        os.symlink("../../outside/x", os.path.join(upper, "up-link"))
        os.symlink("src/blob.bin", os.path.join(upper, "ok-link"))
        os.mkdir(os.path.join(upper, "escape"))  # the host's link replaced by a directory
        with open(os.path.join(upper, "escape", "planted"), "w") as f:
            f.write("p\n")
    finally:
        changes.unmount()
    found = {c.path: c for c in diff(changes)}
    assert "fifo" not in found and "null" not in found
    assert found["abs-link"].refused.startswith("symlink target '/etc/shadow' is absolute")
    assert found["up-link"].refused == "symlink target '../../outside/x' leaves the directory"
    result = apply(changes)
    assert sorted(p for p, _ in result.skipped) == ["abs-link", "up-link"]
    host_view = snapshot_of(host)
    assert stat.S_IMODE(os.stat(os.path.join(host, "suid")).st_mode) == 0o755
    assert "fifo" not in host_view and "null" not in host_view
    assert os.readlink(os.path.join(host, "ok-link")) == "src/blob.bin"
    assert os.listdir(outside) == []  # nothing went through the host's link
    assert host_view["escape"][0] == stat.S_IFDIR and host_view["escape/planted"][4] == b"p\n"
    changes.discard()


def test_the_upper_layer_is_capped(tmp_path, changes_root, monkeypatch):
    monkeypatch.setenv("CORRAL_WORKSPACE_BYTES", str(16 << 20))
    host = make_host(tmp_path)
    with cow(host, changes_root) as sb:
        assert sh(sb, "head -c 32M /dev/zero > big; echo $?") == (
            0, "1\nhead: error writing 'standard output': No space left on device\n")
        assert os.path.getsize(os.path.join(host, "README")) == 8
        changes = sb.changes
    image = os.path.join(changes.path, "upper.img")
    assert os.stat(image).st_blocks * 512 <= 20 << 20  # sparse: what was written, at most
    changes.discard()
    assert workspace_fs.max_bytes() == 16 << 20


def test_a_failed_start_leaves_no_change_set(tmp_path, changes_root, monkeypatch):
    host = make_host(tmp_path)

    def refuse(self, *args):
        raise OSError(5, "refused for the test")

    monkeypatch.setattr(Sandbox, "_spawn_init", refuse)
    sb = cow(host, changes_root)
    with pytest.raises(OSError):
        sb.start()
    assert os.listdir(changes_root) == []


def test_sweep_unmounts_what_a_crash_left_mounted(tmp_path, changes_root):
    host = make_host(tmp_path)
    changes = ChangeSet.create(changes_root, "sbx-crashed", host, upper_uid=100000)
    changes.mount()
    os.mkdir(os.path.join(changes_root, ".tmp-sbx-half.0000"))
    assert sorted(changes_mod.sweep(changes_root)) == [".tmp-sbx-half.0000", "sbx-crashed"]
    assert not changes.is_mounted() and os.listdir(changes_root) == ["sbx-crashed"]
    changes.discard()


def test_a_mount_waits_for_the_writable_mount_of_an_ended_sandbox_to_go(tmp_path,
                                                                        changes_root,
                                                                        monkeypatch):
    """A sandbox's writable mount of its upper image is unmounted lazily: while something
    still holds it (the sandbox's last references, a moment after its destroy), the image's
    journal needs recovery, a read-only mount of it (a diff) failed with EROFS, and a
    writable one (the next sandbox on it) would be a second writer. Both wait for it to go;
    past RELEASE_WAIT_S they are refused (EBUSY), never mounted beside it."""
    import threading

    host = make_host(tmp_path)
    changes = ChangeSet.create(changes_root, "sbx-ending", host, upper_uid=100000)
    late = os.path.join(changes.upper, "late.txt")

    def end_held() -> int:
        """Mount writable, append a line, unmount lazily; returns the descriptor that
        keeps that mount alive."""
        changes.mount()
        with open(late, "a") as f:
            f.write("later\n")
        holder = os.open(changes.upper, os.O_RDONLY | os.O_DIRECTORY)
        changes.unmount()  # gone from mnt/, alive while `holder` is open
        assert not changes.is_mounted()
        return holder

    for lines, read_only in ((1, True), (2, False)):
        releaser = threading.Timer(0.5, os.close, (end_held(),))
        releaser.start()
        try:
            assert changes.mount(read_only=read_only) is True
            with open(late) as f:
                assert f.read() == "later\n" * lines  # what the ended mount wrote
        finally:
            releaser.join()
            changes.unmount()
    monkeypatch.setattr(changes_mod, "RELEASE_WAIT_S", 0.2)
    holder = end_held()
    try:
        with pytest.raises(SandboxSetupError, match="EBUSY"):
            changes.mount(read_only=True)
        assert not changes.is_mounted()
    finally:
        os.close(holder)
    with changes.mounted():
        assert [c.path for c in diff(changes)] == ["late.txt"]
    changes.discard()


def test_changes_left_by_a_host_crash_are_read_after_their_journal_is_replayed(tmp_path,
                                                                               changes_root):
    """The upper image as a power cut under a running sandbox leaves it: a copy taken while
    it was mounted writable, its journal needing recovery. A read-only loop device cannot
    replay it (EROFS); the diff replays it with a writable mount first and reads what the
    sandbox wrote."""
    import shutil
    import subprocess

    host = make_host(tmp_path)
    changes = ChangeSet.create(changes_root, "sbx-crash", host, upper_uid=100000)
    changes.mount()
    with open(os.path.join(changes.upper, "made-before.txt"), "w") as f:
        f.write("kept\n")
    os.sync()
    image = os.path.join(changes.path, "upper.img")
    shutil.copyfile(image, image + ".at-crash")
    changes.unmount()
    assert wait_until(lambda: not changes_mod._attached(image), timeout_s=5)
    os.replace(image + ".at-crash", image)
    features = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True).stdout
    assert "needs_recovery" in features  # what the test stands for: a dirty journal
    assert [(c.path, c.kind) for c in diff(changes)] == [("made-before.txt", "added")]
    assert not changes.is_mounted()  # the diff's read-only mount went with it
    features = subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True).stdout
    assert "needs_recovery" not in features
    changes.discard()
