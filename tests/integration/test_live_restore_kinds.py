"""Live restore of the sandboxes whose state is layered (image, snapshot, copy-on-write
workspace), of warm pools' acquired sandboxes, and of a tty command's terminal: a real
daemon SIGKILLed and started again on the same state directory (sandbox/images/kept.py,
runtime/pools.py, sandbox/ptys.py master_copy).

Each test creates the kind, writes state, kills the daemon, starts another, finds the
sandbox with its files, runs a command in it, uses the kind's own API, destroys it and
checks that its directories and mounts are gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.runtime.command_journal import JOURNAL_DIR, STDIN_SUFFIX
from corral.runtime.holder import SOCKET_NAME, HolderClient, start_or_connect
from corral.sandbox.backends.native import runtime_base
from corral.sandbox.images.store import ImageStore

from ..linux.test_image_run import app_layer, tools_layer, top_layer
from ..unit.test_image_builder import write_oci
from .daemon_harness import alive, collect_exec, sandbox_footprint, wait_until
from .test_live_restore import (  # noqa: F401 (fixtures)
    LIVE_RESTORE,
    _details,
    _first,
    _holder_pid,
    _rows,
    kept_daemon,
    reaper,
    state_dir,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def _sh(c, sandbox_id: str, script: str) -> bytes:
    result = collect_exec(c.exec(sandbox_id, ["/bin/sh", "-c", script]))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value)


def _mounts_naming(word: str) -> list[str]:
    """Lines of this process's mount table (the daemon's: the same namespace) naming word."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if word in line]


def _kill_and_restart(kept_daemon, d, sandbox_id: str):  # noqa: F811
    """SIGKILL d once its row of sandbox_id is written; the next daemon and its client."""
    assert wait_until(lambda: sandbox_id in _rows(d))
    assert d.kill() == -signal.SIGKILL
    d2 = kept_daemon().start()
    restored = _details(d2, "sandbox.restore")
    assert restored[sandbox_id]["restored"], restored[sandbox_id]
    return d2, d2.client()


def _destroyed_cleanly(c, sandbox_id: str, init_pid: int) -> None:
    c.destroy_sandbox(sandbox_id)
    assert wait_until(lambda: sandbox_footprint(sandbox_id) == {}), sandbox_footprint(sandbox_id)
    assert not alive(init_pid)
    assert _mounts_naming(sandbox_id) == []


def _stopped_with_nothing_held(d) -> None:
    """Stop d; nothing was left kept, so its holder ends and restore.db is empty."""
    assert d.stop() == 0, d.log()
    assert _rows(d) == {}
    assert wait_until(lambda: not os.path.exists(d.state / SOCKET_NAME))


@pytest.fixture
def image(tmp_path, monkeypatch):
    """An image pulled into a store of its own, which the daemons use: (store root, ref,
    record)."""
    store_root = str(tmp_path / "store")
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", store_root)  # the daemons inherit it
    ref = write_oci(str(tmp_path / "img"), [tools_layer(), app_layer(), top_layer()])
    return store_root, ref, ImageStore(store_root).pull(ref)


def test_an_image_sandbox_keeps_its_layers_held_across_a_sigkill(kept_daemon, reaper,  # noqa: F811
                                                                  image):
    store_root, ref, record = image
    d, c = _first(kept_daemon, reaper)
    sb = c.create_sandbox(image=ref, ttl_s=600)
    reaper.pids.add(sb.init_pid)
    assert _details(d, "sandbox.create")[sb.id]["live_restore"] == "kept"
    _sh(c, sb.id, "echo tmp-change > /tmp/changed && echo ws > /workspace/w")
    d2, c2 = _kill_and_restart(kept_daemon, d, sb.id)
    store = ImageStore(store_root)
    assert all(store.held(layer.diff_id) for layer in record.layers)  # held all along
    # the image's config still applies (its Env/WorkingDir/User come from the kept rootfs)
    assert _sh(c2, sb.id, "cat /tmp/changed /workspace/w /image-only-file") == (
        b"tmp-change\nws\nfrom the image\n")
    # a snapshot reads the root's upper layer (its tmpfs kept by the holder) and leaves out
    # what the setup made there (the list kept in state.json)
    snap = c2.snapshot(sb.id)
    fork = c2.create_sandbox(snapshot=snap.id)
    reaper.pids.add(fork.init_pid)
    assert _sh(c2, fork.id, "cat /workspace/w /image-only-file") == b"ws\nfrom the image\n"
    _destroyed_cleanly(c2, fork.id, fork.init_pid)
    c2.remove_snapshot(snap.id)
    removed = c2.image_remove(ref)  # the record goes; the layers it runs on stay
    assert (len(removed.in_use_layers), list(removed.removed_layers)) == (3, [])
    assert _sh(c2, sb.id, "cat /image-only-file") == b"from the image\n"
    _destroyed_cleanly(c2, sb.id, sb.init_pid)
    # the daemon's hold goes with the sandbox, the holder's copy right after it
    assert wait_until(lambda: not any(store.held(layer.diff_id) for layer in record.layers))
    assert len(store.prune().layers) == 3  # released: garbage now
    _stopped_with_nothing_held(d2)


def test_a_snapshot_sandbox_keeps_its_hold_and_upper_layers_across_a_sigkill(
        kept_daemon, reaper):  # noqa: F811
    d, c = _first(kept_daemon, reaper)
    base = c.create_sandbox()
    reaper.pids.add(base.init_pid)
    _sh(c, base.id, "echo base > /workspace/a")
    c.snapshot(base.id, name="base")
    c.destroy_sandbox(base.id)
    sb = c.create_sandbox(snapshot="base")
    reaper.pids.add(sb.init_pid)
    assert _details(d, "sandbox.create")[sb.id]["live_restore"] == "kept"
    _sh(c, sb.id, "echo mine > /workspace/b")
    d2, c2 = _kill_and_restart(kept_daemon, d, sb.id)
    assert _sh(c2, sb.id, "cat /workspace/a /workspace/b") == b"base\nmine\n"
    assert c2.get_snapshot("base").in_use == 1
    code, message = _code(lambda: c2.remove_snapshot("base"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "in use" in message, message
    # a snapshot of the restored sandbox reads its upper layer (kept by the holder)
    child = c2.snapshot(sb.id, name="child")
    fork = c2.create_sandbox(snapshot="child")
    reaper.pids.add(fork.init_pid)
    assert _sh(c2, fork.id, "cat /workspace/a /workspace/b") == b"base\nmine\n"
    _destroyed_cleanly(c2, fork.id, fork.init_pid)
    _destroyed_cleanly(c2, sb.id, sb.init_pid)
    c2.remove_snapshot(child.id)
    c2.remove_snapshot("base")  # nothing holds it now
    _stopped_with_nothing_held(d2)


def test_a_cow_workspace_keeps_its_change_set_across_a_sigkill(kept_daemon, reaper,  # noqa: F811
                                                                tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("host\n")
    d, c = _first(kept_daemon, reaper)
    sb = c.create_sandbox(workspace_dir=str(project), workspace_cow=True)
    reaper.pids.add(sb.init_pid)
    assert _details(d, "sandbox.create")[sb.id]["live_restore"] == "kept"
    _sh(c, sb.id, "echo before > /workspace/before.txt")
    mnt = os.path.join(d.state, "changes", sb.id, "mnt")
    assert _mounts_naming(mnt)
    d2, c2 = _kill_and_restart(kept_daemon, d, sb.id)
    assert _mounts_naming(mnt), "the restart's sweep must leave a live change set mounted"
    _sh(c2, sb.id, "echo after > /workspace/after.txt")
    assert _sh(c2, sb.id, "cat /workspace/keep.txt /workspace/before.txt") == b"host\nbefore\n"
    assert sorted(ch.path for ch in c2.diff(sb.id)) == ["after.txt", "before.txt"]
    assert sorted(p.name for p in project.iterdir()) == ["keep.txt"]  # the host untouched
    _destroyed_cleanly(c2, sb.id, sb.init_pid)
    assert _mounts_naming(mnt) == []
    assert sorted(ch.path for ch in c2.diff(sb.id)) == ["after.txt", "before.txt"]
    assert c2.discard(sb.id) == 2
    assert not os.path.exists(os.path.dirname(mnt))
    _stopped_with_nothing_held(d2)


POOL = LIVE_RESTORE + """
pool_refill_per_s = 20
[pools.small]
size = 2
memory = "128M"
pids = 64
tmp = "8M"
cpus = 1
"""
#: A Create the pool serves.
POOL_SPEC = {"memory_bytes": 128 << 20, "pids_max": 64, "tmp_bytes": 8 << 20, "cpus": 1.0}


def test_an_acquired_pool_sandbox_is_kept_and_ready_ones_die_with_the_daemon(
        kept_daemon, reaper):  # noqa: F811
    d = kept_daemon(config=POOL).start()
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        reaper.pids.add(_holder_pid(holder))
    assert wait_until(lambda: len(d.records("sandbox.pool.fill")) >= 2, timeout_s=60)
    fills = {r.sandbox_id: json.loads(r.detail_json)["init_pid"]
             for r in d.records("sandbox.pool.fill")}
    reaper.pids.update(fills.values())
    c = d.client()
    sb = c.create_sandbox(**POOL_SPEC, labels={"from": "pool"})
    detail = _details(d, "sandbox.create")[sb.id]
    assert (sb.id in fills, detail["pool"], detail["live_restore"]) == (True, "small", "kept")
    c.write_file(sb.id, "mark", b"acquired")
    assert wait_until(lambda: len(d.records("sandbox.pool.fill")) >= 3, timeout_s=60)
    ready = {r.sandbox_id: json.loads(r.detail_json)["init_pid"]
             for r in d.records("sandbox.pool.fill") if r.sandbox_id != sb.id}
    reaper.pids.update(ready.values())
    assert wait_until(lambda: set(_rows(d)) == {sb.id})  # ready ones have no row

    d2, c2 = _kill_and_restart(kept_daemon, d, sb.id)
    assert wait_until(lambda: not any(alive(pid) for pid in ready.values())), \
        "ready sandboxes die with their daemon"
    assert alive(sb.init_pid)
    got = c2.get_sandbox(sb.id)
    assert (dict(got.labels), got.init_pid) == ({"from": "pool"}, sb.init_pid)
    assert c2.read_file(sb.id, "mark") == b"acquired"
    assert _sh(c2, sb.id, "echo ran") == b"ran\n"
    assert wait_until(lambda: all(sandbox_footprint(i) == {} for i in ready))
    assert not set(ready) & {s.id for s in c2.list_sandboxes()}
    _destroyed_cleanly(c2, sb.id, sb.init_pid)
    _stopped_with_nothing_held(d2)


def test_a_transient_group_dies_with_its_connection_unless_kept(state_dir):  # noqa: F811
    """The holder's side of warm pools: a ready sandbox's group is killed when the daemon's
    connection ends; one put again without transient (acquired) outlives it."""
    ready = subprocess.Popen(["sleep", "1000"])
    acquired = subprocess.Popen(["sleep", "1000"])
    try:
        fds = [os.pidfd_open(ready.pid), os.pidfd_open(acquired.pid)]
        client = start_or_connect(state_dir)
        client.put("ready", [fds[0]], kill=(0,), transient=True)
        client.put("acquired", [fds[1]], kill=(0,), transient=True)
        client.put("acquired", [fds[1]], kill=(0,))  # replace: an ordinary group now
        with start_or_connect(state_dir) as other:  # another connection's end: no effect
            assert other.keys() == {"ready": 1, "acquired": 1}
        assert ready.poll() is None
        client.close()  # the daemon is gone
        assert ready.wait(timeout=10) == -signal.SIGKILL
        with start_or_connect(state_dir) as again:
            assert again.keys() == {"acquired": 1}
            again.forget("acquired")
        assert acquired.poll() is None
    finally:
        for fd in fds:
            os.close(fd)
        for proc in (ready, acquired):
            proc.kill()
            proc.wait()


def test_a_tty_command_can_be_resized_after_a_sigkill(kept_daemon, reaper):  # noqa: F811
    d, c = _first(kept_daemon, reaper)
    sb = c.create_sandbox()
    reaper.pids.add(sb.init_pid)
    events = c.exec(sb.id, ["/bin/sh", "-c", "stty size; read line; stty size"], tty=True,
                    rows=24, cols=80, keep_stdin_open=True)
    exec_id = next(events).started.exec_id
    record = os.path.join(runtime_base(), sb.id, JOURNAL_DIR, exec_id, "command.json")
    stdin_key = f"{sb.id}/{exec_id}{STDIN_SUFFIX}"  # put last: then all of it is held

    def held() -> bool:
        with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
            return stdin_key in holder.keys()

    assert wait_until(lambda: os.path.exists(record) and held())
    for ev in events:  # its first size, before the kill
        if ev.WhichOneof("event") == "output" and b"24 80" in ev.output.batch.text:
            break
    d2, c2 = _kill_and_restart(kept_daemon, d, sb.id)
    c2.resize(sb.id, exec_id, 33, 101)
    c2.send_input(sb.id, exec_id, b"go\r")
    result = collect_exec(c2.attach(sb.id, exec_id))
    assert result.returncode == 0, result
    assert result.stdout.replace(b"\r\n", b"\n").endswith(b"33 101\n"), result.stdout
    code, _ = _code(lambda: c2.resize(sb.id, exec_id, 10, 10))  # ended: its terminal is gone
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    _destroyed_cleanly(c2, sb.id, sb.init_pid)
    _stopped_with_nothing_held(d2)
