"""A warm, single-threaded process that forks attempt shims: `python -m ...zygote FD`.

Starting a shim as a new Python process costs ~100 ms of interpreter start and imports per
attempt. The zygote pays that once: it imports what a shim needs, then for each request on
its socket (descriptor FD, a SOCK_SEQPACKET from the daemon) forks a child that becomes the
shim (new session, stdio to the attempt's shim.log) and answers with the child's pid and a
pidfd of it (SCM_RIGHTS), so the daemon follows the shim exactly as one it started itself.
Forking is safe here: the zygote never starts a thread. The kernel reaps its children
(SIGCHLD ignored); each child restores SIGCHLD before it runs the attempt. The zygote ends
when the daemon closes the socket (or dies); the shims it forked run on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def serve(sock: socket.socket) -> None:
    from . import shim

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message = sock.recv(65536)
        if not message:
            return  # the daemon is gone or let us go
        for line in message.splitlines():
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:  # the shim
                code = 1
                try:
                    sock.close()
                    os.setsid()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    null = os.open(os.devnull, os.O_RDONLY)
                    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.dup2(null, 0)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    os.close(null)
                    os.close(log)
                    os.chdir("/")
                    code = shim.main([request["plan"]])
                except BaseException:  # noqa: BLE001 - a child must never return into the loop
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = -1
            reply = (json.dumps({"pid": pid}) + "\n").encode()
            if pidfd >= 0:
                socket.send_fds(sock, [reply], [pidfd])
                os.close(pidfd)
            else:
                sock.sendall(reply)


def _warm_sandbox_start() -> None:
    """What a sandbox's first start in a process pays once, paid here before any fork: the
    native backend's lazy imports, the seccomp profile's load and BPF compile, the Landlock
    probe (contain.prepare of a default spec; cached by profile digest), then one default
    sandbox started and destroyed, which leaves the rest of the per-process state every
    shim inherits: the base mount namespace (a descriptor), the cgroup layout, the first
    run through the spawn path. Measured: an attempt's sandbox start fell from ~40 ms to
    ~7 ms with the prepare alone, and the real start takes another ~3.5 ms off the first
    start of each shim (docs/architecture.md, deep tasks). No thread is left running, so
    forking stays safe. The start neither sweeps nor keeps shims from sweeping: each
    shim's first start sweeps as before. Best effort: a host where this fails still starts
    shims, each paying it itself."""
    try:
        from corral.ext import _spawn  # noqa: F401
        from corral.sandbox import SandboxSpec, cgroups, contain, mounts  # noqa: F401
        from corral.sandbox.backends import native

        contain.prepare(SandboxSpec())
        swept, native.Sandbox._swept = native.Sandbox._swept, True
        try:
            with native.Sandbox(SandboxSpec()):  # started, then destroyed
                pass
        finally:
            native.Sandbox._swept = swept
    except Exception as exc:  # noqa: BLE001 - a cold first start is slower, not wrong
        print(f"zygote: warming the sandbox start failed: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    # Warm: everything a shim imports, before the first fork.
    from corral.ext import TokenStream  # noqa: F401

    from . import runner, shim  # noqa: F401

    _warm_sandbox_start()

    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
