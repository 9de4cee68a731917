"""A deep task's egress rules reach its sandbox: the task fetches from the test internet
through the daemon's proxy, and a host its rules do not name stays closed (allow_net was
once dropped on the way in, and the task ran with no network at all)."""

from __future__ import annotations

import json

from ..tasks.conftest import task_daemon  # noqa: F401 (fixture)
from ..tasks.helpers import SUCCEEDED, wait_done

FETCH = """
import json, os, urllib.error, urllib.request
out = {}
for url in ('http://allowed.test/d', 'http://other.test/d'):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[url] = r.read().decode()
    except urllib.error.HTTPError as e:
        out[url] = e.code
os.makedirs('/workspace/out', exist_ok=True)
with open('/workspace/out/fetched.json', 'w') as f:
    json.dump(out, f)
"""


def test_a_tasks_allow_net_reaches_its_sandbox(internet, task_daemon, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CORRAL_EGRESS_HOSTS", internet.hosts_file)
    monkeypatch.setenv("CORRAL_EGRESS_ROUTABLE", internet.subnet)
    monkeypatch.setenv("CORRAL_EGRESS_UPSTREAM_ONLY", f"{internet.subnet},127.0.0.0/8")
    c = task_daemon().client()
    t = c.submit_task(["python3", "-c", FETCH], allow_net=["allowed.test:80"])
    assert list(t.spec.sandbox.allow_net) == ["allowed.test:80"]
    done = wait_done(c, t.id, timeout_s=60)
    assert done.state == SUCCEEDED, done.reason
    (piece,) = [p for p in c.task_result(t.id).files if p.path == "fetched.json"]
    fetched = json.loads(piece.content)
    assert fetched["http://allowed.test/d"] == f"hello from {internet.allowed} for allowed.test /d"
    assert isinstance(fetched["http://other.test/d"], int)  # the proxy's refusal
