"""sandbox/fstree.py: trees a sandbox wrote are removed, walked and copied without recursion,
without following links, with few descriptors, and sparse files stay sparse."""

from __future__ import annotations

import os
import shutil

import pytest

from corral.sandbox import fstree

DEPTH = 1500


def _deep(top: str, depth: int = DEPTH) -> None:
    """top/d/d/.../d (depth levels), a file f at each level; made with descriptors."""
    os.makedirs(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.symlink("/etc", "etc", dir_fd=fd)
    os.mkfifo("fifo", dir_fd=fd)
    os.fchmod(fd, 0o500)
    os.close(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_shutil_cannot_remove_what_remove_tree_can(tmp_path):
    top = str(tmp_path / "ws")
    _deep(top)
    with pytest.raises(RecursionError):
        shutil.rmtree(top)  # the bug this module exists for
    fds = _open_fds()
    fstree.remove_tree(top)
    assert not os.path.exists(top)
    assert _open_fds() == fds
    assert os.path.isdir("/etc")


def test_remove_tree_keeps_link_targets_and_tolerates_missing(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    ws = tmp_path / "ws"
    ws.mkdir()
    os.symlink(target, ws / "link")
    os.symlink(target, tmp_path / "toplink")
    fstree.remove_tree(str(ws))
    fstree.remove_tree(str(tmp_path / "toplink"))  # the link itself, never its target
    fstree.remove_tree(str(tmp_path / "missing"))
    assert (target / "keep").read_text() == "x"
    assert not ws.exists() and not (tmp_path / "toplink").exists()


def test_walk_is_depth_first_sorted_by_bytes_and_resumes(tmp_path):
    for rel in ("b/z", "b/a/x", "a", "c"):
        path = tmp_path / "t" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)
    os.symlink("/etc", tmp_path / "t" / "b" / "link")
    top = os.open(tmp_path / "t", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert [e.path for e in fstree.walk(top)] == [
            "a", "b", "b/a", "b/a/x", "b/link", "b/z", "c"]
        # from b/link on: its ancestor b is reported again (a copy can make it), not b/a
        assert [e.path for e in fstree.walk(top, start=("b", "link"))] == [
            "b", "b/link", "b/z", "c"]
        assert [e.path for e in fstree.walk(top, start=("b", "m"))] == ["b", "b/z", "c"]
    finally:
        os.close(top)


def test_walk_of_1500_levels_uses_a_bounded_number_of_descriptors(tmp_path):
    top_path = str(tmp_path / "ws")
    _deep(top_path)
    top = os.open(top_path, os.O_RDONLY | os.O_DIRECTORY)
    base = _open_fds()  # what the test process already holds (earlier tests' too)
    peak = base
    try:
        count = 0
        for _ in fstree.walk(top):
            count += 1
            if count % 100 == 0:
                peak = max(peak, _open_fds())
    finally:
        os.close(top)
    assert count == 2 * DEPTH + 2  # every d and f, then etc and fifo
    assert peak - base <= fstree.MAX_OPEN_DIRS + 16
    fstree.remove_tree(top_path)


def test_walk_stops_when_a_closed_ancestor_was_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(fstree, "MAX_OPEN_DIRS", 2)
    top_path = tmp_path / "ws"
    (top_path / "a" / "b" / "c" / "d").mkdir(parents=True)
    (top_path / "z").mkdir()
    top = os.open(top_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(fstree.TreeChanged):
            for entry in fstree.walk(top):
                if entry.path == "a/b/c/d":  # "a" has no descriptor now: swap it
                    os.rename(top_path / "a", top_path / "old")
                    os.rename(top_path / "old" / "b", top_path / "a")
    finally:
        os.close(top)


def test_copy_file_keeps_holes_and_stops_at_the_budget(tmp_path):
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"a" * 5000)
    s = os.open(src, os.O_RDONLY)
    d = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        copied, whole = fstree.copy_file(s, d, 1 << 30)
        assert whole and copied <= 64 << 10
        st = os.fstat(d)
        assert st.st_size == 64 << 20 and st.st_blocks * 512 <= 64 << 10
        assert (tmp_path / "copy").read_bytes() == src.read_bytes()
        os.ftruncate(d, 0)
        assert fstree.copy_file(s, d, 100) == (100, False)
        assert os.fstat(d).st_size == (10 << 20) + 100  # ends at the last byte copied
    finally:
        os.close(s)
        os.close(d)


def test_open_file_never_opens_a_fifo_or_follows_a_link(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it for reading without O_NONBLOCK would wait
    os.symlink("/etc/passwd", tmp_path / "link")
    (tmp_path / "f").write_text("x")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fstree.open_file(dfd, "fifo") is None
        assert fstree.open_file(dfd, "link") is None
        fd = fstree.open_file(dfd, "f")
        assert fd is not None and os.read(fd, 10) == b"x"
        os.close(fd)
    finally:
        os.close(dfd)
