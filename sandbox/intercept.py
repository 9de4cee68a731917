"""TLS interception toward hosts a secret is bound to: terminate, rewrite, re-encrypt.

The egress proxy (sandbox/proxy.py) hands a connection here once its policy allowed it,
the upstream TCP connection is made and checked, and the destination name is one a
secret of the sandbox is bound to (port 443). The rules this file keeps:

1. Toward the sandbox we are the server, with a leaf for the name from the sandbox's
   own CA (sandbox/secrets.py); ALPN offers h2 and http/1.1 (h2 is served by
   sandbox/intercept_h2.py, rule 7). A client that pins its server's key refuses our
   leaf: its handshake fails and the event says so. Nothing is forwarded then.
2. Toward the server we are an ordinary client: the name is verified against the system
   store, or the operator's bundle (EgressConfig.upstream_ca_file), never skipped. A
   server that fails verification gets no request; the sandbox gets a 502.
3. HTTP/1.1 is parsed with h11 on both sides, one request at a time (keep-alive kept).
   The request's method, target, header names and values are rewritten whole; a body of
   known length up to MAX_REWRITTEN_BODY is rewritten whole and its Content-Length fixed;
   a chunked body is rewritten as it streams (its framing is ours to choose). A longer body of fixed
   length streams unchanged except that another secret's placeholder still stops it.
4. A placeholder of a secret not bound to this host, anywhere in a request, stops it
   before one byte of it goes out (Exfiltration): the sandbox gets a 403, the upstream
   connection is reset, and the proxy records `net.secret` / `blocked-exfiltration`.
5. Responses are scrubbed the same way in reverse: the real value becomes the
   placeholder (in the header values, and in bodies, re-framed when lengths change).
6. A protocol upgrade (WebSocket, h2c) is refused with a 501: after it the stream is no
   longer HTTP and could not be rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from http import HTTPStatus

import h2.exceptions
import h11

from .secrets import Exfiltration, SecretSet, StreamRewriter

#: The largest request or response body of known length rewritten whole (held in memory).
MAX_REWRITTEN_BODY = 1 << 20
#: The largest request or response head h11 accepts.
MAX_HEAD_BYTES = 64 * 1024
READ_BYTES = 256 * 1024
#: The sandbox's answer (502) when the server failed verification or the handshake.
UPSTREAM_FAILED = "corral: TLS with {host} failed verification or did not complete\n"
#: How long a kept-alive connection may wait for the sandbox's next request head.
IDLE_TIMEOUT_S = 300.0
#: Upstream TLS sessions kept for resumption, one per (context, host): a resumed
#: handshake skips the server's certificate chain, most of a new connection's cost here.
MAX_SESSIONS = 1024
_sessions: dict[tuple[int, str], ssl.SSLSession] = {}
#: Per (context, host): an upstream SSLObject (with its BIOs) already given the kept
#: session, made after a connection ends: setting a session copies it (~0.25 ms in
#: CPython), which is then off the next connection's path.
_ready: dict[tuple[int, str], tuple[ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject]] = {}


class TlsPipe:
    """TLS over a non-blocking socket on the proxy's loop (ssl.SSLObject + memory BIOs),
    so bytes the proxy already read while sniffing are fed in first."""

    def __init__(self, sock, tls: tuple[ssl.MemoryBIO, ssl.MemoryBIO, ssl.SSLObject],
                 initial: bytes = b""):
        """tls: (incoming BIO, outgoing BIO, the SSLObject over them)."""
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self._in, self._out, self.tls = tls
        # h2 streams send from several tasks: their records must leave in order, whole
        self._sending = asyncio.Lock()
        if initial:
            self._in.write(initial)

    async def _flush(self) -> None:
        async with self._sending:
            data = self._out.read()
            if data:
                await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        chunk = await self.loop.sock_recv(self.sock, READ_BYTES)
        if chunk:
            self._in.write(chunk)
        else:
            self._in.write_eof()

    async def handshake(self) -> None:
        """Complete the handshake (ssl.SSLError when the peer refuses ours)."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def recv(self) -> bytes:
        """Plaintext as it comes, every record already received at once (one read gives
        one record, 16 KiB at most); b"" at the end (with or without close_notify)."""
        while True:
            try:
                chunks = [self.tls.read(READ_BYTES)]
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
        while self._in.pending or self.tls.pending():
            try:
                chunk = self.tls.read(READ_BYTES)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break  # the rest comes with the next call
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def send(self, data: bytes) -> None:
        if data:
            self.tls.write(data)
            await self._flush()

    async def close(self) -> None:
        """Send close_notify (best effort: the peer may be gone)."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self.tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()


class _Peer:
    """One side of an intercepted exchange: its TLS pipe and its h11 state machine."""

    def __init__(self, pipe: TlsPipe, role):
        self.pipe = pipe
        self.h11 = h11.Connection(role, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.pipe.recv()
            self.h11.receive_data(data)

    async def send(self, *events) -> int:
        """Send events in one write (a head and a short body go out together)."""
        data = b"".join(self.h11.send(event) or b"" for event in events)
        await self.pipe.send(data)
        return len(data)


async def serve(secrets: SecretSet, host: str, conn, upstream, first: bytes, event: dict,
                upstream_context: ssl.SSLContext, on_block) -> None:
    """Intercept one connection to host (a secret-bound name) until either side ends.

    Args:
        conn, upstream: the sandbox's and the server's connected non-blocking sockets.
        first: bytes already read from the sandbox (its ClientHello, or part of it).
        event: the connection's net.connect event (bytes counted, errors noted).
        on_block: called with (secret name, where) when a request is refused.
    """
    event["intercepted"] = True
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bios = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = TlsPipe(conn, (*bios, secrets.ca.server_context(host).wrap_bio(
        *bios, server_side=True)), initial=first)
    key = (id(upstream_context), host)
    server = TlsPipe(upstream, _ready.pop(key, None) or _upstream_tls(upstream_context, host))
    results = await asyncio.gather(client.handshake(), server.handshake(),
                                   return_exceptions=True)
    if isinstance(results[0], BaseException):
        event["error"] = f"TLS with the sandbox failed (a client that pins its server's " \
                         f"certificate refuses interception): {_why(results[0])}"
        return
    failed = isinstance(results[1], BaseException)
    if failed:
        event["error"] = f"TLS with {host} failed: {_why(results[1])}"
    event["substituted"] = 0
    if client.tls.selected_alpn_protocol() == "h2":
        try:
            await _serve_h2(secrets, host, client, None if failed else _Peer(server, h11.CLIENT),
                            upstream_context, event, on_block)
        finally:
            await client.close()
            if not failed:
                _keep_session(key, server.tls, upstream_context, host)
                await server.close()
        return
    sandbox = _Peer(client, h11.SERVER)
    if failed:
        await _refuse(sandbox, 502, UPSTREAM_FAILED.format(host=host))
        return
    remote = _Peer(server, h11.CLIENT)
    try:
        while await _exchange(secrets, host, sandbox, remote, event, on_block):
            sandbox.h11.start_next_cycle()
            remote.h11.start_next_cycle()
    except (h11.ProtocolError, TimeoutError) as exc:
        event.setdefault("error", f"HTTP: {_why(exc)}")
        if sandbox.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _refuse(sandbox, 400 if isinstance(exc, h11.RemoteProtocolError) else 502,
                          "corral: the request or response was not HTTP/1.1 the proxy "
                          "could rewrite\n")
    finally:
        await client.close()  # first: the sandbox's answer is complete at its EOF
        _keep_session(key, server.tls, upstream_context, host)
        await server.close()


async def _serve_h2(secrets, host, client: TlsPipe, remote: _Peer | None, context, event,
                    on_block) -> None:
    """Rule 7: the sandbox's h2 connection, each stream through its own HTTP/1.1 one
    (remote None: the server failed TLS, and every stream gets a 502)."""
    from . import intercept_h2

    async def open_peer(sock) -> _Peer:
        pipe = TlsPipe(sock, _upstream_tls(context, host))
        await pipe.handshake()
        return _Peer(pipe, h11.CLIENT)

    upstream = remote and intercept_h2.H1Upstream(remote, host, open_peer)
    try:
        await intercept_h2.serve_h2(secrets, host, intercept_h2.H2Sandbox(client), upstream,
                                    event, on_block, IDLE_TIMEOUT_S)
    except (h2.exceptions.ProtocolError, TimeoutError) as exc:
        event.setdefault("error", f"HTTP/2: {_why(exc)}")
    finally:
        if upstream is not None:
            await upstream.close()


async def _exchange(secrets, host, sandbox: _Peer, remote: _Peer, event, on_block) -> bool:
    """One request and its response; True when both sides may go on to the next one."""
    async with asyncio.timeout(IDLE_TIMEOUT_S):
        request = await sandbox.next_event()
    if not isinstance(request, h11.Request):
        return False  # the sandbox closed (ConnectionClosed) between requests
    if h11_header(request.headers, b"upgrade") is not None:
        await _refuse(sandbox, 501, "corral: protocol upgrades to a host a secret is bound "
                                    "to are not supported\n")
        return False
    rewrite = secrets.request_rewriter(host)
    try:
        head = h11.Request(method=rewrite.whole(request.method),
                           target=rewrite.whole(request.target),
                           headers=[(rewrite.whole(k), rewrite.whole(v))
                                    for k, v in request.headers if k != b"expect"])
    except Exfiltration as exc:
        return await _block(sandbox, event, on_block, exc.secret, "request head")
    if sandbox.h11.they_are_waiting_for_100_continue:
        await sandbox.send(h11.InformationalResponse(status_code=100, headers=[]))
    try:
        await _relay_body(sandbox, remote, head, rewrite, rewrite,
                          secrets.foreign_scanner(host), event, "bytes_out")
    except Exfiltration as exc:
        return await _block(sandbox, event, on_block, exc.secret, "request body")
    event["substituted"] += rewrite.replaced
    response = await remote.next_event()
    while isinstance(response, h11.InformationalResponse):
        response = await remote.next_event()  # 1xx (we answered 100 ourselves)
    if not isinstance(response, h11.Response):
        raise h11.RemoteProtocolError("the server closed without a response")
    scrub = secrets.response_scrubber(host)
    head = h11.Response(status_code=response.status_code, reason=scrub.whole(response.reason),
                        headers=[(scrub.whole(k), scrub.whole(v)) for k, v in response.headers])
    if request.method == b"HEAD" or response.status_code in (204, 304):
        await _relay_bodiless(remote, sandbox, head, event, "bytes_in")
    else:
        await _relay_body(remote, sandbox, head, scrub, scrub, None, event, "bytes_in")
    return sandbox.h11.our_state is h11.DONE and remote.h11.our_state is h11.DONE \
        and remote.h11.their_state is h11.DONE


async def _relay_body(source: _Peer, dest: _Peer, head, whole: StreamRewriter,
                      streamed: StreamRewriter, fixed: StreamRewriter | None, event: dict,
                      counter: str) -> None:
    """Send head and then the body read from source to dest, rewritten (rule 3 and 5).

    A body of known length up to MAX_REWRITTEN_BODY is read whole first, so a refused
    request never sends its head. A longer one streams through `fixed` (which refuses
    but never resizes) when given, or is re-framed as chunked and rewritten as it comes.
    """
    length = h11_header(head.headers, b"content-length")
    chunked = b"chunked" in (h11_header(head.headers, b"transfer-encoding") or b"").lower()
    if isinstance(head, h11.Request) and length is None and not chunked:
        return await _relay_bodiless(source, dest, head, event, counter)
    if length is not None and not chunked and int(length) <= MAX_REWRITTEN_BODY:
        body = bytearray()
        while not isinstance(part := await source.next_event(), h11.EndOfMessage):
            if isinstance(part, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the peer closed in the middle of a body")
            body += part.data
        data = whole.whole(bytes(body))
        event[counter] += await dest.send(_reheaded(head, len(data)),
                                          *([h11.Data(data=data)] if data else []),
                                          h11.EndOfMessage())
        return
    if length is not None and not chunked and fixed is not None:
        streamed = fixed
    else:
        head = _reheaded(head, None)
    event[counter] += await dest.send(head)
    while True:
        part = await source.next_event()
        if isinstance(part, h11.EndOfMessage):
            tail = streamed.finish()
            event[counter] += await dest.send(*([h11.Data(data=tail)] if tail else []),
                                              h11.EndOfMessage())
            return
        if not isinstance(part, h11.Data):
            raise h11.RemoteProtocolError("the peer closed in the middle of a body")
        out = streamed.feed(part.data)
        if out:
            event[counter] += await dest.send(h11.Data(data=out))


async def _relay_bodiless(source: _Peer, dest: _Peer, head, event: dict,
                          counter: str) -> None:
    """Send a head whose message has no body (a GET, a HEAD's response), framing as is."""
    while not isinstance(part := await source.next_event(), h11.EndOfMessage):
        if isinstance(part, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the peer closed in the middle of a message")
    event[counter] += await dest.send(head, h11.EndOfMessage())


def _upstream_tls(context: ssl.SSLContext, host: str):
    """A client SSLObject for host and its BIOs, resuming the session kept for it."""
    bios = ssl.MemoryBIO(), ssl.MemoryBIO()
    return (*bios, context.wrap_bio(*bios, server_hostname=host,
                                    session=_sessions.get((id(context), host))))


def _keep_session(key: tuple[int, str], tls: ssl.SSLObject, context: ssl.SSLContext,
                  host: str) -> None:
    """Remember a verified upstream session (its ticket) and make the next connection's
    SSLObject ready with it, once this connection's sandbox side is closed.

    A resumed session is kept as it was: reading tls.session costs ~0.2 ms (a copy of
    the session), as much as a third of an intercepted connection's added time."""
    if not (tls.session_reused and key in _sessions):
        session = tls.session
        if session is None or not session.has_ticket:
            return
        if len(_sessions) >= MAX_SESSIONS and key not in _sessions:
            _ready.pop(evicted := next(iter(_sessions)), None)
            _sessions.pop(evicted)
        _sessions[key] = session
    if key not in _ready:
        _ready[key] = _upstream_tls(context, host)


def h11_header(headers, name: bytes) -> bytes | None:
    """The value of a header (h11 keeps names lower case), None when absent."""
    return next((v for k, v in headers if k == name), None)


def _reheaded(head, length: int | None):
    """head (a Request or Response) with Content-Length set to length, or, for None,
    without it and chunked (the body streams and its length may change)."""
    out = [(k, v) for k, v in head.headers if k != b"content-length"]
    if length is not None:
        out = [(k, v) for k, v in out if k != b"transfer-encoding"]
        out.append((b"content-length", str(length).encode()))
    elif h11_header(out, b"transfer-encoding") is None:
        out.append((b"transfer-encoding", b"chunked"))
    if isinstance(head, h11.Request):
        return h11.Request(method=head.method, target=head.target, headers=out)
    return h11.Response(status_code=head.status_code, reason=head.reason, headers=out)


async def _block(sandbox: _Peer, event: dict, on_block, secret: str, where: str) -> bool:
    """Refuse a request that carries another secret's placeholder (rule 4)."""
    event.update(decision="deny", reason=f"blocked: the placeholder of secret {secret} "
                                         f"in the {where}")
    on_block(secret, where)
    await _refuse(sandbox, 403, f"corral: refused: the request carries the placeholder of "
                                f"secret {secret}, which is not bound to this host\n")
    return False


async def _refuse(peer: _Peer, status: int, text: str) -> None:
    """Answer the sandbox ourselves and end the connection (best effort)."""
    body = text.encode()
    with contextlib.suppress(h11.LocalProtocolError, OSError, ssl.SSLError):
        await peer.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase,
                                     headers=[
            (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage())


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
