"""The Ray executor's transfer of a task directory's trees (checkpoints, out/) as a tar:
iterative at any depth, regular files and directories only, bounded in memory."""

from __future__ import annotations

import os

from corral.runtime.tasks import ray_executor
from corral.runtime.tasks.ray_executor import _tar_dir, _untar
from corral.sandbox import fstree


def test_a_deep_tree_with_a_fifo_a_link_and_a_huge_sparse_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "MAX_COPY_BYTES", 1 << 20)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_text("aa")
    os.mkfifo(src / "fifo")
    os.symlink("/etc/passwd", src / "link")
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 40)  # a tar has no holes: this would be 1 TiB in memory
    fd = os.open(src / "sub", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # tarfile.add recursed: RecursionError
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(os.open("deep", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    try:
        data = _tar_dir(str(src))
        assert len(data) < 4 << 20
        _untar(data, str(tmp_path / "dst"))
        top = os.open(tmp_path / "dst", os.O_RDONLY | os.O_DIRECTORY)
        try:
            paths = [e.path for e in fstree.walk(top)]
        finally:
            os.close(top)
        assert paths[0] == "a" and paths[-1] == "/".join(["sub"] + ["d"] * 1200 + ["deep"])
        assert len(paths) == 1 + 1 + 1200 + 1  # a, sub, the d's, deep: no fifo, link, sparse
        assert _tar_dir(str(tmp_path / "missing")) is None
    finally:
        fstree.remove_tree(str(src))
        fstree.remove_tree(str(tmp_path / "dst"))


def test_untar_takes_only_files_and_directories_inside_dest(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind in (("../escape", tarfile.REGTYPE), ("/abs", tarfile.REGTYPE),
                           ("./link", tarfile.SYMTYPE), ("./d", tarfile.DIRTYPE),
                           ("./d/ok", tarfile.REGTYPE), ("./fifo", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _untar(buf.getvalue(), str(tmp_path / "dst"))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "dst", "dst/d", "dst/d/ok"]
