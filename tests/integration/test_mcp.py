"""`corral mcp` end to end, driven by the official MCP SDK's own client: over stdio (the
server a subprocess of the client, with a private daemon of its own) and over streamable HTTP
(against the shared test daemon, behind a bearer token). Each run creates a sandbox, execs,
moves files, steers and interrupts a session, runs a deep task and destroys the sandbox, and
the daemon's audit log must show each call as the RPC it made.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import Implementation

from corral.runtime.audit import AuditLog
from corral.runtime.mcp_server.tools import CLIENT_LABEL, CLIENT_VERSION_LABEL, TOOL_NAMES

from .daemon_harness import AGENTS_DIR

pytestmark = pytest.mark.root

CLIENT_INFO = Implementation(name="corral-test", version="1.2.3")
AGENT = "/workspace/plain_agent.py"
#: A deep task that leaves one result file.
TASK_ARGV = ["sh", "-c", "mkdir -p /workspace/out && echo 42 > /workspace/out/answer.txt"]


async def call(client, tool: str, **arguments) -> dict:
    """The tool's answer as a dict; a tool error fails the test with its text."""
    result = await client.call_tool(tool, arguments)
    text = result.content[0].text
    assert not result.is_error, f"{tool}: {text}"
    assert result.structured_content == json.loads(text)
    return result.structured_content


async def call_error(client, tool: str, **arguments) -> str:
    """The text of a call that must be a tool error."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.content
    return result.content[0].text


async def read_until(client, session_id: str, after_seq: int, wanted: str) -> tuple[str, int]:
    """Session text from after_seq on until it holds `wanted` (or the agent exits)."""
    text = ""
    for _ in range(30):
        answer = await call(client, "session_read", session_id=session_id,
                            after_seq=after_seq, wait_s=2)
        text += answer["text"]
        after_seq = answer["next_seq"]
        if wanted in text or answer["state"] != "running":
            break
    return text, after_seq


async def session_part(client, sandbox_id: str) -> str:
    """Start the plain agent in the sandbox, read it, steer it, interrupt it."""
    started = await call(client, "session_start", argv=["python3", AGENT, "--echo"],
                         sandbox_id=sandbox_id)
    assert started["sandbox_id"] == sandbox_id
    session_id = started["session_id"]
    text, seq = await read_until(client, session_id, 0, "line 2")
    assert "line 0\nline 1\nline 2\n" in text
    await call(client, "session_steer", session_id=session_id, text="hello")
    text, seq = await read_until(client, session_id, seq, "echo: hello")
    assert "echo: hello\n" in text
    assert await call(client, "session_interrupt", session_id=session_id) == {
        "session_id": session_id, "interrupted": True}
    return session_id


async def task_part(client) -> str:
    submitted = await call(client, "task_submit", argv=TASK_ARGV, memory="256M")
    task_id = submitted["task_id"]
    state = submitted["state"]
    for _ in range(60):
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        state = (await call(client, "task_status", task_id=task_id, wait_s=5))["state"]
    assert state == "SUCCEEDED"
    result = await call(client, "task_result", task_id=task_id)
    assert [(f["path"], f["content"]) for f in result["files"]] == [("answer.txt", "42\n")]
    return task_id


async def scenario(client) -> dict:
    """Every tool once, in the order an agent would use them; returns the ids made."""
    tools = await client.list_tools()
    assert sorted(t.name for t in tools.tools) == sorted(TOOL_NAMES)
    assert all(t.description and t.input_schema["type"] == "object" for t in tools.tools)

    bad = await call_error(client, "sandbox_create", memory="12Q")
    assert "memory: '12Q' is not a size; use e.g. 512M or 2G" in bad
    assert "Traceback" not in bad
    typed = await call_error(client, "sandbox_create", pids="many")
    assert "pids\n  Input should be a valid integer" in typed
    missing = await call_error(client, "exec", sandbox_id="sbx-000000000000", argv=["true"])
    assert "NOT_FOUND" in missing and "Traceback" not in missing

    box = await call(client, "sandbox_create", memory="256M", pids=64, ttl="10m",
                     labels={"team": "a"})
    sandbox_id = box["sandbox_id"]
    assert box["labels"] == {"team": "a", CLIENT_LABEL: "corral-test",
                             CLIENT_VERSION_LABEL: "1.2.3"}
    listed = await call(client, "sandbox_list", selector="team=a")
    assert [b["sandbox_id"] for b in listed["sandboxes"]] == [sandbox_id]

    ran = await call(client, "exec", sandbox_id=sandbox_id, argv=["echo", "hi"])
    assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (0, "hi\n", "")
    cut = await call(client, "exec", sandbox_id=sandbox_id, max_output_bytes=10,
                     argv=["sh", "-c", "printf 0123456789abcdef; echo oops >&2"])
    assert (cut["stdout"], cut["stdout_truncated_bytes"], cut["stderr"]) == (
        "0123456789", 6, "oops\n")

    await call(client, "exec", sandbox_id=sandbox_id, argv=["mkdir", "notes"])
    await call(client, "file_write", sandbox_id=sandbox_id, path="notes/a.txt",
               content="hello mcp\n")
    read = await call(client, "file_read", sandbox_id=sandbox_id, path="notes/a.txt")
    assert (read["content"], read["truncated"]) == ("hello mcp\n", False)
    listing = await call(client, "file_list", sandbox_id=sandbox_id, path="notes")
    assert [(e["name"], e["kind"], e["size"]) for e in listing["entries"]] == [
        ("a.txt", "file", 10)]
    escape = await call_error(client, "file_read", sandbox_id=sandbox_id, path="../../etc/passwd")
    assert "Traceback" not in escape

    await call(client, "file_write", sandbox_id=sandbox_id, path="plain_agent.py",
               content=(AGENTS_DIR / "plain_agent.py").read_text())
    session_id = await session_part(client, sandbox_id)
    task_id = await task_part(client)

    gone = await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
    assert gone == {"sandbox_id": sandbox_id, "destroyed": True, "already_destroyed": False}
    return {"sandbox": sandbox_id, "session": session_id, "task": task_id}


def check_audit(audit_db: str, made: dict, tenant: str) -> None:
    """Each tool call is in the audit log as the RPC it made, by tenant, with the MCP
    client's name."""
    records = _records(audit_db)
    on_box = {r.kind for r in records if r.sandbox_id == made["sandbox"]}
    assert {"sandbox.create", "exec.start", "exec.exit", "file.write", "file.read",
            "file.list", "session.open", "session.input", "session.interrupt",
            "sandbox.destroy"} <= on_box
    (create,) = [r for r in records if r.kind == "sandbox.create"
                 and r.sandbox_id == made["sandbox"]]
    assert json.loads(create.detail_json)["labels"][CLIENT_LABEL] == "corral-test"
    assert create.tenant == tenant
    (opened,) = [r for r in records if r.kind == "session.open"
                 and r.session_id == made["session"]]
    assert json.loads(opened.detail_json)["labels"][CLIENT_VERSION_LABEL] == "1.2.3"
    assert any(r.kind == "task.submit" and made["task"] in r.detail_json for r in records)


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def private_socket_dir(state: str) -> str:
    """Where the private daemon of state listened, from its daemon.start record."""
    (start,) = [r for r in _records(os.path.join(state, "audit.db")) if r.kind == "daemon.start"]
    return os.path.dirname(json.loads(start.detail_json)["socket"])


def server_env() -> dict[str, str]:
    return {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PATH": os.environ["PATH"]}


def test_stdio_with_a_private_daemon(tmp_path):
    """No daemon named: `corral mcp` starts its own, and it is gone once the client leaves."""
    state = str(tmp_path / "mcp-state")
    params = StdioServerParameters(command=sys.executable, env=server_env(),
                                   args=["-m", "corral.runtime.cli", "mcp", "--state", state])

    async def main() -> dict:
        with open(tmp_path / "server.err", "w") as errlog:
            async with Client(stdio_client(params, errlog=errlog),
                              client_info=CLIENT_INFO) as client:
                assert processes_naming(state), "the private daemon is not running"
                assert stat.S_IMODE(os.stat(private_socket_dir(state)).st_mode) == 0o700
                return await scenario(client)

    made = anyio.run(main)
    assert processes_naming(state) == []
    socket_dir = private_socket_dir(state)
    assert socket_dir.startswith(tempfile.gettempdir() + "/corral-mcp-")
    assert not os.path.exists(socket_dir)
    kinds = [r.kind for r in _records(os.path.join(state, "audit.db"))]
    assert kinds[-2:] == ["daemon.stop", "audit.checkpoint"]
    check_audit(os.path.join(state, "audit.db"), made, "mcp")  # not "local", the operator


def test_sigterm_stops_the_private_daemon(tmp_path):
    """SIGTERM while the client is still connected (stdin open, no EOF): `corral mcp`
    exits 0 and its private daemon and socket directory are gone."""
    state = str(tmp_path / "st")
    proc = subprocess.Popen([sys.executable, "-m", "corral.runtime.cli", "mcp", "--state", state],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        # initialize answered: the server is serving (the private daemon came up first)
        proc.stdin.write(json.dumps({
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}}).encode() + b"\n")
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        assert answer["result"]["serverInfo"]["name"] == "corral"
        daemons = [p for p in processes_naming(state) if p != proc.pid]
        assert len(daemons) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert processes_naming(state) == []
    assert "daemon.stop" in [r.kind for r in _records(os.path.join(state, "audit.db"))]


def _records(audit_db: str) -> list:
    log = AuditLog.open(audit_db, readonly=True)
    try:
        return log.query(limit=10_000)
    finally:
        log.close()


def start_http_server(daemon, token: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.runtime.cli", "mcp", "--socket", daemon.socket,
         "--transport", "http", "--listen", "127.0.0.1:0", "--http-token", token],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    prefix = "corral mcp: serving on "
    if not line.startswith(prefix):
        proc.kill()
        raise AssertionError(f"corral mcp said {line!r}; {proc.stderr.read()}")
    return proc, line[len(prefix):].strip()


def test_streamable_http_against_a_daemon(daemon):
    """A named daemon (--socket), the SDK's streamable HTTP client with the bearer token."""
    proc, url = start_http_server(daemon, "s3cret")
    try:
        async def main() -> dict:
            async with httpx2.AsyncClient() as anonymous:
                refused = await anonymous.post(url, json={})
                assert refused.status_code == 401
            headers = {"Authorization": "Bearer s3cret"}
            async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
                async with Client(streamable_http_client(url, http_client=http),
                                  client_info=CLIENT_INFO) as client:
                    return await scenario(client)

        made = anyio.run(main)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        proc.stderr.close()
    assert rc == 0
    check_audit(daemon.audit_db, made, "local")


def test_a_private_daemon_that_fails_leaves_nothing(tmp_path):
    """The daemon cannot open its audit log: `corral mcp` says why in one line, exits 1,
    and neither the daemon nor its socket directory is left."""
    state = tmp_path / "st"
    (state / "audit.db").mkdir(parents=True)
    before = set(Path(tempfile.gettempdir()).glob("corral-mcp-*"))
    done = subprocess.run([sys.executable, "-m", "corral.runtime.cli", "mcp", "--state",
                           str(state)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("corral: mcp: UNAVAILABLE: the private daemon exited with ")
    assert "Traceback (most recent call last)" not in done.stderr.splitlines()[0]
    assert set(Path(tempfile.gettempdir()).glob("corral-mcp-*")) - before == set()
    assert processes_naming(str(state)) == []

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = subprocess.run([sys.executable, "-m", "corral.runtime.cli", "mcp", "--state",
                           str(not_a_dir / "st")], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        1, f"corral: mcp: UNAVAILABLE: --state {not_a_dir / 'st'}: Not a directory\n")


@pytest.mark.parametrize(("flags", "message"), [
    (["--listen", "0.0.0.0:0", "--public"], "--public needs --http-token (or $CORRAL_MCP_TOKEN)"),
    (["--listen", "10.1.2.3:8765"],
     "--listen 10.1.2.3 is not loopback; add --public (with --http-token) to serve other hosts"),
    (["--listen", "8765"], "--listen '8765' is not HOST:PORT, e.g. 127.0.0.1:8765"),
])
def test_http_listen_flags_are_checked_first(flags, message):
    """A bad --listen is a usage error (2) naming the flag, before any daemon is touched."""
    done = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "mcp", "--socket", "/nonexistent",
         "--transport", "http", *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CORRAL_MCP_TOKEN": ""})
    assert (done.returncode, done.stderr) == (2, f"corral: mcp: INVALID_ARGUMENT: {message}\n")
