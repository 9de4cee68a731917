"""What the real `corral` CLI lets reach a terminal, run with its stdout on a pty.

A sandbox writes a clipboard write (OSC 52), a window title, a C1 CSI, a bidi override and
a colour: on a terminal only the text and the colour arrive; with --raw, or into a pipe,
every byte does. Listings (`corral audit query`, `corral ps`) show tenant text escaped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pty
import subprocess
import sys
import tty

import pytest

from corral.runtime.client import ClientError

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

RLO = "\u202e"
C1_CSI = "\u009b"
#: What the sandboxed program writes: text around hostile sequences and one SGR colour.
PAYLOAD = ("a\x1b]52;c;ZXZpbA==\x07b\x1b]0;owned\x1b\\c\x1b[31md\x1b[0m"
           f"{C1_CSI}2Je{RLO}f\x1b[2J\x1b[6ng\n").encode()
#: What a terminal may see of it.
SHOWN = b"abc\x1b[31md\x1b[0mefg\n"
WRITER = ["python3", "-c",
          f"import sys; sys.stdout.buffer.write(bytes.fromhex('{PAYLOAD.hex()}'))"]


def _env(daemon=None) -> dict:
    env = dict(os.environ)
    if daemon is not None:
        env["CORRAL_SOCKET"] = daemon.socket
    return env


def _on_pty(args: list[str], env: dict) -> tuple[int, bytes, bytes]:
    """Run `corral ARGS` with stdout on a raw pty (no newline translation); stderr piped."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "corral.runtime.cli", *args],
                                stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=subprocess.PIPE, env=env)
    finally:
        os.close(slave)
    out = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:  # every slave end is closed
                    break
                raise
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    err = proc.stderr.read()
    proc.stderr.close()
    return proc.wait(timeout=60), bytes(out), err


def _piped(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=60,
                          check=False)


def test_run_filters_a_terminal_and_passes_pipes_and_raw_unchanged():
    rc, out, err = _on_pty(["run", "--", *WRITER], _env())
    assert (rc, out) == (0, SHOWN), err
    rc, out, err = _on_pty(["run", "--raw", "--", *WRITER], _env())
    assert (rc, out) == (0, PAYLOAD), err
    piped = _piped(["run", "--", *WRITER], _env())
    assert (piped.returncode, piped.stdout) == (0, PAYLOAD), piped.stderr


def test_exec_filters_a_terminal_and_passes_pipes_and_raw_unchanged(daemon, sandbox):
    env = _env(daemon)
    rc, out, err = _on_pty(["exec", sandbox.id, "--", *WRITER], env)
    assert (rc, out) == (0, SHOWN), err
    rc, out, err = _on_pty(["exec", "--raw", sandbox.id, "--", *WRITER], env)
    assert (rc, out) == (0, PAYLOAD), err
    piped = _piped(["exec", sandbox.id, "--", *WRITER], env)
    assert (piped.returncode, piped.stdout) == (0, PAYLOAD), piped.stderr


def test_session_filters_a_terminal_and_passes_raw_unchanged(daemon):
    env = _env(daemon)
    rc, out, err = _on_pty(["session", "--", *WRITER], env)
    assert (rc, out) == (0, SHOWN), err
    rc, out, err = _on_pty(["session", "--raw", "--", *WRITER], env)
    assert (rc, out) == (0, PAYLOAD), err
    piped = _piped(["session", "--", *WRITER], env)
    assert (piped.returncode, piped.stdout) == (0, PAYLOAD), piped.stderr


def test_audit_listing_and_ps_show_tenant_text_escaped(daemon, client):
    sb = client.create_sandbox(memory_bytes=64 << 20)
    try:
        marker = f"evil{RLO}txt.exe{C1_CSI}2J"
        started = client.exec(sb.id, ["sh", "-c", "sleep 30", marker])
        next(iter(started))  # the started event: the exec runs (and is audited)
        env = _env(daemon)
        rc, out, err = _on_pty(["audit", "query", "--sandbox", sb.id, "--kind", "exec.start"],
                               env)
        assert rc == 0, err
        text = out.decode()
        assert "evil\\u202etxt.exe\\x9b2J" in text, text
        assert RLO not in text and C1_CSI not in text and "\x1b" not in text
        rc, out, err = _on_pty(["ps"], env)
        assert rc == 0, err
        assert "evil\\u202etxt.exe\\x9b2J" in out.decode()
        assert RLO.encode() not in out and C1_CSI.encode() not in out
    finally:
        with contextlib.suppress(ClientError):
            client.destroy_sandbox(sb.id)
