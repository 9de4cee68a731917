"""The `corral` command line: local runs now, daemon verbs as they land.

Start-up cost matters (`corral run -- /bin/true` is measured): this module imports only
argparse and the standard library at the top; each verb imports what it uses.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USAGE = 2

RUN_EPILOG = """\
default policy: new user/PID/mount/network/UTS/IPC/cgroup namespaces (root inside is the
first id of the sandbox's own range of 65536 unprivileged host ids), loopback-only network,
read-only host /usr /bin /sbin /lib*, minimal /etc, fresh /proc with host-wide files
masked, minimal /dev, tmpfs /tmp, writable /workspace (the working directory), no
capabilities, no_new_privs, landlock (writes only to /workspace, /tmp, /dev/shm and
terminals), the "default" seccomp profile.

your directories: --workspace, --rw and --ro directories are idmapped: the directory's
owner on the host is root inside, so files the command writes there are the owner's. It
cannot leave a setuid/setgid file, a device node or another user's file there.

as an ordinary user (rootless): root inside is you; ids 1..65535 your /etc/subuid range
(newuidmap, package uidmap) or nothing else. Without a cgroup you may write (cgroup v1, or
v2 without delegation) one line says so and RLIMIT_DATA/RLIMIT_NPROC stand in for --memory
and --pids; --cpus is not applied. `corral doctor` shows what this user has.

output: when stdout or stderr is a terminal, what the command writes there is filtered:
text, newlines, tabs and colour (SGR) sequences pass; other escape sequences (clipboard
writes, window titles, cursor moves, terminal queries), control characters and bidi
overrides are dropped (under -t, see terminals). --raw turns the filter off; pipes
and files always get the bytes unchanged.

terminals: -t gives the command a pty of the sandbox's own /dev/pts (`tty` prints
/dev/pts/N; it is the command's controlling terminal, sized like yours and resized with
it); -i sends your keys to it. With -it your terminal is raw while it runs (^C, ^Z, ^\\
reach the command as in a local shell) and its mode is restored however the run ends
(exit, kill, timeout, OOM, SIGTERM/SIGHUP to corral). -t needs a terminal on stdin. The
output filter then also keeps what a full-screen program needs (cursor moves, erases,
scrolling regions, the alternate screen, cursor keys, bracketed paste, mouse modes) but
still drops whatever makes your terminal answer or act for the program (status and
device queries, window reports, titles, OSC 52 clipboard writes, DCS/APC strings), and
puts back the modes the command left set; --raw passes everything. A program inside
cannot type into your terminal: it never holds it (its pty is its own), and TIOCSTI is
refused by the default seccomp profile. Only the native backend has terminals.

exit status: the command's own, 128+N when it was killed by signal N, 124 on timeout,
137 when the memory limit killed it, 125 when the sandbox could not be set up, 127 when
the command does not exist inside the sandbox, 2 on a usage error (also -t without a
terminal on stdin), 128+N when corral itself got signal N (SIGTERM, SIGHUP) under -t.
"""

TTY_HELP = ("give the command a terminal (a pty inside the sandbox, sized like yours); "
            "stdin must be a terminal")
INTERACTIVE_HELP = ("with -t: send your keys to the command, your terminal raw meanwhile; "
                    "without -t stdin is passed as it always is (run streams it, exec "
                    "sends a pipe or file whole)")

RAW_HELP = ("write the output to a terminal unchanged (default: only text, newlines, tabs "
            "and colours reach a terminal; pipes and files always get every byte)")


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default", metavar="NAME|FILE",
                   help="seccomp profile: 'default', 'unconfined' or a Docker-format JSON "
                        "file (default: %(default)s)")
    p.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 256M or 2G; no swap "
                                                     "(default: 512M)")
    p.add_argument("--pids", metavar="N", help="max processes and threads (default: 256)")
    p.add_argument("--cpus", metavar="CORES", help="CPU quota in cores, e.g. 0.5 (default: 1)")
    p.add_argument("--timeout", metavar="DURATION",
                   help="wall-clock limit, e.g. 30s, 5m, 1h30m (default: none)")
    p.add_argument("--workspace", metavar="DIR",
                   help="host directory mounted writable at /workspace, its owner as root "
                        "inside (default: a fresh temporary directory, removed afterwards)")
    p.add_argument("--ro", action="append", default=[], metavar="PATH[:INSIDE]",
                   help="also show a host path, read-only (repeatable)")
    p.add_argument("--rw", action="append", default=[], metavar="PATH[:INSIDE]",
                   help="also show a host path, writable (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set a variable in the command's environment (repeatable)")
    p.add_argument("--tmp-size", metavar="SIZE", help="size cap of /tmp (default: 64M)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Corral: run untrusted agent code in Linux sandboxes.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    run = sub.add_parser(
        "run",
        help="run a command in a fresh sandbox",
        description="Run CMD in a fresh sandbox, streaming its output; the sandbox is "
                    "destroyed when CMD ends.",
        usage="corral run [OPTIONS] [--image REF] -- CMD [ARGS...]",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_policy_flags(run)
    run.add_argument("--allow-net", action="append", default=[], metavar="RULE",
                     help="allow egress to HOST[:PORT], *.DOMAIN[:PORT], IP[:PORT] or "
                          "CIDR[:PORT] through Corral's egress proxy (repeatable; default: "
                          "no network but loopback)")
    run.add_argument("--audit", metavar="FILE",
                     help="with --allow-net: append every connection attempt to FILE as JSON "
                          "lines (default: one line per attempt on stderr)")
    run.add_argument("--backend", choices=("native", "docker"), default="native",
                     help="where the sandbox runs: Corral's own kernel setup, or a container "
                          "on a Docker engine (default: %(default)s)")
    run.add_argument("--docker-host", metavar="URL",
                     help="Docker engine for --backend docker (default: $DOCKER_HOST, else "
                          "unix:///var/run/docker.sock)")
    run.add_argument("--image", metavar="REF",
                     help="root filesystem: an image of the local store (oci:DIR[:TAG], "
                          "docker-archive:FILE or a local engine's NAME, pulled into the "
                          "store first when missing), read-only like the default root; "
                          "its Entrypoint/Cmd run when no CMD is given (args "
                          "after -- replace Cmd), its Env, WorkingDir and User apply "
                          "(default: the host's /usr, read-only; see docs/images.md)")
    run.add_argument("--raw", action="store_true", help=RAW_HELP)
    run.add_argument("-i", "--interactive", action="store_true", help=INTERACTIVE_HELP)
    run.add_argument("-t", "--tty", action="store_true", help=TTY_HELP)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    from corral.runtime import probe as probe_verb

    probe_verb.add_parser(sub)

    from corral.runtime import doctor

    doctor.add_parser(sub)

    daemon = sub.add_parser(
        "daemon", help="run the gRPC daemon",
        description="Run the Corral daemon: sandboxes, sessions and the audit log over gRPC. "
                    "Every flag can also be set in the --config TOML file under the same name "
                    "(with '_' for '-'); flags win.",
        epilog="Tenant policy (TOML only; docs/policy.md): [policy] bounds every tenant that "
               "is not an operator: profiles (default: [\"default\"]), allow_net (default: "
               "[\"public\"], i.e. no address rule touching loopback, private, link-local "
               "or reserved space), max_memory (4G), max_pids (1024), max_cpus (host cores), "
               "max_tmp (1G), max_ttl (the sandbox TTL), max_priority (10), and the quotas "
               "max_sandboxes (32), max_sessions (32), max_running_tasks (4), "
               "max_queued_tasks (1000), max_request_rate (200 a second). The same keys in "
               "[tenants.NAME] apply to that tenant on top of [policy]. Operators get the "
               "host's size as their only limit. A request over a limit is "
               "PERMISSION_DENIED, over a quota RESOURCE_EXHAUSTED; both are audited as "
               "'denied'. policy_file = FILE|DIR reads [policy] and [tenants.NAME] policy "
               "keys from version-controlled files instead (`corral policy check|diff`); "
               "SIGHUP reloads them, as an audited, signed policy.reload record. "
               "[audit] (docs/operations.md): signing_key (default <state>/audit-signing.key, "
               "made at first start, public half in .pub) or signing_command + "
               "signing_public_key, checkpoint_records (1000), checkpoint_interval (60s), "
               "and [audit.sinks.NAME] tables: type = file|syslog|otlp.",
    )
    daemon.add_argument("--config", metavar="FILE", help="TOML configuration file")
    daemon.add_argument("--socket", metavar="PATH",
                        help="unix socket, mode 0600 (default: $XDG_RUNTIME_DIR/corral.sock "
                             "or /run/corral/corral.sock)")
    daemon.add_argument("--listen", metavar="HOST:PORT",
                        help="also listen on TCP; clients need a tenant's bearer token")
    daemon.add_argument("--state", metavar="DIR",
                        help="state directory: audit.db (default: /var/lib/corral)")
    daemon.add_argument("--tls-cert", metavar="PEM", help="TLS certificate for --listen")
    daemon.add_argument("--tls-key", metavar="PEM", help="TLS private key for --listen")
    daemon.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by this CA (mTLS)")
    daemon.add_argument("--session-idle-ttl", metavar="DURATION",
                        help="reap a session nobody watched for this long (default: 5m)")
    daemon.add_argument("--sandbox-ttl", metavar="DURATION",
                        help="longest life of a sandbox (default: 1h)")
    daemon.add_argument("--max-sandboxes", metavar="N", type=int,
                        help="most sandboxes at once (default: 512)")
    daemon.add_argument("--workspace-root", metavar="DIR",
                        help="root-only directory of every workspace, each a tmpfs mounted "
                             "nosuid,nodev with a byte and inode cap (default: "
                             "/run/corral/workspaces)")
    daemon.add_argument("--workspace-size", metavar="SIZE",
                        help="byte cap of one workspace; its bytes are memory, charged to the "
                             "sandbox's memory limit (default: 1G)")
    daemon.add_argument("--workspace-inodes", metavar="N", type=int,
                        help="inode (file) cap of one workspace (default: 65536)")
    daemon.add_argument("--disk-reserve", metavar="SIZE",
                        help="bytes kept in <state>/.reserve and released when the state "
                             "filesystem fills, so audit and task records still write; new "
                             "work is refused (RESOURCE_EXHAUSTED, health NOT_SERVING) until "
                             "twice that is free (default: 64M, at most 5%% of the filesystem)")
    daemon.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. "
                             "127.0.0.1:9464 (port 0: any free one, recorded as metrics_port "
                             "in daemon.start); loopback only unless --metrics-public; "
                             "default: off (docs/operations.md lists every metric)")
    daemon.add_argument("--metrics-public", action="store_true", default=None,
                        help="allow a --metrics address that is not loopback")
    daemon.add_argument("--tracing", metavar="otlp|file:PATH",
                        help="OpenTelemetry spans per RPC and per sandbox phase: otlp "
                             "(OTLP/gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT; pip install "
                             "'corral[otlp]') or file:PATH (one JSON object a span); "
                             "default: off, nothing imported")
    daemon.add_argument("--log-format", choices=("text", "json"),
                        help="daemon log on stderr: text (default) or json, one object a "
                             "line with time, level, logger, message and the tenant, "
                             "sandbox, session and task ids when known")
    daemon.add_argument("--verify-audit", choices=("full", "tail"),
                        help="audit check at start: 'tail' checks the head anchor and the "
                             "records past it; 'full' re-hashes every record of every segment "
                             "(streamed) and refuses to start on a broken chain (default: tail)")
    daemon.add_argument("--audit-segment-records", metavar="N", type=int,
                        help="seal the active audit segment into <state>/audit.db.segments/ "
                             "at N records, its audit.seal included; each segment's first "
                             "record chains to the previous seal, so `corral audit verify` "
                             "still proves the whole history (default: 100000; 0: no limit)")
    daemon.add_argument("--audit-segment-size", metavar="SIZE",
                        help="... or at about SIZE of record content (default: 64M; 0: none)")
    daemon.add_argument("--audit-retention", metavar="DURATION",
                        help="remove sealed audit segments whose last record is older than "
                             "this (e.g. 90d), at start and at each rotation, after an "
                             "audit.prune record 'pruned up to seq N, hash H' that verify "
                             "checks (default: forever)")
    daemon.add_argument("--task-retention", metavar="DURATION",
                        help="remove a finished task (its row, RESULT, output files, log, "
                             "checkpoint) and a lost attempt's workspace this long after it "
                             "ended, behind a task.expired record; 0: keep them (default: 7d)")
    daemon.add_argument("--mux-interval-ms", metavar="MS", type=float,
                        help="Sessions.OpenMany: least ms between two messages of one stream; "
                             "its sessions' news travels together (default: 2; 0: at once)")

    def client_flags(p):
        p.add_argument("--socket", metavar="PATH",
                       help="daemon socket (default: $CORRAL_SOCKET, else the default path)")
        p.add_argument("--target", metavar="HOST:PORT", help="daemon over TCP instead")
        p.add_argument("--token", metavar="TOKEN", help="bearer token for --target "
                                                         "(default: $CORRAL_TOKEN)")
        p.add_argument("--tenant", metavar="NAME", help="act as this tenant (local socket only)")
        p.add_argument("--tls-ca", metavar="PEM",
                       help="with --target: verify the daemon's TLS certificate against this CA")
        p.add_argument("--tls-client-cert", metavar="PEM",
                       help="with --target: client certificate for a daemon that asks for mTLS")
        p.add_argument("--tls-client-key", metavar="PEM", help="its private key")

    ps = sub.add_parser("ps", help="list sandboxes and their commands",
                        description="List sandboxes. Control and bidi characters of commands "
                                    "are shown escaped (\\x1b, \\u202e); --json has them as "
                                    "they are.")
    client_flags(ps)
    ps.add_argument("--json", action="store_true", help="one JSON object per sandbox")
    ps.add_argument("-l", "--selector", metavar="SELECTOR", default="",
                    help="only sandboxes whose labels match: requirements joined by commas, "
                         "k=v, k!=v (or absent), k (present), !k (absent); e.g. "
                         "'team=ml,!gpu'")
    ps.add_argument("--destroyed", action="store_true",
                    help="the destroyed sandboxes the daemon still remembers instead")

    sessions = sub.add_parser("sessions", help="list sessions",
                              description="List this tenant's sessions: running ones, and "
                                          "those whose agent exited and that the daemon still "
                                          "holds (until idle for its session_idle_ttl).")
    client_flags(sessions)
    sessions.add_argument("--json", action="store_true", help="one JSON object per session")
    sessions.add_argument("-l", "--selector", metavar="SELECTOR", default="",
                          help="only sessions whose labels match (the grammar of `corral ps "
                               "--selector`)")
    sessions.add_argument("--state", choices=("running", "exited"),
                          help="only sessions in this state")

    timeout = sub.add_parser(
        "timeout", help="set when a sandbox is destroyed: DURATION from now",
        description="Extend or shorten a sandbox's lifetime: the daemon destroys it DURATION "
                    "from now (e.g. 30m, 2h). Refused above the daemon's sandbox_ttl or the "
                    "tenant's max_ttl. Prints the new expiry time.")
    client_flags(timeout)
    timeout.add_argument("sandbox_id", metavar="SANDBOX")
    timeout.add_argument("duration", metavar="DURATION",
                         help="the new lifetime from now, e.g. 90s, 30m, 2h")

    stats = sub.add_parser(
        "stats", help="a sandbox's CPU, memory, pids and I/O, sampled until it is destroyed",
        description="Print a sandbox's usage every INTERVAL until it is destroyed or you press "
                    "Ctrl-C: CPU (percent of one core over the interval), memory and its limit, "
                    "processes and their limit, storage I/O, workspace use. A figure this "
                    "host cannot measure shows as '-'.")
    client_flags(stats)
    stats.add_argument("sandbox_id", metavar="SANDBOX")
    stats.add_argument("--interval", metavar="DURATION", default="1s",
                       help="time between samples, 0.1s to 1h (default: %(default)s)")
    stats.add_argument("--no-stream", action="store_true",
                       help="print one sample (two, a CPU interval apart, with CPU) and exit")
    stats.add_argument("--json", action="store_true", help="one JSON object per sample")

    create = sub.add_parser("create", help="create a sandbox on the daemon; prints its id")
    client_flags(create)
    create.add_argument("--profile", metavar="NAME")
    create.add_argument("--memory", metavar="SIZE")
    create.add_argument("--pids", metavar="N", type=int)
    create.add_argument("--cpus", metavar="CORES", type=float)
    create.add_argument("--ttl", metavar="DURATION", help="destroy it after this long")
    create.add_argument("--backend", choices=("native", "docker"),
                        help="where the daemon runs it (default: native; docker uses the "
                             "daemon's DOCKER_HOST engine)")
    create.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--allow-net", action="append", default=[], metavar="RULE",
                        help="allow egress to HOST[:PORT], *.DOMAIN, IP or CIDR (repeatable)")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label to find the sandbox by (`corral ps --selector`); "
                             "repeatable")
    create.add_argument("--request-id", metavar="ID", default="",
                        help="idempotency key: running the same create again with this ID "
                             "prints the sandbox the first one made instead of making another")

    inspect = sub.add_parser(
        "inspect", help="show the policy a daemon sandbox really runs under",
        description="Read the effective confinement of every process in SANDBOX from the "
                    "live kernel (namespaces, id maps, seccomp, capabilities, cgroup limits, "
                    "mounts, landlock, interfaces and routes) and compare it with the spec. "
                    "Exit status 3 when anything differs from the spec.")
    client_flags(inspect)
    inspect.add_argument("--json", action="store_true", help="the full report as JSON")
    inspect.add_argument("sandbox_id", metavar="SANDBOX")

    port = sub.add_parser(
        "port", help="expose a sandbox's port on the host, list or remove exposed ports",
        description="`corral port SANDBOX PORT` forwards a host port on 127.0.0.1 to "
                    "127.0.0.1:PORT inside the sandbox and prints the host address "
                    "(127.0.0.1:N); it stays exposed until removed or the sandbox is "
                    "destroyed. `corral port SANDBOX` lists the exposed ports (PORT -> "
                    "ADDRESS). `corral port SANDBOX PORT --remove` closes the forward.")
    client_flags(port)
    port.add_argument("sandbox_id", metavar="SANDBOX")
    port.add_argument("port", metavar="PORT", type=int, nargs="?",
                      help="the port a program listens on inside the sandbox (1-65535)")
    port.add_argument("--host-port", metavar="N", type=int, default=0,
                      help="the host port to listen on (default: any free one)")
    port.add_argument("--remove", action="store_true", help="stop exposing PORT")

    destroy = sub.add_parser("destroy", help="destroy a sandbox on the daemon")
    client_flags(destroy)
    destroy.add_argument("sandbox_id", metavar="SANDBOX")

    from corral.runtime import cli_cp, cli_image

    cli_cp.add_parser(sub, client_flags)
    cli_image.add_parser(sub)

    exe = sub.add_parser(
        "exec", help="run a command in a daemon sandbox, streaming its output",
        usage="corral exec [OPTIONS] SANDBOX -- CMD [ARGS...]",
        description="Streams the command's stdout and stderr byte for byte (binary output "
                    "arrives as written: `corral exec SB -- cat blob | sha256sum`). Nothing "
                    "is dropped: while this reader is slow the daemon stops reading the "
                    "command's output, and the command waits in write(2). The exit status "
                    "is the command's own. -t runs it on a terminal, -it with your keys and "
                    "your terminal raw: as `corral run -it` (see `corral run --help`), "
                    "through the daemon (Exec with tty; window changes are sent as "
                    "Resize).")
    client_flags(exe)
    exe.add_argument("--timeout", metavar="DURATION")
    exe.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    exe.add_argument("--raw", action="store_true", help=RAW_HELP)
    exe.add_argument("-i", "--interactive", action="store_true", help=INTERACTIVE_HELP)
    exe.add_argument("-t", "--tty", action="store_true", help=TTY_HELP)
    exe.add_argument("--allow-loss", action="store_true",
                     help="never hold the command back: output this reader is too slow for "
                          "is dropped; a loss is reported on stderr and the exit status is "
                          "then non-zero (the command's own, or 1 when it exited 0)")
    exe.add_argument("sandbox_id", metavar="SANDBOX")
    exe.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    session = sub.add_parser(
        "session", help="start (or attach to) an interactive agent session",
        usage="corral session [OPTIONS] [--attach ID] [-- CMD [ARGS...]]",
        description="Prints the agent's tokens live. Lines typed on stdin steer the running "
                    "turn; Ctrl-C interrupts the turn, a second Ctrl-C detaches (the session "
                    "keeps running; `corral session --attach ID` comes back). End of stdin "
                    "only ends steering: the tokens keep printing until the agent exits, so "
                    "`echo QUESTION | corral session -- AGENT` works in scripts. On a "
                    "terminal only text, newlines, tabs and colours of the agent's output are "
                    "shown (--raw: all of it).",
    )
    client_flags(session)
    session.add_argument("--attach", metavar="SESSION", help="attach to a running session")
    session.add_argument("--after-seq", type=int, default=0, metavar="SEQ",
                         help="with --attach: replay entries after this sequence number")
    session.add_argument("--watch", action="store_true", help="with --attach: watch only")
    session.add_argument("--raw", action="store_true", help=RAW_HELP)
    session.add_argument("--input", metavar="TEXT", help="first input of the session")
    session.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                         help="a label to find the session by (`corral sessions --selector`); "
                              "repeatable")
    session.add_argument("--request-id", metavar="ID", default="",
                         help="idempotency key: the same start again with this ID attaches "
                              "to the session the first one started")
    session.add_argument("--memory", metavar="SIZE", help="memory limit of the new sandbox")
    session.add_argument("--put", action="append", default=[], metavar="FILE[:PATH]",
                         help="upload a local file into the new sandbox's /workspace first "
                              "(repeatable)")
    session.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    audit = sub.add_parser(
        "audit", help="read and verify the audit log",
        description="Read and verify the audit log. One line per record; control, format "
                    "and bidi characters a tenant chose (argv, paths) are shown escaped "
                    "(\\x9b, \\u202e), so a line reads as what was recorded; --json gives the "
                    "exact text.")
    audit_sub = audit.add_subparsers(dest="audit_verb", metavar="VERB")
    for name, text in (("tail", "follow new records"), ("query", "search records"),
                       ("verify", "check the hash chain (and with --pubkey its signatures); "
                                  "exit 1 when broken"),
                       ("export", "stream records with hashes and signatures, for a SIEM"),
                       ("status", "operators: signing key, checkpoints, each sink's lag")):
        ap = audit_sub.add_parser(name, help=text)
        client_flags(ap)
        ap.add_argument("--db", metavar="FILE",
                        help="read this audit.db directly instead of asking the daemon")
        if name == "verify":
            ap.description = (
                "Recompute the hash chain and name the first broken record. With --pubkey, "
                "also check every audit.checkpoint signature against that Ed25519 public key "
                "(the daemon writes it to <state>/audit-signing.key.pub) and that every "
                "record is covered by one: a copy re-hashed end to end, head anchor "
                "included, fails, naming the first record past the last valid signature.")
            ap.add_argument("--pubkey", metavar="FILE", action="append",
                            help="Ed25519 public key (PEM, or 32 bytes raw/hex/base64); "
                                 "repeat for a log signed by a rotated key")
            ap.add_argument("--unsigned-tail-ok", action="store_true",
                            help="with --pubkey: accept records after the last checkpoint (a "
                                 "running daemon's newest), naming them, instead of failing")
            ap.add_argument("--file", metavar="EXPORT",
                            help="verify an exported copy (jsonl or ocsf lines, '-' for "
                                 "stdin) instead: needs only --pubkey, no daemon, no db")
        if name == "export":
            ap.description = (
                "Write records after --since (or the --cursor file's seq) as JSON lines: "
                "every column, detail_json verbatim, hashes, and the audit.checkpoint "
                "records that carry the signatures, so the output verifies with only the "
                "public key (`corral audit verify --file OUT --pubkey KEY`). "
                "--format ocsf writes OCSF 1.1 API Activity events (class 6003), each "
                "keeping the record whole under unmapped.corral_record.")
            ap.add_argument("--since", type=int, default=0, metavar="SEQ",
                            help="records after this seq (the last one you already have; "
                                 "default 0: from the first)")
            ap.add_argument("--format", choices=("jsonl", "ocsf"), default="jsonl")
            ap.add_argument("--out", metavar="FILE",
                            help="append to FILE (created 0600) instead of stdout")
            ap.add_argument("--cursor", metavar="FILE",
                            help="resume after the seq in FILE and store the last seq "
                                 "written there once the output is flushed")
            continue
        if name == "status":
            ap.add_argument("--json", action="store_true", help="the figures as JSON")
            continue
        if name != "verify":
            ap.add_argument("--sandbox", metavar="ID")
            ap.add_argument("--kind", metavar="KIND", help="exact kind or a prefix ending in '.'")
            ap.add_argument("--json", action="store_true", help="one JSON object per record")
        if name == "query":
            ap.add_argument("--session", metavar="ID")
            ap.add_argument("--since", metavar="DURATION", help="e.g. 1h: records newer than that")
            ap.add_argument("--limit", type=int, default=100)
            ap.add_argument("--of-tenant", dest="for_tenant", metavar="NAME",
                            help="operators: another tenant's records")
    policy = sub.add_parser(
        "policy", help="check and compare tenant policy files",
        description="Tenant policy as code: a TOML file (or a directory of them) with "
                    "[policy] and [tenants.NAME] tables, as in the daemon config, without "
                    "tokens; the daemon reads it from policy_file and reloads it on SIGHUP "
                    "(docs/policy.md). No daemon needed.")
    policy_sub = policy.add_subparsers(dest="policy_verb", metavar="VERB")
    pc = policy_sub.add_parser("check", help="validate a policy file or directory; print "
                                             "its digest")
    pc.add_argument("path", metavar="FILE|DIR")
    pd = policy_sub.add_parser(
        "diff", help="what B allows that A did not",
        description="One line per widening: a new tenant, a seccomp profile, a network "
                    "rule (\"tenant acme may now reach 10.0.0.0/8:5432\"), each limit and "
                    "each quota raised or lifted, for each tenant and for the default of "
                    "every other tenant. Exit 0 when B allows nothing more than A, 1 when it "
                    "does, 2 on an invalid file.")
    pd.add_argument("old", metavar="A")
    pd.add_argument("new", metavar="B")

    report = sub.add_parser(
        "report", help="signed attestation report of a sandbox",
        description="Ask the daemon for a report of SANDBOX: the effective policy read from "
                    "the kernel, the requested spec, its policy digests, the egress rules and "
                    "attempts (denials listed), and its audit records, signed with the audit "
                    "key. --check verifies a saved JSON report against a public key.")
    client_flags(report)
    report.add_argument("sandbox", nargs="?", metavar="SANDBOX")
    report.add_argument("--format", choices=("json", "markdown"), default="json")
    report.add_argument("--probes", action="store_true",
                        help="run the probe suite for the sandbox's policy class when no "
                             "verdicts are cached for it on this kernel (about 30 s)")
    report.add_argument("--check", metavar="FILE",
                        help="verify a report saved with --format json (needs --pubkey)")
    report.add_argument("--pubkey", metavar="FILE", help="the audit key's public half")

    from corral.runtime.tasks import cli as task_cli

    task_cli.add_parsers(sub, client_flags)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"corral: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from corral.sandbox import CommandNotFound, CorralError, InvalidSpec, SandboxSpec
    from corral.sandbox.errors import SandboxSetupError

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv and not args.image:
        return _fail("run: no command given; usage: corral run [OPTIONS] -- CMD [ARGS...]",
                     EXIT_USAGE)
    if args.image:
        failed = _ensure_image(args.image)
        if failed is not None:
            return failed
    try:
        spec = SandboxSpec.build(
            profile=args.profile, memory=args.memory, pids=args.pids, cpus=args.cpus,
            timeout=args.timeout, workspace=args.workspace, ro=args.ro, rw=args.rw,
            env=args.env, tmp_size=args.tmp_size, backend=args.backend,
            allow_net=args.allow_net, image=args.image,
        )
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", EXIT_USAGE)
    if spec.allow_net:
        _net_log(args.audit)
    if args.tty and not os.isatty(0):
        return _fail("run: -t needs a terminal on stdin (it is a pipe or a file); drop -t "
                     "to stream stdin to the command", EXIT_USAGE)
    try:
        return _run_streaming(spec, argv, docker_host=args.docker_host, raw=args.raw,
                              tty=args.tty, interactive=args.interactive)
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", EXIT_USAGE)
    except CommandNotFound as exc:
        return _fail(f"run: {exc}", 127)
    except SandboxSetupError as exc:
        return _fail(f"run: {exc}", 125)
    except CorralError as exc:
        return _fail(f"run: {exc}", 125)


def _ensure_image(ref: str) -> int | None:
    """Pull REF into the local store unless it is there; an exit status when that fails."""
    from corral.sandbox import CorralError
    from corral.sandbox.images.errors import ImageNotFound
    from corral.sandbox.images.store import ImageStore

    try:
        store = ImageStore()
        try:
            store.get(ref)
        except ImageNotFound:
            store.pull(ref)
    except ImageNotFound as exc:
        return _fail(f"run: {exc}", 1)
    except (CorralError, OSError) as exc:
        return _fail(f"run: --image {ref}: {exc}", 2)
    return None


def _run_streaming(spec, argv: list[str], docker_host: str | None = None,
                   raw: bool = False, tty: bool = False, interactive: bool = False) -> int:
    """Run argv, copying its output live and our stdin to it; returns the exit status
    (tty: on a pty, see corral.runtime.interactive)."""
    from corral.sandbox import ExitReason
    from corral.sandbox.backends import open_sandbox

    with open_sandbox(spec, docker_host=docker_host) as sandbox:
        for note in getattr(sandbox, "notes", ()):  # what it runs without, e.g. cgroups
            print(f"corral: {note}", file=sys.stderr, flush=True)
        extra: dict = {}
        if spec.image:  # the image's Entrypoint/Cmd, Env, WorkingDir and User
            from corral.sandbox.images import runconfig

            for note in runconfig.notes(sandbox.image_config):
                print(f"corral: {note}", file=sys.stderr, flush=True)
            cmd = sandbox.image_command(argv)
            argv = cmd.argv
            extra = {"env": cmd.env, "user": cmd.user}
            if cmd.cwd:
                extra["cwd"] = cmd.cwd
        if tty:
            from corral.runtime import interactive as term

            size = term.RawTerminal(0).window()
            env = {"TERM": os.environ["TERM"]} if os.environ.get("TERM") else None
            if extra:
                extra["env"] = {**extra["env"], **(env or {})}
                env = extra.pop("env")
            proc = sandbox.exec(argv, tty=size, env=env, **extra)
            stopped = term.run_on_terminal(proc, interactive=interactive, raw=raw)
            if stopped is not None:
                return 128 + stopped
        else:
            proc = sandbox.exec(argv, **extra)
            _pump_streaming(proc, raw)
    if proc.reason == ExitReason.TIMEOUT:
        print(f"corral: {argv[0]}: killed after the {spec.timeout_s:g}s timeout", file=sys.stderr)
        return 124
    if proc.reason == ExitReason.OOM:
        print(f"corral: {argv[0]}: killed by the {_size(spec.memory_bytes)} memory limit (OOM)",
              file=sys.stderr)
        return 137
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _pump_streaming(proc, raw: bool) -> None:
    """Copy proc's output live and our stdin to it until it ends (no tty)."""
    import signal
    import threading

    from corral.runtime.terminal import TerminalWriter

    interrupts = []

    def on_signal(signum, _frame):
        # First Ctrl-C interrupts the command; a second one (or SIGTERM) kills it.
        interrupts.append(signum)
        if signum == signal.SIGINT and len(interrupts) == 1:
            proc.send_signal(signal.SIGINT)
        else:
            proc.kill()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=_copy_stdin, args=(proc.stdin,), daemon=True).start()
        proc.stdin = None  # the thread owns it now
        out = TerminalWriter(sys.stdout.buffer, raw=raw)
        err = TerminalWriter(sys.stderr.buffer, raw=raw)
        try:
            proc.pump(out.write, err.write)
        finally:
            out.close()
            err.close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _net_log(path: str | None) -> None:
    """Where this process's egress proxy reports each connection attempt (no daemon)."""
    import json
    import threading

    from corral.runtime.terminal import visible
    from corral.sandbox import proxy

    lock = threading.Lock()
    out = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (process lifetime)

    def sink(event: dict) -> None:
        with lock:
            if out is not None:
                out.write(json.dumps(event, sort_keys=True) + "\n")
            elif event.get("decision"):
                # the name is what the sandbox asked for (CONNECT, SNI, Host): shown escaped
                dest = event.get("name") or event.get("address", "")
                print(visible(f"corral: egress {event['decision']} {event.get('mode', '')} "
                              f"{dest}:{event.get('port', '')} ({event.get('reason', '')})"),
                      file=sys.stderr, flush=True)

    proxy.shared_proxy().default_on_event = sink


def _copy_stdin(dest) -> None:
    try:
        src = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
        while True:
            chunk = os.read(src.fileno(), 65536)
            if not chunk:
                break
            dest.write(chunk)
    except (OSError, ValueError):
        pass
    finally:
        try:
            dest.close()
        except OSError:
            pass


def _size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from corral.runtime import __version__

        print(f"corral {__version__}")
        return 0
    if args.verb == "run":
        return cmd_run(args)
    if args.verb == "daemon":
        return cmd_daemon(args)
    if args.verb == "doctor":
        from corral.runtime import doctor

        return doctor.main(args)
    if args.verb == "probe":
        from corral.runtime import probe as probe_verb

        return probe_verb.main(args)
    if args.verb in ("task", "nodes"):
        from corral.runtime.tasks import cli as task_cli

        return task_cli.dispatch(args)
    if args.verb == "image":
        return args.image_main(args)
    if args.verb == "policy":
        from corral.runtime import cli_governance

        return cli_governance.policy(args)
    if args.verb == "report":
        from corral.runtime import cli_governance

        return cli_governance.report(args)
    if args.verb in ("ps", "create", "destroy", "exec", "session", "audit", "inspect", "cp",
                     "sessions", "timeout", "stats", "port"):
        from corral.runtime import cli_client

        return cli_client.dispatch(args)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


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
        return _fail(f"daemon: {exc}", EXIT_USAGE)
    return daemon.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
