"""`corral audit tail|query|verify|export|status`: read, verify and export the audit log,
from the daemon or straight from an audit.db (--db) or an exported copy (verify --file)."""

from __future__ import annotations

import json
import os
import sys
import time

from corral.runtime.terminal import visible

from .connection import add_daemon_parser, connect, daemon_verb
from .exits import EXIT_USAGE
from .flags import add_flag_for
from .output import fail

AUDIT_DESCRIPTION = """\
Read and verify the audit log. One line per record; control, format and bidi characters a tenant
chose (argv, paths) are shown escaped (\\x9b, \\u202e), so a line reads as what was recorded;
--json gives the exact text."""


VERIFY_DESCRIPTION = """\
Recompute the hash chain and name the first broken record. With --pubkey, also check every \
audit.checkpoint signature against that Ed25519 public key (the daemon writes it to \
<state>/audit-signing.key.pub) and that every record is covered by one: a copy re-hashed end \
to end, head anchor included, fails, naming the first record past the last valid signature."""

EXPORT_DESCRIPTION = """\
Write records after --since (or the --cursor file's seq) as JSON lines: every column, \
detail_json verbatim, hashes, and the audit.checkpoint records that carry the signatures, so \
the output verifies with only the public key (`corral audit verify --file OUT --pubkey KEY`). \
--format ocsf writes OCSF 1.1 API Activity events (class 6003), each keeping the record whole \
under unmapped.corral_record."""


def _add_record_filters(ap) -> None:
    """tail's flags, which query's start with: which records, and how they print."""
    ap.add_argument("--sandbox", metavar="ID")
    ap.add_argument("--kind", metavar="KIND", help="exact kind or a prefix ending in '.'")
    ap.add_argument("--json", action="store_true", help="one JSON object per record")


def _add_query_flags(ap) -> None:
    _add_record_filters(ap)
    ap.add_argument("--session", metavar="ID")
    ap.add_argument("--since", metavar="DURATION", help="e.g. 1h: records newer than that")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--of-tenant", dest="for_tenant", metavar="NAME",
                    help="operators: another tenant's records")


def _add_verify_flags(ap) -> None:
    ap.description = VERIFY_DESCRIPTION
    ap.add_argument("--pubkey", metavar="FILE", action="append",
                    help="Ed25519 public key (PEM, or 32 bytes raw/hex/base64); repeat for a "
                         "log signed by a rotated key")
    add_flag_for(ap, "--pubkey", "--unsigned-tail-ok", action="store_true",
                 help="accept records after the last checkpoint (a running daemon's newest), "
                      "naming them, instead of failing")
    ap.add_argument("--file", metavar="EXPORT",
                    help="verify an exported copy (jsonl or ocsf lines, '-' for stdin) "
                         "instead: needs only --pubkey, no daemon, no db")


def _add_export_flags(ap) -> None:
    ap.description = EXPORT_DESCRIPTION
    ap.add_argument("--since", type=int, default=0, metavar="SEQ",
                    help="records after this seq (the last one you already have; default 0: "
                         "from the first)")
    ap.add_argument("--format", choices=("jsonl", "ocsf"), default="jsonl")
    ap.add_argument("--out", metavar="FILE", help="append to FILE (created 0600) instead of stdout")
    ap.add_argument("--cursor", metavar="FILE",
                    help="resume after the seq in FILE and store the last seq written there "
                         "once the output is flushed")


def _add_status_flags(ap) -> None:
    ap.add_argument("--json", action="store_true", help="the figures as JSON")


#: The audit verbs in `corral audit --help` order: name, help, and what adds the verb's own
#: flags after --db, which every one has.
AUDIT_VERBS = (
    ("tail", "follow new records", _add_record_filters),
    ("query", "search records", _add_query_flags),
    ("verify", "check the hash chain (and with --pubkey its signatures); exit 1 when broken",
     _add_verify_flags),
    ("export", "stream records with hashes and signatures, for a SIEM", _add_export_flags),
    ("status", "operators: signing key, checkpoints, each sink's lag", _add_status_flags),
)


def add_parsers(sub) -> None:
    audit = sub.add_parser(
        "audit", help="read and verify the audit log",
        description=AUDIT_DESCRIPTION)
    audit_sub = audit.add_subparsers(dest="audit_verb", metavar="VERB")
    for name, text, add_flags in AUDIT_VERBS:
        ap = add_daemon_parser(audit_sub, name, help=text)
        ap.add_argument("--db", metavar="FILE",
                        help="read this audit.db directly instead of asking the daemon")
        add_flags(ap)
    audit.set_defaults(handler=audit_verb)


@daemon_verb
def audit_verb(args) -> int:
    from corral.runtime.audit import AuditLog, format_record
    from corral.sandbox.errors import CorralError

    verb = args.audit_verb
    if verb is None:
        return fail("audit: which one? tail, query, verify or export", EXIT_USAGE)
    if verb == "export":
        return _audit_export(args)
    if verb == "status":
        return _audit_status(args)
    if verb == "verify" and (args.pubkey or args.file):
        return _audit_verify_signed(args)
    if args.db:
        try:
            log = AuditLog.open(args.db, readonly=True)
        except CorralError as exc:  # not a log, or too damaged to open: say which, no trace
            return fail(f"audit: {exc}", 1)
        try:
            if verb == "verify":
                result = log.verify()
                return _print_verify(result.ok, result.checked, result.broken_at_seq,
                                     result.problem, result.segments, result.first_seq)
            records = log.query(**_query_filters(args), latest=True)
            for rec in records:
                print(json.dumps(rec.to_dict()) if args.json else format_record(rec))
            return 0
        except CorralError as exc:
            return fail(f"audit: {exc}", 1)
        finally:
            log.close()
    with connect(args) as client:
        if verb == "verify":
            r = client.audit_verify()
            return _print_verify(r.ok, r.checked, r.broken_at_seq, r.problem, r.segments,
                                 r.first_seq)
        if verb == "query":
            for rec in client.audit_query(**_query_filters(args)):
                _print_record(rec, args.json)
            return 0
        try:
            last = client.audit_query(limit=1)
            after = last[-1].seq if last else 0
            for rec in client.audit_watch(after_seq=max(after - 10, 0),
                                          sandbox_id=args.sandbox or "", kind=args.kind or ""):
                _print_record(rec, args.json)
        except KeyboardInterrupt:
            return 0
    return 0


def _query_filters(args) -> dict:
    filters: dict = {}
    if getattr(args, "sandbox", None):
        filters["sandbox_id"] = args.sandbox
    if getattr(args, "session", None):
        filters["session_id"] = args.session
    if getattr(args, "kind", None):
        filters["kind"] = args.kind
    if getattr(args, "since", None):
        from corral.sandbox.spec import parse_duration

        filters["since"] = time.time() - parse_duration(args.since, "since")
    if getattr(args, "for_tenant", None):
        filters["tenant"] = args.for_tenant
    filters["limit"] = getattr(args, "limit", 100) or 100
    return filters


def _print_record(rec, as_json: bool) -> None:
    from google.protobuf import json_format

    if as_json:
        print(json.dumps(json_format.MessageToDict(rec, preserving_proto_field_name=True)))
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.time))
    ids = " ".join(x for x in (rec.sandbox_id, rec.session_id) if x)
    # tenant-chosen text (argv, paths, names) is shown escaped: \u202e, \x9b, \x1b
    print(visible(f"{stamp}Z #{rec.seq} {rec.tenant or '-'} {rec.kind} {ids} "
                  f"{rec.detail_json}"))


def _print_verify(ok: bool, checked: int, broken_at: int, problem: str, segments: int = 0,
                  first_seq: int = 0) -> int:
    if ok:
        extra = []
        if segments:
            extra.append(f"{segments} sealed segment{'s' if segments != 1 else ''} and the "
                         "active one")
        if first_seq > 1:
            extra.append(f"pruned up to record {first_seq - 1}, as its audit.prune record "
                         "states")
        print(f"audit chain OK: {checked} records verified"
              + (f" ({'; '.join(extra)})" if extra else ""))
        return 0
    print(f"audit chain BROKEN at record {broken_at}: {problem}", file=sys.stderr)
    return 1


def _audit_rows(args, after_seq: int):
    """Row tuples after a seq, in batches: from --db, or paged through the daemon's Query."""
    from corral.runtime.audit import AuditLog

    if args.db:
        log = AuditLog.open(args.db, readonly=True)
        try:
            yield from log.row_batches(after_seq)
        finally:
            log.close()
        return
    with connect(args) as client:
        while True:
            page = client.audit_query(after_seq=after_seq, limit=10_000)
            if not page:
                return
            yield [(r.seq, r.time, r.tenant, r.peer, r.kind, r.sandbox_id, r.session_id,
                    r.detail_json, r.prev_hash, r.hash) for r in page]
            after_seq = page[-1].seq


def _audit_export(args) -> int:
    from corral.runtime import audit_export
    from corral.sandbox.errors import CorralError

    after = args.since
    if args.cursor:
        after = max(after, audit_export.read_cursor(args.cursor))
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        out = open(fd, "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    else:
        out = sys.stdout
    last = after
    try:
        for rows in _audit_rows(args, after):
            out.write(audit_export.format_rows(rows, args.format))
            last = rows[-1][0]
        out.flush()
        if args.out:
            os.fsync(out.fileno())
    except BrokenPipeError:
        return 1  # the reader went away: the cursor stays where it was
    except CorralError as exc:
        return fail(f"audit: {exc}", 1)
    finally:
        if args.out:
            out.close()
    if args.cursor and last > after:
        audit_export.write_cursor(args.cursor, last)
    return 0


def _audit_verify_signed(args) -> int:
    from corral.runtime import audit_export
    from corral.runtime.audit import AuditLog
    from corral.runtime.signing import load_public_key, verify_signed
    from corral.sandbox.errors import CorralError

    if not args.pubkey:
        return fail("audit: verify --file needs --pubkey FILE (the daemon's "
                     "audit-signing.key.pub)", EXIT_USAGE)
    try:
        key = [load_public_key(path) for path in args.pubkey]
        if args.file:
            copy = sys.stdin if args.file == "-" else audit_export.open_copy(args.file)
            with copy:
                result = verify_signed(audit_export.read_copy(copy, args.file), key)
        else:
            if args.db:  # the chain, its anchor and segments first, as plain verify does
                log = AuditLog.open(args.db, readonly=True)
                try:
                    chain = log.verify()
                finally:
                    log.close()
                if not chain.ok:
                    return _print_verify(False, chain.checked, chain.broken_at_seq,
                                         chain.problem)
            result = verify_signed((r for rows in _audit_rows(args, 0) for r in rows), key)
    except CorralError as exc:
        return fail(f"audit: {exc}", 1)
    if result.unsigned_from and args.unsigned_tail_ok:
        print(f"audit chain OK: {result.checked} records verified, records "
              f"{result.first_seq}-{result.signed_through} signed by key "
              f"{result.key_id.replace(',', ' or ')}; records {result.unsigned_from}-"
              f"{result.last_seq} are not signed yet")
        return 0
    if not result.ok:
        print(f"audit signatures BROKEN at record {result.broken_at_seq}: {result.problem}",
              file=sys.stderr)
        return 1
    print(f"audit chain OK and signed: {result.checked} records verified, records "
          f"{result.first_seq}-{result.signed_through} pinned by {result.signatures} "
          f"checkpoint signature{'s' if result.signatures != 1 else ''} of key "
          f"{result.key_id.replace(',', ' or ')}")
    return 0


def _audit_status(args) -> int:
    from google.protobuf import json_format

    with connect(args) as client:
        st = client.audit_status()
    if args.json:
        print(json.dumps(json_format.MessageToDict(st, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True),
                         sort_keys=True))
        return 0
    print(f"last record {st.last_seq}; tenant policy {st.policy_digest or '-'} "
          f"({st.policy_reloads} reload{'s' if st.policy_reloads != 1 else ''})")
    if st.signing_key_id:
        print(f"signing key {st.signing_key_id}: {st.checkpoints} checkpoints, signed through "
              f"record {st.signed_through}, {st.unsigned_records} records since, "
              f"{st.signing_failures} failures")
    else:
        print("signing off")
    for s in st.sinks:
        print(visible(f"sink {s.name}: delivered through {s.delivered_seq}, lag {s.lag}, "
                      f"{s.errors} errors, {s.dropped} dropped"
                      + (f" (last error: {s.last_error})" if s.last_error else "")))
    return 0
