"""Sandboxes.Pause/Resume (issue 14): a paused sandbox is frozen in place (the cgroup freezer),
uses no CPU, refuses or holds execs per request, stops its TTL clock and its commands' time
limits, and goes on where it stopped when resumed."""

from __future__ import annotations

import json
import secrets
import threading
import time

import grpc
import pytest

from corral.runtime.client import ClientError, SessionStream
from corral.v1 import sandbox_pb2 as pb
from corral.v1 import session_pb2

from .daemon_harness import SessionRecorder, collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# Counts as fast as it can into /workspace/n (one line a ten-thousandth step): a process that
# burns CPU and leaves a trace of how far it got.
COUNTER = ("exec python3 -c 'import os\ni = 0\nwhile True:\n i += 1\n if i % 10000 == 0:\n"
           "  open(\"/workspace/n.tmp\", \"w\").write(str(i)); os.rename(\"/workspace/n.tmp\", "
           "\"/workspace/n\")'")


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value)


def _count(c, sandbox_id: str) -> int:
    return int(bytes(c.read_file(sandbox_id, "n")) or b"0")


def _cpu_us(c, sandbox_id: str) -> int:
    return next(iter(c.stats(sandbox_id, interval_s=0.1))).cpu_usage_us


def _wait(predicate, timeout_s: float = 20.0, what: str = "") -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def tenant_client(daemon):
    return daemon.client(tenant=f"pause-{secrets.token_hex(3)}")


def _busy_sandbox(c):
    sb = c.create_sandbox(memory_bytes=128 << 20)
    threading.Thread(target=lambda: list(c.exec(sb.id, ["sh", "-c", COUNTER])),
                     daemon=True).start()
    _wait(lambda: bytes(c.read_file(sb.id, "n")) if _listed(c, sb.id, "n") else False,
          what="the counter's first write")
    return sb


def _listed(c, sandbox_id: str, name: str) -> bool:
    return any(e.name == name for e in c.list_files(sandbox_id, "."))


def test_a_paused_sandbox_uses_no_cpu_and_goes_on_where_it_stopped(tenant_client):
    c = tenant_client
    sb = _busy_sandbox(c)
    paused = c.pause(sb.id)
    assert paused.state == pb.SANDBOX_STATE_PAUSED and paused.paused_at > 0
    cpu, count = _cpu_us(c, sb.id), _count(c, sb.id)
    time.sleep(1.0)
    assert (_cpu_us(c, sb.id), _count(c, sb.id)) == (cpu, count)  # not one microsecond more
    running = c.resume(sb.id)
    assert running.state == pb.SANDBOX_STATE_RUNNING and running.paused_at == 0
    # the same process goes on from its count: no restart (a new one would start at 10000)
    _wait(lambda: _count(c, sb.id) > count, what="the counter to move on")
    assert _count(c, sb.id) > count >= 10000
    assert _cpu_us(c, sb.id) > cpu
    c.destroy_sandbox(sb.id)


def test_pause_and_resume_show_in_get_list_and_the_audit_trail(daemon, tenant_client):
    c = tenant_client
    a, b = c.create_sandbox(), c.create_sandbox()
    assert c.pause(a.id).state == pb.SANDBOX_STATE_PAUSED
    assert c.pause(a.id).state == pb.SANDBOX_STATE_PAUSED  # again: nothing changes
    assert c.get_sandbox(a.id).state == pb.SANDBOX_STATE_PAUSED
    assert [s.id for s in c.list_sandboxes(state=pb.SANDBOX_STATE_PAUSED)] == [a.id]
    assert [s.id for s in c.list_sandboxes()] == [a.id, b.id]
    assert [s.id for s in c.list_sandboxes(state=pb.SANDBOX_STATE_RUNNING)] == [a.id, b.id]
    assert c.resume(b.id).state == pb.SANDBOX_STATE_RUNNING  # a running one: nothing to do
    c.resume(a.id)
    assert c.list_sandboxes(state=pb.SANDBOX_STATE_PAUSED) == []
    kinds = [(r.kind, r.sandbox_id) for r in daemon.records()
             if r.kind in ("sandbox.pause", "sandbox.resume") and r.sandbox_id in (a.id, b.id)]
    assert kinds == [("sandbox.pause", a.id), ("sandbox.resume", a.id)]
    for s in (a, b):
        c.destroy_sandbox(s.id)


def test_an_exec_on_a_paused_sandbox_is_refused_or_waits_as_asked(tenant_client):
    c = tenant_client
    sb = c.create_sandbox()
    c.pause(sb.id)
    code, message = _code(lambda: list(c.exec(sb.id, ["true"])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "paused" in message
    results = []
    waiter = threading.Thread(target=lambda: results.append(
        collect_exec(c.exec(sb.id, ["echo", "after"], wait_if_paused=True))), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not results  # held while paused
    c.resume(sb.id)
    waiter.join(20)
    assert results and results[0].stdout == b"after\n" and results[0].returncode == 0
    # a waiter whose sandbox is destroyed while it waits is told so
    c.pause(sb.id)
    errors = []

    def wait_then_fail():
        try:
            list(c.exec(sb.id, ["true"], wait_if_paused=True))
        except ClientError as exc:
            errors.append(exc.code)

    waiter = threading.Thread(target=wait_then_fail, daemon=True)
    waiter.start()
    time.sleep(0.3)
    c.destroy_sandbox(sb.id)  # a paused sandbox is destroyed like any other
    waiter.join(20)
    assert errors == [grpc.StatusCode.NOT_FOUND]


def test_the_ttl_and_a_commands_time_limit_do_not_count_the_pause(tenant_client):
    c = tenant_client
    sb = c.create_sandbox(ttl_s=600)
    events = []
    runner = threading.Thread(target=lambda: events.append(collect_exec(c.exec(
        sb.id, ["sh", "-c", "sleep 1; echo a; exec sleep 30"], timeout_s=2.0))), daemon=True)
    started = time.monotonic()
    runner.start()
    time.sleep(0.5)
    before = c.pause(sb.id).expires_at
    time.sleep(2.5)  # past the command's 2 s limit, all of it paused
    after = c.resume(sb.id).expires_at
    assert after - before >= 2.4  # the TTL moved on by the pause
    runner.join(30)
    result = events[0]
    # It ran 0.5 s, was frozen 2.5 s (its `sleep 1` timer ran out meanwhile, as timers do:
    # a pause freezes processes, not clocks), printed "a" once thawed, and was ended 1.5 s
    # after the resume, its limit less the time it ran before the pause. Had the pause
    # counted, it would have died frozen, before printing anything.
    assert (result.reason, result.stdout) == ("timeout", b"a\n")
    assert time.monotonic() - started >= 4.4
    c.destroy_sandbox(sb.id)


def test_a_pause_outliving_paused_ttl_destroys_the_sandbox(make_daemon):
    d = make_daemon("pttl", config='paused_ttl = "2s"\n').start()
    c = d.client()
    sb = c.create_sandbox(ttl_s=600)
    c.pause(sb.id)
    def destroys():  # recorded once the destroy is done
        return [json.loads(r.detail_json)["reason"] for r in d.records("sandbox.destroy")
                if r.sandbox_id == sb.id]

    _wait(destroys, timeout_s=15, what="the paused sandbox to be destroyed")
    assert destroys() == ["paused-ttl"]
    assert sb.id in [s.id for s in c.list_sandboxes(state=pb.SANDBOX_STATE_DESTROYED)]
    assert d.stop() == 0


def _start_in(c, sandbox_id: str, **start) -> SessionRecorder:
    """A session of a one-line agent in an existing sandbox, read on a thread."""
    req = session_pb2.SessionRequest(start=session_pb2.SessionStart(
        argv=["sh", "-c", "echo started"], sandbox_id=sandbox_id, **start))
    return SessionRecorder(SessionStream(c.sessions, req, c.metadata))


def test_a_session_start_on_a_paused_sandbox_is_refused_or_waits_as_asked(tenant_client):
    c = tenant_client
    sb = c.create_sandbox()
    c.pause(sb.id)
    refused = _start_in(c, sb.id)
    refused.join(20)
    assert refused.error is not None
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "paused" in str(refused.error) and refused.session_id == ""
    waiting = _start_in(c, sb.id, wait_if_paused=True)
    time.sleep(0.5)
    assert not waiting.done.is_set() and waiting.session_id == ""  # held while paused
    c.resume(sb.id)
    waiting.wait_for(lambda r: "started\n" in "".join(r.tokens()), what="the agent's line")
    waiting.join(20)
    assert waiting.error is None and waiting.first("exited").returncode == 0
    # destroyed while the start waits: NOT_FOUND, and no session is left behind
    c.pause(sb.id)
    doomed = _start_in(c, sb.id, wait_if_paused=True)
    time.sleep(0.3)
    c.destroy_sandbox(sb.id)
    doomed.join(20)
    assert doomed.error is not None and doomed.error.code == grpc.StatusCode.NOT_FOUND
    # the waiting start made no session: only the one that ran (and exited) is listed
    assert [s.session_id for s in c.list_sessions()] == [waiting.session_id]
