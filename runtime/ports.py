"""Exposed ports: a host listener on 127.0.0.1 forwarding to 127.0.0.1:PORT in a sandbox.

The listener lives in the daemon, in the host's network namespace, on its event loop. For
each accepted connection the socket to the sandbox is created inside the sandbox's network
namespace by a short-lived thread that setns()es into it (a namespace file descriptor opened
from the sandbox's PID 1 when the port was exposed), makes the socket and returns (the
thread ends either way, so a failed return leaves no thread behind in the wrong namespace).
A socket keeps the namespace it was made in, so the connect and all the copying run on the
event loop in the host namespace: asyncio streams both ways, with half-close (an EOF from
one side is a write_eof() on the other) and backpressure (drain() before the next read).
The forward is one-way: nothing inside the sandbox can reach the host through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass, field

from corral.sandbox.errors import CorralError, InvalidSpec, InvalidTransition

log = logging.getLogger(__name__)

#: Connections open at once through one exposed port; more are closed as they arrive.
MAX_CONNECTIONS_PER_PORT = 64
#: Bytes read from one side before they are written to the other (and drained).
CHUNK_BYTES = 256 << 10
HOST_ADDRESS = "127.0.0.1"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class PortAlreadyExposed(CorralError):
    """That port of the sandbox is already exposed."""

    grpc_status = "ALREADY_EXISTS"


class HostPortInUse(CorralError):
    """The host port asked for is taken."""

    grpc_status = "FAILED_PRECONDITION"


def check_port(name: str, value: int, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if not low <= value <= 65535:
        raise InvalidSpec(name, f"{value} is not a port ({low}-65535)")
    return int(value)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


async def socket_in_netns(netns_fd: int) -> socket.socket:
    """A TCP socket made in the network namespace netns_fd names, by a thread of its own
    that closes netns_fd whatever happens (also when the caller is cancelled meanwhile)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    result: dict = {}

    def work() -> None:
        try:
            host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result["error"] = exc
            return
        try:
            _setns(netns_fd)
            try:
                result["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(host)  # if this fails the thread ends anyway
        except OSError as exc:
            result.setdefault("error", exc)
        finally:
            os.close(host)

    def run() -> None:
        try:
            work()
        finally:
            os.close(netns_fd)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, done, result)

    threading.Thread(target=run, name="corral-port-netns", daemon=True).start()
    return await done


def _settle(done: asyncio.Future, result: dict) -> None:
    if done.cancelled():
        if "sock" in result:
            result["sock"].close()
    elif "sock" in result:
        done.set_result(result["sock"])
    else:
        done.set_exception(result["error"])


@dataclass
class ExposedPort:
    sandbox_id: str
    tenant: str
    port: int
    host_port: int
    netns_fd: int
    server: asyncio.base_events.Server | None = None
    connections: int = 0
    tasks: set = field(default_factory=set)
    closed: bool = False

    @property
    def host_address(self) -> str:
        return HOST_ADDRESS

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed or len(self.tasks) >= MAX_CONNECTIONS_PER_PORT:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self.tasks.add(task)
        self.connections += 1
        writers = [writer]
        clean = False
        try:
            loop = asyncio.get_running_loop()
            # the thread gets its own copy: a close() meanwhile cannot hand it a reused number
            netns = os.dup(self.netns_fd)
            sock = await socket_in_netns(netns)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, (HOST_ADDRESS, self.port))
                inner_reader, inner_writer = await asyncio.open_connection(
                    sock=sock, limit=CHUNK_BYTES)
            except BaseException:
                sock.close()
                raise
            writers.append(inner_writer)
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(reader, inner_writer))
                group.create_task(_pump(inner_reader, writer))
            clean = True
            for w in writers:  # what is still buffered goes out before the close
                w.close()
            for w in writers:
                await w.wait_closed()
        except* OSError as group:
            log.debug("port %s of %s: connection ended: %s", self.port, self.sandbox_id,
                      group.exceptions[0])
        finally:
            if not clean or task.cancelling():
                for w in writers:
                    w.transport.abort()
            self.tasks.discard(task)

    async def close(self) -> None:
        """Close the listener, every connection and the namespace descriptor; safe to call
        again (each resource is let go once), e.g. for a server made after a first call."""
        self.closed = True
        server, self.server = self.server, None
        if self.netns_fd >= 0:
            os.close(self.netns_fd)  # a connection being set up holds its own dup
            self.netns_fd = -1
        if server is not None:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side."""
    try:
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                break
            writer.write(data)
            await writer.drain()  # backpressure: read no more until the other side took it
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        raise


class PortTable:
    """Every exposed port of the daemon, by (sandbox id, port)."""

    def __init__(self) -> None:
        self._ports: dict[tuple[str, int], ExposedPort] = {}

    def count(self, tenant: str) -> int:
        return sum(1 for p in self._ports.values() if p.tenant == tenant)

    def of_sandbox(self, sandbox_id: str) -> list[ExposedPort]:
        return sorted((p for (sid, _), p in self._ports.items() if sid == sandbox_id),
                      key=lambda p: p.port)

    def get(self, sandbox_id: str, port: int) -> ExposedPort | None:
        return self._ports.get((sandbox_id, port))

    async def expose(self, sandbox_id: str, tenant: str, init_pid: int, port: int,
                     host_port: int) -> ExposedPort:
        """Listen on 127.0.0.1:host_port and forward to port inside the sandbox.

        Raises:
            PortAlreadyExposed, HostPortInUse, InvalidTransition (the sandbox has no PID 1).
        """
        key = (sandbox_id, port)
        if key in self._ports:
            raise PortAlreadyExposed(f"port {port} of sandbox {sandbox_id!r} is already "
                                     f"exposed at {HOST_ADDRESS}:{self._ports[key].host_port}")
        try:
            netns_fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidTransition(f"sandbox {sandbox_id!r} is not running ({exc.strerror})") \
                from None
        exposed = ExposedPort(sandbox_id, tenant, port, host_port, netns_fd)
        # held from here on (no await before): a second expose is ALREADY_EXISTS, and the
        # tenant's count includes it
        self._ports[key] = exposed
        try:
            try:  # once now, so that a daemon that may not enter it says so here
                (await socket_in_netns(os.dup(netns_fd))).close()
            except OSError as exc:
                raise InvalidTransition(f"sandbox {sandbox_id!r}: the daemon cannot make "
                                        f"sockets in its network namespace ({exc})") from None
            if exposed.closed:  # the sandbox was destroyed meanwhile
                raise InvalidTransition(f"sandbox {sandbox_id!r} is not running")
            try:
                exposed.server = await asyncio.start_server(
                    exposed._handle, HOST_ADDRESS, host_port, reuse_address=True,
                    limit=CHUNK_BYTES)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise HostPortInUse(f"host_port: {HOST_ADDRESS}:{host_port} is already "
                                        f"in use") from None
                if exc.errno == errno.EACCES:
                    raise HostPortInUse(f"host_port: {HOST_ADDRESS}:{host_port}: "
                                        f"{exc.strerror}") from None
                raise
            if exposed.closed:
                raise InvalidTransition(f"sandbox {sandbox_id!r} is not running")
        except BaseException:
            if self._ports.get(key) is exposed:
                del self._ports[key]
            await asyncio.shield(exposed.close())
            raise
        exposed.host_port = exposed.server.sockets[0].getsockname()[1]
        return exposed

    async def unexpose(self, sandbox_id: str, port: int) -> ExposedPort | None:
        exposed = self._ports.pop((sandbox_id, port), None)
        if exposed is not None:
            await exposed.close()
        return exposed

    async def close_sandbox(self, sandbox_id: str) -> list[ExposedPort]:
        gone = self.of_sandbox(sandbox_id)
        for exposed in gone:
            self._ports.pop((sandbox_id, exposed.port), None)
            await exposed.close()
        return gone
