"""CLI verbs for security teams: `corral policy check|diff` (offline) and `corral report`."""

from __future__ import annotations

import json
import sys

from corral.sandbox.errors import CorralError

from .terminal import visible

EXIT_USAGE = 2


def _fail(message: str, code: int = 1) -> int:
    print(f"corral: {visible(message)}", file=sys.stderr)
    return code


def policy(args) -> int:
    from .policy_files import load_book, policy_digest, widenings

    if args.policy_verb is None:
        return _fail("policy: which one? check or diff", EXIT_USAGE)
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
        return _fail(f"policy: {exc}", EXIT_USAGE)
    lines = widenings(old, new)
    for line in lines:
        print(line)
    if not lines:
        print(f"{args.new} allows nothing that {args.old} did not")
    return 1 if lines else 0


def report(args) -> int:
    from . import report as report_mod
    from .cli_client import _connect
    from .client import ClientError

    if args.check:
        return _check_report(args)
    if not args.sandbox:
        return _fail("report: which sandbox? corral report SANDBOX", EXIT_USAGE)
    try:
        with _connect(args) as client:
            answer = client.audit_report(args.sandbox, run_probes=args.probes)
    except ClientError as exc:
        return _fail(f"report: {exc}", EXIT_USAGE if exc.code.name == "INVALID_ARGUMENT" else 1)
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
    from .signing import load_public_key, verify_document

    if not args.pubkey:
        return _fail("report: --check needs --pubkey FILE", EXIT_USAGE)
    try:
        key = load_public_key(args.pubkey)
        with open(args.check, encoding="utf-8") as f:
            saved = json.load(f)
        body, signature = saved["report"], saved["signature"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _fail(f"report: {args.check}: not a saved JSON report ({exc})", EXIT_USAGE)
    except CorralError as exc:
        return _fail(f"report: {exc}", 1)
    problem = verify_document(body, signature, key)
    if problem:
        return _fail(f"report: {args.check}: BROKEN: {problem}", 1)
    print(f"report OK: sandbox {body.get('sandbox_id')} signed by key {signature['key_id']} "
          f"(sha256 {signature['sha256']})")
    return 0

