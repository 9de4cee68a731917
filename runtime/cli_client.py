"""CLI verbs that talk to a running daemon: ps, create, destroy, exec, session, audit, cp."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import grpc

from corral.sandbox.errors import CorralError, InvalidSpec
from corral.sandbox.spec import parse_duration, parse_size

from .client import Client, ClientError, decode_batch
from .terminal import TerminalWriter, visible

EXIT_USAGE = 2


def _fail(message: str, code: int = 1) -> int:
    # the daemon's messages may quote what a tenant or a sandbox wrote
    print(f"corral: {visible(message)}", file=sys.stderr)
    return code


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{flag} {path}: {exc.strerror}") from None


def _connect(args) -> Client:
    ca = getattr(args, "tls_ca", None)
    cert = getattr(args, "tls_client_cert", None)
    key = getattr(args, "tls_client_key", None)
    if bool(cert) != bool(key):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          "--tls-client-cert and --tls-client-key go together")
    return Client.connect(socket=args.socket, target=args.target, token=args.token,
                          tenant=args.tenant, root_certificates=_read_pem(ca, "--tls-ca"),
                          client_cert=_read_pem(cert, "--tls-client-cert"),
                          client_key=_read_pem(key, "--tls-client-key"))


def _argv(args) -> list[str]:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    return argv


def _env(items) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSpec("env", f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


def dispatch(args) -> int:
    try:
        verb = {"ps": ps, "create": create, "destroy": destroy, "exec": exec_,
                "session": session, "audit": audit, "inspect": inspect, "cp": cp,
                "sessions": sessions, "timeout": timeout, "stats": stats,
                "port": port}[args.verb]
        return verb(args)
    except InvalidSpec as exc:
        return _fail(f"{args.verb}: {exc}", EXIT_USAGE)
    except ClientError as exc:
        code = EXIT_USAGE if exc.code.name == "INVALID_ARGUMENT" else 1
        return _fail(f"{args.verb}: {exc}", code)


def cp(args) -> int:
    from . import cli_cp

    try:
        return cli_cp.run(args, _connect)
    except OSError as exc:  # a local path: one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"cp:{where}: {exc.strerror}")


def _labels(items) -> dict[str, str]:
    """--label KEY=VALUE flags (a bare KEY is an empty value); the daemon checks them."""
    labels = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise InvalidSpec("label", f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _shown_labels(labels) -> str:
    return ",".join(f"{k}={v}" if v else k for k, v in sorted(labels.items())) or "-"


def ps(args) -> int:
    from corral.v1 import sandbox_pb2

    state = sandbox_pb2.SANDBOX_STATE_DESTROYED if getattr(args, "destroyed", False) else 0
    with _connect(args) as client:
        boxes = client.list_sandboxes(getattr(args, "selector", ""), state)
    if args.json:
        from google.protobuf import json_format

        for b in boxes:
            print(json.dumps(json_format.MessageToDict(b)))
        return 0
    if not boxes:
        print("no sandboxes")
        return 0
    labelled = any(b.labels for b in boxes)
    print(f"{'SANDBOX':18} {'TENANT':10} {'AGE':>7} {'TTL LEFT':>9} {'MEMORY':>7}  COMMANDS"
          + ("  LABELS" if labelled else ""))
    now = time.time()
    for b in boxes:
        running = [e for e in b.execs if e.running]
        cmds = ", ".join(f"{e.id}:{visible(' '.join(e.argv)[:30])}" for e in running) or "-"
        print(f"{b.id:18} {b.tenant:10} {now - b.created_at:6.0f}s {b.expires_at - now:8.0f}s "
              f"{b.spec.memory_bytes >> 20:6d}M  {cmds}"
              + (f"  {_shown_labels(b.labels)}" if labelled else ""))
    return 0


def sessions(args) -> int:
    from corral.v1 import session_pb2

    state = {"running": session_pb2.SESSION_STATE_RUNNING,
             "exited": session_pb2.SESSION_STATE_EXITED}.get(args.state or "", 0)
    with _connect(args) as client:
        found = client.list_sessions(args.selector, state)
    if args.json:
        from google.protobuf import json_format

        for s in found:
            print(json.dumps(json_format.MessageToDict(s)))
        return 0
    if not found:
        print("no sessions")
        return 0
    print(f"{'SESSION':18} {'SANDBOX':18} {'STATE':8} {'AGE':>7} {'TURN':>5} {'LAST SEQ':>9}  "
          "LABELS")
    now = time.time()
    for s in found:
        state_name = "exited" if s.state == session_pb2.SESSION_STATE_EXITED else "running"
        print(f"{s.session_id:18} {s.sandbox_id:18} {state_name:8} {now - s.created_at:6.0f}s "
              f"{s.turn:5d} {s.last_seq:9d}  {_shown_labels(s.labels)}")
    return 0


def timeout(args) -> int:
    ttl = parse_duration(args.duration, "DURATION")
    with _connect(args) as client:
        sb = client.set_timeout(args.sandbox_id, max(1, round(ttl)))
    print(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sb.expires_at)))
    return 0


def port(args) -> int:
    if args.port is None:
        if args.remove or args.host_port:
            return _fail("port: --remove and --host-port need a PORT", EXIT_USAGE)
        with _connect(args) as client:
            for p in client.list_ports(args.sandbox_id):
                print(f"{p.port} -> {p.host_address}:{p.host_port}")
        return 0
    from .ports import check_port  # the daemon checks the same; a uint32 cannot be negative

    check_port("port", args.port)
    check_port("host_port", args.host_port, zero_ok=True)
    with _connect(args) as client:
        if args.remove:
            client.unexpose_port(args.sandbox_id, args.port)
            return 0
        p = client.expose_port(args.sandbox_id, args.port, args.host_port)
    print(f"{p.host_address}:{p.host_port}")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def stats(args) -> int:
    from google.protobuf import json_format

    interval = parse_duration(args.interval, "interval")
    header = f"{'CPU %':>7} {'MEMORY / LIMIT':>21} {'PIDS':>9} {'READ':>9} {'WRITTEN':>9} " \
             f"{'WORKSPACE':>9}"
    shown = 0
    with _connect(args) as client:
        samples = client.stats(args.sandbox_id, interval)
        try:
            for sample in samples:
                has = sample.HasField
                if args.no_stream and has("cpu_usage_us") and not has("cpu_percent"):
                    continue  # CPU needs a second sample
                if args.json:
                    print(json.dumps(json_format.MessageToDict(
                        sample, preserving_proto_field_name=True)), flush=True)
                else:
                    if shown == 0:
                        print(header)
                    cpu = f"{sample.cpu_percent:.1f}" if has("cpu_percent") else "-"
                    mem = _human_bytes(sample.memory_bytes) if has("memory_bytes") else "-"
                    pids = str(sample.pids) if has("pids") else "-"
                    read = _human_bytes(sample.io_read_bytes) if has("io_read_bytes") else "-"
                    wrote = _human_bytes(sample.io_write_bytes) if has("io_write_bytes") else "-"
                    ws = (_human_bytes(sample.workspace_bytes) if has("workspace_bytes")
                          else "-")
                    print(f"{cpu:>7} {mem + ' / ' + _human_bytes(sample.memory_limit_bytes):>21} "
                          f"{pids + '/' + str(sample.pids_limit):>9} {read:>9} {wrote:>9} "
                          f"{ws:>9}", flush=True)
                shown += 1
                if args.no_stream:
                    break
        except KeyboardInterrupt:
            return 130
        finally:
            samples.close()
    return 0


def create(args) -> int:
    spec: dict = {}
    if args.profile:
        spec["profile"] = args.profile
    if args.memory:
        spec["memory_bytes"] = parse_size(args.memory, "memory")
    if args.pids:
        spec["pids_max"] = args.pids
    if args.cpus:
        spec["cpus"] = args.cpus
    if args.ttl:
        spec["ttl_s"] = int(parse_duration(args.ttl, "ttl"))
    if args.env:
        spec["env"] = _env(args.env)
    if args.allow_net:
        spec["allow_net"] = args.allow_net
    if getattr(args, "backend", None):
        spec["backend"] = args.backend
    labels = _labels(getattr(args, "label", []))
    with _connect(args) as client:
        print(client.create_sandbox(labels=labels, request_id=getattr(args, "request_id", ""),
                                    **spec).id)
    return 0


#: Exit status of `corral inspect` when the live state differs from the spec.
EXIT_MISMATCH = 3


def inspect(args) -> int:
    from corral.sandbox.inspect import format_table

    with _connect(args) as client:
        resp = client.inspect_sandbox(args.sandbox_id)
    report = json.loads(resp.report_json)
    if args.json:
        print(json.dumps({"report": report, "mismatches": list(resp.mismatches),
                          "policy_digest": resp.policy_digest}, indent=2))
    else:
        print(format_table(report, list(resp.mismatches), resp.policy_digest))
    if resp.mismatches:
        print(f"corral: inspect: {args.sandbox_id} differs from its spec in "
              f"{len(resp.mismatches)} way(s)", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


def destroy(args) -> int:
    with _connect(args) as client:
        if client.destroy_sandbox(args.sandbox_id):
            print(f"corral: destroy: {args.sandbox_id} was already destroyed", file=sys.stderr)
    return 0


def exec_(args) -> int:
    argv = _argv(args)
    if not argv:
        return _fail("exec: no command given; usage: corral exec SANDBOX -- CMD [ARGS...]",
                     EXIT_USAGE)
    kw = {"env": _env(args.env)}
    if getattr(args, "allow_loss", False):
        kw["allow_loss"] = True
    if args.timeout:
        kw["timeout_s"] = parse_duration(args.timeout, "timeout")
    if getattr(args, "tty", False):
        if not os.isatty(0):
            return _fail("exec: -t needs a terminal on stdin (it is a pipe or a file); drop "
                         "-t to send stdin to the command", EXIT_USAGE)
        from . import interactive

        with _connect(args) as client:
            return interactive.exec_on_terminal(client, args.sandbox_id, argv, kw,
                                                interactive=args.interactive, raw=args.raw)
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        if data:
            kw["stdin"] = data
    sinks = {1: TerminalWriter(sys.stdout.buffer, raw=args.raw),
             2: TerminalWriter(sys.stderr.buffer, raw=args.raw)}
    try:
        return _exec_stream(args, argv, kw, sinks)
    finally:
        for sink in sinks.values():
            sink.close()


def _exec_stream(args, argv, kw, sinks) -> int:
    lost = {1: 0, 2: 0}  # entries (reads of the command's pipe) dropped, per stream
    with _connect(args) as client:
        for event in client.exec(args.sandbox_id, argv, **kw):
            kind = event.WhichOneof("event")
            if kind == "output":
                batch = event.output.batch
                if batch.HasField("lost"):
                    lost[event.output.stream] += batch.lost.count
                sinks[event.output.stream].write(batch.text)
            elif kind == "exited":
                ex = event.exited
                if ex.reason == "timeout":
                    _fail(f"{argv[0]}: killed after its timeout")
                    status = 124
                elif ex.reason == "oom":
                    _fail(f"{argv[0]}: killed by the memory limit (OOM)")
                    status = 137
                else:
                    status = ex.returncode if ex.returncode >= 0 else 128 - ex.returncode
                return _report_loss(argv, lost, status)
    return _fail("exec: the stream ended without an exit status")


def _report_loss(argv, lost: dict[int, int], status: int) -> int:
    """One stderr line when output was dropped (only --allow-loss allows it); the status is
    then non-zero: the command's own, or 1 when it exited 0."""
    if not any(lost.values()):
        return status
    parts = [f"{n} chunks of {name}" for name, n in (("stdout", lost[1]), ("stderr", lost[2]))
             if n]
    _fail(f"exec: {' and '.join(parts)} of {argv[0]} were lost (this reader was too slow; "
          f"the command exited with status {status})")
    return status or 1


def session(args) -> int:
    """Print tokens live; stdin lines steer; Ctrl-C interrupts, a second one detaches."""
    argv = _argv(args)
    cleanup: list = []
    with _connect(args) as client:
        try:
            return _session(args, argv, client, cleanup)
        finally:
            for fn in cleanup:
                try:
                    fn()
                except ClientError:
                    pass


def _upload_pair(item: str) -> tuple[str, str]:
    local, sep, remote = item.partition(":")
    if not os.path.isfile(local):
        raise InvalidSpec("put", f"{local!r} is not a file")
    return local, remote if sep else os.path.basename(local)


def _session(args, argv, client, cleanup) -> int:
    if args.attach:
        stream = client.resume_session(args.attach, args.after_seq, args.watch)
    else:
        if not argv:
            return _fail("session: no command given; usage: corral session -- CMD",
                         EXIT_USAGE)
        spec = {}
        if args.memory:
            spec["memory_bytes"] = parse_size(args.memory, "memory")
        uploads = [_upload_pair(item) for item in args.put]
        once = {"labels": _labels(getattr(args, "label", [])),
                "request_id": getattr(args, "request_id", "")}
        if uploads:
            sandbox = client.create_sandbox(**spec)
            cleanup.append(lambda: client.destroy_sandbox(sandbox.id))
            for local, remote in uploads:
                with open(local, "rb") as f:
                    client.write_file(sandbox.id, remote, f.read(),
                                      0o755 if os.access(local, os.X_OK) else 0o644)
            stream = client.open_session(argv, sandbox_id=sandbox.id,
                                         input=args.input or "", **once)
        else:
            stream = client.open_session(argv, input=args.input or "", **once, **spec)
    interrupts = []

    def on_sigint(_signum, _frame):
        interrupts.append(time.monotonic())
        if len(interrupts) == 1 and not args.watch:
            stream.interrupt()
        else:
            print(f"\ncorral: detached; `corral session --attach {stream.session_id} "
                  f"--after-seq {stream.last_seq}` comes back", file=sys.stderr)
            stream.detach()

    old = signal.signal(signal.SIGINT, on_sigint)
    if not args.watch:
        threading.Thread(target=_pump_lines, args=(stream,), daemon=True).start()
    tokens = 0
    started = time.monotonic()
    out = TerminalWriter(sys.stdout.buffer, raw=args.raw)
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "opened":
                print(f"corral: session {event.opened.session_id} in sandbox "
                      f"{event.opened.sandbox_id}", file=sys.stderr)
            elif kind == "batch":
                decoded = decode_batch(event.batch)
                tokens += len(decoded.texts)
                if decoded.lost:
                    print(f"\n[corral: {decoded.lost} entries were lost while this "
                          "client was behind]", file=sys.stderr)
                out.write("".join(decoded.texts).encode())
            elif kind == "turn_ended":
                interrupts.clear()
                print(f"\n[turn {event.turn_ended.turn} {visible(event.turn_ended.status)}]",
                      file=sys.stderr)
            elif kind == "exited":
                rate = tokens / max(time.monotonic() - started, 1e-9)
                print(f"corral: agent exited ({event.exited.reason}, code "
                      f"{event.exited.returncode}); {tokens} tokens, {rate:,.0f} tokens/s",
                      file=sys.stderr)
                code = event.exited.returncode
                return code if code >= 0 else 128 - code
    finally:
        out.close()
        signal.signal(signal.SIGINT, old)
    return 0


def _pump_lines(stream) -> None:
    try:
        for line in sys.stdin:
            stream.send_input(line.rstrip("\n"))
    except (OSError, ValueError):
        pass


def audit(args) -> int:
    from .audit import AuditLog, format_record

    verb = args.audit_verb
    if verb is None:
        return _fail("audit: which one? tail, query, verify or export", EXIT_USAGE)
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
            return _fail(f"audit: {exc}", 1)
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
            return _fail(f"audit: {exc}", 1)
        finally:
            log.close()
    with _connect(args) as client:
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
    from .audit import AuditLog

    if args.db:
        log = AuditLog.open(args.db, readonly=True)
        try:
            yield from log.row_batches(after_seq)
        finally:
            log.close()
        return
    with _connect(args) as client:
        while True:
            page = client.audit_query(after_seq=after_seq, limit=10_000)
            if not page:
                return
            yield [(r.seq, r.time, r.tenant, r.peer, r.kind, r.sandbox_id, r.session_id,
                    r.detail_json, r.prev_hash, r.hash) for r in page]
            after_seq = page[-1].seq


def _audit_export(args) -> int:
    from . import audit_export

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
        return _fail(f"audit: {exc}", 1)
    finally:
        if args.out:
            out.close()
    if args.cursor and last > after:
        audit_export.write_cursor(args.cursor, last)
    return 0


def _audit_verify_signed(args) -> int:
    from . import audit_export
    from .audit import AuditLog
    from .signing import load_public_key, verify_signed

    if not args.pubkey:
        return _fail("audit: verify --file needs --pubkey FILE (the daemon's "
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
        return _fail(f"audit: {exc}", 1)
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

    with _connect(args) as client:
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
