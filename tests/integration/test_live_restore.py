"""Live restore's descriptor holder (runtime/holder.py), with real processes and SIGKILL.

What a sandbox needs to survive its daemon is a set of open descriptors; these tests kill
the process that handed them to the holder and check that the kernel objects behind them
(a pipe with a writer, a pidfd, a running sandbox's PID 1 and exit-status pipe) lived on
and come back to a new client unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

from corral.runtime import config, restore
from corral.runtime.client import ClientError
from corral.runtime.holder import (
    BATCH,
    SOCKET_NAME,
    HolderClient,
    HolderError,
    start_or_connect,
)
from corral.sandbox import SandboxSpec, ids
from corral.sandbox.backends.native import Sandbox, runtime_base, sweep
from corral.sandbox.errors import InvalidSpec
from corral.v1 import sandbox_pb2

from .daemon_harness import (
    alive,
    collect_exec,
    reap,
    sandbox_footprint,
    set_child_subreaper,
    wait_until,
)


def _holder_pid(client: HolderClient) -> int:
    creds = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _wait_gone(pid: int) -> None:
    """Block until pid has exited (it is not our child: a pidfd says when)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


@pytest.fixture
def state_dir(tmp_path):
    """A state directory whose holder, if one was started, is stopped at the end."""
    path = str(tmp_path / "state")
    os.makedirs(path, mode=0o700)
    yield path
    try:
        client = HolderClient.connect(os.path.join(path, SOCKET_NAME))
    except HolderError:
        return
    with client:
        pid = _holder_pid(client)
        # a holder alone with nothing held ends by itself: it may have been ending while
        # this connected, and then the stop finds the connection reset
        with contextlib.suppress(HolderError):
            client.stop()
    _wait_gone(pid)


#: A client that hands the descriptors it inherited (numbers in argv) to the holder under
#: "sbx", the first one's to be killed at the orphan end, says so, and waits to be killed.
CLIENT = textwrap.dedent("""
    import os, sys
    from corral.runtime.holder import start_or_connect
    client = start_or_connect(sys.argv[1], orphan_s=600)
    fds = [int(a) for a in sys.argv[2:]]
    client.put("sbx", fds, kill=(1,))
    for fd in fds:
        os.close(fd)
    sys.stdout.write("held\\n")
    sys.stdout.flush()
    sys.stdin.read()
""")


def test_a_writers_pipe_and_pidfd_outlive_the_killed_client(state_dir):
    data = os.urandom(48 << 10)  # within one pipe buffer: the writer never waits for a reader
    gate_r, gate_w = os.pipe()
    out_r, out_w = os.pipe()
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); "
         f"sys.stdout.buffer.write(bytes.fromhex('{data.hex()}'))"],
        stdin=gate_r, stdout=out_w)
    os.close(gate_r)
    os.close(out_w)
    pidfd = os.pidfd_open(writer.pid)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, state_dir, str(out_r), str(pidfd)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              pass_fds=(out_r, pidfd), text=True)
    assert client.stdout.readline() == "held\n"
    os.close(out_r)
    os.close(pidfd)
    client.kill()
    assert client.wait() == -signal.SIGKILL
    client.stdin.close()
    client.stdout.close()
    # only the holder has the read end now: without it the write would fail (EPIPE)
    os.write(gate_w, b"go\n")
    os.close(gate_w)
    assert writer.wait() == 0
    with start_or_connect(state_dir) as again:
        assert again.keys() == {"sbx": 2}
        read_end, held_pidfd = again.get("sbx")
    try:
        got = b""
        while chunk := os.read(read_end, 1 << 16):
            got += chunk
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        assert select.select([held_pidfd], [], [], 0)[0] == [held_pidfd]  # it has exited
    finally:
        os.close(read_end)
        os.close(held_pidfd)


def test_an_orphaned_holder_kills_what_it_was_told_to_and_ends(state_dir):
    doomed = subprocess.Popen(["sleep", "1000"])
    spared = subprocess.Popen(["sleep", "1000"])
    try:
        client = start_or_connect(state_dir, orphan_s=0.2)
        holder = _holder_pid(client)
        doomed_fd, spared_fd = os.pidfd_open(doomed.pid), os.pidfd_open(spared.pid)
        client.put("sbx", [spared_fd, doomed_fd], kill=(1,))
        os.close(doomed_fd)
        os.close(spared_fd)
        client.close()  # no daemon connected from here on
        assert doomed.wait() == -signal.SIGKILL
        _wait_gone(holder)
        assert spared.poll() is None
        assert not os.path.exists(os.path.join(state_dir, SOCKET_NAME))
    finally:
        for proc in (doomed, spared):
            proc.kill()
            proc.wait()


def test_more_descriptors_than_one_message_carries_come_back_in_order(state_dir):
    pipes = [os.pipe() for _ in range(2 * BATCH + 17)]
    mine = [r for r, _ in pipes]
    try:
        with start_or_connect(state_dir) as client:
            assert client.put("many", mine) == len(mine)
            back = client.get("many")
        try:
            assert [os.fstat(fd).st_ino for fd in back] == [os.fstat(fd).st_ino for fd in mine]
        finally:
            for fd in back:
                os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_bad_requests_are_refused_by_field_and_change_nothing(state_dir):
    r, w = os.pipe()
    try:
        with start_or_connect(state_dir) as client:
            client.put("kept", [r])
            with pytest.raises(ValueError, match=r"^kill: positions in the 1 descriptors"):
                client.put("bad", [w], kill=(3,))
            with pytest.raises(HolderError, match=r"^key: nothing held under 'absent'$"):
                client.get("absent")
            raw = client.sock
            for message, error in [
                (b"\xff not json", "request: not JSON ('utf-8' codec"),
                (b"[1]", "request: not a JSON object"),
                (b'{"op": "rename", "key": "kept"}', "op: unknown operation 'rename'"),
                (b'{"op": "get", "key": ""}', "key: must be a non-empty string"),
                (b'{"op": "put", "key": "x", "kill": [0]}', "kill: indexes of this message's 0"),
            ]:
                raw.send(message)
                answer = raw.recv(1 << 16)
                assert error.encode() in answer, (message, answer)
            assert client.keys() == {"kept": 1}
        mode = os.stat(os.path.join(state_dir, SOCKET_NAME)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        os.close(r)
        os.close(w)


def test_a_second_start_finds_the_running_holder(state_dir):
    with start_or_connect(state_dir) as first, start_or_connect(state_dir) as second:
        assert _holder_pid(first) == _holder_pid(second)
        assert _holder_pid(first) != os.getpid()


#: A sandbox owner standing for the daemon: a sandbox whose PID 1 does not die with it
#: (die_with_parent=False, what live restore asks for), a command waiting for a line, and
#: the descriptors the sandbox needs handed to the holder; then it waits to be killed.
OWNER = textwrap.dedent("""
    import sys
    from corral.runtime.holder import start_or_connect
    from corral.sandbox import SandboxSpec
    from corral.sandbox.backends.native import Sandbox
    sb = Sandbox(SandboxSpec(die_with_parent=False))
    sb.start()
    proc = sb.exec(["sh", "-c", "read line; echo got $line; exit 7"])
    client = start_or_connect(sys.argv[1], orphan_s=600)
    client.put("sbx", [sb.status_fd, sb._init_pidfd, proc.stdin.fileno(),
                       proc.stdout.fileno()], kill=(1,))
    print(sb.id, sb.init_pid, proc.ns_pid, flush=True)
    sys.stdin.read()
""")


def test_a_sandbox_and_its_command_outlive_their_killed_owner(state_dir):
    set_child_subreaper(True)  # the orphaned PID 1 and holder are reaped here
    init_pid = 0
    try:
        owner = subprocess.Popen([sys.executable, "-c", OWNER, state_dir],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        sandbox_id, init_pid, ns_pid = owner.stdout.readline().split()
        init_pid, ns_pid = int(init_pid), int(ns_pid)
        owner.kill()
        assert owner.wait() == -signal.SIGKILL
        owner.stdin.close()
        owner.stdout.close()
        with start_or_connect(state_dir) as client:
            status_fd, init_pidfd, stdin_w, stdout_r = client.get("sbx")
        try:
            assert select.select([init_pidfd], [], [], 0)[0] == []  # PID 1 lives on
            os.write(stdin_w, b"again\n")
            os.close(stdin_w)
            out = b""
            while chunk := os.read(stdout_r, 4096):
                out += chunk
            assert out == b"got again\n"
            report = b""
            while len(report) < 8:  # corral-init's {ns pid, wait status} of the command
                select.select([status_fd], [], [])  # (the pipe is non-blocking)
                report += os.read(status_fd, 8 - len(report))
            pid, status = struct.unpack("=ii", report)
            assert (pid, os.waitstatus_to_exitcode(status)) == (ns_pid, 7)
        finally:
            signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
            os.waitpid(init_pid, 0)
            for fd in (status_fd, init_pidfd, stdout_r):
                os.close(fd)
    finally:
        set_child_subreaper(False)
        if init_pid:  # what its dead owner left: any start's sweep removes it
            sweep()
            ids.sweep()  # and its host id range
            assert not os.path.exists(os.path.join(runtime_base(), sandbox_id))


#: An owner that leaves a command running that wrote a file in the workspace, and prints
#: what a restarted one needs to adopt the sandbox (its id, spec and the command's pid).
LEAVER = textwrap.dedent("""
    import json, sys
    from corral.runtime.holder import start_or_connect
    from corral.sandbox import SandboxSpec
    from corral.sandbox.backends.native import Sandbox
    sb = Sandbox(SandboxSpec(die_with_parent=False))
    sb.start()
    proc = sb.exec(["sh", "-c", "echo before > /workspace/mark; echo ready; exec sleep 1000"])
    assert proc.stdout.readline() == b"ready\\n"
    client = start_or_connect(sys.argv[1], orphan_s=600)
    client.put("sbx", [sb.status_fd, sb._init_pidfd, proc.stdout.fileno()], kill=(1,))
    print(json.dumps({"id": sb.id, "spec": sb.spec.to_fields()}), flush=True)
    sys.stdin.read()
""")


def test_an_adopted_sandbox_runs_new_commands_and_is_destroyed_whole(state_dir):
    set_child_subreaper(True)  # the orphaned PID 1 is reaped here (by destroy)
    sandbox_id = ""
    try:
        owner = subprocess.Popen([sys.executable, "-c", LEAVER, state_dir],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        left = json.loads(owner.stdout.readline())
        sandbox_id = left["id"]
        owner.kill()
        assert owner.wait() == -signal.SIGKILL
        owner.stdin.close()
        owner.stdout.close()
        with start_or_connect(state_dir) as client:
            status_fd, init_pidfd, old_stdout = client.get("sbx")
            sb = Sandbox.adopt(SandboxSpec.from_fields(left["spec"]), sandbox_id,
                               init_pidfd=init_pidfd, status_fd=status_fd)
            client.forget("sbx")
        try:
            out, _ = sb.exec(["cat", "/workspace/mark"]).communicate()
            assert out == b"before\n"
        finally:
            sb.destroy()
        assert os.read(old_stdout, 16) == b""  # the old command died with the sandbox
        os.close(old_stdout)
        assert not os.path.exists(os.path.join(runtime_base(), sandbox_id))
        assert left["spec"]["uid_base"] is not None
        assert not os.path.exists(os.path.join(ids.state_dir(), str(left["spec"]["uid_base"])))
    finally:
        set_child_subreaper(False)
        if sandbox_id:  # on a failure: what the dead owner left
            sweep()
            ids.sweep()


# -- through the daemon (runtime/restore.py, runtime/sandboxes.py) ---------------------------

LIVE_RESTORE = "live_restore = true\n"


class _Reaper:
    """This test process as the subreaper of the daemons' orphans (PID 1s, the holder),
    reaping the pids it is given on a thread of its own: a zombie PID 1 would look alive
    to the sweeps, and host PID 1 here does not reap."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.02):
            for pid in list(self.pids):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        self.pids.discard(pid)
                except ChildProcessError:  # not ours yet (its daemon lives), or gone
                    if not os.path.exists(f"/proc/{pid}"):
                        self.pids.discard(pid)


@pytest.fixture
def reaper():
    set_child_subreaper(True)
    r = _Reaper()
    r.thread.start()
    try:
        yield r
    finally:
        r.done.set()
        r.thread.join()
        set_child_subreaper(False)
        reap(r.pids)


@pytest.fixture
def kept_daemon(make_daemon, reaper):
    """make_daemon(config=live_restore on); at the end, whatever a failed test left held
    is killed and swept (discard: what a daemon with live restore off does)."""
    made = []

    def make(config: str = LIVE_RESTORE):
        d = make_daemon(config=config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()
        if restore.discard(str(d.state)):
            sweep()
            ids.sweep()


def _pidfds(pid: int) -> dict[int, int]:
    """Process pid's pidfds: descriptor number -> the pid it refers to."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError, StopIteration, ValueError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    found[int(fd)] = next(int(line.split()[1]) for line in f
                                          if line.startswith("Pid:"))
    return found


def _first(kept_daemon, reaper):
    """A daemon with live restore on, started, and a client of it; its holder, started
    with it, is reaped here when it ends."""
    d = kept_daemon().start()
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        reaper.pids.add(_holder_pid(holder))
    return d, d.client()


def _rows(d) -> dict[str, tuple[float, float]]:
    """restore.db as the daemon wrote it: id -> (expires_at, paused_at)."""
    db = sqlite3.connect(f"file:{d.state / restore.DB_NAME}?mode=ro", uri=True)
    try:
        return {i: (e, p) for i, e, p in db.execute(
            "SELECT id, expires_at, paused_at FROM sandboxes")}
    finally:
        db.close()


def _details(d, kind: str) -> dict[str, dict]:
    return {r.sandbox_id: json.loads(r.detail_json) for r in d.records(kind)}


@pytest.mark.timeout(120)
def test_kept_sandboxes_survive_a_sigkill_and_expire_on_time(kept_daemon, reaper):
    d, c = _first(kept_daemon, reaper)
    ran = c.create_sandbox(labels={"role": "ran"})
    paused = c.create_sandbox(labels={"role": "paused"})
    short = c.create_sandbox()
    net = c.create_sandbox(allow_net=["example.com:443"])
    c.write_file(ran.id, "mark", b"before")
    c.pause(paused.id)
    c.set_timeout(short.id, 4)
    expected = {s.id: c.get_sandbox(s.id) for s in (ran, paused, short, net)}
    reaper.pids.update(s.init_pid for s in (ran, paused, short, net))
    assert wait_until(lambda: _rows(d).keys() == expected.keys() and all(
        _rows(d)[i] == (s.expires_at, s.paused_at) for i, s in expected.items()))
    created = _details(d, "sandbox.create")
    assert created[net.id]["live_restore"] == created[ran.id]["live_restore"] == "kept"

    assert d.kill() == -signal.SIGKILL
    assert all(alive(s.init_pid) for s in expected.values())

    d2 = kept_daemon().start()
    c2 = d2.client()
    listed = {s.id: s for s in c2.list_sandboxes()}
    assert listed.keys() <= expected.keys() and {ran.id, paused.id, net.id} <= listed.keys()
    for sandbox_id in (ran.id, paused.id):
        got, before = listed[sandbox_id], expected[sandbox_id]
        assert (got.labels, got.expires_at, got.paused_at, got.init_pid, got.state) == (
            before.labels, before.expires_at, before.paused_at, before.init_pid, before.state)
    assert listed[paused.id].state == sandbox_pb2.SANDBOX_STATE_PAUSED
    assert collect_exec(c2.exec(ran.id, ["cat", "/workspace/mark"])).stdout == b"before"
    with pytest.raises(ClientError) as refused:  # still frozen: refused, not hung
        c2.exec(paused.id, ["true"], wait_if_paused=False).__next__()
    assert refused.value.code.name == "FAILED_PRECONDITION"
    c2.resume(paused.id)
    assert collect_exec(c2.exec(paused.id, ["echo", "thawed"])).stdout == b"thawed\n"
    # the short one's TTL, set before the kill, still runs out after the restart
    assert wait_until(lambda: short.id in _details(d2, "sandbox.destroy"), timeout_s=20)
    assert _details(d2, "sandbox.destroy")[short.id]["reason"] == "ttl"
    restored = _details(d2, "sandbox.restore")
    assert {k: v["restored"] for k, v in restored.items()} == dict.fromkeys(expected, True)
    start = json.loads(d2.records("daemon.start")[-1].detail_json)
    assert (start["live_restore"], start["restored"]) == (True, 4)
    # PID 1s' pidfds the holder gave back are parked high, as a start parks them: no
    # spawn's child copies them
    init_pidfds = {pid: fd for fd, pid in _pidfds(d2.pid).items()
                   if pid in {s.init_pid for s in expected.values()}}
    assert len(init_pidfds) >= 3 and min(init_pidfds.values()) >= 1024, init_pidfds

    for sandbox_id in (ran.id, paused.id, net.id):
        c2.destroy_sandbox(sandbox_id)
    assert d2.stop() == 0, d2.log()
    for s in expected.values():
        assert sandbox_footprint(s.id) == {}
        assert not alive(s.init_pid)
    assert not os.path.exists(d2.state / SOCKET_NAME)  # the holder ended: nothing held
    assert _rows(d2) == {}


@pytest.mark.timeout(120)
def test_a_clean_stop_keeps_sandboxes_and_their_commands_running(kept_daemon, reaper):
    d, c = _first(kept_daemon, reaper)
    sb = c.create_sandbox(labels={"keep": "yes"})
    reaper.pids.add(sb.init_pid)
    # waits for a file, then writes 1 MB (far past a pipe's buffer), then says it finished
    events = c.exec(sb.id, ["sh", "-c", "while [ ! -e go ]; do sleep 0.05; done; "
                                        "head -c 1000000 /dev/zero; echo done > finished"])
    command = next(events).started.pid
    assert d.stop() == 0, d.log()  # an upgrade: stop, start (maybe a new binary)
    with pytest.raises(ClientError):
        collect_exec(events)  # its stream ended with the daemon; the command did not
    assert alive(sb.init_pid) and alive(command)
    assert d.records("sandbox.destroy") == []

    d2 = kept_daemon().start()
    c2 = d2.client()
    assert [(s.id, dict(s.labels)) for s in c2.list_sandboxes()] == [(sb.id, {"keep": "yes"})]
    assert _details(d2, "sandbox.restore")[sb.id]["commands"] == 1
    c2.write_file(sb.id, "go", b"")
    # no SIGPIPE, and no pipe left full: the new daemon drains (and drops) what it writes
    assert wait_until(lambda: not alive(command), timeout_s=20)
    assert c2.read_file(sb.id, "finished") == b"done\n"
    assert collect_exec(c2.exec(sb.id, ["echo", "after"])).stdout == b"after\n"
    assert d2.health() == "SERVING"
    c2.destroy_sandbox(sb.id)
    assert d2.stop() == 0, d2.log()
    assert sandbox_footprint(sb.id) == {} and not alive(sb.init_pid)


@pytest.mark.timeout(120)
def test_a_dead_pid_1_is_reported_and_live_restore_off_sweeps_the_rest(kept_daemon, reaper):
    d, c = _first(kept_daemon, reaper)
    died, left = c.create_sandbox(), c.create_sandbox()
    reaper.pids.update((died.init_pid, left.init_pid))
    c.pause(left.id)  # frozen: its PID 1 dies of SIGKILL only once thawed
    assert wait_until(lambda: _rows(d).keys() == {died.id, left.id} and _rows(d)[left.id][1])
    assert d.kill() == -signal.SIGKILL
    os.kill(died.init_pid, signal.SIGKILL)  # while no daemon runs
    assert wait_until(lambda: died.init_pid not in reaper.pids)

    d2 = kept_daemon().start()
    restored = _details(d2, "sandbox.restore")
    assert (restored[died.id]["restored"], restored[died.id]["reason"]) == (
        False, f"sandbox {died.id}: its PID 1 has ended")
    assert (restored[left.id]["restored"], restored[left.id]["paused"]) == (True, True)
    assert sandbox_footprint(died.id) == {}
    assert d2.stop() == 0, d2.log()
    assert alive(left.init_pid)  # kept again

    off = kept_daemon(config="").start()  # live restore off: what was kept dies now
    assert wait_until(lambda: not alive(left.init_pid))
    assert left.id in {r.sandbox_id for r in off.records("sandbox.reaped")}
    assert off.client().list_sandboxes() == []
    assert sandbox_footprint(left.id) == {}
    assert not os.path.exists(off.state / SOCKET_NAME)
    assert not os.path.exists(off.state / restore.DB_NAME)
    assert off.stop() == 0, off.log()


@pytest.mark.timeout(120)
def test_a_sandbox_its_daemon_died_before_holding_is_killed_at_the_next_start(kept_daemon,
                                                                              reaper):
    """The daemon spawns a kept sandbox, answers Create, and hands it to the holder and
    restore.db just after, on a thread of its own: a SIGKILL in between leaves a PID 1 that
    does not die with its parent and that nothing holds. Made here by taking the holder's
    copies and the row away while no daemon runs; the next start finds it by its
    state.json (kept_by this state directory), kills it and says so."""
    d, c = _first(kept_daemon, reaper)
    lost, kept = c.create_sandbox(), c.create_sandbox()
    reaper.pids.update((lost.init_pid, kept.init_pid))
    assert wait_until(lambda: _rows(d).keys() == {lost.id, kept.id})
    with open(os.path.join(runtime_base(), lost.id, "state.json")) as f:
        assert json.load(f)["kept_by"] == str(d.state)
    assert d.kill() == -signal.SIGKILL
    with HolderClient.connect(str(d.state / SOCKET_NAME)) as holder:
        for fd in holder.get(lost.id):
            os.close(fd)
        holder.forget(lost.id)
    db = sqlite3.connect(str(d.state / restore.DB_NAME))
    with db:
        db.execute("DELETE FROM sandboxes WHERE id = ?", (lost.id,))
    db.close()
    assert alive(lost.init_pid)  # nothing holds it, and it did not die with its daemon

    d2 = kept_daemon().start()
    assert wait_until(lambda: not alive(lost.init_pid))
    restored = _details(d2, "sandbox.restore")
    assert (restored[lost.id]["restored"], restored[lost.id]["reason"]) == (
        False, restore.UNHELD_REASON)
    assert restored[kept.id]["restored"] is True
    assert sandbox_footprint(lost.id) == {}
    assert [s.id for s in d2.client().list_sandboxes()] == [kept.id]
    d2.client().destroy_sandbox(kept.id)
    assert d2.stop() == 0, d2.log()


def test_live_restore_is_off_unless_set_to_true(tmp_path):
    assert config.load(None, {}).live_restore is False
    path = tmp_path / "corral.toml"
    path.write_text("live_restore = true\n")
    assert config.load(str(path), {}).live_restore is True
    path.write_text('live_restore = "yes"\n')
    with pytest.raises(InvalidSpec, match=r"^live_restore: 'yes' is not true or false$"):
        config.load(str(path), {})


def test_the_daemon_flag_turns_it_on_over_the_file(tmp_path):
    from corral.runtime.cli import build_parser

    args = build_parser().parse_args(["daemon", "--live-restore"])
    assert args.live_restore is True
    assert build_parser().parse_args(["daemon"]).live_restore is None  # the file's, then off
    path = tmp_path / "corral.toml"
    path.write_text("live_restore = false\n")
    assert config.load(str(path), {"live_restore": args.live_restore}).live_restore is True
