"""Sandboxes over the real socket: lifecycle, streamed exec, stdin, attach, signals, files."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import uuid

import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2

from .daemon_harness import alive, collect_exec, sandbox_cgroup, sandbox_footprint, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

MiB = 1 << 20


def _code(exc_info) -> str:
    return exc_info.value.code.name


def test_create_get_list_destroy(client):
    sb = client.create_sandbox(memory_bytes=128 * MiB, pids_max=64, ttl_s=600)
    assert sb.id.startswith("sbx-")
    assert sb.tenant == "local"
    assert sb.state == sandbox_pb2.SANDBOX_STATE_RUNNING
    assert len(sb.policy_digest) == 64 and int(sb.policy_digest, 16) >= 0
    assert sb.spec.memory_bytes == 128 * MiB and sb.spec.pids_max == 64
    assert alive(sb.init_pid)
    assert sandbox_footprint(sb.id).keys() >= {"runtime dir", "cgroups", "workspace"}

    got = client.get_sandbox(sb.id)
    assert (got.id, got.init_pid, got.policy_digest) == (sb.id, sb.init_pid, sb.policy_digest)
    assert 0 < got.expires_at - got.created_at <= 600
    assert sb.id in [b.id for b in client.list_sandboxes()]

    client.destroy_sandbox(sb.id)
    with pytest.raises(ClientError) as exc:
        client.get_sandbox(sb.id)
    assert _code(exc) == "NOT_FOUND"
    assert sb.id not in [b.id for b in client.list_sandboxes()]
    assert wait_until(lambda: not alive(sb.init_pid))
    assert sandbox_footprint(sb.id) == {}
    # destroying it again says so (already_destroyed) and does not fail
    assert client.destroy_sandbox(sb.id) is True


def test_exec_streams_stdout_and_stderr_apart_with_exit_code(client, sandbox):
    res = collect_exec(client.exec(sandbox.id, [
        "sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 5"]))
    assert res.exec_id.startswith("exe-")
    assert res.stdout == b"out1\nout2\n"
    assert res.stderr == b"err1\nerr2\n"
    assert (res.returncode, res.reason) == (5, "exited")
    info = {e.id: e for e in client.get_sandbox(sandbox.id).execs}[res.exec_id]
    assert (info.running, info.returncode, info.reason) == (False, 5, "exited")


def test_exec_killed_by_a_signal(client, sandbox):
    res = collect_exec(client.exec(sandbox.id, ["sh", "-c", "echo before; kill -TERM $$"]))
    assert res.stdout == b"before\n"
    assert (res.returncode, res.reason) == (-signal.SIGTERM, "signaled")


def test_exec_timeout(client, sandbox):
    res = collect_exec(client.exec(sandbox.id, ["sh", "-c", "echo started; sleep 60"],
                                   timeout_s=0.5))
    assert res.stdout == b"started\n"
    assert res.reason == "timeout"
    assert res.returncode == -signal.SIGKILL


def test_exec_oom(client):
    sb = client.create_sandbox(memory_bytes=32 * MiB)
    try:
        res = collect_exec(client.exec(sb.id, [
            "python3", "-c", "print('allocating', flush=True); b = b'x' * (256 << 20)"]))
        assert res.stdout == b"allocating\n"
        assert (res.returncode, res.reason) == (-signal.SIGKILL, "oom")
    finally:
        client.destroy_sandbox(sb.id)


def test_exec_with_stdin(client, sandbox):
    data = b"".join(b"line %d\n" % i for i in range(5000))  # > one pipe buffer
    res = collect_exec(client.exec(sandbox.id, ["sh", "-c", "cat; echo done >&2"], stdin=data))
    assert res.stdout == data
    assert res.stderr == b"done\n"
    assert (res.returncode, res.reason) == (0, "exited")


def test_keep_stdin_open_and_send_input(client, sandbox):
    events = client.exec(sandbox.id, ["cat"], keep_stdin_open=True)
    first = next(events)
    exec_id = first.started.exec_id
    got = bytearray()
    done = threading.Event()
    result = {}

    def drain():
        res = collect_exec(events)
        result["res"] = res
        done.set()

    # The stream is drained on a thread while we steer the command.
    seen = threading.Event()

    def watch():
        for ev in client.attach(sandbox.id, exec_id):
            if ev.WhichOneof("event") == "output":
                got.extend(ev.output.batch.text)
                if b"first\n" in got:
                    seen.set()

    threading.Thread(target=drain, daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    client.send_input(sandbox.id, exec_id, b"first\n")
    assert seen.wait(10), "the command did not echo the first input while stdin stayed open"
    assert client.get_sandbox(sandbox.id).execs[-1].running
    client.send_input(sandbox.id, exec_id, b"second\n", close=True)
    assert done.wait(10)
    res = result["res"]
    assert res.stdout == b"first\nsecond\n"
    assert (res.returncode, res.reason) == (0, "exited")
    with pytest.raises(ClientError) as exc:
        client.send_input(sandbox.id, exec_id, b"late\n")
    assert _code(exc) == "FAILED_PRECONDITION"


def test_attach_replays_from_a_seq_without_loss(client, sandbox):
    script = ("import sys, time\n"
              "for i in range(200):\n"
              "    print(f'line {i}', flush=True)\n"
              "    time.sleep(0.005)\n")
    expected = b"".join(b"line %d\n" % i for i in range(200))
    events = client.exec(sandbox.id, ["python3", "-c", script])
    exec_id = next(events).started.exec_id
    part = bytearray()
    last_seq = 0
    for ev in events:  # read a part, then drop this stream mid-way
        if ev.WhichOneof("event") == "output" and ev.output.stream == 1:
            b = ev.output.batch
            part += b.text
            last_seq = b.first_seq + len(b.lengths) - 1
            if len(part) > 200:
                break
    events.close()
    assert 0 < len(part) < len(expected)
    rest = collect_exec(client.attach(sandbox.id, exec_id, stdout_after_seq=last_seq))
    assert rest.exec_id == exec_id
    assert rest.stdout_seqs and rest.stdout_seqs[0] == last_seq + 1
    assert bytes(part) + rest.stdout == expected
    assert (rest.returncode, rest.reason) == (0, "exited")
    # From the start, a late attach replays everything.
    whole = collect_exec(client.attach(sandbox.id, exec_id))
    assert whole.stdout == expected
    assert whole.stdout_seqs == list(range(1, len(whole.stdout_seqs) + 1))


def test_signal_one_command_and_the_whole_sandbox(client, sandbox):
    events = client.exec(sandbox.id, ["sleep", "60"])
    exec_id = next(events).started.exec_id
    assert client.signal(sandbox.id, signal.SIGTERM, exec_id=exec_id) == 1
    res = collect_exec(events)
    assert (res.returncode, res.reason) == (-signal.SIGTERM, "signaled")

    # Without an exec id every process but PID 1 gets the signal.
    a = client.exec(sandbox.id, ["sleep", "60"])
    b = client.exec(sandbox.id, ["sh", "-c", "sleep 60 & wait"])
    next(a), next(b)
    assert wait_until(lambda: sum(e.running for e in client.get_sandbox(sandbox.id).execs) == 2)
    assert client.signal(sandbox.id, signal.SIGKILL) >= 3
    for events in (a, b):
        assert collect_exec(events).returncode == -signal.SIGKILL
    assert client.signal(sandbox.id, signal.SIGTERM, exec_id=exec_id) == 0  # already ended


def test_files_round_trip(client, sandbox):
    content = bytes(range(256)) * 100
    assert client.write_file(sandbox.id, "data.bin", content, mode=0o600) == len(content)
    assert client.read_file(sandbox.id, "data.bin") == content
    assert client.read_file(sandbox.id, "/workspace/data.bin") == content
    assert client.read_file(sandbox.id, "data.bin", max_bytes=10) == content[:10]
    entries = {e.name: e for e in client.list_files(sandbox.id)}
    assert entries["data.bin"].kind == "file"
    assert entries["data.bin"].size == len(content)
    assert entries["data.bin"].mode == 0o600

    # What the API wrote, the sandbox sees; what the sandbox writes, the API reads.
    res = collect_exec(client.exec(sandbox.id, [
        "sh", "-c", "sha256sum data.bin && mkdir sub && echo inside > sub/made.txt"]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == hashlib.sha256(content).hexdigest()
    assert client.read_file(sandbox.id, "sub/made.txt") == b"inside\n"
    assert [(e.name, e.kind) for e in client.list_files(sandbox.id, "sub")] == [
        ("made.txt", "file")]
    assert {e.name: e.kind for e in client.list_files(sandbox.id)}["sub"] == "dir"

    with pytest.raises(ClientError) as exc:
        client.read_file(sandbox.id, "missing.txt")
    assert _code(exc) == "NOT_FOUND"


def _host_state(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    with open(path, "rb") as f:
        return st.st_mtime_ns, st.st_size, hashlib.sha256(f.read()).hexdigest()


def test_paths_cannot_escape_the_workspace(client, sandbox):
    tag = uuid.uuid4().hex[:12]
    escape = f"/tmp/corral-escape-{tag}"
    passwd = _host_state("/etc/passwd")

    for path in (f"../corral-escape-{tag}", f"sub/../../corral-escape-{tag}", escape,
                 "/etc/passwd", "/workspace/../etc/passwd"):
        with pytest.raises(ClientError) as exc:
            client.write_file(sandbox.id, path, b"pwned\n")
        assert _code(exc) == "INVALID_ARGUMENT", path
        assert "path" in str(exc.value)
        with pytest.raises(ClientError) as exc:
            client.read_file(sandbox.id, path)
        assert _code(exc) == "INVALID_ARGUMENT", path

    # Symlinks planted by a command, pointing out of the workspace (host paths, as the
    # daemon resolves them from outside).
    res = collect_exec(client.exec(sandbox.id, ["sh", "-c",
        f"ln -s /etc/passwd pw && ln -s / rootlink && ln -s .. up "
        f"&& ln -s {escape} dangling && mkdir d && ln -s ../.. d/upup"]))
    assert res.returncode == 0, res.stderr
    for path in ("pw", "rootlink/etc/passwd", "up/x", "d/upup/etc/passwd"):
        with pytest.raises(ClientError) as exc:
            client.read_file(sandbox.id, path)
        assert _code(exc) == "PERMISSION_DENIED", path
    for path in ("pw", "dangling", f"rootlink/tmp/corral-escape-{tag}",
                 f"up/corral-escape-{tag}", "d/upup/etc/passwd"):
        with pytest.raises(ClientError) as exc:
            client.write_file(sandbox.id, path, b"pwned\n")
        assert _code(exc) == "PERMISSION_DENIED", path
    for path in ("rootlink", "up", "d/upup"):
        with pytest.raises(ClientError) as exc:
            client.list_files(sandbox.id, path)
        assert _code(exc) == "PERMISSION_DENIED", path

    assert not os.path.exists(escape)
    assert _host_state("/etc/passwd") == passwd
    # The link itself is listed as a link, not followed.
    kinds = {e.name: e.kind for e in client.list_files(sandbox.id)}
    assert kinds["pw"] == kinds["rootlink"] == kinds["dangling"] == "symlink"


def test_destroy_kills_every_process(client):
    sb = client.create_sandbox()
    events = client.exec(sb.id, [
        "sh", "-c", "sleep 300 & sleep 300 & (sleep 300 &) ; echo ready; wait"])
    next(events)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("res", collect_exec(events)),
                         daemon=True)
    t.start()
    name = sandbox_cgroup(sb.id)  # a pooled one's name, most of the time
    procs = f"/sys/fs/cgroup/pids/corral/{name}/cgroup.procs"
    if not os.path.exists(procs):  # cgroup v2
        procs = f"/sys/fs/cgroup/corral/{name}/cgroup.procs"

    def pids():
        with open(procs) as f:
            return [int(p) for p in f.read().split()]

    assert wait_until(lambda: len(pids()) >= 5)  # PID 1, sh, three sleeps
    before = pids()
    assert sb.init_pid in before
    client.destroy_sandbox(sb.id)
    t.join(10)
    assert result["res"].returncode == -signal.SIGKILL
    assert wait_until(lambda: not any(alive(p) for p in before)), [
        p for p in before if alive(p)]
    assert sandbox_footprint(sb.id) == {}
