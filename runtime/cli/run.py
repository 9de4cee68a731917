"""`corral run`: a command in a fresh local sandbox, no daemon; its output streamed live.

The sandbox is made here, in this process, and destroyed when the command ends; -t runs the
command on a pty of the sandbox (corral.runtime.interactive).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from . import exits
from .flags import (
    add_command,
    add_docker_host,
    add_env_flag,
    add_flag_for,
    add_profile,
    add_secret_flag,
    add_terminal_flags,
    command_argv,
    parse_secrets,
    secret_values_from_env,
)
from .output import fail

#: A local run's messages come from this user's own input: printed as they are.
_fail = functools.partial(fail, escape=False)

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


#: The limits of a local run as flags: (flag, metavar, help). An absent one keeps
#: SandboxSpec's default, which the help names (the parser does not import the spec).
LIMIT_FLAGS = (
    ("--memory", "SIZE", "memory limit, e.g. 256M or 2G; no swap (default: 512M)"),
    ("--pids", "N", "max processes and threads (default: 256)"),
    ("--cpus", "CORES", "CPU quota in cores, e.g. 0.5 (default: 1)"),
    ("--timeout", "DURATION", "wall-clock limit, e.g. 30s, 5m, 1h30m (default: none)"),
)


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    add_profile(p, "seccomp profile")
    for flag, metavar, text in LIMIT_FLAGS:
        p.add_argument(flag, metavar=metavar, help=text)
    p.add_argument("--workspace", metavar="DIR",
                   help="host directory mounted writable at /workspace, its owner as root "
                        "inside (default: a fresh temporary directory, removed afterwards)")
    for flag, how in (("--ro", "read-only"), ("--rw", "writable")):
        p.add_argument(flag, action="append", default=[], metavar="PATH[:INSIDE]",
                       help=f"also show a host path, {how} (repeatable)")
    add_env_flag(p, "set a variable in the command's environment (repeatable)")
    p.add_argument("--tmp-size", metavar="SIZE", help="size cap of /tmp (default: 64M)")



def add_parsers(sub) -> None:
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
    add_secret_flag(run, "your variable NAME")
    add_flag_for(run, "--allow-net", "--audit", metavar="FILE",
                 help="append every connection attempt to FILE as JSON lines (default: one "
                      "line per attempt on stderr)")
    run.add_argument("--backend", choices=("native", "docker"), default="native",
                     help="where the sandbox runs: Corral's own kernel setup, or a container "
                          "on a Docker engine (default: %(default)s)")
    add_docker_host(run)
    run.add_argument("--image", metavar="REF",
                     help="root filesystem: an image of the local store (oci:DIR[:TAG], "
                          "docker-archive:FILE or a local engine's NAME, pulled into the "
                          "store first when missing), read-only like the default root; "
                          "its Entrypoint/Cmd run when no CMD is given (args "
                          "after -- replace Cmd), its Env, WorkingDir and User apply "
                          "(default: the host's /usr, read-only; see docs/images.md)")
    add_terminal_flags(run)
    add_command(run)
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from corral.sandbox import CommandNotFound, CorralError, InvalidSpec, SandboxSpec
    from corral.sandbox.errors import SandboxSetupError

    argv = command_argv(args)
    if not argv and not args.image:
        return _fail("run: no command given; usage: corral run [OPTIONS] -- CMD [ARGS...]",
                     exits.EXIT_USAGE)
    if args.image and args.backend != "docker":  # the engine loads or pulls it itself
        failed = _ensure_image(args.image)
        if failed is not None:
            return failed
    try:
        spec = SandboxSpec.build(
            profile=args.profile, memory=args.memory, pids=args.pids, cpus=args.cpus,
            timeout=args.timeout, workspace=args.workspace, ro=args.ro, rw=args.rw,
            env=args.env, tmp_size=args.tmp_size, backend=args.backend,
            allow_net=args.allow_net, image=args.image, secrets=parse_secrets(args.secret),
        )
        secrets = secret_values_from_env(spec.secrets) if spec.secrets else None
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", exits.EXIT_USAGE)
    if spec.allow_net:
        report_egress(args.audit)
    if args.tty and not os.isatty(0):
        return _fail("run: -t needs a terminal on stdin (it is a pipe or a file); drop -t "
                     "to stream stdin to the command", exits.EXIT_USAGE)
    try:
        return _run_streaming(spec, argv, docker_host=args.docker_host, raw=args.raw,
                              tty=args.tty, interactive=args.interactive, secrets=secrets)
    except CommandNotFound as exc:  # an InvalidSpec: caught first, for its own exit status
        return _fail(f"run: {exc}", exits.EXIT_NOT_FOUND)
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", exits.EXIT_USAGE)
    except SandboxSetupError as exc:
        return _fail(f"run: {exc}", exits.EXIT_SETUP_FAILED)
    except CorralError as exc:
        return _fail(f"run: {exc}", exits.EXIT_SETUP_FAILED)


def _ensure_image(ref: str) -> int | None:
    """Pull REF into the local store unless it is there; an exit status when that fails."""
    from corral.sandbox import CorralError
    from corral.sandbox.images.errors import ImageNotFound
    from corral.sandbox.images.store import ImageStore

    try:
        ImageStore().ensure(ref)
    except ImageNotFound as exc:
        return _fail(f"run: {exc}", 1)
    except (CorralError, OSError) as exc:
        return _fail(f"run: --image {ref}: {exc}", exits.EXIT_USAGE)
    return None


def _run_streaming(spec, argv: list[str], docker_host: str | None = None,
                   raw: bool = False, tty: bool = False, interactive: bool = False,
                   secrets: dict[str, str] | None = None) -> int:
    """Run argv, copying its output live and our stdin to it; returns the exit status
    (tty: on a pty, see corral.runtime.interactive; secrets: the values of
    spec.secrets, which only the native backend takes). Without a tty or an image the
    sandbox is one-shot: its PID 1 starts argv itself (Sandbox.start_running), with a
    scratch /workspace unless --workspace names one."""
    from corral.sandbox import ExitReason
    from corral.sandbox.backends import new_sandbox

    if secrets:
        from corral.sandbox.backends.native import Sandbox

        sandbox = Sandbox(spec, secrets=secrets)
    else:
        sandbox = new_sandbox(spec, docker_host=docker_host)
    try:
        if tty or spec.image:
            sandbox.start()
            _print_notes(sandbox)
            proc = _run_started(sandbox, argv, raw=raw, tty=tty, interactive=interactive)
            if isinstance(proc, int):  # the terminal's own stop (a signal)
                return proc
        else:
            proc = sandbox.start_running(argv, scratch_workspace=True)
            _print_notes(sandbox)
            _pump_streaming(proc, raw)
    finally:
        sandbox.destroy()
    if proc.reason == ExitReason.TIMEOUT:
        print(f"corral: {argv[0]}: killed after the {spec.timeout_s:g}s timeout", file=sys.stderr)
        return exits.EXIT_TIMEOUT
    if proc.reason == ExitReason.OOM:
        print(f"corral: {argv[0]}: killed by the {_size(spec.memory_bytes)} memory limit (OOM)",
              file=sys.stderr)
        return exits.EXIT_OOM
    return exits.shell_status(proc.returncode)


def _print_notes(sandbox) -> None:
    for note in getattr(sandbox, "notes", ()):  # what it runs without, e.g. cgroups
        print(f"corral: {note}", file=sys.stderr, flush=True)


def _run_started(sandbox, argv: list[str], *, raw: bool, tty: bool, interactive: bool):
    """argv in a started sandbox (an image's command, or on a pty); returns its Process
    once it ended, or the exit status when the terminal stopped it."""
    extra: dict = {}
    if sandbox.spec.image:  # the image's Entrypoint/Cmd, Env, WorkingDir and User
        from corral.sandbox.images import runconfig

        for note in runconfig.notes(sandbox.image_config):
            print(f"corral: {note}", file=sys.stderr, flush=True)
        cmd = sandbox.image_command(argv)
        argv = cmd.argv
        extra = {"env": cmd.env, "user": cmd.user}
        if cmd.cwd:
            extra["cwd"] = cmd.cwd
    if not tty:
        proc = sandbox.exec(argv, **extra)
        _pump_streaming(proc, raw)
        return proc
    from corral.runtime import interactive as term

    size = term.RawTerminal(0).window()
    env = {"TERM": os.environ["TERM"]} if os.environ.get("TERM") else None
    if extra:
        extra["env"] = {**extra["env"], **(env or {})}
        env = extra.pop("env")
    proc = sandbox.exec(argv, tty=size, env=env, **extra)
    stopped = term.run_on_terminal(proc, interactive=interactive, raw=raw)
    return exits.killed_by(stopped) if stopped is not None else proc


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


def report_egress(path: str | None) -> None:
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
            elif event.get("kind") == "net.secret":
                print(visible(f"corral: egress blocked {event.get('mode', '')} "
                              f"{event.get('name') or event.get('address', '')}: the "
                              f"placeholder of secret {event['secret']} in the "
                              f"{event['where']}"), file=sys.stderr, flush=True)
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


