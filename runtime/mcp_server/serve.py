"""How `corral mcp` serves its tools: over stdio, or over the SDK's streamable HTTP behind an
optional bearer token, until the client leaves or a SIGTERM/SIGINT comes.

A signal cancels the serving task group (anyio's signal receiver), so that the caller's
`finally` (which stops a private daemon) always runs; the session streams the tools hold
are let go of on the way out.
"""

from __future__ import annotations

import hmac
import os
import signal
import socket
import sys

import anyio

from .tools import build_server


def serve(client, listen: tuple[str, int] | None, token: str | None) -> None:
    """Serve over stdio (listen None) or streamable HTTP at listen, to its end."""
    server, tools = build_server(client)
    try:
        if listen is None:
            anyio.run(_until_signal, lambda: _serve_stdio(server))
        else:
            anyio.run(_until_signal, lambda: _serve_http(server, listen, token))
    finally:
        tools.sessions.detach_all()


async def _until_signal(serve_fn) -> None:
    """Run serve_fn() until it returns or SIGTERM/SIGINT arrives."""
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    group.cancel_scope.cancel()
                    return

        group.start_soon(stop_on_signal)
        await serve_fn()
        group.cancel_scope.cancel()


class CancellableStdin:
    """The lines of fd 0, read without a thread so that a signal's cancel ends the read.

    The SDK's own stdin reader blocks a worker thread in read(2), and a cancelled task
    waits for that thread: a SIGTERM would wait for the client's next line.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._pending = b""

    def __aiter__(self) -> CancellableStdin:
        return self

    async def __anext__(self) -> str:
        while b"\n" not in self._pending:
            await anyio.wait_readable(self.fd)
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if not self._pending:
                    raise StopAsyncIteration
                line, self._pending = self._pending, b""
                return line.decode("utf-8", errors="replace")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return (line + b"\n").decode("utf-8", errors="replace")


async def _serve_stdio(server) -> None:
    """MCPServer.run_stdio_async with CancellableStdin in place of the SDK's reader; stdout
    is still claimed by the SDK (stray output goes to stderr, never the wire)."""
    from mcp.server.stdio import stdio_server

    was_blocking = os.get_blocking(0)
    os.set_blocking(0, False)
    lowlevel = server._lowlevel_server  # what run_stdio_async runs; no public name for it
    try:
        async with stdio_server(stdin=CancellableStdin(0)) as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream,
                               lowlevel.create_initialization_options())
    finally:
        os.set_blocking(0, was_blocking)


class BearerGate:
    """ASGI middleware: a request without `Authorization: Bearer TOKEN` gets 401 and never
    reaches the MCP app (compared in constant time)."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body",
                            "body": b"corral mcp: a bearer token is required\n"})
                return
        await self.app(scope, receive, send)


async def _serve_http(server, listen: tuple[str, int], token: str | None) -> None:
    """The SDK's streamable HTTP app under uvicorn, on a socket bound here so that port 0
    is told: the address is printed on stderr once it listens."""
    import uvicorn

    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    app = server.streamable_http_app(host=host)
    if token:
        app = BearerGate(app, token)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"corral mcp: serving on http://{shown}:{sock.getsockname()[1]}/mcp",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    try:
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
