"""Evidence for security teams, through a real daemon and the real CLI: signed checkpoints,
exports that verify with only the public key, sinks, policy files and their reload, reports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from corral.runtime.audit import _head_slot, record_hash
from corral.runtime.client import ClientError

from .daemon_harness import collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

CLI = [sys.executable, "-m", "corral.runtime.cli"]


def corral(*args, cwd=None, env=None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          input=stdin, timeout=120)


def _pubkey(d) -> str:
    return str(d.state / "audit-signing.key.pub")


def _wait(predicate, what: str, timeout_s: float = 20.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _rehash_from(db: str, seq: int, new_detail: str) -> None:
    """Edit one record and re-hash it and every record after it, then rewrite the head
    anchor: what root on the host can do to a chain with no signatures."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER records_no_update")
    rows = conn.execute("SELECT seq, time, tenant, peer, kind, sandbox_id, session_id, "
                        "detail_json, prev_hash, hash FROM records ORDER BY seq").fetchall()
    prev = None
    for row in rows:
        s, t, tenant, peer, kind, sb, sess, detail, prev_hash, digest = row
        if s < seq:
            prev = digest
            continue
        if s == seq:
            detail = new_detail
        prev_hash = prev if prev is not None else prev_hash
        digest = record_hash(prev_hash, seq=s, time=t, tenant=tenant, peer=peer, kind=kind,
                             sandbox_id=sb, session_id=sess, detail_json=detail)
        conn.execute("UPDATE records SET detail_json = ?, prev_hash = ?, hash = ? "
                     "WHERE seq = ?", (detail, prev_hash, digest, s))
        prev = digest
    conn.commit()
    conn.close()
    last = rows[-1][0]
    with open(db + ".head", "r+b") as f:
        f.write(_head_slot(last, prev) * 2)


def test_a_copy_rehashed_end_to_end_fails_verify_pubkey(make_daemon, tmp_path):
    d = make_daemon("signed", config="[audit]\ncheckpoint_records = 4\n").start()
    client = d.client()
    sb = client.create_sandbox()
    for i in range(6):
        assert collect_exec(client.exec(sb.id, ["sh", "-c", f"exit {i}"])).returncode == i
    client.destroy_sandbox(sb.id)
    assert d.stop() == 0
    assert oct(os.stat(d.state / "audit-signing.key").st_mode & 0o777) == "0o600"

    ok = corral("audit", "verify", "--db", d.audit_db, "--pubkey", _pubkey(d))
    assert ok.returncode == 0, ok.stderr
    records = d.records()
    checkpoints = [r for r in records if r.kind == "audit.checkpoint"]
    assert len(checkpoints) >= 3
    assert ok.stdout.startswith(f"audit chain OK and signed: {len(records)} records verified, "
                                f"records 1-{records[-2].seq} pinned by {len(checkpoints)} "
                                "checkpoint signatures of key ")

    # the copy: sandbox.create's detail edited, everything after re-hashed, anchor rewritten
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("audit.db", "audit.db.head"):
        shutil.copy(d.state / name, copy / name)
    # an exit status rewritten, past the first checkpoint
    created = next(r for r in records if r.kind == "exec.exit" and r.seq > checkpoints[0].seq)
    detail = json.loads(created.detail_json)
    detail["returncode"] = 0
    _rehash_from(str(copy / "audit.db"),
                 created.seq, json.dumps(detail, sort_keys=True, separators=(",", ":")))

    chain_only = corral("audit", "verify", "--db", str(copy / "audit.db"))
    assert chain_only.returncode == 0, chain_only.stderr  # the chain alone cannot tell

    signed = corral("audit", "verify", "--db", str(copy / "audit.db"), "--pubkey", _pubkey(d))
    assert signed.returncode == 1
    pinned = max(json.loads(c.detail_json)["seq"] for c in checkpoints if c.seq < created.seq)
    first_bad = next(c for c in checkpoints if c.seq > created.seq)
    signed_seq = json.loads(first_bad.detail_json)["seq"]
    assert signed.stderr.startswith(
        f"audit signatures BROKEN at record {pinned + 1}: record {first_bad.seq}: signed hash ")
    assert signed.stderr.rstrip().endswith(
        f"of record {signed_seq}, but the chain has "
        f"{_hash_in(copy / 'audit.db', signed_seq)[:16]}... there: records up to {signed_seq} "
        f"were rewritten after they were signed; the last valid signature covers records up "
        f"to {pinned}, so record {pinned + 1} is the first that cannot be trusted")


def _hash_in(db, seq: int) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()[0]
    finally:
        conn.close()


def test_an_export_verifies_with_only_the_public_key(make_daemon, tmp_path):
    d = make_daemon("export", config="[audit]\ncheckpoint_records = 3\n").start()
    client = d.client()
    sb = client.create_sandbox()
    collect_exec(client.exec(sb.id, ["true"]))
    cursor = tmp_path / "cursor"
    out = tmp_path / "trail.jsonl"
    first = corral("audit", "export", "--socket", d.socket, "--cursor", str(cursor),
                   "--out", str(out))
    assert first.returncode == 0, first.stderr
    mid = int(cursor.read_text())
    assert mid == len(out.read_text().splitlines())
    client.destroy_sandbox(sb.id)
    assert d.stop() == 0
    # resumed from the cursor, against the file itself (the daemon is gone)
    second = corral("audit", "export", "--db", d.audit_db, "--cursor", str(cursor),
                    "--out", str(out))
    assert second.returncode == 0, second.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(d.records()) + 1))
    assert int(cursor.read_text()) == lines[-1]["seq"] > mid
    ocsf = corral("audit", "export", "--db", d.audit_db, "--format", "ocsf")
    assert ocsf.returncode == 0, ocsf.stderr
    event = json.loads(ocsf.stdout.splitlines()[0])
    assert (event["class_uid"], event["metadata"]["uid"]) == (6003, "1")
    (tmp_path / "trail.ocsf").write_text(ocsf.stdout)

    # "another machine": a fresh process in an empty directory with the two files only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out, elsewhere / "trail.jsonl")
    shutil.copy(tmp_path / "trail.ocsf", elsewhere / "trail.ocsf")
    shutil.copy(_pubkey(d), elsewhere / "audit.pub")
    env = {"PATH": os.environ["PATH"], "HOME": str(elsewhere),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for name in ("trail.jsonl", "trail.ocsf"):
        res = corral("audit", "verify", "--file", name, "--pubkey", "audit.pub",
                     cwd=elsewhere, env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"audit chain OK and signed: {len(lines)} records")

    # one byte of one record changed (its hash kept): refused, naming where trust ends
    text = (elsewhere / "trail.jsonl").read_text().splitlines()
    victim = next(i for i, r in enumerate(lines) if r["kind"] == "sandbox.destroy")
    text[victim] = text[victim].replace('"tenant":"local"', '"tenant":"locaL"')
    (elsewhere / "bad.jsonl").write_text("\n".join(text) + "\n")
    bad = corral("audit", "verify", "--file", "bad.jsonl", "--pubkey", "audit.pub",
                 cwd=elsewhere, env=env)
    assert bad.returncode == 1
    seq = lines[victim]["seq"]
    assert f"the hash chain breaks: record {seq}: content does not match its hash" in bad.stderr


class _SyslogListener:
    """A UDP or TCP syslog receiver on 127.0.0.1 keeping every message."""

    def __init__(self, protocol: str, port: int = 0):
        kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        if protocol == "tcp":
            self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.protocol = protocol
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        if self.protocol == "udp":
            while not self._stop:
                try:
                    self.messages.append(self.sock.recv(70000))
                except OSError:
                    return
            return
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        buf = b""
        while not self._stop:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b" " in buf:
                size, _, rest = buf.partition(b" ")
                if len(rest) < int(size):
                    break
                self.messages.append(rest[:int(size)])
                buf = rest[int(size):]

    def seqs(self) -> list[int]:
        out = []
        for m in list(self.messages):
            body = m.split(b"\xef\xbb\xbf", 1)[1]
            out.append(json.loads(body)["seq"])
        return out

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_syslog_delivery_reaches_a_listener(make_daemon, tmp_path):
    listener = _SyslogListener("udp")
    try:
        d = make_daemon("syslog", config=(
            f'[audit.sinks.siem]\ntype = "syslog"\naddress = "127.0.0.1:{listener.port}"\n'
            f'[audit.sinks.archive]\ntype = "file"\npath = "{tmp_path}/archive.jsonl"\n'
            'max_size = "4K"\nkeep = 2\n')).start()
        client = d.client()
        sb = client.create_sandbox()
        created = client.audit_query(sandbox_id=sb.id, kind="sandbox.create")[0]
        msg = _wait(lambda: next((m for m in list(listener.messages)
                                  if f'seq="{created.seq}"'.encode() in m), None),
                    "the sandbox.create record at the listener")
        head, _, body = msg.partition(b"\xef\xbb\xbf")
        stamp = datetime.fromtimestamp(created.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # PRI 110: facility 13 (log audit) * 8 + 6 (informational); MSGID: the kind
        assert head.decode() == (
            f"<110>1 {stamp} {socket.gethostname()} corral {d.pid} sandbox.create "
            f'[corral@32473 seq="{created.seq}" hash="{created.hash}" tenant="local" '
            f'sandbox="{sb.id}"] ')
        assert json.loads(body) == {
            "seq": created.seq, "time": created.time, "tenant": "local", "peer": created.peer,
            "kind": "sandbox.create", "sandbox_id": sb.id, "session_id": "",
            "detail_json": created.detail_json, "prev_hash": created.prev_hash,
            "hash": created.hash}
        for _ in range(6):
            collect_exec(client.exec(sb.id, ["true"]))
        client.destroy_sandbox(sb.id)
        assert d.stop() == 0
        # every record reached the listener and the file, each once, in order
        seqs = [r.seq for r in d.records()]
        assert listener.seqs() == seqs  # a new sink starts at the head: here, an empty log
        archived = []
        for name in ("archive.jsonl.2", "archive.jsonl.1", "archive.jsonl"):
            if (tmp_path / name).exists():
                archived += [json.loads(x)["seq"]
                             for x in (tmp_path / name).read_text().splitlines()]
        assert (tmp_path / "archive.jsonl.1").exists()  # rotated at 4K, 2 old files kept
        assert archived == list(range(archived[0], seqs[-1] + 1))  # each once, none missing
    finally:
        listener.close()


def test_a_down_sink_never_blocks_create_and_catches_up(make_daemon):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there: every delivery is refused
    d = make_daemon("down", config=(
        f'[audit.sinks.siem]\ntype = "syslog"\nprotocol = "tcp"\n'
        f'address = "127.0.0.1:{port}"\n')).start()
    client = d.client()
    made = [client.create_sandbox().id for _ in range(4)]
    assert len(set(made)) == 4
    status = _wait(lambda: (s := client.audit_status()).sinks[0].errors >= 1 and s,
                   "a failed delivery")
    sink = status.sinks[0]
    assert sink.name == "siem" and sink.lag >= 4 and "refused" in sink.last_error.lower()
    behind = sink.delivered_seq
    listener = _SyslogListener("tcp", port)
    try:
        _wait(lambda: client.audit_status().sinks[0].lag == 0, "the sink caught up", 30)
        got = listener.seqs()
        assert got[0] == behind + 1 and got == list(range(got[0], got[-1] + 1))
        status = corral("audit", "status", "--socket", d.socket)
        assert status.returncode == 0, status.stderr
        assert "sink siem: delivered through" in status.stdout and ", lag 0, " in status.stdout
    finally:
        for sid in made:
            client.destroy_sandbox(sid)
        assert d.stop() == 0
        listener.close()


def test_policy_file_reload_is_audited_signed_and_swaps_the_policy(make_daemon, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[tenants.acme]\nmax_memory = "256M"\n')
    d = make_daemon("policy", config=f'policy_file = "{policy}"\n').start()
    acme = d.client(tenant="acme")
    with pytest.raises(ClientError) as refused:
        acme.create_sandbox(memory_bytes=512 << 20)
    assert refused.value.code.name == "PERMISSION_DENIED"
    before = d.client().audit_status().policy_digest
    checked = corral("policy", "check", str(policy))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == (f"policy OK: {policy}: {before} (tenants acme; default policy "
                              "for every other tenant)\n")

    policy.write_text('[tenants.acme]\nmax_memory = "1G"\n')
    os.kill(d.pid, signal.SIGHUP)
    reload = _wait(lambda: d.client().audit_query(kind="policy.reload"), "policy.reload")[0]
    detail = json.loads(reload.detail_json)
    assert detail["previous"] == before and detail["digest"] != before
    assert detail["widens"] == ["tenant acme may now ask for max_memory = 1G (was 256M)"]
    sb = acme.create_sandbox(memory_bytes=512 << 20)
    created = acme.audit_query(sandbox_id=sb.id, kind="sandbox.create")[0]
    assert json.loads(created.detail_json)["corral.policy"] == detail["digest"]
    after = d.client().audit_query(after_seq=reload.seq, limit=1)[0]
    assert after.kind == "audit.checkpoint"  # the reload is signed at once
    assert json.loads(after.detail_json)["reason"] == "policy.reload"
    assert json.loads(after.detail_json)["seq"] == reload.seq

    policy.write_text('[tenants.acme]\nmax_memory = "lots"\n')
    os.kill(d.pid, signal.SIGHUP)
    failed = _wait(lambda: d.client().audit_query(kind="policy.reload_failed"),
                   "policy.reload_failed")[0]
    assert json.loads(failed.detail_json)["digest"] == detail["digest"]  # still in force
    acme.destroy_sandbox(sb.id)
    # live, through the daemon: its newest records are not signed yet, and are named
    live = corral("audit", "verify", "--socket", d.socket, "--pubkey", _pubkey(d))
    assert live.returncode == 1 and "are not covered by any signature" in live.stderr
    tail_ok = corral("audit", "verify", "--socket", d.socket, "--pubkey", _pubkey(d),
                     "--unsigned-tail-ok")
    assert tail_ok.returncode == 0, tail_ok.stderr
    assert re.fullmatch(r"audit chain OK: (\d+) records verified, records 1-(\d+) signed by "
                        r"key [0-9a-f]{16}; records (\d+)-\1 are not signed yet\n",
                        tail_ok.stdout), tail_ok.stdout
    assert d.stop() == 0
    assert corral("audit", "verify", "--db", d.audit_db, "--pubkey", _pubkey(d)).returncode == 0


def test_report_lists_the_egress_rule_and_the_denials(make_daemon, tmp_path):
    d = make_daemon("report").start()
    client = d.client()
    sb = client.create_sandbox(allow_net=["example.invalid:443"])
    # what the rule does not allow: a TCP connection and a UDP datagram, both refused
    probe = ("import socket\n"
             "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "u.sendto(b'x', ('192.0.2.1', 9))\n"
             "t = socket.socket(); t.settimeout(5)\n"
             "try: t.connect(('192.0.2.1', 80)); t.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
             "t.recv(10)\n"
             "except OSError: pass\n")
    collect_exec(client.exec(sb.id, ["python3", "-c", probe]))
    denied = _wait(lambda: (r := [x for x in client.audit_query(sandbox_id=sb.id, kind="net.")
                                  if json.loads(x.detail_json).get("decision") == "deny"])
                   and len(r) >= 2 and r, "two egress denials")
    res = corral("report", sb.id, "--socket", d.socket)
    assert res.returncode == 0, res.stderr
    saved = json.loads(res.stdout)
    body = saved["report"]
    assert body["sandbox_id"] == sb.id and body["egress"]["rules"] == ["example.invalid:443"]
    assert body["requested_spec"]["allow_net"] == ["example.invalid:443"]
    assert body["tenant_policy"]["digest"] == client.audit_status().policy_digest
    kinds = [r["kind"] for r in body["lifecycle"]]
    assert kinds[0] == "sandbox.create" and "exec.start" in kinds
    expected = {}
    for r in denied:
        det = json.loads(r.detail_json)
        key = (f"{det.get('name') or det.get('address') or '?'}:{det.get('port', '')}",
               det.get("reason", ""))
        expected[key] = expected.get(key, 0) + 1
    assert sorted((x["destination"], x["reason"], x["count"])
                  for x in body["egress"]["denied"]) == sorted(
        (k[0], k[1], n) for k, n in expected.items())
    assert {x["reason"] for x in body["egress"]["denied"]} >= {
        "UDP is dropped (only DNS to the sandbox resolver)"}
    assert body["egress"]["records"]["net.udp"] >= 1 and body["egress"]["allowed"] == []
    (tmp_path / "r.json").write_text(res.stdout)
    ok = corral("report", "--check", str(tmp_path / "r.json"), "--pubkey", _pubkey(d))
    assert ok.returncode == 0 and ok.stdout.startswith(f"report OK: sandbox {sb.id} ")
    saved["report"]["mismatches"] = []
    saved["report"]["egress"]["rules"] = ["*"]
    (tmp_path / "forged.json").write_text(json.dumps(saved))
    bad = corral("report", "--check", str(tmp_path / "forged.json"), "--pubkey", _pubkey(d))
    assert bad.returncode == 1
    assert bad.stderr == (f"corral: report: {tmp_path}/forged.json: BROKEN: the document does "
                          "not match the digest its signature covers: it was altered\n")
    md = corral("report", sb.id, "--socket", d.socket, "--format", "markdown")
    assert md.returncode == 0 and f"# Sandbox report: {sb.id}" in md.stdout
    assert "Rules: `example.invalid:443`" in md.stdout
    assert body["probes"]["status"] == "not run"
    assert body["probes"]["class"]["profile"] == "default"

    # probe verdicts: run once for this policy class and kernel, then from the cache
    ran = json.loads(corral("report", sb.id, "--socket", d.socket, "--probes").stdout)
    probes = ran["report"]["probes"]
    assert probes["status"] == "ran" and probes["summary"]["ESCAPED"] == 0
    assert probes["summary"]["contained"] == len(probes["probes"]) - probes["summary"]["error"]
    again = json.loads(corral("report", sb.id, "--socket", d.socket).stdout)["report"]
    assert again["probes"] == {**probes, "status": "cached"}
    cache = list((d.state / "probe-cache").iterdir())
    assert [p.name for p in cache] == [probes["class"]["digest"][7:] + ".json"]
    client.destroy_sandbox(sb.id)
    assert d.stop() == 0


def _kms_script(tmp_path, key_path: str) -> str:
    script = tmp_path / "kms-sign"
    script.write_text(f"#!{sys.executable}\n"
                      "import base64, sys\n"
                      "from cryptography.hazmat.primitives import serialization\n"
                      f"key = serialization.load_pem_private_key(open({key_path!r}, 'rb')"
                      ".read(), None)\n"
                      "print(base64.b64encode(key.sign(sys.stdin.buffer.read())).decode())\n")
    script.chmod(0o700)
    return str(script)


def test_a_signing_command_holds_the_key_and_a_wrong_one_stops_the_start(make_daemon,
                                                                         tmp_path):
    from corral.runtime.signing import FileSigner

    hsm = FileSigner.load_or_create(str(tmp_path / "hsm" / "audit.key"))
    other = FileSigner.load_or_create(str(tmp_path / "hsm" / "other.key"))
    wrong = make_daemon("wrong", config=(
        f'[audit]\nsigning_command = ["{_kms_script(tmp_path, other.path)}"]\n'
        f'signing_public_key = "{hsm.path}.pub"\n'))
    assert wrong.run_to_exit() == 1
    assert (f"signing command '{tmp_path}/kms-sign' signs with another key than "
            f"{hsm.path}.pub (key id {hsm.key_id})") in wrong.log()

    d = make_daemon("kms", config=(
        f'[audit]\nsigning_command = ["{_kms_script(tmp_path, hsm.path)}"]\n'
        f'signing_public_key = "{hsm.path}.pub"\ncheckpoint_records = 2\n')).start()
    client = d.client()
    client.destroy_sandbox(client.create_sandbox().id)
    assert client.audit_status().signing_key_id == hsm.key_id
    assert d.stop() == 0
    assert not (d.state / "audit-signing.key").exists()  # no key on the daemon's disk
    ok = corral("audit", "verify", "--db", d.audit_db, "--pubkey", f"{hsm.path}.pub")
    assert ok.returncode == 0, ok.stderr


def test_a_sink_resumes_after_a_restart_without_losing_a_record(make_daemon, tmp_path):
    archive = tmp_path / "archive.jsonl"
    config = f'[audit.sinks.archive]\ntype = "file"\npath = "{archive}"\n'
    d = make_daemon("resume", config=config).start()
    client = d.client()
    client.destroy_sandbox(client.create_sandbox().id)
    d.kill()  # no drain, no final checkpoint: the cursor may lag what was written
    d.start()
    client = d.client()
    client.destroy_sandbox(client.create_sandbox().id)
    assert d.stop() == 0
    shipped = [json.loads(line)["seq"] for line in archive.read_text().splitlines()]
    seqs = [r.seq for r in d.records()]
    # at least once: every record, in order; a repeat only where the cursor lagged (the
    # seq is the dedup key)
    assert list(dict.fromkeys(shipped)) == seqs
    cursor = int((d.state / "sinks" / "archive.cursor").read_text())
    assert cursor == seqs[-1]
