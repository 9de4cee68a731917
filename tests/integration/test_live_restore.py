"""Live restore's descriptor holder (runtime/holder.py), with real processes and SIGKILL.

What a sandbox needs to survive its daemon is a set of open descriptors; these tests kill
the process that handed them to the holder and check that the kernel objects behind them
(a pipe with a writer, a pidfd, a running sandbox's PID 1 and exit-status pipe) lived on
and come back to a new client unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap

import pytest

from corral.runtime.holder import (
    BATCH,
    SOCKET_NAME,
    HolderClient,
    HolderError,
    start_or_connect,
)
from corral.sandbox import SandboxSpec, ids
from corral.sandbox.backends.native import Sandbox, runtime_base, sweep

from .daemon_harness import set_child_subreaper


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
