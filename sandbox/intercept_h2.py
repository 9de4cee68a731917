"""HTTP/2 from the sandbox on an intercepted connection (sandbox/intercept.py, rule 7).

A sandbox client that chose h2 by ALPN speaks it to us; the server is spoken to in
HTTP/1.1 (h11), one upstream connection per request in flight, so many concurrent
streams stay concurrent. The rules are those of HTTP/1.1, stream by stream:

- A request (its pseudo-headers, :path with its query, and headers) is rewritten whole;
  its DATA is gathered up to MAX_REWRITTEN_BODY and rewritten whole, so a placeholder
  split across frames is found like any other. A longer body is refused (413) before
  one byte of it goes out.
- A placeholder of a secret not bound to this host refuses that stream with a 403 and
  a `net.secret` record; nothing of the request reaches the server. Other streams go on.
- The response's headers and DATA are scrubbed (DATA as it streams, so Content-Length
  is dropped), and sent as the sandbox's flow-control windows allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11

from .intercept import MAX_REWRITTEN_BODY, UPSTREAM_FAILED
from .secrets import Exfiltration, SecretSet

#: Headers of one hop in HTTP/1.1 that HTTP/2 forbids (RFC 9113 8.2.2).
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                         b"transfer-encoding", b"upgrade", b"te"})
#: Upstream HTTP/1.1 connections kept idle for the next stream of one h2 connection.
MAX_IDLE_UPSTREAM = 8


class H2Sandbox:
    """Our server side of the sandbox's h2 connection: frames in and out, flow control."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.window = asyncio.Event()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.pipe.send(data)

    async def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        """Send data as the stream's and the connection's windows allow (waits for
        WINDOW_UPDATE; a reset stream raises h2's StreamClosedError)."""
        view = memoryview(data)
        while view:
            room = min(self.conn.local_flow_control_window(stream_id), len(view))
            if room <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            frame = self.conn.max_outbound_frame_size
            for start in range(0, room, frame):  # every frame the window allows, one write
                self.conn.send_data(stream_id, view[start:min(start + frame, room)])
            view = view[room:]
            await self.flush()
        if end:
            self.conn.end_stream(stream_id)
            await self.flush()

    async def respond(self, stream_id: int, status: int, text: str) -> None:
        """Answer a stream ourselves (best effort: it may be reset meanwhile)."""
        body = text.encode()
        with contextlib.suppress(h2.exceptions.ProtocolError, OSError, ssl.SSLError):
            self.conn.send_headers(stream_id, [
                (b":status", str(status).encode()), (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode())])
            await self.send_data(stream_id, body, True)


class H1Upstream:
    """HTTP/1.1 connections to the server behind one h2 connection: the first is the
    one the proxy made and checked; more go to the same verified peer address."""

    def __init__(self, first_peer, host: str, open_peer):
        self.host = host
        self.open_peer = open_peer  # coroutine (connected socket) -> handshaken _Peer
        self.address = first_peer.pipe.sock.getpeername()
        self.idle = [first_peer]
        self.opened = [first_peer]

    async def _take(self):
        if self.idle:
            return self.idle.pop()
        sock = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.address[:2])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = await self.open_peer(sock)
        except BaseException:
            sock.close()
            raise
        self.opened.append(peer)
        return peer

    async def exchange(self, headers, body: bytes):
        """Send one translated request; yield the response head, then DATA chunks."""
        peer = await self._take()
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        fields = [(k, v) for k, v in headers if not k.startswith(b":") and k not in HOP_HEADERS
                  and k != b"host"]
        fields.insert(0, (b"host", pseudo.get(b":authority", self.host.encode())))
        cookies = [v for k, v in fields if k == b"cookie"]  # h2 may split them (8.2.3)
        fields = [(k, v) for k, v in fields if k not in (b"content-length", b"cookie")]
        if cookies:
            fields.append((b"cookie", b"; ".join(cookies)))
        if body or pseudo.get(b":method") not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            fields.append((b"content-length", str(len(body)).encode()))
        await peer.send(h11.Request(method=pseudo.get(b":method", b"GET"),
                                    target=pseudo.get(b":path", b"/"), headers=fields),
                        *([h11.Data(data=body)] if body else []), h11.EndOfMessage())
        response = await peer.next_event()
        while isinstance(response, h11.InformationalResponse):
            response = await peer.next_event()
        if not isinstance(response, h11.Response):
            raise h11.RemoteProtocolError("the server closed without a response")
        yield response
        bodiless = pseudo.get(b":method") == b"HEAD" or response.status_code in (204, 304)
        while not bodiless:
            part = await peer.next_event()
            if isinstance(part, h11.EndOfMessage):
                break
            if not isinstance(part, h11.Data):
                raise h11.RemoteProtocolError("the server closed in the middle of a body")
            yield part.data
        if peer.h11.our_state is h11.DONE and peer.h11.their_state is h11.DONE \
                and len(self.idle) < MAX_IDLE_UPSTREAM:
            peer.h11.start_next_cycle()
            self.idle.append(peer)

    async def close(self) -> None:
        """Close the connections opened here (the first is the proxy's to close)."""
        for peer in self.opened[1:]:
            await peer.pipe.close()
            peer.pipe.sock.close()


async def serve_h2(secrets: SecretSet, host: str, sandbox: H2Sandbox,
                   upstream: H1Upstream | None,
                   event: dict, on_block, idle_timeout: float) -> None:
    """Read the sandbox's frames until it ends the connection; each complete request
    runs as its own task (concurrent streams). With no stream open, the connection may
    stay idle idle_timeout seconds."""
    sandbox.conn.initiate_connection()
    await sandbox.flush()
    requests: dict[int, tuple[list, bytearray]] = {}
    tasks: dict[int, asyncio.Task] = {}
    try:
        while True:
            busy = requests or tasks  # a long response may go on without a frame from us
            async with asyncio.timeout(None if busy else idle_timeout):
                data = await sandbox.pipe.recv()
            if not data:
                return
            for ev in sandbox.conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return
                _on_event(ev, sandbox, requests, tasks, lambda sid, head, body: _stream(
                    secrets, host, sandbox, upstream, event, on_block, sid, head,
                    body))
            await sandbox.flush()
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        with contextlib.suppress(h2.exceptions.ProtocolError, OSError, ssl.SSLError):
            sandbox.conn.close_connection()
            await sandbox.flush()


def _on_event(ev, sandbox: H2Sandbox, requests: dict, tasks: dict, start) -> None:
    """Gather one stream's request; start its task once it has ended."""
    sid = getattr(ev, "stream_id", None)
    if isinstance(ev, h2.events.RequestReceived):
        requests[sid] = (list(ev.headers), bytearray())
    elif isinstance(ev, h2.events.DataReceived):
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            sandbox.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        if sid in requests:
            requests[sid][1].extend(ev.data)
            if len(requests[sid][1]) > MAX_REWRITTEN_BODY:
                del requests[sid]
                _spawn(tasks, sid, sandbox.respond(
                    sid, 413, "corral: an HTTP/2 request body to a host a secret is bound "
                              f"to may be {MAX_REWRITTEN_BODY} bytes at most\n"))
    elif isinstance(ev, h2.events.StreamEnded) and sid in requests:
        head, body = requests.pop(sid)
        _spawn(tasks, sid, start(sid, head, bytes(body)))
    elif isinstance(ev, h2.events.StreamReset):
        requests.pop(sid, None)
        if sid in tasks:
            tasks[sid].cancel()
        sandbox.window.set()
    elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
        sandbox.window.set()


def _spawn(tasks: dict, sid: int, coro) -> None:
    tasks[sid] = asyncio.ensure_future(coro)
    tasks[sid].add_done_callback(lambda _t: tasks.pop(sid, None))


async def _stream(secrets: SecretSet, host: str, sandbox: H2Sandbox,
                  upstream: H1Upstream | None, event: dict, on_block, sid: int, head: list,
                  body: bytes) -> None:
    """One request: rewrite or refuse it, relay it, scrub its response back."""
    if upstream is None:
        await sandbox.respond(sid, 502, UPSTREAM_FAILED.format(host=host))
        return
    rewrite = secrets.request_rewriter(host)
    try:
        head = [(rewrite.whole(k), rewrite.whole(v)) for k, v in head]
        body = rewrite.whole(body)
    except Exfiltration as exc:
        event.update(decision="deny", reason=f"blocked: the placeholder of secret "
                                             f"{exc.secret} in an HTTP/2 request")
        on_block(exc.secret, "HTTP/2 request")
        await sandbox.respond(sid, 403, f"corral: refused: the request carries the "
                                        f"placeholder of secret {exc.secret}, which is "
                                        "not bound to this host\n")
        return
    if any(k == b":protocol" for k, _ in head):
        await sandbox.respond(sid, 501, "corral: extended CONNECT to a host a secret is "
                                        "bound to is not supported\n")
        return
    event["substituted"] += rewrite.replaced
    event["bytes_out"] += len(body)
    scrub = secrets.response_scrubber(host)
    try:
        parts = upstream.exchange(head, body)
        response = await anext(parts)
        sandbox.conn.send_headers(sid, [(b":status", str(response.status_code).encode())] + [
            (scrub.whole(k), scrub.whole(v)) for k, v in response.headers
            if k not in HOP_HEADERS and k != b"content-length"])
        await sandbox.flush()
        async for chunk in parts:
            event["bytes_in"] += len(chunk)
            await sandbox.send_data(sid, scrub.feed(chunk), False)
        await sandbox.send_data(sid, scrub.finish(), True)
    except h2.exceptions.ProtocolError:
        return  # the sandbox reset the stream, or the connection is ending
    except (h11.ProtocolError, OSError, ssl.SSLError) as exc:
        event.setdefault("error", f"HTTP/2 stream {sid} upstream: {type(exc).__name__}")
        with contextlib.suppress(h2.exceptions.ProtocolError):
            sandbox.conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        with contextlib.suppress(OSError, ssl.SSLError):
            await sandbox.flush()
