"""runtime/metrics.py and runtime/logs.py without a daemon: addresses, label bounds, the
no-op hooks, and JSON log lines."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corral.runtime import config as daemon_config
from corral.runtime import logs, metrics
from corral.sandbox.errors import InvalidSpec, NotFound, ResourceExhausted

# -- the metrics address -------------------------------------------------------------------


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("127.0.0.2:0", ("127.0.0.2", 0)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:9464", ("localhost", 9464)),
])
def test_loopback_addresses_are_taken(address, expected):
    assert metrics.check_address(address, public=False) == expected


def test_other_addresses_need_metrics_public():
    with pytest.raises(ValueError, match=r"^0\.0\.0\.0:9464 is not a loopback address: metrics "
                                         r"show every tenant's activity; pass "
                                         r"--metrics-public \(metrics_public = true\) to serve "
                                         r"them there$"):
        metrics.check_address("0.0.0.0:9464", public=False)
    assert metrics.check_address("0.0.0.0:9464", public=True) == ("0.0.0.0", 9464)


@pytest.mark.parametrize("address, message", [
    ("9464", r"^'9464' is not HOST:PORT \(e\.g\. 127\.0\.0\.1:9464\)$"),
    ("127.0.0.1:http", r"^'127\.0\.0\.1:http' is not HOST:PORT"),
    ("127.0.0.1:70000", r"^'127\.0\.0\.1:70000' is not HOST:PORT"),
    ("metrics.example:9464", r"^'metrics\.example' is not an IP address \(use e\.g\. "
                             r"127\.0\.0\.1\)$"),
])
def test_malformed_addresses_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        metrics.check_address(address, public=True)


def test_config_names_the_metrics_setting(tmp_path):
    with pytest.raises(InvalidSpec, match=r"^metrics: 10\.0\.0\.1:9464 is not a loopback "):
        daemon_config.load(None, {"metrics": "10.0.0.1:9464", "state": str(tmp_path)})
    cfg = daemon_config.load(None, {"metrics": "10.0.0.1:9464", "metrics_public": True,
                                    "state": str(tmp_path)})
    assert (cfg.metrics, cfg.metrics_public, cfg.log_format) == ("10.0.0.1:9464", True, "text")
    toml = tmp_path / "corral.toml"
    toml.write_text('metrics = "127.0.0.1:0"\nlog_format = "json"\n')
    cfg = daemon_config.load(str(toml), {"state": str(tmp_path)})
    assert (cfg.metrics, cfg.log_format) == ("127.0.0.1:0", "json")
    with pytest.raises(InvalidSpec, match=r"^log_format: 'xml' is not 'text' or 'json'$"):
        daemon_config.load(None, {"log_format": "xml", "state": str(tmp_path)})


# -- hooks -----------------------------------------------------------------------------------


def test_off_imports_neither_prometheus_nor_opentelemetry():
    code = ("import sys; import corral.runtime.daemon, corral.runtime.cli; "
            "from corral.runtime.metrics import NO_METRICS as m; "
            "f = lambda: 1; assert m.timed_spawn(f, 'native') is f; "
            "m.sandbox_created('native', m.clock()); m.rpc_failed('X', ValueError()); "
            "m.egress_decision({'decision': 'deny'}); "
            "from corral.runtime.tracing import NO_TRACING as t; "
            "assert t.phase_in_thread(f, 'sandbox.spawn') is f; s = t.rpc('X'); "
            "s.set('k', 1); s.failed('NOT_FOUND'); s.end(); "
            "print(sorted(n for n in sys.modules if n.split('.')[0] in "
            "('prometheus_client', 'opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_tracing_targets():
    with pytest.raises(InvalidSpec, match=r"^tracing: 'zipkin' is not 'otlp' or 'file:PATH'$"):
        daemon_config.load(None, {"tracing": "zipkin", "state": "/tmp/x"})
    assert daemon_config.load(None, {"tracing": "file:/tmp/s.jsonl",
                                     "state": "/tmp/x"}).tracing == "file:/tmp/s.jsonl"


def _daemon(**cfg):
    config = SimpleNamespace(**{"operators": ("local",), "tenant_policies": {}, "tokens": {},
                                **cfg})
    return SimpleNamespace(config=config, sandboxes=None, sessions=None, scheduler=None)


def _samples(m: metrics.DaemonMetrics) -> dict:
    text = generate_latest(m.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_daemon_has_its_own_registry():
    a = metrics.DaemonMetrics(_daemon(), "127.0.0.1:0")
    b = metrics.DaemonMetrics(_daemon(), "127.0.0.1:0")
    a.rpc_failed("SandboxesServicer.Get", NotFound("sandbox 'x' does not exist"))
    a.rpc_failed("SandboxesServicer.Create", ResourceExhausted("full"))
    a.rpc_failed("SandboxesServicer.Create", OSError(24, "Too many open files"))
    a.rpc_failed("TasksServicer.Get", KeyError("bug"))
    key = ("corral_rpc_errors_total", (("code", "NOT_FOUND"),
                                       ("method", "SandboxesServicer.Get")))
    assert _samples(a)[key] == 1
    assert _samples(a)[("corral_rpc_errors_total", (
        ("code", "RESOURCE_EXHAUSTED"), ("method", "SandboxesServicer.Create")))] == 2
    assert _samples(a)[("corral_rpc_errors_total", (
        ("code", "INTERNAL"), ("method", "TasksServicer.Get")))] == 1
    assert key not in _samples(b)


def test_egress_reasons_are_classes_not_text():
    m = metrics.DaemonMetrics(_daemon(), "127.0.0.1:0")
    for event in (
        {"kind": "net.connect", "decision": "deny", "reason": "no rule allows evil.test:443"},
        {"kind": "net.connect", "decision": "deny", "reason": "no rule allows other.test:80"},
        {"kind": "net.dns", "decision": "allow", "reason": "name rule"},
        {"kind": "net.udp", "decision": "deny",
         "reason": "UDP is dropped (only DNS to the sandbox resolver)"},
        {"kind": "net.connect", "decision": "deny", "reason": "10.1.2.3 is a non-public "
                                                              "address (private)"},
        {"kind": "net.connect", "decision": "deny", "reason": "something new"},
        {"kind": "net.summary", "allowed": 3, "denied": 4},  # no decision: not counted
    ):
        m.egress_decision(event)
    got = {k[1]: v for k, v in _samples(m).items() if k[0] == "corral_egress_decisions_total"}
    assert got == {
        (("decision", "deny"), ("kind", "net.connect"), ("reason", "no_rule")): 2,
        (("decision", "allow"), ("kind", "net.dns"), ("reason", "name_rule")): 1,
        (("decision", "deny"), ("kind", "net.udp"), ("reason", "udp")): 1,
        (("decision", "deny"), ("kind", "net.connect"), ("reason", "non_public_address")): 1,
        (("decision", "deny"), ("kind", "net.connect"), ("reason", "other")): 1,
    }


def test_tenant_labels_are_capped():
    m = metrics.DaemonMetrics(_daemon(tokens={"t" * 16: "acme"}), "127.0.0.1:0")
    names = [m.tenant_label(f"t{i}") for i in range(metrics.MAX_TENANT_LABELS + 5)]
    assert names[:metrics.MAX_TENANT_LABELS] == [f"t{i}" for i in
                                                 range(metrics.MAX_TENANT_LABELS)]
    assert names[metrics.MAX_TENANT_LABELS:] == ["other"] * 5
    assert m.tenant_label("acme") == "acme"  # configured tenants always keep their name
    assert m.tenant_label("local") == "local"


def test_two_call_latencies_pair_up_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_PENDING", 3)
    m = metrics.DaemonMetrics(_daemon(), "127.0.0.1:0")
    m.interrupt_sent("ses-000000000001")
    m.interrupt_sent("ses-000000000001")  # the turn's first interrupt is the one timed
    m.turn_ended("ses-000000000001")
    m.turn_ended("ses-000000000002")  # a turn nobody interrupted
    for i in range(5):
        m.task_queued(f"task-{i:016x}")
    assert len(m._queued) == 3
    m.task_placed(f"task-{0:016x}")  # dropped: not measured
    m.task_placed(f"task-{4:016x}")
    s = _samples(m)
    assert s[("corral_session_interrupt_seconds_count", ())] == 1
    assert s[("corral_task_placement_seconds_count", ())] == 1


# -- JSON log lines --------------------------------------------------------------------------


def _json_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_json_lines_carry_ids_from_extra_binding_and_arguments():
    log, out = _json_logger("corral.test.json")

    def in_an_rpc():
        logs.bind(tenant="acme")
        logs.bind_request(SimpleNamespace(sandbox_id="sbx-0123456789ab", session_id=""))
        log.warning("exec refused:\nline two")

    contextvars.copy_context().run(in_an_rpc)
    log.info("sandbox %s reached its TTL", "sbx-00000000abcd")
    log.info("task %s of session %s", "task-0123456789abcdef", "ses-000000000001")
    log.info("explicit", extra={"tenant": "t1", "task_id": "task-1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    log.info("nothing bound here")
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # a newline in a message stays inside its line
    parsed = [json.loads(line) for line in lines]
    for line in parsed:
        assert line["logger"] == "corral.test.json"
        assert line["time"].endswith("Z") and len(line["time"]) == 24
    strip = [{k: v for k, v in p.items() if k not in ("time", "logger", "exc")}
             for p in parsed]
    assert strip == [
        {"level": "WARNING", "message": "exec refused:\nline two", "tenant": "acme",
         "sandbox_id": "sbx-0123456789ab"},
        {"level": "INFO", "message": "sandbox sbx-00000000abcd reached its TTL",
         "sandbox_id": "sbx-00000000abcd"},
        {"level": "INFO", "message": "task task-0123456789abcdef of session ses-000000000001",
         "task_id": "task-0123456789abcdef", "session_id": "ses-000000000001"},
        {"level": "INFO", "message": "explicit", "tenant": "t1", "task_id": "task-1"},
        {"level": "ERROR", "message": "it failed"},
        {"level": "INFO", "message": "nothing bound here"},
    ]
    assert parsed[4]["exc"].splitlines()[-1] == "ValueError: boom"


def test_configure_picks_the_format():
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    try:
        handler = logs.configure("json", stream=out)
        logging.getLogger("corral.daemon").info("corral daemon listening on %s", "unix:x")
        assert json.loads(out.getvalue())["message"] == "corral daemon listening on unix:x"
        assert isinstance(handler.formatter, logs.JsonFormatter)
        root.handlers[:] = []
        assert not isinstance(logs.configure("text", stream=out).formatter, logs.JsonFormatter)
    finally:
        root.handlers[:] = saved


def test_lagged_watchers_are_a_gauge_of_now_by_tenant():
    """corral_session_watchers_lagged counts the watchers whose next entry the replay log
    has already evicted, and drops once they have caught up."""
    from corral.ext import TokenStream, encode_frame

    stream = TokenStream(log_bytes=200)
    slow, current = stream.subscribe(), stream.subscribe()
    session = SimpleNamespace(exited=None, closing=False, attached=True, tenant="local",
                              hub=SimpleNamespace(stream=stream))
    daemon = _daemon()
    daemon.sessions = SimpleNamespace(_sessions={"ses-1": session})
    m = metrics.DaemonMetrics(daemon, "127.0.0.1:0")
    loop = asyncio.new_event_loop()  # held gauges are read on the daemon's loop
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    m._loop = loop
    try:
        key = ("corral_session_watchers_lagged", (("tenant", "local"),))
        assert key not in _samples(m)
        for i in range(50):
            stream.feed(encode_frame(1, f"{i:03d}".encode()))
            stream.take(current)
        assert _samples(m)[key] == 1  # slow's next entry is gone; current is not behind
        assert stream.take(slow) is not None  # told what it lost, and caught up
        assert key not in _samples(m)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
