"""The daemon on each event loop it offers (runtime/loop.py): sandboxes, execs and sessions
work the same, and daemon.start says which loop and GC policy it runs."""

from __future__ import annotations

import json

import pytest

from .daemon_harness import EVENT_TOKEN, batch_entries, collect_exec

pytestmark = pytest.mark.root


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_the_daemon_serves_on_each_loop(make_daemon, kind):
    d = make_daemon(kind, config=f'event_loop = "{kind}"\ngc_policy = "latency"\n').start()
    c = d.client()
    sb = c.create_sandbox()
    result = collect_exec(c.exec(sb.id, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (result.stdout, result.stderr, result.returncode) == (b"out\n", b"err\n", 3)
    session = c.open_session(["sh", "-c", "read line; echo got $line"], sandbox_id=sb.id)
    session.send_input("hello")
    tokens = []
    for ev in session:
        kind_of = ev.WhichOneof("event")
        if kind_of == "batch":
            tokens += [p for _, k, p in batch_entries(ev.batch) if k == EVENT_TOKEN]
        if kind_of == "exited":
            assert ev.exited.returncode == 0
            break
    assert b"".join(tokens) == b"got hello\n"
    c.destroy_sandbox(sb.id)
    d.stop()
    detail = json.loads(d.records("daemon.start")[-1].detail_json)
    assert (detail["event_loop"], detail["gc_policy"]) == (kind, "latency")
