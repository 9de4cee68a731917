"""Concurrent pulls of one image (processes and threads) unpack each layer once and never
expose a half-unpacked one; a pull SIGKILLed mid-unpack leaves only a temp directory that
the next pull removes and never takes for a layer.

No test here waits on time: a pull is paused inside an unpack by the store's per-entry hook,
and the other pull is known to wait for the layer's lock from /proc/locks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from corral.sandbox.images import ImageNotFound, ImageStore

from ..processes import wait_until
from ..unit.test_image_builder import digest, sample_layers, write_oci

CHILD = r"""
import json, sys
from corral.sandbox.images import ImageStore
root, ref, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
paused = []
def on_entry(n):
    if n == pause_at and not paused:
        paused.append(n)
        print("paused", flush=True)
        sys.stdin.readline()  # until the parent says so, or SIGKILLs this process
events = []
ImageStore(root, on_entry=on_entry).pull(ref, progress=lambda e: events.append(
    [e.diff_id, e.state]))
print(json.dumps(events), flush=True)
"""


def _child(root: str, ref: str, pause_at: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, root, ref, str(pause_at)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _lock_waiters(lock_path: str) -> int:
    """How many flock waiters /proc/locks shows blocked on this lock file."""
    if not os.path.exists(lock_path):
        return 0
    ino = os.stat(lock_path).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f
                   if " -> FLOCK " in line and line.split()[6].endswith(f":{ino}"))


@pytest.fixture
def image(tmp_path):
    layers = sample_layers()
    return write_oci(str(tmp_path / "img"), layers), [digest(layer.tar()) for layer in layers]


def _assert_one_unpack_each(first: list, second: list, diff_ids: list[str]) -> None:
    """Each layer unpacked by exactly one of the two pulls; the paused pull's first layer by
    it (which of them unpacks the later layers is the scheduler's choice)."""
    assert [d for d, _ in first] == [d for d, _ in second] == diff_ids
    assert first[0][1] == "unpacked" and second[0][1] == "present"
    for (d, a), (_, b) in zip(first, second, strict=True):
        assert sorted([a, b]) == ["present", "unpacked"], d


def _assert_consistent(store: ImageStore, ref: str, diff_ids: list[str]) -> None:
    assert [r.ref for r in store.images()] == [ref]
    assert sorted(os.listdir(os.path.join(store.root, "layers", "sha256"))) == sorted(
        d[7:] for d in diff_ids)
    assert os.listdir(os.path.join(store.root, "tmp")) == []
    rootfs = store.rootfs(ref)
    assert sorted(os.listdir(rootfs.layers[0])) == ["bin", "etc", "opt", "ro", "run", "usr"]
    assert os.listdir(rootfs.layers[2]) == ["top"]


def test_two_processes_pulling_at_once_unpack_each_layer_once(image, tmp_path):
    ref, diff_ids = image
    root = str(tmp_path / "store")
    store = ImageStore(root)
    first = _child(root, ref, pause_at=3)
    second = None
    try:
        assert first.stdout.readline() == "paused\n"
        second = _child(root, ref, pause_at=0)
        lock = os.path.join(root, "locks", diff_ids[0][7:] + ".lock")
        assert wait_until(lambda: _lock_waiters(lock) == 1, timeout_s=60)
        # mid-unpack: the layer is only a temp directory, invisible to everyone else
        assert os.listdir(os.path.join(root, "layers", "sha256")) == []
        assert [n.split(".")[0] for n in os.listdir(os.path.join(root, "tmp"))] == [
            diff_ids[0][7:]]
        with pytest.raises(ImageNotFound):
            store.rootfs(ref)
        first.stdin.write("\n")
        first.stdin.flush()
        out_first, _ = first.communicate(timeout=120)
        out_second, _ = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (first.returncode, second.returncode) == (0, 0)
    events_first, events_second = json.loads(out_first), json.loads(out_second)
    _assert_one_unpack_each(events_first, events_second, diff_ids)
    _assert_consistent(store, ref, diff_ids)


def test_two_threads_pulling_at_once_unpack_each_layer_once(image, tmp_path):
    ref, diff_ids = image
    resume = threading.Event()
    paused = threading.Event()

    def on_entry(n: int) -> None:
        if n == 3 and not paused.is_set():
            paused.set()
            resume.wait()

    root = str(tmp_path / "store")
    events: dict[str, list] = {"first": [], "second": []}
    errors: list[BaseException] = []

    def pull(name: str, store: ImageStore) -> None:
        try:
            store.pull(ref, progress=lambda e: events[name].append((e.diff_id, e.state)))
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    first = threading.Thread(target=pull, args=("first", ImageStore(root, on_entry=on_entry)))
    second = threading.Thread(target=pull, args=("second", ImageStore(root)))
    first.start()
    try:
        assert paused.wait(60)
        second.start()
        lock = os.path.join(root, "locks", diff_ids[0][7:] + ".lock")
        assert wait_until(lambda: _lock_waiters(lock) == 1, timeout_s=60)
    finally:
        resume.set()
        first.join()
        if second.is_alive() or second.ident is not None:
            second.join()
    assert errors == []
    _assert_one_unpack_each(events["first"], events["second"], diff_ids)
    _assert_consistent(ImageStore(root), ref, diff_ids)


def test_pull_killed_mid_unpack_leaves_nothing_taken_for_complete(image, tmp_path):
    ref, diff_ids = image
    root = str(tmp_path / "store")
    child = _child(root, ref, pause_at=5)
    try:
        assert child.stdout.readline() == "paused\n"
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup runs
        child.wait()
        child.stdout.close()
        child.stdin.close()
    assert child.returncode == -9
    leftovers = os.listdir(os.path.join(root, "tmp"))
    assert [n.split(".")[0] for n in leftovers] == [diff_ids[0][7:]]
    assert os.listdir(os.path.join(root, "tmp", leftovers[0], "root"))
    assert os.listdir(os.path.join(root, "layers", "sha256")) == []
    assert os.listdir(os.path.join(root, "images")) == []

    store = ImageStore(root)
    with pytest.raises(ImageNotFound, match=r"^no image 'oci:.*' in the store"):
        store.rootfs(ref)
    events = []
    store.pull(ref, progress=lambda e: events.append((e.diff_id, e.state)))
    assert events == [(d, "unpacked") for d in diff_ids]
    _assert_consistent(store, ref, diff_ids)


def test_prune_removes_what_a_killed_pull_left(image, tmp_path):
    ref, diff_ids = image
    root = str(tmp_path / "store")
    child = _child(root, ref, pause_at=5)
    try:
        assert child.stdout.readline() == "paused\n"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
    freed = ImageStore(root).prune()
    assert (freed.temp_dirs, freed.layers, freed.blobs) == (1, [], 0)
    assert freed.bytes > 0
    assert os.listdir(os.path.join(root, "tmp")) == []
