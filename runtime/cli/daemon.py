"""`corral daemon`: its flags, each also a setting of the --config TOML file, and the start."""

from __future__ import annotations

import argparse

from .exits import EXIT_USAGE
from .output import fail

DAEMON_DESCRIPTION = """\
Run the Corral daemon: sandboxes, sessions and the audit log over gRPC. Every flag can also be
set in the --config TOML file under the same name (with '_' for '-'); flags win."""
DAEMON_EPILOG = """\
Tenant policy (TOML only; docs/policy.md): [policy] bounds every tenant that is not an operator:
profiles (default: ["default"]), allow_net (default: ["public"], i.e. no address rule touching
loopback, private, link-local or reserved space), max_memory (4G), max_pids (1024), max_cpus
(host cores), max_tmp (1G), max_ttl (the sandbox TTL), max_priority (10), and the quotas
max_sandboxes (32), max_sessions (32), max_running_tasks (4), max_queued_tasks (1000),
max_request_rate (200 a second). The same keys in [tenants.NAME] apply to that tenant on top of
[policy]. Operators get the host's size as their only limit. A request over a limit is
PERMISSION_DENIED, over a quota RESOURCE_EXHAUSTED; both are audited as 'denied'. policy_file =
FILE|DIR reads [policy] and [tenants.NAME] policy keys from version-controlled files instead
(`corral policy check|diff`); SIGHUP reloads them, as an audited, signed policy.reload record.
[audit] (docs/operations.md): signing_key (default <state>/audit-signing.key, made at first
start, public half in .pub) or signing_command + signing_public_key, checkpoint_records (1000),
checkpoint_interval (60s), and [audit.sinks.NAME] tables: type = file|syslog|otlp."""


def add_parsers(sub) -> None:
    daemon = sub.add_parser(
        "daemon", help="run the gRPC daemon",
        description=DAEMON_DESCRIPTION,
        epilog=DAEMON_EPILOG,
    )
    _add_serving_flags(daemon)
    _add_telemetry_flags(daemon)
    _add_audit_and_retention_flags(daemon)
    daemon.add_argument("--mux-interval-ms", metavar="MS", type=float,
                        help="Sessions.OpenMany: least ms between two messages of one stream; "
                             "its sessions' news travels together (default: 2; 0: at once)")
    daemon.set_defaults(handler=cmd_daemon)


def _add_serving_flags(p: argparse.ArgumentParser) -> None:
    """Where it listens and keeps its state, TLS, lifetimes, and workspace and disk caps."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--socket", metavar="PATH",
                   help="unix socket, mode 0600 (default: $XDG_RUNTIME_DIR/corral.sock "
                        "or /run/corral/corral.sock)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also listen on TCP; clients need a tenant's bearer token")
    p.add_argument("--state", metavar="DIR",
                   help="state directory: audit.db (default: /var/lib/corral)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate for --listen")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key for --listen")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--session-idle-ttl", metavar="DURATION",
                   help="reap a session nobody watched for this long (default: 5m)")
    p.add_argument("--sandbox-ttl", metavar="DURATION",
                   help="longest life of a sandbox (default: 1h)")
    p.add_argument("--max-sandboxes", metavar="N", type=int,
                   help="most sandboxes at once (default: 512)")
    p.add_argument("--workspace-root", metavar="DIR",
                   help="root-only directory of every workspace, each a tmpfs mounted "
                        "nosuid,nodev with a byte and inode cap (default: "
                        "/run/corral/workspaces)")
    p.add_argument("--workspace-size", metavar="SIZE",
                   help="byte cap of one workspace; its bytes are memory, charged to the "
                        "sandbox's memory limit (default: 1G)")
    p.add_argument("--workspace-inodes", metavar="N", type=int,
                   help="inode (file) cap of one workspace (default: 65536)")
    p.add_argument("--disk-reserve", metavar="SIZE",
                   help="bytes kept in <state>/.reserve and released when the state "
                        "filesystem fills, so audit and task records still write; new "
                        "work is refused (RESOURCE_EXHAUSTED, health NOT_SERVING) until "
                        "twice that is free (default: 64M, at most 5%% of the filesystem)")


def _add_telemetry_flags(p: argparse.ArgumentParser) -> None:
    """Metrics, spans and the log format: all off or plain unless asked for."""
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. "
                        "127.0.0.1:9464 (port 0: any free one, recorded as metrics_port "
                        "in daemon.start); loopback only unless --metrics-public; "
                        "default: off (docs/operations.md lists every metric)")
    p.add_argument("--metrics-public", action="store_true", default=None,
                   help="allow a --metrics address that is not loopback")
    p.add_argument("--tracing", metavar="otlp|file:PATH",
                   help="OpenTelemetry spans per RPC and per sandbox phase: otlp "
                        "(OTLP/gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT; pip install "
                        "'corral[otlp]') or file:PATH (one JSON object a span); "
                        "default: off, nothing imported")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="daemon log on stderr: text (default) or json, one object a "
                        "line with time, level, logger, message and the tenant, "
                        "sandbox, session and task ids when known")


def _add_audit_and_retention_flags(p: argparse.ArgumentParser) -> None:
    """How the audit log is checked, cut into segments and pruned; how long finished tasks stay."""
    p.add_argument("--verify-audit", choices=("full", "tail"),
                   help="audit check at start: 'tail' checks the head anchor and the "
                        "records past it; 'full' re-hashes every record of every segment "
                        "(streamed) and refuses to start on a broken chain (default: tail)")
    p.add_argument("--audit-segment-records", metavar="N", type=int,
                   help="seal the active audit segment into <state>/audit.db.segments/ "
                        "at N records, its audit.seal included; each segment's first "
                        "record chains to the previous seal, so `corral audit verify` "
                        "still proves the whole history (default: 100000; 0: no limit)")
    p.add_argument("--audit-segment-size", metavar="SIZE",
                   help="... or at about SIZE of record content (default: 64M; 0: none)")
    p.add_argument("--audit-retention", metavar="DURATION",
                   help="remove sealed audit segments whose last record is older than "
                        "this (e.g. 90d), at start and at each rotation, after an "
                        "audit.prune record 'pruned up to seq N, hash H' that verify "
                        "checks (default: forever)")
    p.add_argument("--task-retention", metavar="DURATION",
                   help="remove a finished task (its row, RESULT, output files, log, "
                        "checkpoint) and a lost attempt's workspace this long after it "
                        "ended, behind a task.expired record; 0: keep them (default: 7d)")


def cmd_daemon(args: argparse.Namespace) -> int:
    from corral.runtime import config, daemon
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import parse_duration, parse_size

    try:
        overrides = {
            "socket": args.socket, "listen": args.listen, "state": args.state,
            "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca, "max_sandboxes": args.max_sandboxes,
            "mux_interval_ms": args.mux_interval_ms,
            "workspace_root": args.workspace_root, "workspace_inodes": args.workspace_inodes,
            "workspace_bytes": (parse_size(args.workspace_size, "workspace-size")
                                if args.workspace_size else None),
            "disk_reserve_bytes": (config.size_or_zero(args.disk_reserve, "disk-reserve")
                                   if args.disk_reserve else None),
            "session_idle_ttl_s": (parse_duration(args.session_idle_ttl, "session-idle-ttl")
                                   if args.session_idle_ttl else None),
            "sandbox_ttl_s": (parse_duration(args.sandbox_ttl, "sandbox-ttl")
                              if args.sandbox_ttl else None),
            "verify_audit": args.verify_audit,
            "audit_segment_records": args.audit_segment_records,
            "audit_segment_bytes": (config.size_or_zero(args.audit_segment_size,
                                                        "audit-segment-size")
                                    if args.audit_segment_size else None),
            "audit_retention_s": (config.retention_seconds(args.audit_retention,
                                                           "audit-retention")
                                  if args.audit_retention else None),
            "task_retention_s": (config.retention_seconds(args.task_retention,
                                                          "task-retention")
                                 if args.task_retention else None),
            "metrics": args.metrics, "metrics_public": args.metrics_public,
            "log_format": args.log_format, "tracing": args.tracing,
        }
        cfg = config.load(args.config, overrides)
    except InvalidSpec as exc:
        return fail(f"daemon: {exc}", EXIT_USAGE, escape=False)
    return daemon.run(cfg)

