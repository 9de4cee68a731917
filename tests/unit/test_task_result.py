"""Tasks.Result pages, encoded by the servicer itself: byte-identical to what the generated
code writes, resumable at any file and offset, sparse files sent as their data only."""

from __future__ import annotations

import os

from corral.runtime.api import tasks as api
from corral.v1 import task_pb2 as pb

HEAD = pb.TaskResult(task=pb.Task(id="task-1"), result_json="{}").SerializeToString()


def _pages(root: str, budget: int) -> list[pb.TaskResult]:
    pages, path, offset = [], "", 0
    while True:
        raw = api._encode_result(HEAD, root, budget, path, offset)
        page = pb.TaskResult.FromString(raw)
        assert raw == page.SerializeToString()  # canonical: fields in number order
        pages.append(page)
        if not page.next_path:
            return pages
        path, offset = page.next_path, page.next_offset


def test_pages_resume_where_the_last_one_stopped(tmp_path):
    out = tmp_path / "out"
    (out / "s").mkdir(parents=True)
    (out / "a").write_bytes(b"hello")
    (out / "s" / "e").write_bytes(b"")
    (out / "z").write_bytes(b"zz")
    os.mkfifo(out / "s" / "fifo")
    os.symlink("/etc/passwd", out / "link")
    pages = _pages(str(out), 3)
    assert [[(f.path, f.content, f.offset, f.size, f.truncated) for f in p.files]
            for p in pages] == [
        [("a", b"hel", 0, 5, True)],
        [("a", b"lo", 3, 5, False), ("s/e", b"", 0, 0, False), ("z", b"z", 0, 2, True)],
        [("z", b"z", 1, 2, False)]]


def test_a_sparse_file_comes_as_its_data(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "big", "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
        f.truncate(128 << 20)
    [page] = _pages(str(out), 1 << 20)
    assert [(f.content.rstrip(b"\0"), f.offset, f.size, f.truncated) for f in page.files] == [
        (b"head", 0, 128 << 20, True), (b"tail", 64 << 20, 128 << 20, False)]
    assert all(len(f.content) <= 64 << 10 for f in page.files)  # a block or so each
