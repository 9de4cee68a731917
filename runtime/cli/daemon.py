"""`corral daemon`: its flags, each also a setting of the --config TOML file, and the start."""

from __future__ import annotations

import argparse
from typing import NamedTuple

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


class _Flag(NamedTuple):
    """One `corral daemon` flag and the --config setting it overrides."""

    name: str
    metavar: str | None
    help: str
    type: type | None = None
    choices: tuple[str, ...] | None = None
    #: the setting's name where it is not the flag's ("workspace_bytes" for --workspace-size)
    setting: str = ""
    #: how the flag's text becomes the setting's value: a key of _readers(); "" as it is
    read: str = ""

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


#: Where it listens and keeps its state, TLS, lifetimes, and workspace and disk caps.
_SERVING_FLAGS = (
    _Flag("--socket", "PATH", "unix socket, mode 0600 (default: $XDG_RUNTIME_DIR/corral.sock "
                              "or /run/corral/corral.sock)"),
    _Flag("--listen", "HOST:PORT", "also listen on TCP; clients need a tenant's bearer token"),
    _Flag("--state", "DIR", "state directory: audit.db (default: /var/lib/corral)"),
    _Flag("--tls-cert", "PEM", "TLS certificate for --listen"),
    _Flag("--tls-key", "PEM", "TLS private key for --listen"),
    _Flag("--tls-client-ca", "PEM", "require client certificates signed by this CA (mTLS)"),
    _Flag("--session-idle-ttl", "DURATION",
          "reap a session nobody watched for this long (default: 5m)",
          setting="session_idle_ttl_s", read="duration"),
    _Flag("--sandbox-ttl", "DURATION", "longest life of a sandbox (default: 1h)",
          setting="sandbox_ttl_s", read="duration"),
    _Flag("--max-sandboxes", "N", "most sandboxes at once (default: 512)", type=int),
    _Flag("--workspace-root", "DIR",
          "root-only directory of every workspace, each a tmpfs mounted nosuid,nodev with a "
          "byte and inode cap (default: /run/corral/workspaces)"),
    _Flag("--workspace-size", "SIZE",
          "byte cap of one workspace; its bytes are memory, charged to the sandbox's memory "
          "limit (default: 1G)", setting="workspace_bytes", read="size"),
    _Flag("--workspace-inodes", "N", "inode (file) cap of one workspace (default: 65536)",
          type=int),
    _Flag("--disk-reserve", "SIZE",
          "bytes kept in <state>/.reserve and released when the state filesystem fills, so "
          "audit and task records still write; new work is refused (RESOURCE_EXHAUSTED, "
          "health NOT_SERVING) until twice that is free (default: 64M, at most 5%% of the "
          "filesystem)", setting="disk_reserve_bytes", read="size_or_zero"),
    _Flag("--image-store-size", "SIZE",
          "bound of the image store's unpacked layers: past it, layers no image names, then "
          "the least recently used images no sandbox holds, are removed (default: 0, no "
          "bound)", setting="image_store_max_bytes", read="size_or_zero"),
)

#: Metrics, spans and the log format: all off or plain unless asked for.
_TELEMETRY_FLAGS = (
    _Flag("--metrics", "HOST:PORT",
          "serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9464 (port 0: "
          "any free one, recorded as metrics_port in daemon.start); loopback only unless "
          "--metrics-public; default: off (docs/operations.md lists every metric)"),
    _Flag("--tracing", "otlp|file:PATH",
          "OpenTelemetry spans per RPC and per sandbox phase: otlp (OTLP/gRPC to "
          "$OTEL_EXPORTER_OTLP_ENDPOINT; pip install 'corral[otlp]') or file:PATH (one JSON "
          "object a span); default: off, nothing imported"),
    _Flag("--log-format", None,
          "daemon log on stderr: text (default) or json, one object a line with time, level, "
          "logger, message and the tenant, sandbox, session and task ids when known",
          choices=("text", "json")),
)

#: How the audit log is checked, cut into segments and pruned; how long finished tasks stay.
_AUDIT_AND_RETENTION_FLAGS = (
    _Flag("--verify-audit", None,
          "audit check at start: 'tail' checks the head anchor and the records past it; "
          "'full' re-hashes every record of every segment (streamed) and refuses to start on "
          "a broken chain (default: tail)", choices=("full", "tail")),
    _Flag("--audit-segment-records", "N",
          "seal the active audit segment into <state>/audit.db.segments/ at N records, its "
          "audit.seal included; each segment's first record chains to the previous seal, so "
          "`corral audit verify` still proves the whole history (default: 100000; 0: no "
          "limit)", type=int),
    _Flag("--audit-segment-size", "SIZE",
          "... or at about SIZE of record content (default: 64M; 0: none)",
          setting="audit_segment_bytes", read="size_or_zero"),
    _Flag("--audit-retention", "DURATION",
          "remove sealed audit segments whose last record is older than this (e.g. 90d), at "
          "start and at each rotation, after an audit.prune record 'pruned up to seq N, hash "
          "H' that verify checks (default: forever)",
          setting="audit_retention_s", read="retention"),
    _Flag("--task-retention", "DURATION",
          "remove a finished task (its row, RESULT, output files, log, checkpoint) and a lost "
          "attempt's workspace this long after it ended, behind a task.expired record; 0: "
          "keep them (default: 7d)", setting="task_retention_s", read="retention"),
    _Flag("--mux-interval-ms", "MS",
          "Sessions.OpenMany: least ms between two messages of one stream; its sessions' "
          "news travels together (default: 2; 0: at once)", type=float),
    _Flag("--cgroup-pool-size", "N",
          "keep N sandbox cgroups ready per limits class: a create takes one instead of "
          "making it, and a destroy gives it back renewed (cgroup v1; counters, limits and "
          "freezer state reset) instead of removing it (default: 4; 0: none)", type=int),
    _Flag("--namespace-pool-size", "N",
          "keep N (user, network) namespace pairs ready, each made for one sandbox and "
          "joined by its PID 1 instead of created on its start's path (root; default: 4; "
          "0: none)", type=int),
)

#: The daemon's loop and collector (runtime/loop.py), chosen for latency by default.
_LOOP_FLAGS = (
    _Flag("--event-loop", None,
          "auto (default: uvloop when installed, else asyncio's), asyncio or uvloop",
          choices=("auto", "asyncio", "uvloop")),
    _Flag("--gc-policy", None,
          "latency (default: start-up frozen, full collections from a 60 s timer at an "
          "on-time tick of the loop) or default (Python's own collector)",
          choices=("latency", "default")),
)

_FLAGS = (*_SERVING_FLAGS, *_TELEMETRY_FLAGS, *_AUDIT_AND_RETENTION_FLAGS, *_LOOP_FLAGS)


def add_parsers(sub) -> None:
    daemon = sub.add_parser(
        "daemon", help="run the gRPC daemon",
        description=DAEMON_DESCRIPTION,
        epilog=DAEMON_EPILOG,
    )
    daemon.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for flag in _FLAGS:
        daemon.add_argument(flag.name, metavar=flag.metavar, help=flag.help, type=flag.type,
                            choices=flag.choices)
    daemon.add_argument("--metrics-public", action="store_true", default=None,
                        help="allow a --metrics address that is not loopback")
    daemon.add_argument("--live-restore", action="store_true", default=None,
                        help="keep sandboxes running across daemon restarts and stops, "
                             "re-adopted by the next daemon (docs/operations.md, Live "
                             "restore); default: off")
    daemon.set_defaults(handler=cmd_daemon)


def _readers() -> dict:
    """How a flag's text is read into its setting's value (imported on use: `corral daemon`
    only, never another verb, pays for the sandbox modules these load)."""
    from corral.runtime import config
    from corral.sandbox.spec import parse_duration, parse_size

    return {"size": parse_size, "size_or_zero": config.size_or_zero,
            "duration": parse_duration, "retention": config.retention_seconds}


def cmd_daemon(args: argparse.Namespace) -> int:
    from corral.runtime import config, daemon
    from corral.sandbox.errors import InvalidSpec

    readers = _readers()
    try:
        overrides = {"metrics_public": args.metrics_public, "live_restore": args.live_restore}
        for flag in _FLAGS:
            value = getattr(args, flag.dest)
            if flag.read:  # unset or empty: the file's; the flag's name names what is wrong
                value = readers[flag.read](value, flag.name[2:]) if value else None
            overrides[flag.setting or flag.dest] = value
        cfg = config.load(args.config, overrides)
    except InvalidSpec as exc:
        return fail(f"daemon: {exc}", EXIT_USAGE, escape=False)
    return daemon.run(cfg)
