"""Verbs for security teams: `corral policy check|diff` (offline: tenant policy files) and
`corral report` (a sandbox's signed attestation report, or --check of a saved one)."""

from __future__ import annotations

import json

from corral.runtime.terminal import visible

from .connection import add_daemon_parser, connect, daemon_verb
from .exits import EXIT_USAGE
from .output import fail

POLICY_DESCRIPTION = """\
Tenant policy as code: a TOML file (or a directory of them) with [policy] and [tenants.NAME]
tables, as in the daemon config, without tokens; the daemon reads it from policy_file and
reloads it on SIGHUP (docs/policy.md). No daemon needed."""
DIFF_DESCRIPTION = """\
One line per widening: a new tenant, a seccomp profile, a network rule ("tenant acme may now
reach 10.0.0.0/8:5432"), each limit and each quota raised or lifted, for each tenant and for the
default of every other tenant. Exit 0 when B allows nothing more than A, 1 when it does, 2 on an
invalid file."""
REPORT_DESCRIPTION = """\
Ask the daemon for a report of SANDBOX: the effective policy read from the kernel, the requested
spec, its policy digests, the egress rules and attempts (denials listed), and its audit records,
signed with the audit key. --check verifies a saved JSON report against a public key."""


def add_parsers(sub) -> None:
    policy = sub.add_parser(
        "policy", help="check and compare tenant policy files",
        description=POLICY_DESCRIPTION)
    policy_sub = policy.add_subparsers(dest="policy_verb", metavar="VERB")
    pc = policy_sub.add_parser("check", help="validate a policy file or directory; print "
                                             "its digest")
    pc.add_argument("path", metavar="FILE|DIR")
    pd = policy_sub.add_parser(
        "diff", help="what B allows that A did not",
        description=DIFF_DESCRIPTION)
    pd.add_argument("old", metavar="A")
    pd.add_argument("new", metavar="B")
    policy.set_defaults(handler=policy_verb)

    report = add_daemon_parser(
        sub, "report", help="signed attestation report of a sandbox",
        description=REPORT_DESCRIPTION)
    report.add_argument("sandbox", nargs="?", metavar="SANDBOX")
    report.add_argument("--format", choices=("json", "markdown"), default="json")
    report.add_argument("--probes", action="store_true",
                        help="run the probe suite for the sandbox's policy class when no "
                             "verdicts are cached for it on this kernel (about 30 s)")
    report.add_argument("--check", metavar="FILE",
                        help="verify a report saved with --format json (needs --pubkey)")
    report.add_argument("--pubkey", metavar="FILE", help="the audit key's public half")
    report.set_defaults(handler=report_verb)


def policy_verb(args) -> int:
    from corral.runtime.policy_files import load_book, policy_digest, widenings
    from corral.sandbox.errors import CorralError

    if args.policy_verb is None:
        return fail("policy: which one? check or diff", EXIT_USAGE)
    try:
        if args.policy_verb == "check":
            book = load_book(args.path)
            tenants = sorted(book.per_tenant)
            print(f"policy OK: {args.path}: {policy_digest(book)} ("
                  + (f"tenants {', '.join(tenants)}; " if tenants else "")
                  + "default policy for every other tenant)")
            return 0
        old, new = load_book(args.old), load_book(args.new)
    except CorralError as exc:
        return fail(f"policy: {exc}", EXIT_USAGE)
    lines = widenings(old, new)
    for line in lines:
        print(line)
    if not lines:
        print(f"{args.new} allows nothing that {args.old} did not")
    return 1 if lines else 0


@daemon_verb
def report_verb(args) -> int:
    from corral.runtime import report as report_mod

    if args.check:
        return _check_report(args)
    if not args.sandbox:
        return fail("report: which sandbox? corral report SANDBOX", EXIT_USAGE)
    with connect(args) as client:
        answer = client.audit_report(args.sandbox, run_probes=args.probes)
    body = json.loads(answer.report_json)
    signature = json.loads(answer.signature_json)
    if args.format == "json":
        print(json.dumps({"report": body, "signature": signature}, indent=2, sort_keys=True,
                         ensure_ascii=False))
    else:
        # tenant text (argv, names) is in it: each line shown escaped, as `audit` does
        print("\n".join(visible(line) for line in
                        report_mod.to_markdown(body, signature).split("\n")))
    return 0


def _check_report(args) -> int:
    from corral.runtime.signing import load_public_key, verify_document
    from corral.sandbox.errors import CorralError

    if not args.pubkey:
        return fail("report: --check needs --pubkey FILE", EXIT_USAGE)
    try:
        key = load_public_key(args.pubkey)
        with open(args.check, encoding="utf-8") as f:
            saved = json.load(f)
        body, signature = saved["report"], saved["signature"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return fail(f"report: {args.check}: not a saved JSON report ({exc})", EXIT_USAGE)
    except CorralError as exc:
        return fail(f"report: {exc}", 1)
    problem = verify_document(body, signature, key)
    if problem:
        return fail(f"report: {args.check}: BROKEN: {problem}", 1)
    print(f"report OK: sandbox {body.get('sandbox_id')} signed by key {signature['key_id']} "
          f"(sha256 {signature['sha256']})")
    return 0
