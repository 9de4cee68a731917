"""Snapshot layers copied from an upper layer: whiteouts and opaque directories kept,
setuid/setgid, FIFOs and devices never kept, owners stored relative to the sandbox, and the
digest a function of the content only."""

from __future__ import annotations

import os
import stat

import pytest

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import SandboxSpec
from corral.sandbox.state.diff import _link_escapes
from corral.sandbox.state.layers import OPAQUE_XATTR, IdShift, copy_layer

BASE = 200000


def upper_tree(path) -> None:
    """What an overlay's upper layer of a sandbox with ids BASE.. can hold."""
    (path / "opaque").mkdir()
    os.setxattr(str(path / "opaque"), OPAQUE_XATTR, b"y")
    (path / "opaque" / "kept").write_text("k")
    os.mknod(str(path / "deleted"), stat.S_IFCHR, 0)  # a whiteout
    os.mknod(str(path / "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(str(path / "fifo"))
    (path / "suid").write_text("s")
    os.chmod(str(path / "suid"), 0o6755)
    os.chown(str(path / "suid"), BASE + 1000, BASE + 1001)
    os.chown(str(path / "opaque" / "kept"), 4242, 4242)  # not the sandbox's: nobody
    os.symlink("/anywhere", str(path / "link"))
    with open(path / "sparse", "wb") as f:
        f.truncate(64 << 20)


def copy(src, dst) -> str:
    dst.mkdir()
    a = os.open(str(src), os.O_RDONLY | os.O_DIRECTORY)
    b = os.open(str(dst), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return copy_layer(a, b, IdShift(BASE, 65536)).digest
    finally:
        os.close(a)
        os.close(b)


def test_a_layer_keeps_overlay_marks_and_drops_what_could_grant(tmp_path):
    (tmp_path / "src").mkdir()
    upper_tree(tmp_path / "src")
    copy(tmp_path / "src", tmp_path / "layer")
    layer = tmp_path / "layer"
    assert sorted(os.listdir(layer)) == ["deleted", "link", "opaque", "sparse", "suid"]
    st = os.lstat(layer / "deleted")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(str(layer / "opaque"), OPAQUE_XATTR) == b"y"
    st = os.stat(layer / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 1000, 1001)
    assert os.stat(layer / "opaque" / "kept").st_uid == 65534
    assert os.readlink(layer / "link") == "/anywhere"
    assert os.stat(layer / "sparse").st_blocks == 0  # holes stay holes


def test_the_digest_is_the_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("same")
    os.utime(tmp_path / "a" / "f", ns=(10**18, 10**18))
    first = copy(tmp_path / "a", tmp_path / "one")
    assert copy(tmp_path / "a", tmp_path / "two") == first
    (tmp_path / "a" / "f").write_text("other")
    os.utime(tmp_path / "a" / "f", ns=(10**18, 10**18))
    assert copy(tmp_path / "a", tmp_path / "three") != first


@pytest.mark.parametrize(("path", "target", "refused"), [
    ("a", "b", False), ("d/a", "../b", False), ("d/a", "../../b", True),
    ("a", "/etc/passwd", True), ("a", "..", True), ("d/e/a", "../../x/../y", False)])
def test_symlinks_that_leave_the_directory_are_refused(path, target, refused):
    assert bool(_link_escapes(path, target)) is refused


@pytest.mark.parametrize(("fields", "message"), [
    ({"snapshot": "snap-XYZ"}, r"^snapshot: 'snap-XYZ' is not a snapshot id"),
    ({"workspace_cow": True}, r"^workspace_cow: needs a host directory"),
    ({"workspace_cow": 1, "workspace": "/tmp"}, r"^workspace_cow: must be true or false$"),
    ({"snapshot": "snap-0123456789ab", "backend": "docker"},
     r"^snapshot: only the native backend"),
    ({"snapshot": "snap-0123456789ab", "workspace": "/tmp"}, r"^workspace: a sandbox from a "
                                                              r"snapshot gets")])
def test_state_fields_of_the_spec_are_checked(fields, message):
    with pytest.raises(InvalidSpec, match=message):
        SandboxSpec(**fields)
