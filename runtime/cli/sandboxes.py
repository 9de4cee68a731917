"""`corral create`, `inspect`, `timeout`, `stats`, `port` and `destroy`: one sandbox on the
daemon, from its making to its end."""

from __future__ import annotations

import json
import sys
import time

from .connection import add_daemon_parser, add_target_parser, connect, daemon_verb, usage_error
from .exits import EXIT_USAGE
from .flags import (
    add_env_flag,
    add_from_flag,
    add_host_workspace_flags,
    add_label_flags,
    add_secret_flag,
    parse_env,
    parse_labels,
    parse_secrets,
)
from .output import fail

#: Exit status of `corral inspect` when the live state differs from the spec.
EXIT_MISMATCH = 3


TIMEOUT_DESCRIPTION = """\
Extend or shorten a sandbox's lifetime: the daemon destroys it DURATION from now (e.g. 30m, 2h).
Refused above the daemon's sandbox_ttl or the tenant's max_ttl. Prints the new expiry time."""
STATS_DESCRIPTION = """\
Print a sandbox's usage every INTERVAL until it is destroyed or you press Ctrl-C: CPU (percent
of one core over the interval), memory and its limit, processes and their limit, storage I/O,
workspace use. A figure this host cannot measure shows as '-'."""
INSPECT_DESCRIPTION = """\
Read the effective confinement of every process in SANDBOX from the live kernel (namespaces, id
maps, seccomp, capabilities, cgroup limits, mounts, landlock, interfaces and routes) and compare
it with the spec. Exit status 3 when anything differs from the spec."""
PORT_DESCRIPTION = """\
`corral port SANDBOX PORT` forwards a host port on 127.0.0.1 to 127.0.0.1:PORT inside the
sandbox and prints the host address (127.0.0.1:N); it stays exposed until removed or the sandbox
is destroyed. `corral port SANDBOX` lists the exposed ports (PORT -> ADDRESS). `corral port
SANDBOX PORT --remove` closes the forward."""


def add_parsers(sub) -> None:
    timeout = add_target_parser(
        sub, "timeout", help="set when a sandbox is destroyed: DURATION from now",
        description=TIMEOUT_DESCRIPTION)
    timeout.add_argument("duration", metavar="DURATION",
                         help="the new lifetime from now, e.g. 90s, 30m, 2h")
    timeout.set_defaults(handler=timeout_verb)

    stats = add_target_parser(
        sub, "stats", help="a sandbox's CPU, memory, pids and I/O, sampled until it is destroyed",
        description=STATS_DESCRIPTION)
    stats.add_argument("--interval", metavar="DURATION", default="1s",
                       help="time between samples, 0.1s to 1h (default: %(default)s)")
    stats.add_argument("--no-stream", action="store_true",
                       help="print one sample (two, a CPU interval apart, with CPU) and exit")
    stats.add_argument("--json", action="store_true", help="one JSON object per sample")
    stats.set_defaults(handler=stats_verb)

    create = add_daemon_parser(sub, "create", help="create a sandbox on the daemon; prints its id")
    create.add_argument("--profile", metavar="NAME")
    create.add_argument("--memory", metavar="SIZE")
    create.add_argument("--pids", metavar="N", type=int)
    create.add_argument("--cpus", metavar="CORES", type=float)
    create.add_argument("--ttl", metavar="DURATION", help="destroy it after this long")
    create.add_argument("--backend", choices=("native", "docker"),
                        help="where the daemon runs it (default: native; docker uses the "
                             "daemon's DOCKER_HOST engine)")
    create.add_argument("--image", metavar="REF",
                        help="run on this image of the daemon's store, pulled through the "
                             "daemon first when it is not there (docs/images.md)")
    add_env_flag(create)
    create.add_argument("--allow-net", action="append", default=[], metavar="RULE",
                        help="allow egress to HOST[:PORT], *.DOMAIN, IP or CIDR (repeatable)")
    add_secret_flag(create, "the daemon's secret store (for your tenant)")
    add_host_workspace_flags(create, "with --workspace: copy-on-write; DIR is not touched "
                                     "until `corral apply` (see `corral diff`, `corral "
                                     "discard`)")
    start = create.add_mutually_exclusive_group()
    add_from_flag(start, "start from a snapshot (id or name): its files, no copy")
    start.add_argument("--fork", metavar="SANDBOX",
                       help="snapshot SANDBOX, then start from that snapshot")
    add_label_flags(create, "sandbox", "ps",
                    "idempotency key: running the same create again with this ID prints the "
                    "sandbox the first one made instead of making another")
    create.set_defaults(handler=create_verb)

    inspect = add_target_parser(
        sub, "inspect", help="show the policy a daemon sandbox really runs under",
        description=INSPECT_DESCRIPTION)
    inspect.add_argument("--json", action="store_true", help="the full report as JSON")
    inspect.set_defaults(handler=inspect_verb)

    port = add_target_parser(
        sub, "port", help="expose a sandbox's port on the host, list or remove exposed ports",
        description=PORT_DESCRIPTION)
    port.add_argument("port", metavar="PORT", type=int, nargs="?",
                      help="the port a program listens on inside the sandbox (1-65535)")
    port.add_argument("--host-port", metavar="N", type=int, default=0,
                      help="the host port to listen on (default: any free one)")
    port.add_argument("--remove", action="store_true", help="stop exposing PORT")
    port.set_defaults(handler=port_verb)

    destroy = add_target_parser(sub, "destroy", help="destroy a sandbox on the daemon")
    destroy.set_defaults(handler=destroy_verb)


@daemon_verb
def timeout_verb(args) -> int:
    from corral.sandbox.spec import parse_duration

    ttl = parse_duration(args.duration, "DURATION")
    with connect(args) as client:
        sb = client.set_timeout(args.sandbox_id, max(1, round(ttl)))
    print(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sb.expires_at)))
    return 0


@daemon_verb
def port_verb(args) -> int:
    if args.port is None:
        if args.remove or args.host_port:
            return fail("port: --remove and --host-port need a PORT", EXIT_USAGE)
        with connect(args) as client:
            for p in client.list_ports(args.sandbox_id):
                print(f"{p.port} -> {p.host_address}:{p.host_port}")
        return 0
    from corral.runtime.ports import (
        check_port,  # the daemon checks the same; a uint32 cannot be negative
    )

    check_port("port", args.port)
    check_port("host_port", args.host_port, zero_ok=True)
    with connect(args) as client:
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


@daemon_verb
def stats_verb(args) -> int:
    from google.protobuf import json_format

    from corral.sandbox.spec import parse_duration

    interval = parse_duration(args.interval, "interval")
    header = f"{'CPU %':>7} {'MEMORY / LIMIT':>21} {'PIDS':>9} {'READ':>9} {'WRITTEN':>9} " \
             f"{'WORKSPACE':>9}"
    shown = 0
    with connect(args) as client:
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


@daemon_verb
def create_verb(args) -> int:
    from corral.sandbox.spec import parse_duration, parse_size

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
        spec["env"] = parse_env(args.env)
    if args.allow_net:
        spec["allow_net"] = args.allow_net
    if getattr(args, "backend", None):
        spec["backend"] = args.backend
    spec.update(_state_and_secrets(args))
    labels = parse_labels(getattr(args, "label", []))
    with connect(args) as client:
        if args.fork:
            spec["snapshot"] = client.snapshot(args.fork).id
            print(f"corral: create: forking {args.fork} from snapshot {spec['snapshot']}",
                  file=sys.stderr)
        if args.image:
            spec["image"] = _image_on_daemon(client, args.image)
        print(client.create_sandbox(labels=labels, request_id=getattr(args, "request_id", ""),
                                    **spec).id)
    return 0


def _image_on_daemon(client, ref: str) -> str:
    """REF as the daemon's store names it, pulled through Images.Pull (a progress line a
    layer on stderr) when the store does not hold it. A local path is made absolute here:
    the daemon reads it on the same host, not from this directory."""
    import grpc

    from corral.runtime.client import ClientError
    from corral.sandbox.images.sources import canonical_ref

    from .image import human

    ref = canonical_ref(ref) if ref.startswith(("oci:", "docker-archive:")) else ref
    try:
        return client.image_get(ref).image.ref
    except ClientError as exc:
        if exc.code.name != "NOT_FOUND":
            raise
    for event in client.image_pull(ref):
        if event.HasField("layer"):
            layer = event.layer
            print(f"corral: create: layer {layer.index}/{layer.count} {layer.diff_id[:19]} "
                  f"{layer.state} ({human(layer.tar_bytes)})", file=sys.stderr, flush=True)
        elif event.HasField("done"):
            print(f"corral: create: pulled {event.done.ref} {event.done.id[:19]}",
                  file=sys.stderr, flush=True)
            return event.done.ref
    raise ClientError(grpc.StatusCode.DATA_LOSS, f"the daemon's pull of {ref} ended without "
                                                f"its image record")


def _state_and_secrets(args) -> dict:
    """The create flags that name where the sandbox's files come from, and its secrets."""
    import os

    spec: dict = {}
    if args.secret:
        bindings = [b.checked() for b in parse_secrets(args.secret)]
        spec["secrets"] = [{"name": b.name, "hosts": list(b.hosts)} for b in bindings]
    if args.cow and not args.workspace:
        raise usage_error("create: --cow needs --workspace DIR")
    if args.workspace:
        spec["workspace_dir"] = os.path.abspath(args.workspace)
        spec["workspace_cow"] = args.cow
    if args.from_snapshot:
        spec["snapshot"] = args.from_snapshot
    return spec


@daemon_verb
def inspect_verb(args) -> int:
    from corral.sandbox.effective import format_table

    with connect(args) as client:
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


@daemon_verb
def destroy_verb(args) -> int:
    with connect(args) as client:
        if client.destroy_sandbox(args.sandbox_id):
            print(f"corral: destroy: {args.sandbox_id} was already destroyed", file=sys.stderr)
    return 0
