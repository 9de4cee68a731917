"""The descriptor holder of live restore: a small process that keeps a daemon's sandboxes'
descriptors open while the daemon is away (SIGKILL, crash, stop, upgrade).

What a sandbox needs to outlive its daemon is a set of open descriptors: PID 1's pidfd,
the read end of corral-init's exit-status pipe, each running command's output read ends,
stdin write end or pty master, its egress proxy's listening sockets, egress namespace and
BPF link (sandbox/net.py). Were the daemon their only holder, its death would close
them: a command writing output would get SIGPIPE, and PID 1's exit reports would be lost.
The holder keeps a copy of each, received over SCM_RIGHTS, and never reads or writes them,
so the kernel's pipe buffers keep what was written meanwhile (a command blocks when its
pipe is full: output is delayed, never lost). A restarted daemon connects and gets copies
back; the holder keeps its own until told to forget them.

It is its own program (`python -I holder.py --socket PATH`), in its own session, importing
only the standard library: a daemon's SIGKILL, its process group's signals and an upgrade
of the daemon's package do not touch it. Its socket is owner-only (mode 0600 in the 0700
state directory), and every peer's uid is checked (SO_PEERCRED) against the holder's.

Its end, so that it never leaks: when no client has been connected for `orphan_s` seconds
(the daemon holds one connection for its whole life), the holder decides the daemon is
gone for good: it SIGKILLs every process whose pidfd it was told to kill at that point
(the sandboxes' PID 1s, whose namespaces die with them), closes everything and exits. The
next daemon's start-up sweep removes what those sandboxes left. A holder told to `stop`
closes everything and exits at once; one holding nothing exits as soon as no client is
connected.

Protocol: SOCK_SEQPACKET, one JSON object per message, descriptors as SCM_RIGHTS ancillary
data, at most BATCH per message (the kernel's SCM_MAX_FD is 253). Requests:

- {"op": "put", "key": K, "kill": [i, ...], "replace": bool, "transient": bool}: add the
  message's descriptors to group K (replace: close what K held first); "kill" indexes,
  within this message, the pidfds to SIGKILL at the orphan end. A transient group (a warm
  pool's ready sandbox) belongs to the connection that put it: when that connection ends
  its pidfds are SIGKILLed and the group closed, so it dies with its daemon; a put with
  replace and not transient makes it an ordinary group. Answer {"ok": true, "held": N}.
- {"op": "get", "key": K}: copies of K's descriptors, in answers {"ok": true, "more": bool}
  carrying up to BATCH each, in the order they were put.
- {"op": "forget", "key": K}: close K's descriptors. Answer {"ok": true, "closed": N}.
- {"op": "list"}: {"ok": true, "keys": {K: count}}.
- {"op": "stop"}: close everything and exit after answering {"ok": true}.

A request the holder cannot use is answered {"ok": false, "error": "field: problem"} and
changes nothing; the connection stays usable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

#: Descriptors per message (the kernel refuses more than SCM_MAX_FD, 253, in one).
BATCH = 250
#: The largest JSON request or answer.
MAX_MESSAGE = 1 << 16
#: Default seconds without any connected client before the holder ends (module docstring).
DEFAULT_ORPHAN_S = 3600.0
#: Seconds an answer may wait for a client that stops reading (it is then dropped).
SEND_TIMEOUT_S = 10.0
#: The socket's name in the daemon's state directory.
SOCKET_NAME = "holder.sock"


class HolderError(Exception):
    """The holder refused a request or could not be reached; the message says why."""


# -- the holder process ---------------------------------------------------------------------


class _Group:
    """The descriptors held under one key, and which of them are pidfds to kill at the end."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.kill: set[int] = set()  # positions in fds
        #: The connection whose end kills and closes it (a transient put), else None.
        self.owner: socket.socket | None = None

    def kill_all(self) -> None:
        for position in sorted(self.kill):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.fds[position], signal.SIGKILL)

    def close(self) -> int:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        count = len(self.fds)
        self.fds, self.kill = [], set()
        return count


class Holder:
    """The holder's state and loop: groups of descriptors by key, and the connected clients."""

    def __init__(self, listener: socket.socket, orphan_s: float) -> None:
        self.listener = listener
        self.orphan_s = orphan_s
        self.groups: dict[str, _Group] = {}
        self.clients: set[socket.socket] = set()
        self.alone_since = time.monotonic()
        self.served_any = False  # a new holder waits for its first client
        self.running = True
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)

    def held(self) -> int:
        return sum(len(group.fds) for group in self.groups.values())

    def serve(self) -> None:
        """Answer clients until stopped, orphaned, or alone with nothing held."""
        while self.running:
            if not self.clients:
                alone = time.monotonic() - self.alone_since
                if self.held() == 0 and self.served_any:
                    break  # nothing to keep for anyone
                if alone >= self.orphan_s:
                    self.orphan_end()
                    break
                timeout = self.orphan_s - alone
            else:
                timeout = None
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.serve_one(key.fileobj)
        self.close()

    def accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = self.listener.accept()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.geteuid():  # the socket's mode says so too; belt and braces
                conn.close()
                return
            # a client that stops reading must not stall the holder for the others
            conn.settimeout(SEND_TIMEOUT_S)
            self.clients.add(conn)
            self.served_any = True
            self.selector.register(conn, selectors.EVENT_READ)

    def serve_one(self, conn: socket.socket) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, BATCH + 3)
        except OSError:
            data, fds, flags = b"", [], 0
        if not data:
            self.drop_client(conn, fds)
            return
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            _close_all(fds)
            _answer(conn, {"ok": False, "error": "message: more than BATCH descriptors "
                                                  f"({BATCH}) or {MAX_MESSAGE} bytes"})
            return
        try:
            try:
                request = json.loads(data)
            except ValueError as exc:
                raise HolderError(f"request: not JSON ({exc})") from None
            if not isinstance(request, dict):
                raise HolderError("request: not a JSON object")
            self.handle(conn, request, fds)
        except HolderError as exc:
            _close_all(fds)
            _answer(conn, {"ok": False, "error": str(exc)})

    def drop_client(self, conn: socket.socket, fds: list[int]) -> None:
        _close_all(fds)
        self.selector.unregister(conn)
        self.clients.discard(conn)
        for key in [k for k, g in self.groups.items() if g.owner is conn]:
            group = self.groups.pop(key)
            group.kill_all()
            group.close()
        conn.close()
        if not self.clients:
            self.alone_since = time.monotonic()

    def handle(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        op = request.get("op")
        if op == "list":
            _answer(conn, {"ok": True, "keys": {k: len(g.fds) for k, g in self.groups.items()}})
            return
        if op == "stop":
            _answer(conn, {"ok": True})
            self.running = False
            return
        if op not in ("put", "get", "forget"):
            raise HolderError(f"op: unknown operation {op!r}")
        key = request.get("key")
        if not isinstance(key, str) or not key:
            raise HolderError("key: must be a non-empty string")
        if op == "put":
            self.put(conn, key, request, fds)
            return
        if fds:
            raise HolderError(f"op: {op} carries no descriptors")
        if op == "get":
            self.get(conn, key)
        else:
            group = self.groups.pop(key, None)
            _answer(conn, {"ok": True, "closed": group.close() if group else 0})

    def put(self, conn: socket.socket, key: str, request: dict, fds: list[int]) -> None:
        kill = request.get("kill", [])
        if not isinstance(kill, list) or not all(
                isinstance(i, int) and 0 <= i < len(fds) for i in kill):
            raise HolderError(f"kill: indexes of this message's {len(fds)} descriptors")
        group = self.groups.setdefault(key, _Group())
        if request.get("replace"):
            group.close()
            group.owner = conn if request.get("transient") else None
        base = len(group.fds)
        group.fds.extend(fds)
        group.kill.update(base + i for i in kill)
        _answer(conn, {"ok": True, "held": len(group.fds)})

    def get(self, conn: socket.socket, key: str) -> None:
        group = self.groups.get(key)
        if group is None:
            raise HolderError(f"key: nothing held under {key!r}")
        fds = group.fds
        for start in range(0, max(len(fds), 1), BATCH):
            batch = fds[start:start + BATCH]
            more = start + BATCH < len(fds)
            _answer(conn, {"ok": True, "more": more}, batch)

    def orphan_end(self) -> None:
        """No daemon came back: kill the processes it asked for (module docstring)."""
        for group in self.groups.values():
            group.kill_all()

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()
        for conn in list(self.clients):
            conn.close()
        self.clients.clear()
        self.selector.close()


def _answer(conn: socket.socket, answer: dict, fds: list[int] = ()) -> None:
    try:
        socket.send_fds(conn, [json.dumps(answer).encode()], list(fds))
    except TimeoutError:  # it stopped reading: cut it off, its drop comes next
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # a client gone meanwhile: its drop comes next


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _listen(path: str) -> socket.socket:
    """The owner-only listening socket at path (a stale one, with no holder behind it, is
    replaced; the caller checked that none answers)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="holder.py", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--orphan-s", type=float, default=DEFAULT_ORPHAN_S)
    parser.add_argument("--ready-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's or a daemon's signals are not ours
    if args.ready_fd >= 0 and os.fork() > 0:
        os._exit(0)  # the starter reaps this one; the holder lives on, a child of init
    listener = _listen(args.socket)
    holder = Holder(listener, args.orphan_s)
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"R")
        os.close(args.ready_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # the starter stops reading errors once it is ready
        os.close(devnull)
    ours = os.stat(args.socket).st_ino
    try:
        holder.serve()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(args.socket).st_ino == ours:  # not a successor's socket
                os.unlink(args.socket)
    return 0


# -- the daemon's side ----------------------------------------------------------------------


class HolderClient:
    """A connection to a holder (the daemon keeps one open for its whole life)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: str) -> HolderClient:
        """Raises: HolderError: no holder answers at path."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise HolderError(f"holder at {path}: {exc.strerror}") from None
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HolderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, request: dict, fds: list[int] = ()) -> tuple[dict, list[int]]:
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], list(fds))
            data, got, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, BATCH + 3)
        except OSError as exc:
            raise HolderError(f"holder: {exc.strerror}") from None
        if not data:
            raise HolderError("holder: it closed the connection")
        answer = json.loads(data)
        if not answer.get("ok"):
            _close_all(got)
            raise HolderError(answer.get("error", "holder: refused"))
        return answer, got

    def put(self, key: str, fds: list[int], kill: tuple[int, ...] = (),
            replace: bool = True, transient: bool = False) -> int:
        """Hand copies of fds to the holder under key (ours stay open); kill: positions in
        fds of pidfds to SIGKILL if no daemon comes back (transient: as soon as this
        connection ends). Returns how many key holds.

        Raises:
            ValueError: kill names a position outside fds (field "kill").
            HolderError: the holder refused or is gone.
        """
        if any(not 0 <= i < len(fds) for i in kill):
            raise ValueError(f"kill: positions in the {len(fds)} descriptors given")
        held = 0
        for start in range(0, max(len(fds), 1), BATCH):
            batch = fds[start:start + BATCH]
            answer, _ = self._call({
                "op": "put", "key": key, "replace": replace and start == 0,
                "transient": transient,
                "kill": [i - start for i in kill if start <= i < start + len(batch)]}, batch)
            held = answer["held"]
        return held

    def get(self, key: str) -> list[int]:
        """New descriptors for what key holds, in the order they were put (the caller
        closes them). Raises HolderError when nothing is held under key."""
        answer, fds = self._call({"op": "get", "key": key})
        out = list(fds)
        try:
            while answer.get("more"):
                data, got, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, BATCH + 3)
                out.extend(got)
                answer = json.loads(data)
        except (OSError, ValueError):
            _close_all(out)
            raise HolderError("holder: its answer was cut off") from None
        return out

    def forget(self, key: str) -> int:
        return self._call({"op": "forget", "key": key})[0]["closed"]

    def keys(self) -> dict[str, int]:
        return self._call({"op": "list"})[0]["keys"]

    def stop(self) -> None:
        self._call({"op": "stop"})


def start_or_connect(state_dir: str, orphan_s: float = DEFAULT_ORPHAN_S) -> HolderClient:
    """A connection to the holder of state_dir: the one a previous daemon left, or a new
    one started now (its own program and session; no descriptor of ours but its ready
    pipe goes to it).

    Raises:
        HolderError: the holder could not be started (its error output is named).
    """
    path = os.path.join(state_dir, SOCKET_NAME)
    with contextlib.suppress(HolderError):
        client = HolderClient.connect(path)
        try:
            client.keys()  # one that was ending as we connected does not answer
            return client
        except HolderError:
            client.close()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--socket", path,
             "--orphan-s", repr(orphan_s), "--ready-fd", str(ready_w)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(ready_w,), start_new_session=True, cwd="/")
    except OSError as exc:
        os.close(ready_r)
        os.close(ready_w)
        raise HolderError(f"holder: cannot start {sys.executable}: {exc.strerror}") from None
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        started = ready.read(1) == b"R"
    child.wait()  # the first process only: the holder itself forked off and lives on
    with child.stderr:
        if not started:
            error = child.stderr.read().decode(errors="replace").strip()
            raise HolderError(f"holder: it did not start: {error or 'no output'}")
    return HolderClient.connect(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
