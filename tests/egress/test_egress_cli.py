"""`corral run --allow-net` without a daemon: the CLI process hosts the proxy."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import cli_env

CLIENT = """
import urllib.request, urllib.error
for url in ('http://allowed.test/cli', 'http://other.test/cli'):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            print(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode().strip())
"""


def corral(*args, env):
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_run_allow_net_with_audit_file(internet, tmp_path):
    log = tmp_path / "egress.jsonl"
    result = corral("run", "--allow-net", "allowed.test:80", "--audit", str(log), "--",
                    "python3", "-I", "-c", CLIENT, env=cli_env(internet))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"200 hello from {internet.allowed} for allowed.test /cli",
        "403 corral: egress denied: no rule allows other.test:80"]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [(e["kind"], e.get("decision"), e.get("name")) for e in events]
    # an allowed connection is recorded when it closes (with its byte counts), a denied one
    # at once: the two may come in either order; the summary is always last
    assert sorted(decisions[:-1]) == [("net.connect", "allow", "allowed.test"),
                                      ("net.connect", "deny", "other.test")]
    assert decisions[-1] == ("net.summary", None, None)


def test_run_reports_denials_on_stderr_by_default(internet):
    result = corral("run", "--allow-net", "allowed.test", "--", "python3", "-I", "-c",
                    "import socket\ntry:\n socket.gethostbyname('other.test')\n"
                    "except OSError as e:\n print('no such name')", env=cli_env(internet))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no such name\n"
    assert "corral: egress deny dns other.test:53 (no rule allows 'other.test')" in \
        result.stderr


def test_bad_rule_is_a_usage_error(internet):
    result = corral("run", "--allow-net", "*", "--", "true", env=cli_env(internet))
    assert result.returncode == 2
    assert result.stderr == ("corral: run: allow_net: '*': not a host name, *.domain, IP "
                             "or CIDR\n")
