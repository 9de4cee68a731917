"""The value leaves no trace inside: memory, files, environment, events, error messages.

After real clients used the secret (and the server echoed it back, scrubbed on the way),
every process of the sandbox has its whole memory read from the host (/proc/PID/mem,
region by region from /proc/PID/maps) and every file it can see under its writable
places is read: none holds the value. Interception limits are checked here too: a
client that pins its own CA gets a clear TLS error, and a server that fails the proxy's
verification gets no request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from corral.sandbox import Sandbox
from corral.sandbox.spec import BindMount, SandboxSpec, SecretBinding

from .conftest import SECRET_VALUE, cli_env, events_when
from .test_substitution import placeholder, run

MiB = 1 << 20
HOLD = """
import json, os, sys, time, urllib.request
req = urllib.request.Request('https://api.test/keep', headers={
    'Authorization': 'Bearer ' + os.environ['API_TOKEN']})
with urllib.request.urlopen(req, timeout=20) as r:
    kept = [r.read(), r.headers['X-Echo-Auth']]
open('/workspace/response.json', 'wb').write(kept[0])
open('/tmp/auth.txt', 'w').write(kept[1])
print('ready', flush=True)
time.sleep(60)
"""


def sandbox_pids(init_pid: int) -> list[int]:
    """PID 1 of the sandbox and every process below it (from the host's /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [init_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_holds(pid: int, needle: bytes) -> tuple[bool, int]:
    """(needle found in any readable region of pid's memory, bytes read)."""
    seen = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # [vvar] and guard pages do not read
            seen += len(data)
            if needle in data:
                return True, seen
    return False, seen


def files_holding(root: str, needle: bytes) -> list[str]:
    hits = []
    for top, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


def test_no_process_memory_or_file_of_the_sandbox_holds_the_value(servers):
    spec = SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),),
                       memory_bytes=256 * MiB, timeout_s=60)
    events: list[dict] = []
    sb = Sandbox(spec, on_net_event=events.append, secrets={"API_TOKEN": SECRET_VALUE})
    sb.start()
    try:
        code, out, err = run(sb, ["sh", "-c", 'curl -sS -H "Authorization: Bearer $API_TOKEN"'
                                              ' https://api.test/curl > /workspace/curl.out'])
        assert code == 0, err
        holder = sb.exec(["python3", "-I", "-c", HOLD])
        assert holder.stdout.readline() == b"ready\n"
        pids = sandbox_pids(sb.init_pid)
        assert len(pids) >= 2  # corral-init and the holder (and its relay's children)
        scanned = 0
        for pid in pids:
            found, seen = memory_holds(pid, SECRET_VALUE.encode())
            assert not found, f"pid {pid} holds the value in its memory"
            scanned += seen
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert SECRET_VALUE.encode() not in f.read()
        assert scanned > 1 * MiB  # the whole of a Python's memory was read
        # the scrubbed response is there, as the placeholder
        holder_found, _ = memory_holds(pids[-1], placeholder(sb).encode())
        assert holder_found
        root = f"/proc/{sb.init_pid}/root"
        assert files_holding(sb.workspace, SECRET_VALUE.encode()) == []
        assert files_holding(root + "/tmp", SECRET_VALUE.encode()) == []
        assert files_holding(root + "/etc", SECRET_VALUE.encode()) == []
        with open(os.path.join(sb.workspace, "curl.out")) as f:
            assert json.loads(f.read())["headers"]["authorization"] == \
                f"Bearer {placeholder(sb)}"
        holder.kill()
        holder.wait()
    finally:
        sb.destroy()
    assert SECRET_VALUE not in json.dumps(events)
    assert SECRET_VALUE not in repr(sb.secrets) + repr(sb.spec) + json.dumps(sb.spec.to_fields())


def test_a_client_that_pins_its_own_ca_gets_a_clear_tls_error(servers):
    spec = SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),),
                       memory_bytes=256 * MiB, timeout_s=60,
                       binds=(BindMount(os.path.dirname(servers.ca_file), "/pinned"),))
    events: list[dict] = []
    sb = Sandbox(spec, on_net_event=events.append, secrets={"API_TOKEN": SECRET_VALUE})
    sb.start()
    servers.received.clear()
    try:
        code, out, err = run(sb, ["python3", "-I", "-c", """
import socket, ssl
ctx = ssl.create_default_context(cafile='/pinned/ca.pem')
try:
    ctx.wrap_socket(socket.create_connection(('api.test', 443), timeout=10),
                    server_hostname='api.test')
except ssl.SSLCertVerificationError as e:
    print(e.verify_message)
"""])
    finally:
        sb.destroy()
    assert code == 0, err
    assert out.strip() == "self-signed certificate in certificate chain"  # not its CA
    errors = [e["error"] for e in events_when(events, lambda e: "error" in e)]
    assert any(e.startswith("TLS with the sandbox failed (a client that pins") for e in errors)
    # the server's handshake ran beside the client's; no request ever came
    assert all(not data.strip() for _, data in servers.received)


def test_a_server_failing_verification_gets_no_request(servers):
    from corral.sandbox import proxy

    cfg = proxy.shared_proxy().config
    saved = cfg.upstream_ca_file
    cfg.upstream_ca_file, cfg._upstream_tls = None, None  # the system store: no test CA
    spec = SandboxSpec(secrets=(SecretBinding("API_TOKEN", ("api.test",)),),
                       memory_bytes=256 * MiB, timeout_s=60)
    events: list[dict] = []
    sb = Sandbox(spec, on_net_event=events.append, secrets={"API_TOKEN": SECRET_VALUE})
    sb.start()
    servers.received.clear()
    try:
        code, out, err = run(sb, ["sh", "-c", 'curl -s -w "%{http_code}" -H "Authorization: '
                                              '$API_TOKEN" https://api.test/'])
    finally:
        sb.destroy()
        cfg.upstream_ca_file, cfg._upstream_tls = saved, None
    assert out.endswith("502") and "failed verification" in out
    [event] = events_when(events, lambda e: e.get("intercepted"))
    assert event["error"].startswith("TLS with api.test failed: SSLCertVerificationError")
    assert all(b"authorization" not in data.lower() for _, data in servers.received)


def test_corral_run_secret_flag(servers, tmp_path):
    audit = tmp_path / "audit.jsonl"
    env = {**cli_env(servers), "API_TOKEN": SECRET_VALUE}
    proc = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--secret", "API_TOKEN@api.test",
         "--audit", str(audit), "--", "sh", "-c",
         'curl -sS -H "Authorization: Bearer $API_TOKEN" https://api.test/cli; '
         'curl -sS "http://api.test/leak?$API_TOKEN"; echo " env=$API_TOKEN"'],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    echoed, _end = json.JSONDecoder().raw_decode(proc.stdout)  # the first (JSON) reply
    token = echoed["headers"]["authorization"].removeprefix("Bearer ")
    assert token.startswith("corral_secret_")
    assert "egress denied: the request carries a secret's placeholder" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"env={token}")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    [block] = [r for r in records if r["kind"] == "net.secret"]
    assert (block["secret"], block["port"], block["where"]) == ("API_TOKEN", 80, "stream")
    for text in (proc.stdout, proc.stderr, audit.read_text()):
        assert SECRET_VALUE not in text
    assert f"Bearer {SECRET_VALUE}".encode() in servers.all_received()


def test_corral_run_secret_without_its_variable_is_a_usage_error(servers):
    env = {k: v for k, v in cli_env(servers).items() if k != "API_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "corral.runtime.cli", "run", "--secret", "API_TOKEN@api.test",
         "--", "true"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("corral: run: secret: API_TOKEN is not set in your "
                                   "environment; export API_TOKEN=... (its value) first")
