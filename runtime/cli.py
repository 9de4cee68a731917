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
default policy: new user/PID/mount/network/UTS/IPC/cgroup namespaces (root inside is an
unprivileged id outside), loopback-only network, read-only host /usr /bin /sbin /lib*,
minimal /etc, fresh /proc with host-wide files masked, minimal /dev, tmpfs /tmp, writable
/workspace (the working directory), no capabilities, no_new_privs, landlock (writes only
to /workspace, /tmp, /dev/shm and terminals), the "default" seccomp profile.

exit status: the command's own, 128+N when it was killed by signal N, 124 on timeout,
137 when the memory limit killed it, 125 when the sandbox could not be set up, 127 when
the command does not exist inside the sandbox, 2 on a usage error.
"""


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
                   help="host directory mounted writable at /workspace "
                        "(default: a fresh temporary directory, removed afterwards)")
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
        usage="corral run [OPTIONS] -- CMD [ARGS...]",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_policy_flags(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
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
    if not argv:
        return _fail("run: no command given; usage: corral run [OPTIONS] -- CMD [ARGS...]",
                     EXIT_USAGE)
    try:
        spec = SandboxSpec.build(
            profile=args.profile, memory=args.memory, pids=args.pids, cpus=args.cpus,
            timeout=args.timeout, workspace=args.workspace, ro=args.ro, rw=args.rw,
            env=args.env, tmp_size=args.tmp_size,
        )
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", EXIT_USAGE)
    try:
        return _run_streaming(spec, argv)
    except InvalidSpec as exc:
        return _fail(f"run: {exc}", EXIT_USAGE)
    except CommandNotFound as exc:
        return _fail(f"run: {exc}", 127)
    except SandboxSetupError as exc:
        return _fail(f"run: {exc}", 125)
    except CorralError as exc:
        return _fail(f"run: {exc}", 125)


def _run_streaming(spec, argv: list[str]) -> int:
    """Run argv, copying its output live and our stdin to it; returns the exit status."""
    import selectors
    import signal
    import threading

    from corral.sandbox import ExitReason, Sandbox

    with Sandbox.create(spec) as sandbox:
        proc = sandbox.exec(argv)
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
            sel = selectors.DefaultSelector()
            sinks = {proc.stdout.fileno(): sys.stdout.buffer,
                     proc.stderr.fileno(): sys.stderr.buffer}
            for f in (proc.stdout, proc.stderr):
                sel.register(f, selectors.EVENT_READ)
            while sel.get_map():
                remaining = proc.remaining()
                if remaining == 0:
                    proc.expire()
                for key, _ in sel.select(remaining):
                    fd = key.fileobj.fileno()
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    sink = sinks[fd]
                    sink.write(chunk)
                    sink.flush()
            proc.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if proc.reason == ExitReason.TIMEOUT:
        print(f"corral: {argv[0]}: killed after the {spec.timeout_s:g}s timeout", file=sys.stderr)
        return 124
    if proc.reason == ExitReason.OOM:
        print(f"corral: {argv[0]}: killed by the {_size(spec.memory_bytes)} memory limit (OOM)",
              file=sys.stderr)
        return 137
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


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
    parser.print_help(sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
