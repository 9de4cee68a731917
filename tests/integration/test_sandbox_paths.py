"""Paths a sandbox controls, handled by the daemon: no file call waits on the sandbox, and
no tree it builds stops cleanup (issue 18: the FIFO trick, the 1,500-level directory)."""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.sandbox import workspace_fs
from corral.v1 import sandbox_pb2

from .daemon_harness import collect_exec, sandbox_footprint

#: Long enough for any loaded machine; a daemon that waits on the sandbox never answers.
RPC_TIMEOUT_S = 30


def _run(client, sandbox_id: str, script: str):
    res = collect_exec(client.exec(sandbox_id, ["sh", "-c", script]))
    assert res.returncode == 0, res.stderr
    return res


def _write(client, sandbox_id: str, path: str, content: bytes):
    """WriteFile with a deadline: (status name, message)."""
    try:
        client.sandboxes.WriteFile(sandbox_pb2.WriteFileRequest(
            sandbox_id=sandbox_id, path=path, content=content), metadata=client.metadata,
            timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    return "OK", ""


def test_write_file_onto_a_fifo_is_refused_and_other_tenants_go_on(make_daemon):
    daemon = make_daemon("fifo").start()
    hostile, other = daemon.client("hostile"), daemon.client("other")
    sb = hostile.create_sandbox()
    _run(hostile, sb.id, "mkfifo /workspace/input.txt && python3 -c "
         "'import socket; socket.socket(socket.AF_UNIX).bind(\"/workspace/sock\")'")
    outcome: dict = {}
    writer = threading.Thread(target=lambda: outcome.update(
        fifo=_write(hostile, sb.id, "input.txt", b"hello")))
    writer.start()
    # Meanwhile another tenant creates a sandbox and runs a command in it (a clone each):
    # before the fix both waited for ever behind the write's WRITE_CLONE slot.
    fresh = other.create_sandbox()
    res = collect_exec(other.exec(fresh.id, ["echo", "still here"]))
    writer.join(RPC_TIMEOUT_S * 2)
    assert (res.returncode, res.stdout) == (0, b"still here\n")
    assert outcome["fifo"] == ("INVALID_ARGUMENT",
                               "path: 'input.txt' is a FIFO, not a regular file")
    assert _write(hostile, sb.id, "sock", b"x") == (
        "INVALID_ARGUMENT", "path: 'sock' is a socket, not a regular file")
    with pytest.raises(ClientError) as exc:
        hostile.read_file(sb.id, "input.txt")
    assert str(exc.value) == "INVALID_ARGUMENT: path: 'input.txt' is a FIFO, not a regular file"

    # A reader inside does not change the answer (the open would succeed, the type check
    # refuses), and the writer's bytes never reach the FIFO.
    reader = other.create_sandbox()  # keeps the clone path busy while we write
    _run(hostile, sb.id,
         "cat /workspace/input.txt > /workspace/got 2>/dev/null </dev/null & sleep 0.2")
    assert _write(hostile, sb.id, "input.txt", b"hello") == (
        "INVALID_ARGUMENT", "path: 'input.txt' is a FIFO, not a regular file")
    _run(hostile, sb.id, "echo done > /workspace/input.txt")
    assert hostile.read_file(sb.id, "got") == b"done\n"
    for sid, c in ((sb.id, hostile), (fresh.id, other), (reader.id, other)):
        c.destroy_sandbox(sid)


def test_a_1500_level_tree_is_removed_with_its_sandbox(daemon, client):
    """shutil.rmtree recursed: RecursionError, and the workspace stayed on the host."""
    sb = client.create_sandbox()
    build = ("import os\n"
             "for i in range(1500):\n"
             "    os.mkdir('d'); open('f', 'w').write('x'); os.chdir('d')\n"
             "os.symlink('/etc', 'etc'); os.mkfifo('fifo')\n"
             "os.mkdir('ro'); open('ro/f', 'w').close(); os.chmod('ro', 0o500)\n"
             "os.chmod('.', 0o500)\n")
    res = collect_exec(client.exec(sb.id, ["python3", "-c", build], cwd="/workspace"))
    assert res.returncode == 0, res.stderr
    res = collect_exec(client.exec(sb.id, ["sh", "-c", "find /workspace | wc -l"]))
    assert res.stdout == b"3005\n"  # the top, 1,500 dirs and files, etc, fifo, ro, ro/f
    client.destroy_sandbox(sb.id)
    assert sandbox_footprint(sb.id) == {}
    assert not os.path.exists(os.path.join(workspace_fs.root(), sb.id))
    assert os.path.isdir("/etc")  # the link was removed, not followed
