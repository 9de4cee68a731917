"""The `corral` client verbs against a real daemon: exit codes and output a script relies on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _corral(daemon, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args], input=stdin,
                          capture_output=True, env=env, timeout=60, check=False)


def test_create_exec_ps_destroy(daemon):
    made = _corral(daemon, "create", "--memory", "64M")
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.decode().strip()
    assert sandbox_id.startswith("sbx-")
    try:
        ran = _corral(daemon, "exec", sandbox_id, "--", "sh", "-c",
                      "cat; echo err >&2; exit 3", stdin=b"from stdin\n")
        assert ran.returncode == 3
        assert ran.stdout == b"from stdin\n" and ran.stderr == b"err\n"
        killed = _corral(daemon, "exec", "--timeout", "0.3s", sandbox_id, "--", "sleep", "30")
        assert killed.returncode == 124 and b"timeout" in killed.stderr
        listed = _corral(daemon, "ps")
        assert listed.returncode == 0 and sandbox_id in listed.stdout.decode()
    finally:
        assert _corral(daemon, "destroy", sandbox_id).returncode == 0
    assert sandbox_id not in _corral(daemon, "ps").stdout.decode()
    missing = _corral(daemon, "exec", sandbox_id, "--", "true")
    assert missing.returncode == 1 and b"NOT_FOUND" in missing.stderr


def test_session_prints_tokens_and_exits_with_the_agents_code(daemon):
    agent = ("import corral_agent as a\n"
             "for w in ['hello', ' ', 'world']: a.token(w)\n"
             "a.turn_end('completed')\n"
             "raise SystemExit(4)\n")
    done = _corral(daemon, "session", "--", "python3", "-c", agent)
    assert done.returncode == 4, done.stderr
    assert done.stdout.decode() == "hello world"
    assert b"turn 1 completed" in done.stderr


def test_audit_verbs(daemon):
    verified = _corral(daemon, "audit", "verify")
    assert verified.returncode == 0 and b"audit chain OK" in verified.stdout
    queried = _corral(daemon, "audit", "query", "--kind", "daemon.start", "--json")
    assert queried.returncode == 0 and b'"kind": "daemon.start"' in queried.stdout
    bad = _corral(daemon, "audit", "query", "--kind", "NOT A KIND")
    assert bad.returncode == 2 and b"kind" in bad.stderr


def test_session_in_an_existing_sandbox_waits_for_its_resume_when_asked(daemon):
    made = _corral(daemon, "create")
    assert made.returncode == 0, made.stderr
    sandbox_id = made.stdout.decode().strip()
    try:
        assert _corral(daemon, "pause", sandbox_id).returncode == 0
        refused = _corral(daemon, "session", "--sandbox", sandbox_id, "--", "echo", "hi")
        assert refused.returncode == 1 and b"FAILED_PRECONDITION" in refused.stderr
        env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
        waiting = subprocess.Popen([sys.executable, "-m", "corral.runtime.cli", "session",
                                    "--sandbox", sandbox_id, "--wait-if-paused", "--", "echo",
                                    "hi"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1.0)  # held while paused
        assert _corral(daemon, "resume", sandbox_id).returncode == 0
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, err
        assert out == b"hi\n" and f"in sandbox {sandbox_id}".encode() in err
        alone = _corral(daemon, "session", "--wait-if-paused", "--", "true")
        assert alone.returncode == 2 and b"--wait-if-paused: only with --sandbox" in alone.stderr
    finally:
        # the sandbox outlived its session: it is there to destroy
        assert _corral(daemon, "destroy", sandbox_id).returncode == 0
