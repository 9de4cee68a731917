"""Python client of the Corral daemon (synchronous, over grpc), used by the CLI and tests.

    from corral.runtime.client import Client
    with Client.connect() as c:                       # $CORRAL_SOCKET or the default socket
        sb = c.create_sandbox(memory_bytes=256 << 20)
        for event in c.exec(sb.id, ["python3", "-c", "print(42)"]):
            ...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from corral.ext.sparse import data_ranges
from corral.v1 import (
    audit_pb2,
    image_pb2,
    sandbox_pb2,
    session_pb2,
    snapshot_pb2,
    stream_pb2,
    task_pb2,
)

from .api.wire import MAX_MESSAGE_BYTES, varint
from .locations import default_socket

#: The daemon answers up to MAX_MESSAGE_BYTES in one message; gRPC clients take 4 MiB
#: unless told otherwise.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]

#: Bytes per Upload chunk the client sends (the daemon takes up to 4 MiB).
UPLOAD_CHUNK_BYTES = 2 << 20

SOCKET_ENV = "CORRAL_SOCKET"
TOKEN_ENV = "CORRAL_TOKEN"


class ClientError(Exception):
    """An RPC failed; carries the gRPC status name and the daemon's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        super().__init__(f"{code.name}: {message}")


def _wrap(exc: grpc.RpcError) -> ClientError:
    return ClientError(exc.code(), exc.details() or "")


def _until_cancelled(responses):
    """The responses of a streaming call: a cancel of ours ends them quietly, any other
    failure is a ClientError."""
    try:
        yield from responses
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise _wrap(exc) from None


class FileContent(bytes):
    """What Client.read_file returns: the bytes read, and whether the file is longer."""

    truncated: bool

    def __new__(cls, content: bytes, *, truncated: bool = False) -> FileContent:
        self = super().__new__(cls, content)
        self.truncated = truncated
        return self


@dataclass
class Tokens:
    """Tokens of one StreamBatch, decoded for display."""

    first_seq: int
    texts: list[str]
    events: list[stream_pb2.StreamEvent]
    lost: int
    last_seq: int


def decode_batch(batch: stream_pb2.StreamBatch) -> Tokens:
    texts, pos = [], 0
    raw = batch.text
    for length in batch.lengths:
        texts.append(raw[pos:pos + length].decode("utf-8"))
        pos += length
    return Tokens(batch.first_seq, texts, list(batch.events), batch.lost.count,
                  _last_seq(batch))


def _last_seq(batch: stream_pb2.StreamBatch) -> int:
    """The seq of a batch's last entry (tokens and events)."""
    return batch.first_seq + len(batch.lengths) + len(batch.events) - 1


def _session_start(argv: list[str], sandbox_id: str, env, input: str, labels, request_id: str,
                   spec: dict, delegations_from: str = "",
                   wait_if_paused: bool = False) -> session_pb2.SessionStart:
    """A SessionStart in sandbox_id, or, without one, in a new sandbox of spec."""
    start = session_pb2.SessionStart(argv=argv, env=env or {}, input=input,
                                     labels=labels or {}, request_id=request_id,
                                     delegations_from=delegations_from,
                                     wait_if_paused=wait_if_paused)
    if sandbox_id:
        start.sandbox_id = sandbox_id
    else:
        start.spec.CopyFrom(sandbox_pb2.SandboxSpec(**spec))
    return start


class _QueuedRequests:
    """A bidirectional call fed from a queue: requests go out in order from any thread;
    None ends the request side."""

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()

    def _request_iter(self):
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _responses(self, call):
        """The call's responses; a cancel of ours ends them quietly, other errors are
        ClientError; the request side is ended either way."""
        try:
            yield from _until_cancelled(call)
        finally:
            self._requests.put(None)


class SessionStream(_QueuedRequests):
    """One open Sessions.Open stream: send steering, iterate server events."""

    def __init__(self, stub, first: session_pb2.SessionRequest, metadata):
        super().__init__()
        self._requests.put(first)
        self._call = stub.Open(self._request_iter(), metadata=metadata)
        self.session_id = ""
        self.last_seq = 0

    def send_input(self, text: str) -> None:
        self._requests.put(session_pb2.SessionRequest(input=session_pb2.SessionInput(text=text)))

    def interrupt(self) -> None:
        self._requests.put(session_pb2.SessionRequest(interrupt=session_pb2.SessionInterrupt()))

    def close_session(self, detach: bool = False) -> None:
        """End the session; detach=True lets the deep tasks it delegated run on."""
        self._requests.put(session_pb2.SessionRequest(
            close=session_pb2.SessionClose(detach=detach)))

    def detach(self) -> None:
        """Drop this connection; the session keeps running on the daemon."""
        self._requests.put(None)
        self._call.cancel()

    def __iter__(self) -> Iterator[session_pb2.SessionEvent]:
        for event in self._responses(self._call):
            kind = event.WhichOneof("event")
            if kind == "opened":
                self.session_id = event.opened.session_id
            elif kind == "batch":
                self.last_seq = _last_seq(event.batch)
            yield event


class SessionMux(_QueuedRequests):
    """One Sessions.OpenMany stream: many sessions, each under a ref of the caller's choice.

        mux = client.open_many()
        mux.start("a", ["python3", "agent.py"], sandbox_id=sb.id)
        for ref, event in mux:          # (ref, SessionEvent), in order per session
            ...

    Requests are queued and sent in order; iterate on one thread. `close()` half-closes:
    the stream ends once every session on it has exited or been detached.
    """

    def __init__(self, stub, metadata):
        super().__init__()
        self._call = stub.OpenMany(self._request_iter(), metadata=metadata)
        self.session_ids: dict[str, str] = {}  # ref -> session id, once opened
        self.last_seq: dict[str, int] = {}  # ref -> newest seq received

    def _send(self, ref: str, **request) -> None:
        self._requests.put(session_pb2.MuxRequest(ref=ref, **request))

    def start(self, ref: str, argv: list[str], *, sandbox_id: str = "", env=None,
              input: str = "", labels=None, request_id: str = "", **spec) -> None:
        """Start a session as ref; labels and request_id as Client.open_session."""
        self._send(ref, start=_session_start(argv, sandbox_id, env, input, labels, request_id,
                                             spec))

    def resume(self, ref: str, session_id: str, after_seq: int = 0,
               watch_only: bool = False) -> None:
        self._send(ref, resume=session_pb2.SessionResume(
            session_id=session_id, after_seq=after_seq, watch_only=watch_only))

    def send_input(self, ref: str, text: str) -> None:
        self._send(ref, input=session_pb2.SessionInput(text=text))

    def interrupt(self, ref: str) -> None:
        self._send(ref, interrupt=session_pb2.SessionInterrupt())

    def close_session(self, ref: str, detach: bool = False) -> None:
        """End ref's session; detach=True lets the deep tasks it delegated run on."""
        self._send(ref, close=session_pb2.SessionClose(detach=detach))

    def detach(self, ref: str) -> None:
        """Stop watching ref's session on this stream; the session keeps running."""
        self._send(ref, detach=session_pb2.SessionDetach())

    def close(self) -> None:
        """No more requests; the stream ends when its sessions have all ended or detached."""
        self._requests.put(None)

    def cancel(self) -> None:
        """Drop the stream now; its sessions keep running on the daemon."""
        self._requests.put(None)
        self._call.cancel()

    def __iter__(self) -> Iterator[tuple[str, session_pb2.SessionEvent]]:
        for message in self._responses(self._call):
            for item in message.events:
                ref, event = item.ref, item.event
                kind = event.WhichOneof("event")
                if kind == "opened":
                    self.session_ids[ref] = event.opened.session_id
                elif kind == "batch":
                    self.last_seq[ref] = _last_seq(event.batch)
                yield ref, event


@dataclass(frozen=True)
class Endpoint:
    """Where a daemon listens and how to speak to it: the channel address, TLS credentials
    (None: plaintext) and the metadata of every call. Shared by Client.connect and the
    asyncio SDK (corral.AsyncClient), which open their channels from it."""

    address: str
    credentials: grpc.ChannelCredentials | None
    metadata: tuple

    @classmethod
    def resolve(cls, socket: str | None = None, target: str | None = None,
                token: str | None = None, tenant: str | None = None,
                root_certificates: bytes | None = None, client_cert: bytes | None = None,
                client_key: bytes | None = None) -> Endpoint:
        """The endpoint Client.connect's arguments name.

        Raises:
            ClientError: UNAUTHENTICATED for a target without a token, UNAVAILABLE when no
                daemon socket exists.
        """
        if target:
            token = token or os.environ.get(TOKEN_ENV)
            if not token:
                raise ClientError(grpc.StatusCode.UNAUTHENTICATED,
                                  f"--target needs a token (--token or ${TOKEN_ENV})")
            credentials = None
            if root_certificates or client_cert:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates, private_key=client_key, certificate_chain=client_cert)
            return cls(target, credentials, (("authorization", f"Bearer {token}"),))
        path = socket or os.environ.get(SOCKET_ENV) or default_socket()
        if not os.path.exists(path):
            raise ClientError(grpc.StatusCode.UNAVAILABLE,
                              f"no daemon socket at {path}; start one with `corral daemon`")
        return cls(f"unix:{path}", None, (("x-corral-tenant", tenant),) if tenant else ())


class Client(contextlib.AbstractContextManager):
    """A connection to one daemon."""

    def __init__(self, channel: grpc.Channel, metadata: tuple = ()):
        self.channel = channel
        self.metadata = tuple(metadata)
        self.sandboxes = service_stub(channel, sandbox_pb2, "Sandboxes")
        self.sessions = service_stub(channel, session_pb2, "Sessions")
        self.audit = service_stub(channel, audit_pb2, "Audit")
        self.tasks = service_stub(channel, task_pb2, "Tasks")
        self.nodes = service_stub(channel, task_pb2, "Nodes")
        self.snapshots = service_stub(channel, snapshot_pb2, "Snapshots")
        self.images = service_stub(channel, image_pb2, "Images")

    @classmethod
    def connect(cls, socket: str | None = None, target: str | None = None,
                token: str | None = None, tenant: str | None = None,
                root_certificates: bytes | None = None, client_cert: bytes | None = None,
                client_key: bytes | None = None) -> Client:
        """Unix socket (default: $CORRAL_SOCKET, else the daemon's default path) or TCP.

        Over TCP, TLS is used when root_certificates (PEM of the CA that signed the daemon's
        certificate) or a client certificate is given; client_cert + client_key (PEM) answer
        a daemon that requires mTLS.
        """
        where = Endpoint.resolve(socket, target, token, tenant, root_certificates,
                                 client_cert, client_key)
        if where.credentials is not None:
            channel = grpc.secure_channel(where.address, where.credentials,
                                          options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(where.address, options=CHANNEL_OPTIONS)
        return cls(channel, where.metadata)

    def close(self) -> None:
        self.channel.close()

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout=60.0):
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    # -- sandboxes --------------------------------------------------------------------------

    def create_sandbox(self, *, labels=None, request_id: str = "",
                       **spec) -> sandbox_pb2.Sandbox:
        """Create a sandbox; spec are SandboxSpec fields. labels: {key: value} to find it
        by; request_id: an idempotency key (a retry with it returns the same sandbox)."""
        return self._call(self.sandboxes.Create, sandbox_pb2.CreateSandboxRequest(
            spec=sandbox_pb2.SandboxSpec(**spec), labels=labels or {}, request_id=request_id))

    def inspect_sandbox(self, sandbox_id: str) -> sandbox_pb2.InspectSandboxResponse:
        """The policy the sandbox really runs under (read from the kernel) and mismatches."""
        return self._call(self.sandboxes.Inspect,
                          sandbox_pb2.InspectSandboxRequest(sandbox_id=sandbox_id))

    def get_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        return self._call(self.sandboxes.Get, sandbox_pb2.GetSandboxRequest(sandbox_id=sandbox_id))

    def list_sandboxes(self, selector: str = "", state: int = 0) -> list[sandbox_pb2.Sandbox]:
        """Every sandbox of the caller's matching a label selector ("k=v,k2!=v2,k3,!k4")
        and state (SANDBOX_STATE_*; 0: the running ones), over as many pages as it takes."""
        return _every_page(self.list_sandboxes_page, "sandboxes", selector, state)

    def list_sandboxes_page(self, selector: str = "", state: int = 0, page_size: int = 0,
                            page_token: str = "") -> sandbox_pb2.ListSandboxesResponse:
        """One page of Sandboxes.List (page_size 0: 100; next_page_token for the next)."""
        return self._call(self.sandboxes.List, sandbox_pb2.ListSandboxesRequest(
            selector=selector, state=state, page_size=page_size, page_token=page_token))

    def set_timeout(self, sandbox_id: str, ttl_s: int) -> sandbox_pb2.Sandbox:
        """Destroy the sandbox ttl_s seconds from now (extends or shortens its TTL)."""
        return self._call(self.sandboxes.SetTimeout, sandbox_pb2.SetTimeoutRequest(
            sandbox_id=sandbox_id, ttl_s=ttl_s))

    def pause(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """Freeze the sandbox in place (state PAUSED); its TTL clock stops."""
        return self._call(self.sandboxes.Pause, sandbox_pb2.PauseSandboxRequest(
            sandbox_id=sandbox_id))

    def resume(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """Thaw a paused sandbox (state RUNNING)."""
        return self._call(self.sandboxes.Resume, sandbox_pb2.ResumeSandboxRequest(
            sandbox_id=sandbox_id))

    # -- state: snapshots, copy-on-write workspaces ------------------------------------------

    def snapshot(self, sandbox_id: str, name: str = "") -> snapshot_pb2.Snapshot:
        """Capture the sandbox's writable state (it is frozen for the copy, then runs on)."""
        return self._call(self.snapshots.Create, snapshot_pb2.CreateSnapshotRequest(
            sandbox_id=sandbox_id, name=name), timeout=3600.0)

    def get_snapshot(self, snapshot: str) -> snapshot_pb2.Snapshot:
        """A snapshot by id or name."""
        return self._call(self.snapshots.Get, snapshot_pb2.GetSnapshotRequest(snapshot=snapshot))

    def list_snapshots(self) -> list[snapshot_pb2.Snapshot]:
        return list(self._call(self.snapshots.List,
                               snapshot_pb2.ListSnapshotsRequest()).snapshots)

    def remove_snapshot(self, snapshot: str) -> None:
        self._call(self.snapshots.Remove, snapshot_pb2.RemoveSnapshotRequest(snapshot=snapshot))

    # -- images: the daemon's store ---------------------------------------------------------

    def images_list(self) -> list[image_pb2.Image]:
        return list(self._call(self.images.List, image_pb2.ListImagesRequest()).images)

    def image_get(self, ref: str) -> image_pb2.GetImageResponse:
        """An image of the daemon's store (by REF, id or id prefix) and its config."""
        return self._call(self.images.Get, image_pb2.GetImageRequest(ref=ref))

    def image_pull(self, ref: str, timeout: float = 3600.0) -> Iterator[image_pb2.PullEvent]:
        """Pull REF into the daemon's store: layer and bytes events, then `done` (the
        record). A pull others wait on goes on when this iterator is dropped."""
        try:
            yield from self.images.Pull(image_pb2.PullImageRequest(ref=ref),
                                        metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def image_remove(self, ref: str) -> image_pb2.RemoveImageResponse:
        """Remove an image (operators); layers a running sandbox holds stay."""
        return self._call(self.images.Remove, image_pb2.RemoveImageRequest(ref=ref))

    def diff(self, sandbox_id: str, *, patch: bool = False,
             max_patch_bytes: int = 0) -> Iterator[sandbox_pb2.Change]:
        """What a copy-on-write workspace changed, path by path."""
        request = sandbox_pb2.DiffRequest(sandbox_id=sandbox_id, patch=patch,
                                          max_patch_bytes=max_patch_bytes)
        try:
            for answer in self.sandboxes.Diff(request, metadata=self.metadata):
                yield from answer.changes
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def apply(self, sandbox_id: str, force: bool = False) -> sandbox_pb2.ApplyResponse:
        """Write a copy-on-write workspace's changes into its host directory."""
        return self._call(self.sandboxes.Apply, sandbox_pb2.ApplyRequest(
            sandbox_id=sandbox_id, force=force), timeout=3600.0)

    def discard(self, sandbox_id: str) -> int:
        """Drop a copy-on-write workspace's changes (destroying the sandbox if it runs)."""
        return self._call(self.sandboxes.Discard, sandbox_pb2.DiscardRequest(
            sandbox_id=sandbox_id)).discarded

    def destroy_sandbox(self, sandbox_id: str) -> bool:
        """Destroy a sandbox; True when it had already been destroyed (not an error)."""
        return self._call(self.sandboxes.Destroy, sandbox_pb2.DestroySandboxRequest(
            sandbox_id=sandbox_id)).already_destroyed

    def expose_port(self, sandbox_id: str, port: int,
                    host_port: int = 0) -> sandbox_pb2.ExposedPort:
        """Forward 127.0.0.1:host_port on the daemon's host (0 = any free port) to
        127.0.0.1:port inside the sandbox; the answer says where (host_address, host_port)."""
        return self._call(self.sandboxes.ExposePort, sandbox_pb2.ExposePortRequest(
            sandbox_id=sandbox_id, port=port, host_port=host_port))

    def unexpose_port(self, sandbox_id: str, port: int) -> sandbox_pb2.ExposedPort:
        """Stop forwarding: the host listener and its connections close."""
        return self._call(self.sandboxes.UnexposePort, sandbox_pb2.UnexposePortRequest(
            sandbox_id=sandbox_id, port=port)).port

    def list_ports(self, sandbox_id: str) -> list[sandbox_pb2.ExposedPort]:
        """The sandbox's exposed ports."""
        return list(self._call(self.sandboxes.ListPorts, sandbox_pb2.ListPortsRequest(
            sandbox_id=sandbox_id)).ports)

    def exec(self, sandbox_id: str, argv: list[str], **kw) -> Iterator[sandbox_pb2.ExecEvent]:
        """Run argv; yields started, output (stdout/stderr bytes exactly as written, one
        StreamBatch each) and exited. kw are ExecRequest fields: env, cwd, stdin,
        keep_stdin_open, timeout_s, user ("uid[:gid]" or a name), and allow_loss=True to
        never hold the command back (a slow reader then loses output, and `batch.lost` says
        so); tty=True with rows and cols runs it on a terminal (all output on stdout; see
        resize())."""
        request = sandbox_pb2.ExecRequest(sandbox_id=sandbox_id, argv=argv, **kw)
        try:
            yield from self.sandboxes.Exec(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def attach(self, sandbox_id: str, exec_id: str, **kw) -> Iterator[sandbox_pb2.ExecEvent]:
        request = sandbox_pb2.AttachRequest(sandbox_id=sandbox_id, exec_id=exec_id, **kw)
        try:
            yield from self.sandboxes.Attach(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def send_input(self, sandbox_id: str, exec_id: str, data: bytes, close: bool = False):
        return self._call(self.sandboxes.SendInput, sandbox_pb2.SendInputRequest(
            sandbox_id=sandbox_id, exec_id=exec_id, data=data, close=close))

    def resize(self, sandbox_id: str, exec_id: str, rows: int, cols: int) -> None:
        """Set the window of a command started with tty=True (Exec's rows and cols)."""
        self._call(self.sandboxes.Resize, sandbox_pb2.ResizeRequest(
            sandbox_id=sandbox_id, exec_id=exec_id, rows=rows, cols=cols))

    def signal(self, sandbox_id: str, sig: int, exec_id: str = "") -> int:
        return self._call(self.sandboxes.Signal, sandbox_pb2.SignalRequest(
            sandbox_id=sandbox_id, exec_id=exec_id, signal=sig)).delivered

    def write_file(self, sandbox_id: str, path: str, content: bytes, mode: int = 0o644) -> int:
        return self._call(self.sandboxes.WriteFile, sandbox_pb2.WriteFileRequest(
            sandbox_id=sandbox_id, path=path, content=content, mode=mode)).size

    def read_file(self, sandbox_id: str, path: str, max_bytes: int = 0) -> FileContent:
        """The file's bytes, at most max_bytes (0: 4 MiB, the most the daemon returns; more
        is INVALID_ARGUMENT); `.truncated` says whether the file is longer."""
        reply = self._call(self.sandboxes.ReadFile, sandbox_pb2.ReadFileRequest(
            sandbox_id=sandbox_id, path=path, max_bytes=max_bytes))
        return FileContent(reply.content, truncated=reply.truncated)

    def list_files(self, sandbox_id: str, path: str = "") -> list[sandbox_pb2.FileEntry]:
        return list(self._call(self.sandboxes.ListFiles, sandbox_pb2.ListFilesRequest(
            sandbox_id=sandbox_id, path=path)).entries)

    # -- files of any size ------------------------------------------------------------------

    def stat_file(self, sandbox_id: str, path: str = "") -> sandbox_pb2.FileStat:
        return self._call(self.sandboxes.StatFile, sandbox_pb2.StatFileRequest(
            sandbox_id=sandbox_id, path=path))

    def make_dir(self, sandbox_id: str, path: str, mode: int = 0, parents: bool = True) -> int:
        """mkdir (-p with parents); returns how many directories were made."""
        return self._call(self.sandboxes.MakeDir, sandbox_pb2.MakeDirRequest(
            sandbox_id=sandbox_id, path=path, mode=mode, parents=parents)).created

    def remove_file(self, sandbox_id: str, path: str, recursive: bool = False) -> str:
        """Remove a file, link or (recursive) tree; returns the kind removed."""
        return self._call(self.sandboxes.RemoveFile, sandbox_pb2.RemoveFileRequest(
            sandbox_id=sandbox_id, path=path, recursive=recursive)).kind

    def rename_file(self, sandbox_id: str, from_path: str, to_path: str,
                    no_replace: bool = False) -> None:
        self._call(self.sandboxes.RenameFile, sandbox_pb2.RenameFileRequest(
            sandbox_id=sandbox_id, from_path=from_path, to_path=to_path,
            no_replace=no_replace))

    def upload(self, sandbox_id: str, path: str, source, *, offset: int = 0, mode: int = 0,
               chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> sandbox_pb2.UploadResponse:
        """Write path from source, in chunks, and check the daemon's sha256 against ours.

        source: a local file path (read sparsely: holes are not sent), a binary file object
        (read from its position), or an iterable of bytes. offset > 0 resumes: the remote
        file is cut there and source's bytes from that offset on are sent (a path or a
        seekable file; an iterable gives only what comes after offset).

        Raises:
            ClientError: the RPC failed, or DATA_LOSS when the digests differ.
        """
        digest = hashlib.sha256()
        close = None
        if isinstance(source, (str, os.PathLike)):
            source = close = open(source, "rb")
        try:
            if hasattr(source, "read"):
                pieces = _file_pieces(source, offset, chunk_bytes, digest)
            else:
                pieces = _hashed(source, digest, offset, chunk_bytes)
            start = sandbox_pb2.UploadStart(sandbox_id=sandbox_id, path=path, mode=mode,
                                            offset=offset)
            sizes = {}

            def requests():  # encoded here: one copy of each chunk, not three
                yield sandbox_pb2.UploadRequest(start=start).SerializeToString()
                for at, data in pieces:
                    if data:
                        yield _upload_chunk(at, data)
                    sizes["end"] = max(sizes.get("end", 0), at + len(data))
                yield sandbox_pb2.UploadRequest(end=sandbox_pb2.UploadEnd(
                    size=sizes.get("end", 0))).SerializeToString()

            upload = self.channel.stream_unary(
                "/corral.v1.Sandboxes/Upload", request_serializer=None,
                response_deserializer=sandbox_pb2.UploadResponse.FromString)
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="corral-upload") as pool:
                    pieces = _read_ahead(pieces, pool)  # read + hash the next chunk meanwhile
                    reply = upload(requests(), metadata=self.metadata)
            except grpc.RpcError as exc:
                raise _wrap(exc) from None
        finally:
            if close is not None:
                close.close()
        return _checked(reply, digest, "the daemon wrote {theirs}, we sent {ours}")

    def download_parts(self, sandbox_id: str, path: str, offset: int = 0,
                       length: int = 0) -> Iterator[sandbox_pb2.DownloadResponse]:
        """The raw Download stream: stat, chunks (holes not sent), end."""
        request = sandbox_pb2.DownloadRequest(sandbox_id=sandbox_id, path=path, offset=offset,
                                              length=length)
        try:
            yield from self.sandboxes.Download(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def download(self, sandbox_id: str, path: str, dest, *, offset: int = 0,
                 length: int = 0) -> sandbox_pb2.DownloadEnd:
        """Read path into dest (a local path, or a binary file object written from its
        position) and check the daemon's sha256 against what arrived.

        offset > 0 resumes: a local path is kept up to offset and written from there (the
        digest then covers the local prefix too). Holes stay holes in a seekable dest.

        Raises:
            ClientError: the RPC failed, or DATA_LOSS when the digests differ.
        """
        digest = hashlib.sha256()
        close = None
        if isinstance(dest, (str, os.PathLike)):
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, offset)
            dest = close = os.fdopen(fd, "r+b")
        try:
            # where byte 0 of the remote file is in dest (a file object is at byte offset)
            base = (0 if close is not None else dest.tell() - offset) if dest.seekable() \
                else None
            if offset:
                if base is None:
                    raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                                      "offset: resuming needs a seekable destination")
                _hash_local(dest.fileno(), base, offset, digest)
            end = None
            pos = offset

            def store(at: int, data: bytes) -> None:
                nonlocal pos
                _zeros_to(dest, digest, pos, at, base)
                if base is not None:
                    _pwrite_all(dest.fileno(), data, base + at)
                else:
                    dest.write(data)
                digest.update(data)
                pos = at + len(data)

            # each chunk is hashed and written on a worker while the next one arrives
            storing = None
            with ThreadPoolExecutor(1, thread_name_prefix="corral-download") as pool:
                for part in self.download_parts(sandbox_id, path, offset, length):
                    which = part.WhichOneof("part")
                    if storing is not None:
                        storing.result()
                        storing = None
                    if which == "chunk":
                        storing = pool.submit(store, part.chunk.offset, part.chunk.data)
                    elif which == "end":
                        end = part.end
                if storing is not None:
                    storing.result()
            if end is not None:
                _zeros_to(dest, digest, pos, end.size, base)
                if base is not None:  # a hole at the end: the file still has its size
                    dest.flush()
                    keep = os.fstat(dest.fileno()).st_size if close is None else 0
                    os.ftruncate(dest.fileno(), max(base + end.size, keep))
                    dest.seek(base + end.size)
            if end is None:
                raise ClientError(grpc.StatusCode.DATA_LOSS, "the download ended early")
        finally:
            if close is not None:
                close.close()
        return _checked(end, digest, "the daemon sent {theirs}, we got {ours}")

    def put_archive(self, sandbox_id: str, path: str,
                    chunks) -> sandbox_pb2.PutArchiveResponse:
        """Extract a tar stream (an iterable of bytes) beneath the directory path."""
        def requests():
            yield sandbox_pb2.PutArchiveRequest(start=sandbox_pb2.PutArchiveStart(
                sandbox_id=sandbox_id, path=path))
            for data in chunks:
                if data:
                    yield sandbox_pb2.PutArchiveRequest(data=bytes(data))

        try:
            return self.sandboxes.PutArchive(requests(), metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def get_archive(self, sandbox_id: str,
                    path: str) -> tuple[sandbox_pb2.FileStat, Iterator[bytes]]:
        """(what path is, the tar stream of it in pieces)."""
        call = self.sandboxes.GetArchive(sandbox_pb2.GetArchiveRequest(
            sandbox_id=sandbox_id, path=path), metadata=self.metadata)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

        def data():
            try:
                for part in call:
                    yield part.data
            except grpc.RpcError as exc:
                raise _wrap(exc) from None
            finally:
                call.cancel()

        return first.stat, data()

    def watch_files(self, sandbox_id: str, path: str = "") -> Iterator[sandbox_pb2.FileEvent]:
        """Changes under path as they happen; the first event is WATCHING."""
        try:
            for reply in self.sandboxes.WatchFiles(sandbox_pb2.WatchFilesRequest(
                    sandbox_id=sandbox_id, path=path), metadata=self.metadata):
                yield from reply.events
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise _wrap(exc) from None

    def stats(self, sandbox_id: str, interval_s: float = 1.0) -> Iterator[sandbox_pb2.SandboxStats]:
        """Usage samples of a sandbox every interval_s (0.1 to 3600) until it is destroyed
        (the iterator then ends) or the caller stops iterating. A figure the host cannot
        measure is absent (`sample.HasField("cpu_usage_us")` is False)."""
        call = self.sandboxes.Stats(sandbox_pb2.StatsRequest(
            sandbox_id=sandbox_id, interval_s=interval_s), metadata=self.metadata)
        try:
            yield from _until_cancelled(call)
        finally:
            call.cancel()

    # -- sessions ---------------------------------------------------------------------------

    def open_session(self, argv: list[str], *, sandbox_id: str = "", env=None, input: str = "",
                     labels=None, request_id: str = "", delegations_from: str = "",
                     wait_if_paused: bool = False, **spec) -> SessionStream:
        """Start a session in sandbox_id, or in a new sandbox of spec (SandboxSpec fields).
        labels: {key: value} to find it by; request_id: an idempotency key (a retry with it
        attaches to the session the first start made); delegations_from: a gone session
        whose delegated deep tasks this one takes over; wait_if_paused: a paused sandbox_id
        is waited for instead of refused."""
        start = _session_start(argv, sandbox_id, env, input, labels, request_id, spec,
                               delegations_from, wait_if_paused)
        return SessionStream(self.sessions, session_pb2.SessionRequest(start=start),
                             self.metadata)

    def resume_session(self, session_id: str, after_seq: int = 0,
                       watch_only: bool = False) -> SessionStream:
        req = session_pb2.SessionRequest(resume=session_pb2.SessionResume(
            session_id=session_id, after_seq=after_seq, watch_only=watch_only))
        return SessionStream(self.sessions, req, self.metadata)

    def get_session(self, session_id: str) -> session_pb2.SessionInfo:
        return self._call(self.sessions.Get, session_pb2.GetSessionRequest(session_id=session_id))

    def list_sessions(self, selector: str = "", state: int = 0) -> list[session_pb2.SessionInfo]:
        """Every session of the caller's matching a label selector and state
        (SESSION_STATE_*; 0: all), over as many pages as it takes."""
        return _every_page(self.list_sessions_page, "sessions", selector, state)

    def list_sessions_page(self, selector: str = "", state: int = 0, page_size: int = 0,
                           page_token: str = "") -> session_pb2.ListSessionsResponse:
        """One page of Sessions.List (page_size 0: 100; next_page_token for the next)."""
        return self._call(self.sessions.List, session_pb2.ListSessionsRequest(
            selector=selector, state=state, page_size=page_size, page_token=page_token))

    def open_many(self) -> SessionMux:
        """A Sessions.OpenMany stream: start, resume and steer many sessions over one call."""
        return SessionMux(self.sessions, self.metadata)

    # -- audit ------------------------------------------------------------------------------

    def audit_query(self, **filters) -> list[audit_pb2.AuditRecord]:
        return list(self._call(self.audit.Query, audit_pb2.AuditQueryRequest(**filters)).records)

    def audit_verify(self) -> audit_pb2.AuditVerifyResponse:
        return self._call(self.audit.Verify, audit_pb2.AuditVerifyRequest(), timeout=600)

    def audit_status(self) -> audit_pb2.AuditStatusResponse:
        """Operators: the signing key, checkpoints, and each audit sink's lag."""
        return self._call(self.audit.Status, audit_pb2.AuditStatusRequest())

    def audit_report(self, sandbox_id: str, run_probes: bool = False
                     ) -> audit_pb2.AuditReportResponse:
        """A signed attestation report of one sandbox (runtime/report.py)."""
        return self._call(self.audit.Report, audit_pb2.AuditReportRequest(
            sandbox_id=sandbox_id, run_probes=run_probes), timeout=600)

    def audit_watch(self, **filters) -> Iterator[audit_pb2.AuditRecord]:
        try:
            yield from self.audit.Watch(audit_pb2.AuditWatchRequest(**filters),
                                        metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    # -- deep tasks and nodes ---------------------------------------------------------------

    def submit_task(self, argv: list[str], *, selector=None, resources=None, priority: int = 0,
                    retries: int = 0, max_runtime_s: float = 0.0, files=None,
                    request_id: str = "", labels=None, parent_session: str = "",
                    **sandbox) -> task_pb2.Task:
        """Submit a deep task; returns it once the daemon has committed it.

        request_id: an idempotency key (e.g. a UUID made once per task): a Submit retried
        with it returns the task the first one made instead of making another.
        labels: {key: value} to find the task by (list_tasks(selector=...)).
        parent_session: link it to a running session of the caller's (cancelled when that
        session closes without detach; listed with list_tasks(parent_session=...)).
        """
        spec = task_pb2.TaskSpec(argv=argv, selector=selector or {}, resources=resources or {},
                                 priority=priority, retries=retries,
                                 max_runtime_s=max_runtime_s, files=files or {},
                                 sandbox=sandbox_pb2.SandboxSpec(**sandbox),
                                 labels=labels or {})
        return self._call(self.tasks.Submit, task_pb2.SubmitTaskRequest(
            spec=spec, request_id=request_id, parent_session=parent_session))

    def submit_tasks(self, specs) -> Iterator[task_pb2.SubmitAck]:
        """Submit many TaskSpecs on one stream; yields one ack per spec, in order."""
        requests = (task_pb2.SubmitTaskRequest(spec=s) for s in specs)
        try:
            yield from self.tasks.SubmitStream(requests, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def get_task(self, task_id: str) -> task_pb2.Task:
        return self._call(self.tasks.Get, task_pb2.GetTaskRequest(task_id=task_id))

    def list_tasks(self, state: int = 0, limit: int = 0, selector: str = "",
                   parent_session: str = "") -> list[task_pb2.Task]:
        """The newest tasks (at most limit; 0: 1000) in a state whose labels match a
        selector (and, with parent_session, linked to that session); list_tasks_page pages
        on from there."""
        return list(self.list_tasks_page(state, limit, selector,
                                         parent_session=parent_session).tasks)

    def list_tasks_page(self, state: int = 0, limit: int = 0, selector: str = "",
                        page_token: str = "", parent_session: str = ""
                        ) -> task_pb2.ListTasksResponse:
        """One page of Tasks.List, newest first (next_page_token: the older ones)."""
        return self._call(self.tasks.List, task_pb2.ListTasksRequest(
            state=state, limit=limit, selector=selector, page_token=page_token,
            parent_session=parent_session))

    def cancel_task(self, task_id: str) -> task_pb2.Task:
        return self._call(self.tasks.Cancel, task_pb2.CancelTaskRequest(task_id=task_id))

    def task_result(self, task_id: str, max_bytes: int = 0, path: str = "",
                    offset: int = 0) -> task_pb2.TaskResult:
        """One page of a finished task's result, from (path, offset) on."""
        return self._call(self.tasks.Result, task_pb2.TaskResultRequest(
            task_id=task_id, max_bytes=max_bytes, path=path, offset=offset))

    def task_result_pages(self, task_id: str, max_bytes: int = 0
                          ) -> Iterator[task_pb2.TaskResult]:
        """Every page of a finished task's result, following next_path / next_offset."""
        path, offset = "", 0
        while True:
            page = self.task_result(task_id, max_bytes, path, offset)
            yield page
            if not page.next_path:
                return
            path, offset = page.next_path, page.next_offset

    def watch_task(self, task_id: str) -> Iterator[task_pb2.TaskUpdate]:
        try:
            yield from self.tasks.Watch(task_pb2.WatchTaskRequest(task_id=task_id),
                                        metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _wrap(exc) from None

    def list_nodes(self) -> list[task_pb2.Node]:
        return list(self._call(self.nodes.List, task_pb2.ListNodesRequest()).nodes)

    def get_node(self, name: str) -> task_pb2.Node:
        return self._call(self.nodes.Get, task_pb2.GetNodeRequest(name=name))

    def cordon_node(self, name: str, on: bool = True) -> task_pb2.Node:
        method = self.nodes.Cordon if on else self.nodes.Uncordon
        return self._call(method, task_pb2.CordonNodeRequest(name=name))

    def drain_node(self, name: str) -> task_pb2.Node:
        return self._call(self.nodes.Drain, task_pb2.DrainNodeRequest(name=name))


def _every_page(list_page, field: str, *args) -> list:
    """The `field` items of every page of a List call; list_page(*args, page_token=T) is one
    page, whose next_page_token names the next ("" after the last)."""
    found, token = [], ""
    while True:
        page = list_page(*args, page_token=token)
        found.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return found


def _checked(reply, digest, mismatch: str):
    """reply, when the sha256 the daemon reports is the one this side computed.

    Raises:
        ClientError: DATA_LOSS, "sha256: " + mismatch naming both digests.
    """
    ours = digest.hexdigest()
    if reply.sha256 != ours:
        raise ClientError(grpc.StatusCode.DATA_LOSS,
                          "sha256: " + mismatch.format(theirs=reply.sha256, ours=ours))
    return reply


_ZEROS = bytes(1 << 20)


def _file_pieces(f, offset: int, chunk_bytes: int, digest):
    """(offset, data) pieces of a binary file from offset on; holes of a regular file are
    skipped (an offset jump), and digest sees every byte from 0, holes as zeros."""
    fd = f.fileno() if hasattr(f, "fileno") else None
    regular = False
    if fd is not None:
        with contextlib.suppress(OSError):
            regular = stat.S_ISREG(os.fstat(fd).st_mode) and f.seekable()
    if not regular:  # a pipe or a stream: everything, in order
        if offset:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                              "offset: resuming needs a regular file as the source")
        pos = 0
        while True:
            data = f.read(chunk_bytes)
            if not data:
                return
            digest.update(data)
            yield pos, data
            pos += len(data)
    base = f.tell()
    size = os.fstat(fd).st_size - base
    _hash_local(fd, base, offset, digest)
    pos = offset
    for start, stop in data_ranges(fd, base + offset, base + size):
        _hash_zeros(digest, start - base - pos)
        pos = start - base
        while pos < stop - base:
            data = os.pread(fd, min(chunk_bytes, stop - base - pos), base + pos)
            if not data:
                break
            digest.update(data)
            yield pos, data
            pos += len(data)
    _hash_zeros(digest, size - pos)
    yield size, b""  # where the file ends (a hole up to there)


def _upload_chunk(offset: int, data: bytes) -> bytes:
    """UploadRequest{chunk: FileChunk{offset, data}}, encoded with one copy of data."""
    inner = b"".join((b"\x08", varint(offset), b"\x12", varint(len(data))))
    return b"".join((b"\x12", varint(len(inner) + len(data)), inner, data))


def _read_ahead(pieces, pool):
    """The items of an iterator, the next one produced on pool while this one is used."""
    ahead = pool.submit(next, pieces, None)
    while True:
        item = ahead.result()
        if item is None:
            return
        ahead = pool.submit(next, pieces, None)
        yield item


def _hashed(blobs, digest, offset: int, chunk_bytes: int):
    """(offset, data) pieces of an iterable of bytes, cut to chunk_bytes."""
    pos = offset
    for blob in blobs:
        view = memoryview(blob)
        for i in range(0, len(view), chunk_bytes):
            data = bytes(view[i:i + chunk_bytes])
            digest.update(data)
            yield pos, data
            pos += len(data)


def _hash_zeros(digest, count: int) -> None:
    while count > 0:
        n = min(count, len(_ZEROS))
        digest.update(_ZEROS[:n])
        count -= n


def _hash_local(fd: int, base: int, count: int, digest) -> None:
    pos = 0
    while pos < count:
        data = os.pread(fd, min(1 << 20, count - pos), base + pos)
        if not data:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"offset: the local file has only {pos} of the {count} bytes "
                              f"to resume after")
        digest.update(data)
        pos += len(data)


def _zeros_to(dest, digest, pos: int, at: int, base) -> None:
    """A hole from pos to at: hashed as zeros, written as zeros only to a stream."""
    gap = at - pos
    _hash_zeros(digest, gap)
    if base is None:
        while gap > 0:
            n = min(gap, len(_ZEROS))
            dest.write(_ZEROS[:n])
            gap -= n


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def service_stub(channel, module, service: str):
    """A stub built from the service descriptor (no generated *_pb2_grpc import needed); a
    grpc.aio channel gives an asyncio stub (the SDK's AsyncClient)."""
    from google.protobuf import message_factory

    desc = module.DESCRIPTOR.services_by_name[service]

    class Stub:
        pass

    stub = Stub()
    for method in desc.methods:
        req = message_factory.GetMessageClass(method.input_type)
        resp = message_factory.GetMessageClass(method.output_type)
        path = f"/{desc.full_name}/{method.name}"
        factory = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        setattr(stub, method.name, factory(path, request_serializer=req.SerializeToString,
                                           response_deserializer=resp.FromString))
    return stub
