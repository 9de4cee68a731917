"""The task directory: checkpoints replace each other atomically, and nothing an agent puts
in its workspace (links, FIFOs) makes the runtime read outside it."""

from __future__ import annotations

import os

from corral.runtime.tasks.files import TaskFiles, copy_tree_safe, tree_signature


def test_checkpoints_keep_only_the_newest(tmp_path):
    files = TaskFiles(str(tmp_path), "task-1")
    files.create()
    assert files.latest_checkpoint() == 0 and files.checkpoint_frame() is None
    src = tmp_path / "ws" / "ck"
    src.mkdir(parents=True)
    (src / "state.json").write_text("1")
    assert files.save_checkpoint(b"one", "ck", beneath=str(tmp_path / "ws")) == 1
    (src / "state.json").write_text("2")
    assert files.save_checkpoint(b"two", "ck", beneath=str(tmp_path / "ws")) == 2
    assert files.checkpoint_frame() == b"two"
    assert sorted(os.listdir(files.checkpoints)) == ["2", "LATEST"]
    assert (tmp_path / "task-1/checkpoints/2/files/state.json").read_text() == "2"
    assert files.save_checkpoint(None, None) == 3  # a frame-less, file-less one is legal


def test_links_in_the_workspace_are_never_followed(tmp_path):
    host = tmp_path / "host"
    (host / "checkpoint").mkdir(parents=True)
    (host / "checkpoint" / "secret").write_text("host secret")
    (host / "out").mkdir()
    (host / "out" / "secret").write_text("host secret")
    ws = tmp_path / "ws"
    ws.mkdir()
    os.symlink(host, ws / ".corral")  # an agent replaced .corral with a link
    os.symlink(host / "out", ws / "out")
    dest = tmp_path / "copy"
    assert copy_tree_safe(".corral/checkpoint", str(dest), beneath=str(ws)) == 0
    assert copy_tree_safe("out", str(dest), beneath=str(ws)) == 0
    assert not dest.exists()
    assert tree_signature(".corral/checkpoint", str(ws)) == ()


def test_only_regular_files_and_directories_are_copied(tmp_path):
    ws = tmp_path / "ws"
    (ws / "out" / "sub").mkdir(parents=True)
    (ws / "out" / "sub" / "a.txt").write_text("a")
    os.mkfifo(ws / "out" / "fifo")  # reading it would block forever
    os.symlink("/etc/passwd", ws / "out" / "passwd")
    dest = tmp_path / "copy"
    assert copy_tree_safe("out", str(dest), beneath=str(ws)) == 1
    assert sorted(p.name for p in dest.rglob("*")) == ["a.txt", "sub"]
    assert copy_tree_safe("out", str(tmp_path / "small"), limit=0, beneath=str(ws)) == 0


def test_copy_tree_reports_what_it_left_and_where_it_stopped(tmp_path):
    from corral.runtime.tasks.files import CopyReport, copy_tree

    ws = tmp_path / "ws"
    (ws / "out" / "sub").mkdir(parents=True)
    (ws / "out" / "a").write_text("aa")
    (ws / "out" / "sub" / "b").write_text("bbb")
    os.mkfifo(ws / "out" / "fifo")
    os.symlink("/etc/passwd", ws / "out" / "link")
    assert copy_tree("out", str(tmp_path / "all"), beneath=str(ws)) == CopyReport(
        bytes=5, entries=3, skipped=2, complete=True)
    assert copy_tree("out", str(tmp_path / "two"), beneath=str(ws), max_entries=2) == \
        CopyReport(bytes=2, entries=2, skipped=2, complete=False)  # a, sub; not sub/b
    assert sorted(os.listdir(tmp_path / "two")) == ["a", "sub"]


def test_checkpoint_of_a_sparse_file_writes_its_data_only(tmp_path):
    files = TaskFiles(str(tmp_path), "task-1")
    files.create()
    ck = tmp_path / "ws" / "ck"
    ck.mkdir(parents=True)
    with open(ck / "big", "wb") as f:
        f.write(b"head")
        f.truncate(64 << 20)
    assert files.save_checkpoint(b"frame", "ck", beneath=str(tmp_path / "ws")) == 1
    assert files.last_checkpoint_bytes <= len(b"frame") + (64 << 10)
    st = os.stat(tmp_path / "task-1" / "checkpoints" / "1" / "files" / "big")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 <= 64 << 10


def test_copy_and_signature_of_a_1500_level_tree(tmp_path):
    from corral.runtime.tasks.files import copy_tree
    from corral.sandbox import fstree

    top = tmp_path / "ws" / "out"
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    try:
        assert len(tree_signature("out", str(tmp_path / "ws"))) == 1501
        report = copy_tree("out", str(tmp_path / "copy"), beneath=str(tmp_path / "ws"))
        assert (report.entries, report.complete) == (1501, True)
        top_fd = os.open(tmp_path / "copy", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert [e.path for e in fstree.walk(top_fd)][-1] == "/".join(["d"] * 1500 + ["f"])
        finally:
            os.close(top_fd)
    finally:  # pytest's own removal of tmp_path recurses
        fstree.remove_tree(str(tmp_path / "ws"))
        fstree.remove_tree(str(tmp_path / "copy"))


def test_checkpoint_pacer_folds_requests_and_waits_for_the_bytes():
    from corral.runtime.tasks.runner import CheckpointPacer

    pacer = CheckpointPacer(min_interval_s=2.0, bytes_per_s=1 << 20)
    assert not pacer.due(0.0) and pacer.wait_s(0.0) is None
    pacer.request()
    assert pacer.due(0.0)
    pacer.taken_at(10.0, 8 << 20)  # 8 MiB at 1 MiB/s: the next one not before 18 s
    for _ in range(9):
        pacer.request()
    assert (pacer.pending, pacer.deferred) == (True, 8)
    assert not pacer.due(17.9) and pacer.wait_s(17.0) == 1.0
    assert pacer.due(18.0)
    pacer.taken_at(18.0, 0)
    assert not pacer.pending and pacer.not_before == 20.0 and pacer.taken == 2
    pacer.taken_at(30.0, 0, took_s=3.0)  # a slow one (thousands of fsyncs): 4x its time
    assert pacer.not_before == 42.0
