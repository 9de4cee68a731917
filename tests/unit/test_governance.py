"""Signing keys and checks, policy files (check, digest, diff through the real CLI), sink and
[audit] settings: no daemon, no root."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest

from corral.runtime import config
from corral.runtime.audit import AuditLog
from corral.runtime.governance import check_audit_settings
from corral.runtime.policy_files import load_book, policy_digest
from corral.runtime.signing import (
    Checkpointer,
    CommandSigner,
    FileSigner,
    SigningError,
    load_public_key,
    sign_document,
    verify_document,
    verify_signed,
)
from corral.runtime.sinks import syslog_message
from corral.sandbox.errors import InvalidSpec

CLI = [sys.executable, "-m", "corral.runtime.cli"]


def corral(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def _rows(log) -> list[tuple]:
    return [r for batch in log.row_batches() for r in batch]


# -- signing ------------------------------------------------------------------------------


def test_key_is_made_0600_with_its_public_half_and_reloaded(tmp_path):
    a = FileSigner.load_or_create(str(tmp_path / "k"))
    assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600"
    b = FileSigner.load_or_create(str(tmp_path / "k"))
    assert a.key_id == b.key_id
    pub = load_public_key(str(tmp_path / "k.pub"))
    assert pub.public_bytes_raw() == a.public_key.public_bytes_raw()


def test_a_key_others_can_read_is_refused(tmp_path):
    FileSigner.load_or_create(str(tmp_path / "k"))
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(SigningError, match=r"^signing key .*/k: mode 0644 lets others read "
                                           r"it; chmod 600 .*/k$"):
        FileSigner.load_or_create(str(tmp_path / "k"))


def _signed_log(tmp_path, n: int, every: int = 3):
    log = AuditLog.open(tmp_path / "audit.db")
    signer = FileSigner.load_or_create(str(tmp_path / "k"))
    cp = Checkpointer(log, signer, every_records=every, interval_s=3600)
    for i in range(n):
        log.append("x.act", tenant="t", detail={"i": i})
    cp.close(final=True)
    return log, load_public_key(str(tmp_path / "k.pub"))


def test_every_record_signed_at_close(tmp_path):
    log, pub = _signed_log(tmp_path, 10)
    rows = _rows(log)
    result = verify_signed(rows, pub)
    assert result.ok and result.checked == len(rows)
    assert rows[-1][4] == "audit.checkpoint"
    assert result.signed_through == max(r[0] for r in rows if r[4] == "x.act")
    assert [json.loads(r[7])["i"] for r in rows if r[4] == "x.act"] == list(range(10))
    log.close()


def test_an_unsigned_tail_names_its_first_record(tmp_path):
    log, pub = _signed_log(tmp_path, 4, every=100)
    signed = log.last_seq()
    log.append("x.late", tenant="t")
    log.append("x.late", tenant="t")
    result = verify_signed(_rows(log), pub)
    assert not result.ok and result.broken_at_seq == signed
    assert result.problem == (
        f"records {signed + 1}-{signed + 2} are not covered by any signature (a running "
        "daemon signs every checkpoint_records records, every checkpoint_interval and when it "
        f"stops); the last valid signature covers records up to {signed - 1}, so record "
        f"{signed} is the first that cannot be trusted")
    log.close()


def test_another_key_and_a_forged_signature_are_refused(tmp_path):
    log, _pub = _signed_log(tmp_path, 5)
    rows = _rows(log)
    other = FileSigner.load_or_create(str(tmp_path / "other"))
    result = verify_signed(rows, other.public_key)
    first = next(r for r in rows if r[4] == "audit.checkpoint")
    kid = json.loads(first[7])["key_id"]
    assert result.problem.startswith(f"record {first[0]}: the checkpoint is signed by key "
                                     f"{kid}, not by the given public key ({other.key_id})")
    log.close()


def _signing_script(tmp_path, key_path: str) -> str:
    script = tmp_path / "kms-sign"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import base64, sys
        from cryptography.hazmat.primitives import serialization
        key = serialization.load_pem_private_key(open({key_path!r}, "rb").read(), None)
        print(base64.b64encode(key.sign(sys.stdin.buffer.read())).decode())
        """))
    script.chmod(0o700)
    return str(script)


def test_a_command_signer_holds_the_key_elsewhere(tmp_path):
    hsm = FileSigner.load_or_create(str(tmp_path / "hsm" / "k"))
    signer = CommandSigner([_signing_script(tmp_path, hsm.path)], hsm.path + ".pub")
    log = AuditLog.open(tmp_path / "audit.db")
    cp = Checkpointer(log, signer, every_records=2, interval_s=3600)
    for i in range(5):
        log.append("x.act", tenant="t", detail={"i": i})
        if i == 2:  # one signature made here for sure (the thread's may not have run yet)
            cp.checkpoint()
    cp.close()  # and one more at close
    result = verify_signed(_rows(log), load_public_key(hsm.path + ".pub"))
    assert result.ok and result.signatures >= 2
    log.close()
    wrong = FileSigner.load_or_create(str(tmp_path / "wrong"))
    bad = CommandSigner([_signing_script(tmp_path, wrong.path)], hsm.path + ".pub")
    with pytest.raises(SigningError, match=r"^signing command '.*kms-sign' signs with another "
                                           r"key than .*/hsm/k\.pub \(key id [0-9a-f]{16}\)$"):
        bad.sign(b"x")


def test_a_document_signature_covers_every_field(tmp_path):
    signer = FileSigner.load_or_create(str(tmp_path / "k"))
    body = {"sandbox_id": "sb-1", "egress": {"rules": ["a.example:443"]}}
    sig = sign_document(signer, body)
    assert verify_document(body, sig, signer.public_key) == ""
    body["egress"]["rules"].append("*")
    assert verify_document(body, sig, signer.public_key) == (
        "the document does not match the digest its signature covers: it was altered")
    sig2 = dict(sig, sha256=sign_document(signer, body)["sha256"])
    assert verify_document(body, sig2, signer.public_key) == (
        "the signature does not verify with the given public key")
    assert base64.b64decode(sig["signature"]) and sig["key_id"] == signer.key_id


# -- policy files -------------------------------------------------------------------------


def _write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_policy_diff_reports_each_widening_kind(tmp_path):
    a = _write(tmp_path / "a.toml", """\
        [policy]
        max_memory = "2G"
        [tenants.acme]
        allow_net = ["public", "10.20.0.0/16:443"]
        max_sandboxes = 10
        [tenants.old]
        max_pids = 100
        """)
    b = _write(tmp_path / "b.toml", """\
        [policy]
        max_memory = "2G"
        max_request_rate = 500
        [tenants.acme]
        profiles = ["default", "unconfined"]
        allow_net = ["public", "10.20.0.0/16:443", "10.20.1.0/24:443", "10.0.0.0/8:5432"]
        max_sandboxes = 100
        max_memory = "8G"
        [tenants.lab]
        max_cpus = 1
        """)
    res = corral("policy", "diff", a, b)
    assert res.returncode == 1, res.stderr
    assert res.stdout.splitlines() == [
        "the default policy (every other tenant) may now hold max_request_rate = 500 (was 200)",
        "tenant acme may now use seccomp profile 'unconfined'",
        "tenant acme may now reach 10.0.0.0/8:5432",
        "tenant acme may now ask for max_memory = 8G (was 2G)",
        "tenant acme may now hold max_sandboxes = 100 (was 10)",
        "tenant acme may now hold max_request_rate = 500 (was 200)",
        "tenant lab is new: it gets a policy of its own",
        "tenant lab may now hold max_request_rate = 500 (was 200)",
        "tenant old may now ask for max_pids = 1024 (was 100) (its own table was removed)",
        "tenant old may now hold max_request_rate = 500 (was 200) (its own table was removed)",
    ]  # lab's max_cpus = 1 narrows the default: not a widening, not listed
    same = corral("policy", "diff", b, b)
    assert (same.returncode, same.stdout) == (0, f"{b} allows nothing that {b} did not\n")


def test_policy_check_names_the_bad_key_and_refuses_tokens(tmp_path):
    bad = _write(tmp_path / "bad.toml", '[tenants.acme]\nmax_memory = "12Q"\n')
    res = corral("policy", "check", bad)
    assert res.returncode == 2
    assert res.stderr.startswith(f"corral: policy: policy_file: {bad}: tenants.acme.max_memory:")
    token = _write(tmp_path / "token.toml", '[tenants.acme]\ntoken = "x" \n')
    res = corral("policy", "check", token)
    assert (res.returncode, res.stderr) == (2, (
        f"corral: policy: policy_file: {token}: tenants.acme.token: tokens are secrets; keep "
        "them in the daemon config, not in a policy file under version control\n"))


def test_a_policy_directory_merges_and_refuses_a_tenant_twice(tmp_path):
    d = tmp_path / "policy.d"
    d.mkdir()
    _write(d / "00-base.toml", '[policy]\nmax_memory = "4096M"\n')
    _write(d / "10-acme.toml", "[tenants.acme]\nmax_pids = 64\n")
    one = _write(tmp_path / "one.toml",
                 '[policy]\nmax_memory = "4G"\n[tenants.acme]\nmax_pids = 64\n')
    # the same policy written differently has the same digest
    assert policy_digest(load_book(str(d))) == policy_digest(load_book(one))
    _write(d / "20-again.toml", "[tenants.acme]\nmax_pids = 32\n")
    with pytest.raises(InvalidSpec, match=r"^policy_file: .*/20-again.toml: \[tenants.acme\] "
                                          r"is already set in another policy file$"):
        load_book(str(d))


def test_daemon_config_takes_policy_file_and_refuses_two_sources(tmp_path):
    pf = _write(tmp_path / "p.toml", '[tenants.acme]\nmax_pids = 64\n')
    cfg = config.load(_write(tmp_path / "c.toml", f'policy_file = "{pf}"\n'
                                                  '[tenants.acme]\ntoken = "0123456789abcdef"\n'),
                      {})
    assert cfg.policy_book().per_tenant["acme"].max_pids == 64
    assert cfg.tokens == {"0123456789abcdef": "acme"}
    with pytest.raises(InvalidSpec, match=r"^policy_file: the tenant policy is read from "):
        config.load(_write(tmp_path / "c2.toml", f'policy_file = "{pf}"\n[policy]\nmax_pids = 1\n'),
                    {})


# -- [audit] settings and sinks --------------------------------------------------------------


def test_audit_settings_are_checked_by_name():
    with pytest.raises(InvalidSpec, match=r"^audit.sign_key: unknown setting \(known: "):
        check_audit_settings({"sign_key": "/k"})
    with pytest.raises(InvalidSpec, match=r"^audit.sinks.siem.address: '127.0.0.1' is not "
                                          r"HOST:PORT$"):
        check_audit_settings({"sinks": {"siem": {"type": "syslog", "address": "127.0.0.1"}}})
    with pytest.raises(InvalidSpec, match=r"^audit.sinks.x.type: 'kafka' is not one of file, "
                                          r"syslog, otlp$"):
        check_audit_settings({"sinks": {"x": {"type": "kafka"}}})
    got = check_audit_settings({"checkpoint_interval": "5m", "checkpoint_records": 10})
    assert (got["checkpoint_interval_s"], got["checkpoint_records"]) == (300.0, 10)


def test_syslog_message_is_rfc5424_with_the_record_whole():
    row = (7, 1712345678.25, "acme", "unix:uid=0", "denied", "sb-1", "",
           '{"reason":"x]\\"y"}', "0" * 64, "a" * 64)
    msg = syslog_message(row, "host1", facility=13)
    head, _, body = msg.partition(b"\xef\xbb\xbf")
    assert head == (f'<108>1 2024-04-05T19:34:38.250000Z host1 corral {os.getpid()} denied '
                    f'[corral@32473 seq="7" hash="{"a" * 64}" tenant="acme" sandbox="sb-1"] '
                    ).encode()
    assert json.loads(body)["detail_json"] == row[7]


# -- export lines ---------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from corral.runtime.audit_records import _EXPORT_NAMES, _canonical_json, jsonl_lines  # noqa: E402

_text = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(1, 1 << 62), st.floats(allow_nan=False, allow_infinity=False),
                 _text, _text, _text, _text, _text, _text, _text, _text))
def test_export_lines_are_byte_identical_to_canonical_json(row):
    assert jsonl_lines([row]) == _canonical_json(dict(zip(_EXPORT_NAMES, row, strict=True))) + "\n"


def test_export_lines_of_odd_types_fall_back_to_canonical_json():
    row = (3, 7, "t", "p", "k", "", "", "{}", None, b"x".decode())  # int time, None hash
    assert jsonl_lines([row]) == _canonical_json(dict(zip(_EXPORT_NAMES, row, strict=True))) + "\n"


def test_otlp_sink_emits_one_log_record_per_audit_record_and_surfaces_failures():
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

    from corral.runtime.sinks import OtlpSink, SinkError

    memory = InMemoryLogRecordExporter()
    sink = OtlpSink("otel", "", exporter=memory)
    rows = [(1, 1.5, "acme", "p", "sandbox.create", "sb-1", "", "{}", "0" * 64, "a" * 64),
            (2, 2.5, "acme", "p", "denied", "", "", '{"reason":"x"}', "a" * 64, "b" * 64)]
    sink.deliver(rows)
    got = memory.get_finished_logs()
    assert [(g.log_record.attributes["corral.seq"], g.log_record.severity_text,
             g.log_record.timestamp) for g in got] == [(1, "INFO", 1_500_000_000),
                                                       (2, "WARN", 2_500_000_000)]
    assert json.loads(got[1].log_record.body)["hash"] == "b" * 64

    class Down(InMemoryLogRecordExporter):
        def export(self, batch):
            raise ConnectionRefusedError("collector at 127.0.0.1:4317 refused")

    down = OtlpSink("otel", "", exporter=Down())
    with pytest.raises(SinkError, match=r"^OTLP export of record 1 failed: collector at "
                                        r"127.0.0.1:4317 refused$"):
        down.deliver(rows)


def test_a_rotated_key_verifies_with_both_public_keys(tmp_path):
    log = AuditLog.open(tmp_path / "audit.db")
    old = FileSigner.load_or_create(str(tmp_path / "old"))
    new = FileSigner.load_or_create(str(tmp_path / "new"))
    for signer in (old, new):  # a daemon restarted with a new key
        cp = Checkpointer(log, signer, every_records=100, interval_s=3600)
        log.append("x.act", tenant="t")
        cp.close()
    rows = _rows(log)
    assert verify_signed(rows, [old.public_key, new.public_key]).ok
    only_new = verify_signed(rows, new.public_key)
    assert only_new.problem.startswith(f"record 2: the checkpoint is signed by key {old.key_id}, "
                                       f"not by the given public key ({new.key_id})")
    log.close()


def test_a_record_too_big_for_a_datagram_is_sent_as_a_named_stub():
    import socket as so

    from corral.runtime.sinks import SyslogSink

    rx = so.socket(so.AF_INET, so.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    sink = SyslogSink("s", f"127.0.0.1:{rx.getsockname()[1]}")
    big = json.dumps({"argv": ["x" * 60000, "y" * 30000]}, separators=(",", ":"))
    row = (9, 1.0, "t", "p", "exec.start", "sb", "", big, "0" * 64, "c" * 64)
    sink.deliver([row])
    body = json.loads(rx.recv(70000).split(b"\xef\xbb\xbf", 1)[1])
    assert (body["seq"], body["hash"]) == (9, "c" * 64)
    whole = len(syslog_message(row, sink.hostname))
    assert whole > 65000
    assert json.loads(body["detail_json"]) == {"corral.truncated": "datagram", "bytes": whole}
    sink.close()
    rx.close()
