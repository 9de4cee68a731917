"""The daemon's own life: SIGTERM ends everything cleanly; after SIGKILL a restart reaps.

Each test runs its own daemon, since each ends one.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import (
    STREAM_AGENT,
    SessionRecorder,
    alive,
    collect_exec,
    reap,
    sandbox_footprint,
    set_child_subreaper,
    upload_agents,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

#: An agent for a session in a fresh sandbox (no upload there): tokens until it is stopped.
INLINE_AGENT = (
    "import itertools, time, corral_agent as a\n"
    "for i in itertools.count():\n"
    "    a.token(f't{i}')\n"
    "    time.sleep(0.01)\n"
)


def _exec_in_background(client, sandbox_id, argv):
    """Start argv; drain its stream on a thread. -> (started event, result holder, thread)."""
    events = client.exec(sandbox_id, argv)
    started = next(events).started
    out: dict = {}

    def drain():
        try:
            out["result"] = collect_exec(events)
        except ClientError as exc:
            out["error"] = exc

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return started, out, t


def test_sigterm_ends_sessions_with_a_reason_and_leaves_nothing(make_daemon):
    d = make_daemon().start()
    c = d.client()
    sb = c.create_sandbox()
    upload_agents(c, sb.id)
    protocol = SessionRecorder(c.open_session(
        ["python3", STREAM_AGENT, "--tokens", "0", "--rate", "200"], sandbox_id=sb.id))
    # A plain agent ignores SHUTDOWN; the daemon must escalate to signals.
    plain = SessionRecorder(c.open_session(
        ["sh", "-c", "echo ready; exec sleep 300"], memory_bytes=64 << 20))
    own = SessionRecorder(c.open_session(["python3", "-c", INLINE_AGENT]))
    for rec in (protocol, plain, own):
        rec.wait_for(lambda r: r.tokens(), what="first tokens")
    started, execd, t = _exec_in_background(c, sb.id, ["sleep", "300"])
    sandboxes = {sb.id, plain.first("opened").sandbox_id, own.first("opened").sandbox_id}
    assert len(sandboxes) == 3

    assert d.stop() == 0, d.log()
    # Every stream ends: with its exited event, sent before the daemon stops serving, or --
    # when the daemon's exit wins the race with the client's last reads -- UNAVAILABLE.
    for rec in (protocol, plain, own):
        rec.join(10)
        exited = rec.first("exited")
        if exited is None:
            assert rec.error is not None and rec.error.code.name == "UNAVAILABLE", rec.summary()
        else:
            assert rec.error is None and exited.reason == "daemon-shutdown", rec.summary()
    if protocol.first("exited") is not None:
        assert protocol.first("exited").returncode == 0  # it obeyed SHUTDOWN
    t.join(10)
    if "error" in execd:
        assert execd["error"].code.name == "UNAVAILABLE", execd["error"]
    else:
        assert execd["result"].returncode == -signal.SIGKILL
    assert d.leftovers() == {}
    for sandbox_id in sandboxes:
        assert sandbox_footprint(sandbox_id) == {}

    records = d.records()
    assert [r.kind for r in records[-2:]] == ["daemon.stop", "audit.checkpoint"]
    reasons = {r.session_id: json.loads(r.detail_json)["reason"]
               for r in records if r.kind == "session.exit"}
    assert set(reasons.values()) == {"daemon-shutdown"} and len(reasons) == 3
    destroyed = {r.sandbox_id for r in records if r.kind == "sandbox.destroy"}
    assert destroyed == sandboxes


def test_sigkill_then_restart_reaps_orphans_and_continues_the_chain(make_daemon):
    d = make_daemon().start()
    c = d.client()
    sb = c.create_sandbox()
    started, execd, t = _exec_in_background(c, sb.id, ["sleep", "300"])
    rec = SessionRecorder(c.open_session(["python3", "-c", INLINE_AGENT]))
    rec.wait_for(lambda r: len(r.tokens()) >= 3, what="tokens")
    session_sb = rec.first("opened").sandbox_id
    orphans = {sb.id, session_sb}
    known = d.created()
    assert set(known) == orphans
    before = d.records()
    pids = [p for ps in known.values() for p in ps if p]
    assert all(alive(p) for p in pids)

    # Orphaned PID 1s are adopted by whoever is the nearest subreaper; let that be us, so
    # that they are reaped instead of lingering as zombies of the host's PID 1.
    set_child_subreaper(True)
    try:
        assert d.kill() == -signal.SIGKILL
        assert wait_until(lambda: not any(alive(p) for p in pids)), "PR_SET_PDEATHSIG"
        reap(pids)
    finally:
        set_child_subreaper(False)
    rec.join(10)
    assert rec.error is not None and rec.error.code.name == "UNAVAILABLE"
    t.join(10)
    assert execd["error"].code.name == "UNAVAILABLE"
    for sandbox_id in orphans:  # what a dead daemon cannot clean up itself
        assert "runtime dir" in sandbox_footprint(sandbox_id)

    d2 = make_daemon().start()  # same state, same socket path
    c2 = d2.client()
    verify = c2.audit_verify()
    assert verify.ok, verify.problem
    after = d2.records()
    assert after[:len(before)] == before
    new = after[len(before):]
    assert new[0].seq == before[-1].seq + 1 and new[0].prev_hash == before[-1].hash
    reaped = {r.sandbox_id for r in new if r.kind == "sandbox.reaped"}
    # Any process that starts sandboxes sweeps those of dead creators at its first start, so
    # one started on this host during the restart (a colleague's daemon, `corral run`) could
    # take an orphan first; outside that second, the restart reaps both and says so. A dead
    # daemon's sandboxes of someone else's may be in `reaped` too.
    assert orphans <= reaped, f"the restart did not reap {sorted(orphans - reaped)}"
    assert all(json.loads(r.detail_json)["reason"] == "its daemon died"
               for r in new if r.kind == "sandbox.reaped")
    assert [r.kind for r in new if r.kind != "sandbox.reaped"] == ["daemon.start"]
    for sandbox_id in orphans:
        assert sandbox_footprint(sandbox_id) == {}
    assert d2.leftovers() == {}
    assert c2.list_sandboxes() == []
    with pytest.raises(ClientError) as exc:
        c2.get_sandbox(sb.id)
    assert exc.value.code.name == "NOT_FOUND"
    gone = SessionRecorder(c2.resume_session(rec.session_id))
    gone.join()
    assert gone.error is not None and gone.error.code.name == "NOT_FOUND"

    # The restarted daemon works as before.
    fresh = c2.create_sandbox()
    assert collect_exec(c2.exec(fresh.id, ["echo", "ok"])).stdout == b"ok\n"
    assert d2.stop() == 0, d2.log()
    assert d2.leftovers() == {}


def test_idle_sessions_and_expired_sandboxes_are_reaped(make_daemon):
    d = make_daemon(args=("--session-idle-ttl", "1s")).start()
    c = d.client()
    # A session nobody watches any more is closed after the idle TTL, its sandbox with it.
    rec = SessionRecorder(c.open_session(["python3", "-c", INLINE_AGENT]))
    rec.wait_for(lambda r: r.tokens(), what="tokens")
    session_sb = rec.first("opened").sandbox_id
    rec.stream.detach()
    rec.join()
    # A sandbox asks for a 1 s lifetime.
    short = c.create_sandbox(ttl_s=1)
    assert short.expires_at - short.created_at == pytest.approx(1, abs=0.01)
    kept = c.create_sandbox()

    def destroyed():
        return {r.sandbox_id: json.loads(r.detail_json)["reason"]
                for r in d.records("sandbox.destroy")}

    assert wait_until(lambda: len(destroyed()) == 2, timeout_s=15), destroyed()
    assert destroyed() == {session_sb: "session ended", short.id: "ttl"}
    assert sandbox_footprint(session_sb) == sandbox_footprint(short.id) == {}
    idle = [r for r in d.records("session.idle") if r.session_id == rec.session_id]
    assert len(idle) == 1
    exits = [json.loads(r.detail_json) for r in d.records("session.exit")]
    assert [e["reason"] for e in exits] == ["idle"]
    gone = SessionRecorder(c.resume_session(rec.session_id))
    gone.join()
    assert gone.error.code.name == "NOT_FOUND"
    assert [b.id for b in c.list_sandboxes()] == [kept.id]
    assert d.stop() == 0, d.log()
    assert d.leftovers() == {}
