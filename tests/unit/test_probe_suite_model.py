"""The probe suite's model without a sandbox: the list, the judges, outcomes and reports."""

from __future__ import annotations

import json
import signal

import pytest

from corral.sandbox.probes import suite
from corral.sandbox.probes.suite import Outcome, Result


def test_at_least_50_uniquely_named_probes_in_every_category():
    names = suite.probe_names()
    assert len(names) >= 50
    assert len(set(names)) == len(names)
    assert {p.category for p in suite.PROBES} == set(suite.CATEGORIES)
    for p in suite.PROBES:
        assert p.contained is not None, p.name
        assert p.attempt, p.name
        assert p.args or p.procedure, p.name


def test_issue_checklist_is_covered():
    names = set(suite.probe_names())
    assert {"caps-effective", "seccomp-mode", "io-uring-setup", "userfaultfd", "keyctl", "bpf",
            "perf-event-open", "kexec-load", "init-module", "open-by-handle-at", "fsopen",
            "af-vsock", "af-alg", "netlink-setlink", "unshare-user", "setuid-binary",
            "ptrace-pid1", "proc-self-exe-write", "host-file", "core-pattern", "sys-write",
            "proc-kcore", "kallsyms", "device-nodes", "host-file-symlink", "file-api-links",
            "fork-bomb", "memory-balloon", "disk-fill-tmp", "fd-exhaustion", "stdout-flood",
            "double-fork-survivor", "timeout", "host-loopback", "engine-sockets",
            "metadata-route", "raw-socket", "dns-route", "tiocsti-stdin"} <= names


def test_inside_program_defines_every_op_the_probes_use():
    namespace: dict = {"__name__": "not_main"}
    exec(compile(suite.inside_source(), "inside.py", "exec"), namespace)  # defines only
    for p in suite.PROBES:
        if p.args and not callable(p.args):
            assert p.args[0] in namespace["OPS"], p.name


@pytest.mark.parametrize("outcome,short,evidence", [
    (Outcome(True, value={"a": 1}), "ok", 'ok: {"a": 1}'),
    (Outcome(False, "EPERM", "x"), "EPERM", "EPERM (Operation not permitted)"),
    (Outcome(None, returncode=-signal.SIGSYS, reason="signaled"), "SIGSYS", "killed by SIGSYS"),
    (Outcome(None, returncode=-9, reason="oom"), "SIGKILL", "killed by SIGKILL (oom)"),
    (Outcome(False, "EAGAIN", {"errno": "EAGAIN", "forked": 3}), "EAGAIN",
     'EAGAIN: {"errno": "EAGAIN", "forked": 3}'),
    (Outcome(None, returncode=3), "exit 3", "exit 3"),
])
def test_outcome_words(outcome, short, evidence):
    assert (outcome.short, outcome.evidence()) == (short, evidence)


def test_parse_report_takes_the_last_json_line_or_the_signal():
    o = suite.parse_report(b'noise\n{"op": "x", "ok": false, "errno": "EPERM", "value": "m"}\n',
                           b"", 0, "exited")
    assert (o.ok, o.errno) == (False, "EPERM")
    killed = suite.parse_report(b"", b"Bad system call", -31, "signaled")
    assert (killed.ok, killed.short) == (None, "SIGSYS")


def test_denied_judge():
    judge = suite.denied("EPERM", "ENOSYS", signals=(signal.SIGSYS,))
    assert judge(Outcome(False, "EPERM"), None)
    assert judge(Outcome(None, returncode=-signal.SIGSYS), None)
    assert not judge(Outcome(False, "EINVAL"), None)  # reached the kernel: escaped
    assert not judge(Outcome(True, value=3), None)
    assert not judge(Outcome(None, returncode=-signal.SIGKILL), None)


def test_select_by_name_and_category():
    assert [p.name for p in suite.select(["bpf"])] == ["bpf"]
    assert {p.category for p in suite.select(categories=["terminal"])} == {"terminal"}
    with pytest.raises(ValueError, match=r"^no probe named 'nope'$"):
        suite.select(["nope"])
    with pytest.raises(ValueError, match=r"^no category 'disk'; categories: identity, "):
        suite.select(categories=["disk"])


RESULTS = [
    Result("bpf", "kernel", "create an eBPF map", suite.CONTAINED, "EPERM", "EPERM (x)"),
    Result("keyctl", "kernel", "read a|keyring", suite.ESCAPED, "ok", "ok: 1"),
    Result("tiocsti-pty", "terminal", "TIOCSTI", suite.ERROR, "OSError", "broke"),
]


def test_reports():
    doc = json.loads(suite.to_json(RESULTS, backend="docker", profile="default"))
    assert doc["summary"] == {"contained": 1, "ESCAPED": 1, "error": 1}
    assert doc["probes"][1] == {"name": "keyctl", "category": "kernel",
                                "attempt": "read a|keyring", "verdict": "ESCAPED",
                                "outcome": "ok", "evidence": "ok: 1"}
    table = suite.render_table(RESULTS, backend="docker", profile="default")
    assert table.endswith("3 probes: 1 contained, 1 ESCAPED, 1 errors\n")
    assert "keyctl       kernel    ESCAPED    ok: 1" in table
    md = suite.render_markdown(RESULTS, backend="docker", profile="default")
    assert md.startswith("# Corral probe report: backend `docker`, profile `default`\n")
    assert "| `keyctl` | read a\\|keyring | **ESCAPED** | ok: 1 |" in md
    assert "## terminal" in md and "## network" not in md
