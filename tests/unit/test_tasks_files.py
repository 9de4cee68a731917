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
