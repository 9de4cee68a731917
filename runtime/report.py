"""`corral report SB`: a signed attestation of one sandbox, for a ticket or an audit folder.

The daemon assembles it (`build`) from what it can prove, each part named by its source:

* ``effective_policy``: read back from the kernel, as `corral inspect` does (namespaces,
  mounts, seccomp, landlock, cgroup limits, egress), with ``mismatches`` against the spec;
* ``requested_spec``: the spec the sandbox was created with, and ``sandbox_policy_digest``;
* ``tenant_policy``: the digest of the operator's tenant policy in force and this tenant's
  effective policy;
* ``egress``: the spec's rules, and from the audit trail the connection attempts by
  decision and destination (denials listed);
* ``probes``: the verdicts of the conformance probe suite (`corral probe`) for the
  sandbox's policy class (backend, seccomp profile, kernel release), cached in
  ``<state>/probe-cache/`` per class digest; run on request (``--probes``);
* ``lifecycle``: every non-egress audit record of the sandbox (seq, time, kind, hash);
* ``audit_head``: seq and hash of the newest record when the report was made.

The signature (runtime/signing.py `sign_document`) is Ed25519, with the audit key, over the
sha256 of the report's canonical JSON; ``corral report --check FILE --pubkey KEY`` checks a
saved report. Making a report is itself recorded (``sandbox.report``, with that sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import Counter
from typing import Any

from corral.sandbox.errors import CorralError

from .signing import _canonical, sign_document

MAX_LIFECYCLE_RECORDS = 10_000
_MAX_DESTINATIONS = 200


class ReportUnavailable(CorralError):
    """The daemon cannot sign reports (signing is off)."""

    grpc_status = "FAILED_PRECONDITION"


def _egress(spec_rules, records) -> dict[str, Any]:
    by_kind: Counter = Counter()
    allowed: Counter = Counter()
    denied: Counter = Counter()
    for rec in records:
        if not rec.kind.startswith("net."):
            continue
        by_kind[rec.kind] += 1
        d = rec.detail
        if rec.kind == "net.summary":
            continue
        dest = f"{d.get('name') or d.get('address') or '?'}:{d.get('port', '')}"
        decision = d.get("decision", "")
        if decision == "allow":
            allowed[dest] += 1
        elif decision:
            denied[(dest, d.get("reason", ""))] += 1
    return {
        "rules": list(spec_rules),
        "records": dict(sorted(by_kind.items())),
        "allowed": [{"destination": k, "count": n}
                    for k, n in allowed.most_common(_MAX_DESTINATIONS)],
        "denied": [{"destination": k[0], "reason": k[1], "count": n}
                   for k, n in denied.most_common(_MAX_DESTINATIONS)],
    }


_probe_lock = threading.Lock()


def probe_class(spec) -> dict:
    """What the probe suite's verdicts depend on: the backend, the seccomp profile (a
    profile file by the sha256 of its content) and the kernel."""
    profile = spec.profile
    if os.path.isabs(profile):
        try:
            with open(profile, "rb") as f:
                profile = f"{profile} sha256:{hashlib.sha256(f.read()).hexdigest()}"
        except OSError:
            profile = f"{profile} (unreadable)"
    cls = {"backend": spec.backend, "profile": profile, "kernel": os.uname().release}
    cls["digest"] = "sha256:" + hashlib.sha256(_canonical(cls).encode()).hexdigest()
    return cls


def probe_verdicts(state_dir: str, spec, run: bool) -> dict[str, Any]:
    """Cached verdicts of the probe suite for the spec's policy class on this kernel; with
    run=True the suite runs (about 30 s, one run at a time) when none are cached."""
    from corral.sandbox.probes import suite

    cls = probe_class(spec)
    folder = os.path.join(state_dir, "probe-cache")
    path = os.path.join(folder, cls["digest"].removeprefix("sha256:") + ".json")
    with _probe_lock:
        try:
            with open(path, encoding="utf-8") as f:
                return {"status": "cached", **json.load(f)}
        except (OSError, ValueError):
            pass
        if not run:
            return {"status": "not run", "class": cls,
                    "how": "corral report SANDBOX --probes runs them (about 30 s); they are "
                           "cached per policy class and kernel"}
        started = time.time()
        results = suite.run_suite(spec.backend, profile=spec.profile)
        entry = {"class": cls, "ran_at": started, "summary": suite.summary(results),
                 "probes": [{"name": r.name, "category": r.category, "verdict": r.verdict}
                            for r in results]}
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(entry, f, sort_keys=True)
        os.replace(tmp, path)
        return {"status": "ran", **entry}


async def build(daemon, caller, sandbox_id: str, *, run_probes: bool = False
                ) -> tuple[dict, dict]:
    """(report, signature) for one of the caller's sandboxes.

    Raises:
        NotFound: no such sandbox of this tenant. ReportUnavailable: signing is off.
    """
    import asyncio

    from google.protobuf import json_format

    from .api.sandboxes import spec_to_proto
    from .policy_files import describe

    gov = daemon.governance
    if gov is None or gov.signer is None:
        raise ReportUnavailable("reports are signed with the audit key, and signing is off "
                                "([audit] signing = false)")
    effective, mismatches, spec_digest = await daemon.sandboxes.inspect(caller, sandbox_id)
    msb = daemon.sandboxes.get(caller, sandbox_id)
    loop = asyncio.get_running_loop()
    records = await loop.run_in_executor(None, lambda: daemon.audit.query(
        sandbox_id=sandbox_id, limit=MAX_LIFECYCLE_RECORDS))
    probes = await loop.run_in_executor(None, probe_verdicts, daemon.config.state, msb.spec,
                                        run_probes)
    daemon.metrics.probes_ran(probes)
    head = await loop.run_in_executor(None, lambda: daemon.audit.query(limit=1, latest=True))
    spec = json_format.MessageToDict(spec_to_proto(msb.spec, msb.expires_at - msb.created_at),
                                     preserving_proto_field_name=True)
    report = {
        "type": "corral.sandbox-report/1",
        "sandbox_id": sandbox_id,
        "tenant": msb.tenant,
        "generated_at": time.time(),
        "kernel": os.uname().release,
        "requested_spec": spec,
        "sandbox_policy_digest": spec_digest,
        "effective_policy": effective,
        "mismatches": list(mismatches),
        "tenant_policy": {"digest": gov.policy_digest,
                          "policy": describe(daemon.policies.of(caller))},
        "egress": _egress(msb.spec.allow_net, records),
        "probes": probes,
        "lifecycle": [{"seq": r.seq, "time": r.time, "kind": r.kind, "hash": r.hash}
                      for r in records if not r.kind.startswith("net.")],
        "audit_head": {"seq": head[0].seq, "hash": head[0].hash} if head else {},
    }
    report = json.loads(_canonical(report))  # what the signature covers, exactly
    signature = await loop.run_in_executor(None, sign_document, gov.signer, report)
    daemon.audit.append("sandbox.report", tenant=caller.tenant, peer=caller.peer,
                        sandbox_id=sandbox_id, detail={"sha256": signature["sha256"],
                                                       "key_id": signature["key_id"]})
    return report, signature


def digest(report: dict) -> str:
    return hashlib.sha256(_canonical(report).encode("utf-8")).hexdigest()


def to_markdown(report: dict, signature: dict) -> str:
    """The report for people; the JSON form is what the signature covers."""
    out = [f"# Sandbox report: {report['sandbox_id']}", "",
           f"* tenant: `{report['tenant']}`",
           "* generated: "
           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(report['generated_at']))}"
           f" on kernel {report['kernel']}",
           f"* sandbox policy digest: `{report['sandbox_policy_digest']}`",
           f"* tenant policy digest: `{report['tenant_policy']['digest']}`",
           f"* audit head: record {report['audit_head'].get('seq', 0)} "
           f"`{report['audit_head'].get('hash', '')[:16]}...`", "",
           "## Requested spec", "", "```json",
           json.dumps(report["requested_spec"], indent=2, sort_keys=True), "```", "",
           "## Effective policy (read from the kernel)", ""]
    if report["mismatches"]:
        out += ["**Mismatches with the spec:**", ""]
        out += [f"* {m}" for m in report["mismatches"]]
    else:
        out.append("No mismatch with the spec.")
    out += ["", "```json", json.dumps(report["effective_policy"], indent=2, sort_keys=True),
            "```", "", "## Egress", ""]
    eg = report["egress"]
    out += ["Rules: " + (", ".join(f"`{r}`" for r in eg["rules"]) or "none (loopback only)"),
            ""]
    out += ["| decision | destination | count | reason |", "|---|---|---|---|"]
    out += [f"| allowed | `{a['destination']}` | {a['count']} | |" for a in eg["allowed"]]
    out += [f"| denied | `{d['destination']}` | {d['count']} | {d['reason']} |"
            for d in eg["denied"]]
    pr = report.get("probes", {})
    out += ["", "## Probe verdicts for this policy class", ""]
    if pr.get("summary"):
        cls = pr["class"]
        out.append(f"{pr['status']}: backend {cls['backend']}, profile `{cls['profile']}`, "
                   f"kernel {cls['kernel']}: " + ", ".join(
                       f"{n} {k}" for k, n in sorted(pr["summary"].items())))
        escaped = [p["name"] for p in pr["probes"] if p["verdict"] == "ESCAPED"]
        if escaped:
            out.append("**ESCAPED:** " + ", ".join(f"`{n}`" for n in escaped))
    else:
        out.append(f"{pr.get('status', 'not run')}: {pr.get('how', '')}")
    out += ["", "## Lifecycle (audit records)", "", "| seq | time | kind |", "|---|---|---|"]
    out += [f"| {r['seq']} | {time.strftime('%H:%M:%S', time.gmtime(r['time']))} | {r['kind']} |"
            for r in report["lifecycle"]]
    out += ["", "## Signature", "",
            f"Ed25519 key `{signature['key_id']}` over sha256 `{signature['sha256']}` of the "
            "report's canonical JSON (`corral report SB --format json` keeps both; `corral "
            "report --check FILE --pubkey KEY` verifies):", "",
            f"`{signature['signature']}`", ""]
    return "\n".join(out)
