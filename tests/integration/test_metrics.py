"""`corral daemon --metrics`: Prometheus text scraped over HTTP while real work runs.

Values that move are checked by exact amounts: a create adds one sandbox, a NOT_FOUND one
error of that RPC, an egress denial one decision of its reason class. No label value is
ever an id.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.runtime.client import ClientError

from .daemon_harness import STREAM_AGENT, SessionRecorder, upload_agents, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

#: Any Corral id: sandbox, session, exec, task.
ID_SHAPE = re.compile(r"(sbx|ses|exe|task)-[0-9a-f]{6,}")

EGRESS_CLIENT = """
import json, socket
out = {}
for target in ('other.test:80', '127.0.0.1:METRICS_PORT'):
    s = socket.create_connection(('100.127.255.1', 3128), timeout=10)
    s.sendall(b'CONNECT %s HTTP/1.1\\r\\n\\r\\n' % target.encode())
    out[target] = s.recv(200).decode().split('\\r\\n')[0]
    s.close()
print(json.dumps(out))
"""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def metrics_port(d) -> int:
    return json.loads(d.records("daemon.start")[-1].detail_json)["metrics_port"]


def _exec_ok(client, sandbox_id, argv) -> bytes:
    out = bytearray()
    code = None
    for ev in client.exec(sandbox_id, argv):
        if ev.HasField("output") and ev.output.stream == 1:
            out += ev.output.batch.text
        if ev.HasField("exited"):
            code = ev.exited.returncode
    assert code == 0, out
    return bytes(out)


def test_scrape_counts_real_work_without_ids(make_daemon):
    d = make_daemon("m", args=("--metrics", "127.0.0.1:0")).start()
    port = metrics_port(d)
    assert port > 0
    client = d.client()
    before = scrape(port)
    assert total(before, "corral_sandboxes") == 0

    box = client.create_sandbox(memory_bytes=256 << 20, allow_net=["allowed.test:80"])
    upload_agents(client, box.id)
    after_create = scrape(port)
    assert total(after_create, "corral_sandbox_create_seconds_count", backend="native") == 1
    assert total(after_create, "corral_sandbox_spawn_seconds_count", backend="native") == 1
    assert value(after_create, "corral_sandboxes", state="running", tenant="local",
                 backend="native") == 1

    assert _exec_ok(client, box.id, ["echo", "hi"]) == b"hi\n"
    with pytest.raises(ClientError) as missing:
        client.get_sandbox("sbx-000000000000")
    assert missing.value.code.name == "NOT_FOUND"

    # egress: a name no rule allows, and the daemon's own metrics port (protected)
    client.write_file(box.id, "egress.py",
                      EGRESS_CLIENT.replace("METRICS_PORT", str(port)).encode())
    answers = json.loads(_exec_ok(client, box.id, ["python3", "-I", "/workspace/egress.py"]))
    assert answers == {"other.test:80": "HTTP/1.1 403 Forbidden",
                       f"127.0.0.1:{port}": "HTTP/1.1 403 Forbidden"}

    agent = ["python3", STREAM_AGENT, "--tokens", "50", "--exit", "0"]
    rec = SessionRecorder(client.open_session(agent, sandbox_id=box.id))
    rec.join()
    assert rec.error is None, rec.error
    tokens = rec.tokens()
    assert tokens == [f"t{i}" for i in range(50)]

    s = scrape(port)
    # exactly what was done
    assert total(s, "corral_sandbox_create_seconds_count") == 1
    assert total(s, "corral_exec_start_seconds_count", backend="native") == 3  # 2 + agent
    assert value(s, "corral_rpc_errors_total", method="SandboxesServicer.Get",
                 code="NOT_FOUND") == 1
    assert total(s, "corral_rpc_errors_total") == 1
    assert value(s, "corral_egress_decisions_total", decision="deny", kind="net.connect",
                 reason="no_rule") == 1
    assert value(s, "corral_egress_decisions_total", decision="deny", kind="net.connect",
                 reason="protected_endpoint") == 1
    assert value(s, "corral_session_tokens_in_total") == 50
    # one watcher saw every entry: tokens, the agent's TURN_END, ...
    assert value(s, "corral_session_entries_sent_total") == len(rec.entries)
    assert value(s, "corral_session_lagged_total") == 0
    # the agent exited; its session is held until it is reaped (idle TTL)
    assert value(s, "corral_sessions", state="exited", tenant="local") == 1
    assert total(s, "corral_sessions") == 1
    assert value(s, "corral_sandboxes", state="running", tenant="local",
                 backend="native") == 1
    # histograms that were fed
    assert total(s, "corral_session_token_latency_seconds_count") >= 1
    assert total(s, "corral_audit_commit_seconds_count") >= 5
    assert ("corral_event_loop_lag_seconds_count", ()) in s
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "process_open_fds") > 0
    # bounded labels: no id anywhere
    offending = [(name, lab) for name, lab in s if any(ID_SHAPE.search(v) for _, v in lab)]
    assert offending == []

    client.destroy_sandbox(box.id)
    gone = scrape(port)
    assert total(gone, "corral_sandboxes") == 0
    assert d.stop() == 0
    with pytest.raises(OSError):  # the listener went with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_interrupt_latency_is_observed(make_daemon):
    d = make_daemon("i", args=("--metrics", "127.0.0.1:0")).start()
    port = metrics_port(d)
    client = d.client()
    box = client.create_sandbox(memory_bytes=256 << 20)
    upload_agents(client, box.id)
    rec = SessionRecorder(client.open_session(
        ["python3", STREAM_AGENT, "--tokens", "0", "--rate", "200"], sandbox_id=box.id))
    rec.wait_for(lambda r: len(r.tokens()) >= 5, what="5 tokens")
    rec.stream.interrupt()
    rec.wait_for(lambda r: r.turn_ends(), what="the turn's end")
    assert rec.turn_ends() == [(1, "interrupted")]
    s = scrape(port)
    assert value(s, "corral_session_interrupt_seconds_count") == 1
    assert value(s, "corral_sessions", state="attached", tenant="local") == 1
    rec.stream.close_session()
    rec.join()
    assert d.stop() == 0


def test_non_loopback_metrics_address_is_refused(make_daemon):
    d = make_daemon("pub", args=("--metrics", "0.0.0.0:9464"))
    assert d.run_to_exit() == 2
    assert ("daemon: metrics: 0.0.0.0:9464 is not a loopback address: metrics show every "
            "tenant's activity; pass --metrics-public (metrics_public = true) to serve them "
            "there") in d.log()


def test_metrics_from_the_config_file(make_daemon):
    d = make_daemon("cfg", config='metrics = "127.0.0.1:0"\n').start()
    port = metrics_port(d)
    assert port > 0
    assert value(scrape(port), "corral_rpc_errors_total") == 0
    assert d.stop() == 0


def _listening_ports(pid: int) -> set[int]:
    """TCP ports some socket of process pid listens on."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_off_nothing_listens(make_daemon):
    d = make_daemon("off").start()
    assert metrics_port(d) == 0
    assert _listening_ports(d.pid) == set()
    assert d.stop() == 0


def test_json_log_lines_name_their_ids(make_daemon):
    d = make_daemon("json", args=("--log-format", "json")).start()
    client = d.client()
    box = client.create_sandbox(memory_bytes=256 << 20, ttl_s=1)
    # the daemon logs the TTL reaping of the sandbox, naming it
    assert wait_until(lambda: f'"sandbox_id": "{box.id}"' in d.log(), timeout_s=20)
    assert d.stop() == 0
    lines = [json.loads(line) for line in d.log().splitlines()]  # every line is JSON
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines)
    (ttl,) = [line for line in lines if line.get("sandbox_id") == box.id]
    assert (ttl["level"], ttl["logger"], ttl["message"]) == (
        "INFO", "corral.sandboxes", f"sandbox {box.id} reached its TTL")
    assert lines[-1]["message"].startswith("corral daemon stopped after ")


def test_tasks_by_state_and_placement(make_daemon):
    from corral.v1 import task_pb2

    from ..tasks.helpers import wait_done

    d = make_daemon("t", args=("--metrics", "127.0.0.1:0")).start()
    port = metrics_port(d)
    client = d.client()
    task = client.submit_task(["true"], memory_bytes=256 << 20)
    assert wait_done(client, task.id).state == task_pb2.TASK_STATE_SUCCEEDED
    s = scrape(port)
    assert value(s, "corral_tasks", state="succeeded", tenant="local") == 1
    assert total(s, "corral_tasks") == 1
    assert value(s, "corral_task_placement_seconds_count") == 1
    offending = [(name, lab) for name, lab in s if any(ID_SHAPE.search(v) for _, v in lab)]
    assert offending == []
    assert d.stop() == 0


def test_tracing_spans_per_rpc_and_phase(make_daemon, tmp_path):
    spans_path = tmp_path / "spans.jsonl"
    d = make_daemon("tr", args=("--tracing", f"file:{spans_path}")).start()
    client = d.client()
    box = client.create_sandbox(memory_bytes=256 << 20)
    assert _exec_ok(client, box.id, ["true"]) == b""
    with pytest.raises(ClientError):
        client.get_sandbox("sbx-000000000000")
    client.destroy_sandbox(box.id)
    assert d.stop() == 0  # the last spans are exported before the process ends
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()]
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (create,) = by_name["SandboxesServicer.Create"]
    (spawn,) = by_name["sandbox.spawn"]
    (exec_rpc,) = by_name["SandboxesServicer.Exec"]
    (exec_spawn,) = by_name["exec.spawn"]
    (get,) = by_name["SandboxesServicer.Get"]
    assert (create["kind"], create["status"], create["attributes"]) == (
        "SERVER", "UNSET", {"rpc.method": "SandboxesServicer.Create",
                            "corral.tenant": "local"})
    assert (spawn["parent_id"], spawn["trace_id"]) == (create["span_id"], create["trace_id"])
    assert spawn["attributes"] == {"backend": "native"}
    assert (exec_spawn["parent_id"], exec_spawn["trace_id"]) == (
        exec_rpc["span_id"], exec_rpc["trace_id"])
    assert (get["status"], get["attributes"]["rpc.grpc.status_code"]) == ("ERROR", "NOT_FOUND")
    assert create["start_ns"] <= spawn["start_ns"] <= spawn["end_ns"] <= create["end_ns"]
    # ids are never span names
    assert [s["name"] for s in spans if ID_SHAPE.search(s["name"])] == []
