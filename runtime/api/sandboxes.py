"""corral.v1.Sandboxes servicer: proto <-> SandboxManager calls, nothing else."""

from __future__ import annotations

import asyncio
import json
import time

from corral.sandbox import SandboxSpec
from corral.sandbox.errors import InvalidSpec, NotFound
from corral.sandbox.seccomp import requested_profile
from corral.sandbox.spec import SecretBinding
from corral.v1 import sandbox_pb2 as pb

from ..labels import ListQuery, check_labels, check_state
from .exits import exit_fields
from .servicer import Servicer, relay, streaming, unary
from .wire import field_bytes, field_varint, fill_typed, varint

#: Sandboxes.Stats: the shortest and longest sampling interval a client may ask for.
STATS_MIN_INTERVAL_S = 0.1
STATS_MAX_INTERVAL_S = 3600.0

MAX_TIMEOUT_S = 30 * 86400.0
#: Bytes of command output one ExecOutput message carries at most: fewer, fuller messages
#: (gRPC costs per message); under the 4 MiB a gRPC client accepts by default.
EXEC_BATCH_BYTES = 1 << 20
PID_MAX_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit
#: The smallest /tmp (and /dev/shm) a spec may ask for: tmpfs would silently round a few
#: bytes up to a page, and less than this is no room for a program's temporary files.
MIN_TMP_BYTES = 1 << 20


def spec_from_proto(msg: pb.SandboxSpec, snapshot_id: str = "") -> SandboxSpec:
    """Build a SandboxSpec; zero values keep the defaults (docs/policy.md). msg.snapshot
    may be a name: the caller resolves it (the tenant's snapshots) and passes its id."""
    kw: dict = {}
    if msg.profile:
        # a built-in, or an absolute path (the tenant's policy says which files it may use);
        # never a name looked up in the daemon's working directory
        kw["profile"] = requested_profile(msg.profile, "spec.profile")
    if msg.memory_bytes:
        kw["memory_bytes"] = int(msg.memory_bytes)
    if msg.pids_max:
        if msg.pids_max > PID_MAX_LIMIT:  # the kernel refuses more (EINVAL from pids.max)
            raise InvalidSpec("spec.pids_max", f"{msg.pids_max} is over {PID_MAX_LIMIT}")
        kw["pids_max"] = int(msg.pids_max)
    if msg.cpus:
        kw["cpus"] = float(msg.cpus)
    if msg.command_timeout_s:
        if not 0 < msg.command_timeout_s <= MAX_TIMEOUT_S:
            raise InvalidSpec("spec.command_timeout_s", "must be between 0 and 30 days")
        kw["timeout_s"] = float(msg.command_timeout_s)
    if msg.tmp_bytes:
        if msg.tmp_bytes < MIN_TMP_BYTES:
            raise InvalidSpec("spec.tmp_bytes", f"{msg.tmp_bytes} is under the minimum of "
                                                f"{MIN_TMP_BYTES} (1 MiB)")
        kw["tmp_bytes"] = int(msg.tmp_bytes)
    if msg.hostname:
        kw["hostname"] = msg.hostname
    if msg.env:
        kw["env"] = tuple(sorted(msg.env.items()))
    if msg.allow_net:
        kw["allow_net"] = tuple(msg.allow_net)
    if msg.backend:
        kw["backend"] = msg.backend
    if msg.image:
        kw["image"] = msg.image
    if msg.secrets:
        kw["secrets"] = tuple(SecretBinding(b.name, tuple(b.hosts)) for b in msg.secrets)
    if msg.workspace_dir:
        if not msg.workspace_dir.startswith("/"):
            raise InvalidSpec("spec.workspace_dir", "must be an absolute path on the daemon's "
                                                    "host")
        kw["workspace"] = msg.workspace_dir
    if msg.workspace_cow:
        kw["workspace_cow"] = True
    if snapshot_id:
        kw["snapshot"] = snapshot_id
    return SandboxSpec(**kw)


def spec_to_proto(spec: SandboxSpec, ttl_s: float) -> pb.SandboxSpec:
    return pb.SandboxSpec(
        profile=spec.profile, memory_bytes=spec.memory_bytes, pids_max=spec.pids_max,
        cpus=spec.cpus or 0.0, command_timeout_s=spec.timeout_s or 0.0,
        tmp_bytes=spec.tmp_bytes, env=dict(spec.env), hostname=spec.hostname,
        ttl_s=int(ttl_s), allow_net=list(spec.allow_net), backend=spec.backend,
        image=spec.image, snapshot=spec.snapshot, workspace_dir=spec.workspace or "",
        workspace_cow=spec.workspace_cow,
        secrets=[pb.SecretBinding(name=b.name, hosts=list(b.hosts)) for b in spec.secrets],
    )


def sandbox_to_proto(msb) -> pb.Sandbox:
    """A live sandbox (a ManagedSandbox: the manager holds no other) is RUNNING or PAUSED;
    one the daemon remembers after its end (a DestroyedSandbox) is DESTROYED."""
    return pb.Sandbox(
        id=msb.id, tenant=msb.tenant,
        state=(pb.SANDBOX_STATE_DESTROYED if msb.destroyed else
               pb.SANDBOX_STATE_PAUSED if msb.paused_at else pb.SANDBOX_STATE_RUNNING),
        paused_at=msb.paused_at,
        spec=spec_to_proto(msb.spec, msb.expires_at - msb.created_at),
        policy_digest=msb.policy_digest, created_at=msb.created_at, expires_at=msb.expires_at,
        init_pid=(msb.sandbox.init_pid or 0) if msb.sandbox is not None else 0,
        labels=msb.labels,
        execs=[
            pb.ExecInfo(id=h.id, argv=shown_argv(h.argv), running=h.running,
                        returncode=h.returncode or 0, reason=h.reason)
            for h in msb.execs.values()
        ],
    )


def sandbox_wire(msb) -> bytes:
    """msb as one entry of an encoded ListSandboxesResponse: its Sandbox message (typed
    times filled) as field 1. Built once and kept on msb (`wire_cache`) until a field the
    message shows changes: an idle sandbox costs List a key comparison, not a message
    built, filled and encoded (~20 us)."""
    init = msb.sandbox.init_pid if msb.sandbox is not None else 0
    execs = (tuple((h.id, h.returncode, h.reason) for h in msb.execs.values())
             if msb.execs else ())
    key = (msb.spec, msb.tenant, msb.policy_digest, msb.created_at, msb.expires_at,
           msb.paused_at, msb.destroyed, init, tuple(msb.labels.items()), execs)
    cached = msb.wire_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    data = field_bytes(1, fill_typed(sandbox_to_proto(msb)).SerializeToString())
    msb.wire_cache = (key, data)
    return data


#: Bytes of Change messages one DiffResponse carries (a diff with patches can be large).
DIFF_BATCH_BYTES = 1 << 20
_CHANGE_KINDS = {"added": pb.CHANGE_KIND_ADDED, "modified": pb.CHANGE_KIND_MODIFIED,
                 "deleted": pb.CHANGE_KIND_DELETED, "mode": pb.CHANGE_KIND_MODE}


def change_to_proto(change) -> pb.Change:
    return pb.Change(
        path=change.path, kind=_CHANGE_KINDS[change.kind], type=change.type,
        old_mode=change.old_mode, new_mode=change.new_mode, size=change.size,
        binary=change.binary, patch=change.patch, lines_added=change.lines_added,
        lines_removed=change.lines_removed, conflict=change.conflict)


def port_to_proto(exposed) -> pb.ExposedPort:
    return pb.ExposedPort(sandbox_id=exposed.sandbox_id, port=exposed.port,
                          host_address=exposed.host_address, host_port=exposed.host_port,
                          connections=exposed.connections,
                          open_connections=len(exposed.tasks))


#: Bytes of one command's argv shown in a Sandbox answer (the audit trail has its digest).
SHOWN_ARGV_BYTES = 4096


def shown_argv(argv) -> list[str]:
    """argv cut to SHOWN_ARGV_BYTES in all, with a last element saying what was left out, so
    that a sandbox's answer stays small whatever its commands were."""
    shown, used = [], 0
    for i, arg in enumerate(argv):
        if used + len(arg) > SHOWN_ARGV_BYTES:
            room = max(0, SHOWN_ARGV_BYTES - used)
            if room:
                shown.append(arg[:room])
            shown.append(f"...({len(argv) - i} arguments cut, "
                         f"{sum(len(a) for a in argv[i:]) - room} bytes)")
            break
        shown.append(arg)
        used += len(arg)
    return shown


def _output_event(stream: int, batch: bytes) -> bytes:
    """ExecEvent{output: ExecOutput{stream, batch}} around an already-encoded batch."""
    return field_bytes(2, field_varint(1, stream) + field_bytes(2, batch))


def exec_watchers(handle, stdout_after: int | None = None, stderr_after: int | None = None,
                  *, lossy: bool = False) -> dict:
    """A watcher per output stream. Unless lossy, the reader holds the command back when
    it is slow (lossless hubs).

    Raises:
        SeqOutOfRange: an after_seq past the newest entry (INVALID_ARGUMENT, naming it).
    """
    watchers = {
        pb.OUTPUT_STREAM_STDOUT: handle.stdout.watch(stdout_after, lossy=lossy,
                                                     field="stdout_after_seq"),
    }
    try:
        watchers[pb.OUTPUT_STREAM_STDERR] = handle.stderr.watch(
            stderr_after, lossy=lossy, field="stderr_after_seq")
    except BaseException:
        watchers[pb.OUTPUT_STREAM_STDOUT].close()
        raise
    return watchers


async def stream_exec(handle, watchers: dict):
    """Yield encoded ExecEvent output messages until both streams end, then the exit."""
    pending = {asyncio.ensure_future(w.next_batch(EXEC_BATCH_BYTES)): s
               for s, w in watchers.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                stream = pending.pop(fut)
                batch = fut.result()
                if batch is None:
                    continue
                yield _output_event(stream, batch)
                pending[asyncio.ensure_future(
                    watchers[stream].next_batch(EXEC_BATCH_BYTES))] = stream
        await handle.exited.wait()
        yield fill_typed(pb.ExecEvent(exited=pb.ExecExited(
            returncode=handle.returncode, reason=handle.reason, duration_s=handle.duration_s,
            **exit_fields(handle.returncode, handle.reason),
        ))).SerializeToString()
    finally:
        for fut in pending:
            fut.cancel()
        for w in watchers.values():
            w.close()


FILE_EVENT_KINDS = {
    "watching": pb.FILE_EVENT_KIND_WATCHING, "created": pb.FILE_EVENT_KIND_CREATED,
    "modified": pb.FILE_EVENT_KIND_MODIFIED, "attrib": pb.FILE_EVENT_KIND_ATTRIB,
    "closed_write": pb.FILE_EVENT_KIND_CLOSED_WRITE, "deleted": pb.FILE_EVENT_KIND_DELETED,
    "moved_from": pb.FILE_EVENT_KIND_MOVED_FROM, "moved_to": pb.FILE_EVENT_KIND_MOVED_TO,
    "overflow": pb.FILE_EVENT_KIND_OVERFLOW, "limit": pb.FILE_EVENT_KIND_LIMIT,
}


def file_stat_to_proto(info) -> pb.FileStat:
    return fill_typed(pb.FileStat(path=info.path, kind=info.kind, size=info.size,
                                  mode=info.mode, mtime=info.mtime,
                                  link_target=info.link_target,
                                  allocated_bytes=info.allocated_bytes))


def _download_chunk(offset: int, data: bytes) -> bytes:
    """DownloadResponse{chunk: FileChunk{offset, data}}, encoded with one copy of data."""
    inner = b"".join((b"\x08", varint(offset), b"\x12", varint(len(data))))
    return b"".join((b"\x12", varint(len(inner) + len(data)), inner, data))


async def _first(request_iterator, part: str):
    """The first message of a client stream, which must be its `part` (start)."""
    async for req in request_iterator:
        if req.WhichOneof("part") != part:
            break
        return getattr(req, part)
    raise InvalidSpec(part, f"the first message must be a {part}")


async def _upload_parts(request_iterator):
    """An Upload's messages after its start, as SandboxManager.upload reads them."""
    async for req in request_iterator:
        which = req.WhichOneof("part")
        if which == "chunk":
            yield ("chunk", req.chunk.offset, req.chunk.data)
        elif which == "end":
            yield ("end", req.end.size)
            return
        else:
            raise InvalidSpec("part", f"{which or 'an empty part'} after the start; "
                                      f"send chunks, then an end")


async def _archive_chunks(request_iterator):
    """A PutArchive's tar bytes, the messages after its start."""
    async for req in request_iterator:
        if req.WhichOneof("part") != "data":
            raise InvalidSpec("part", "only data may follow the start")
        yield req.data


def _file_entries(entries) -> pb.ListFilesResponse:
    return pb.ListFilesResponse(entries=[
        pb.FileEntry(name=e.name, kind=e.kind, size=e.size, mode=e.mode, mtime=e.mtime)
        for e in entries])


class SandboxesServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.manager = daemon.sandboxes

    @unary
    async def Create(self, request, context):
        caller = self.caller(context)
        snapshot_id = ""
        if request.spec.snapshot:  # an id or a name, of the caller's snapshots only
            snapshot_id = (await self.manager.run_blocking(
                self.daemon.state.get, caller, request.spec.snapshot)).id
        spec = spec_from_proto(request.spec, snapshot_id)
        labels = check_labels(request.labels)
        # what a retry under the same request_id must ask for: the request without its id
        fingerprint = pb.CreateSandboxRequest(spec=request.spec, labels=request.labels)
        msb = await self.manager.create_once(
            caller, spec, ttl_s=request.spec.ttl_s or None, labels=labels,
            request_id=request.request_id,
            fingerprint=fingerprint.SerializeToString(deterministic=True).hex())
        return sandbox_to_proto(msb)

    Get = relay("manager.get", "sandbox_id", answer=sandbox_to_proto)

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        check_state(request.state, pb.SandboxState.values(), "SandboxState")
        listing = ListQuery.of(request, "sandboxes", request.state or pb.SANDBOX_STATE_RUNNING)
        found = self.manager.find(caller, listing.selector,
                                  destroyed=request.state == pb.SANDBOX_STATE_DESTROYED)
        if request.state == pb.SANDBOX_STATE_PAUSED:
            found = (m for m in found if m.paused_at)
        chosen, token = listing.page(found, lambda m: m.seq, in_order=True)
        # pre-encoded (runtime/daemon.py): each sandbox's cached entry, then the token
        return b"".join([*map(sandbox_wire, chosen),
                         field_bytes(2, token.encode()) if token else b""])

    Pause = relay("manager.pause", "sandbox_id", answer=sandbox_to_proto)
    Resume = relay("manager.resume", "sandbox_id", answer=sandbox_to_proto)

    @streaming
    async def Diff(self, request, context):
        caller = self.caller(context)
        changes = await self.daemon.state.diff(caller, request.sandbox_id,
                                               patch=request.patch,
                                               max_patch_bytes=request.max_patch_bytes)
        batch: list[pb.Change] = []
        size = 0
        for change in changes:
            message = change_to_proto(change)
            batch.append(message)
            size += message.ByteSize()
            if size >= DIFF_BATCH_BYTES:
                yield pb.DiffResponse(changes=batch)
                batch, size = [], 0
        if batch or not changes:
            yield pb.DiffResponse(changes=batch)

    @unary
    async def Apply(self, request, context):
        caller = self.caller(context)
        result = await self.daemon.state.apply(caller, request.sandbox_id, force=request.force)
        return pb.ApplyResponse(written=result.written, removed=result.removed)

    Discard = relay("daemon.state.discard", "sandbox_id",
                    answer=lambda n: pb.DiscardResponse(discarded=n))
    SetTimeout = relay("manager.set_timeout", "sandbox_id", "ttl_s", answer=sandbox_to_proto)

    @streaming
    async def Stats(self, request, context):
        caller = self.caller(context)
        interval = request.interval_s or 1.0
        if not STATS_MIN_INTERVAL_S <= interval <= STATS_MAX_INTERVAL_S:
            raise InvalidSpec("interval_s", f"{interval:g} is outside {STATS_MIN_INTERVAL_S:g} "
                                            f"to {STATS_MAX_INTERVAL_S:g} seconds")
        self.manager.get(caller, request.sandbox_id)  # NOT_FOUND before the stream starts
        previous: tuple[float, int] | None = None
        while True:
            try:
                sample = await asyncio.to_thread(self.manager.usage, caller, request.sandbox_id)
            except NotFound:
                return  # destroyed meanwhile: the stream ends
            cpu = sample.get("cpu_usage_us")
            if cpu is not None:
                now = time.monotonic()
                if previous is not None and now > previous[0]:
                    sample["cpu_percent"] = max(0, cpu - previous[1]) / 1e4 / (now - previous[0])
                previous = (now, cpu)
            yield pb.SandboxStats(**sample)
            await asyncio.sleep(interval)

    @streaming
    async def Exec(self, request, context):
        caller = self.caller(context)
        if request.timeout_s and not 0 < request.timeout_s <= MAX_TIMEOUT_S:
            raise InvalidSpec("timeout_s", "must be between 0 and 30 days")
        if not request.tty and (request.rows or request.cols):
            raise InvalidSpec("tty", "rows and cols are the size of a terminal; set tty")
        handle = await self.manager.exec(
            caller, request.sandbox_id, list(request.argv), env=dict(request.env),
            cwd=request.cwd, stdin=request.stdin, keep_stdin_open=request.keep_stdin_open,
            timeout_s=request.timeout_s or None,
            # byte-exact output; lossless (flow control) unless the request allows loss
            stdout_mode="bytes", stderr_mode="bytes", lossless=not request.allow_loss,
            tty=(request.rows, request.cols) if request.tty else None,
            wait_if_paused=request.wait_if_paused, user=request.user,
        )
        watchers = exec_watchers(handle, lossy=request.allow_loss)
        yield pb.ExecEvent(started=pb.ExecStarted(
            exec_id=handle.id, pid=handle.process.pid)).SerializeToString()
        async for event in stream_exec(handle, watchers):
            yield event

    @streaming
    async def Attach(self, request, context):
        caller = self.caller(context)
        handle = self.manager.get_exec(caller, request.sandbox_id, request.exec_id)
        watchers = exec_watchers(handle, request.stdout_after_seq or None,
                                 request.stderr_after_seq or None, lossy=request.allow_loss)
        yield pb.ExecEvent(started=pb.ExecStarted(
            exec_id=handle.id, pid=handle.process.pid)).SerializeToString()
        async for event in stream_exec(handle, watchers):
            yield event

    SendInput = relay("manager.send_input", "sandbox_id", "exec_id", "data", "close",
                      empty=pb.SendInputResponse)
    Resize = relay("manager.resize", "sandbox_id", "exec_id", "rows", "cols",
                   empty=pb.ResizeResponse)
    Signal = relay("manager.signal", "sandbox_id", "exec_id", "signal",
                   answer=lambda n: pb.SignalResponse(delivered=n))

    WriteFile = relay("manager.write_file", "sandbox_id", "path", "content", "mode",
                      answer=lambda size: pb.WriteFileResponse(size=size))
    ReadFile = relay("manager.read_file", "sandbox_id", "path", "max_bytes",
                     answer=lambda got: pb.ReadFileResponse(content=got[0], truncated=got[1]))
    ListFiles = relay("manager.list_files", "sandbox_id", "path", answer=_file_entries)

    # -- files of any size -------------------------------------------------------------------

    StatFile = relay("manager.stat_file", "sandbox_id", "path", answer=file_stat_to_proto)
    MakeDir = relay("manager.make_dir", "sandbox_id", "path", "mode", "parents",
                    answer=lambda made: pb.MakeDirResponse(created=made))
    RemoveFile = relay("manager.remove_file", "sandbox_id", "path", "recursive",
                       answer=lambda kind: pb.RemoveFileResponse(kind=kind))
    RenameFile = relay("manager.rename_file", "sandbox_id", "from_path", "to_path",
                       "no_replace", empty=pb.RenameFileResponse)

    @unary
    async def Upload(self, request_iterator, context):
        caller = self.caller(context)
        start = await _first(request_iterator, "start")
        size, digest, received = await self.manager.upload(
            caller, start.sandbox_id, start.path, mode=start.mode, offset=start.offset,
            sha256=start.sha256, parts=_upload_parts(request_iterator))
        return pb.UploadResponse(size=size, sha256=digest, bytes_received=received)

    # Download and GetArchive yield encoded messages (identity serializer, runtime/daemon.py):
    # building a message around 4 MiB of data and serializing it cost ~5 ms a chunk.

    @streaming
    async def Download(self, request, context):
        caller = self.caller(context)
        parts = await self.manager.download(caller, request.sandbox_id, request.path,
                                            request.offset, request.length)
        async for part in parts:
            if part[0] == "chunk":
                yield _download_chunk(part[1], part[2])
            elif part[0] == "stat":
                yield pb.DownloadResponse(stat=file_stat_to_proto(part[1])).SerializeToString()
            else:
                yield pb.DownloadResponse(end=pb.DownloadEnd(
                    size=part[1], sha256=part[2])).SerializeToString()

    @unary
    async def PutArchive(self, request_iterator, context):
        caller = self.caller(context)
        start = await _first(request_iterator, "start")
        r = await self.manager.put_archive(caller, start.sandbox_id, start.path,
                                           _archive_chunks(request_iterator))
        return pb.PutArchiveResponse(files=r.files, dirs=r.dirs, symlinks=r.symlinks,
                                     hardlinks=r.hardlinks, bytes=r.bytes, skipped=r.skipped,
                                     skipped_names=r.skipped_names)

    @streaming
    async def GetArchive(self, request, context):
        caller = self.caller(context)
        info, chunks = await self.manager.get_archive(caller, request.sandbox_id, request.path)
        yield pb.GetArchiveResponse(stat=file_stat_to_proto(info)).SerializeToString()
        async for data in chunks:
            yield b"".join((b"\x12", varint(len(data)), data))  # GetArchiveResponse.data

    @streaming
    async def WatchFiles(self, request, context):
        caller = self.caller(context)
        events = await self.manager.watch_files(caller, request.sandbox_id, request.path)
        try:
            async for batch in events:
                yield pb.WatchFilesResponse(events=[
                    pb.FileEvent(path=e.path, kind=FILE_EVENT_KINDS[e.kind], is_dir=e.is_dir,
                                 cookie=e.cookie, dropped=e.dropped) for e in batch])
        finally:
            await events.aclose()

    @unary
    async def Inspect(self, request, context):
        caller = self.caller(context)
        report, problems, digest = await self.manager.inspect(caller, request.sandbox_id)
        return pb.InspectSandboxResponse(report_json=json.dumps(report), mismatches=problems,
                                         policy_digest=digest)

    Destroy = relay("manager.destroy", "sandbox_id",
                    answer=lambda already: pb.DestroySandboxResponse(already_destroyed=already))
    ExposePort = relay("manager.expose_port", "sandbox_id", "port", "host_port",
                       answer=port_to_proto)
    UnexposePort = relay("manager.unexpose_port", "sandbox_id", "port",
                         answer=lambda p: pb.UnexposePortResponse(port=port_to_proto(p)))
    ListPorts = relay("manager.list_ports", "sandbox_id",
                      answer=lambda ports: pb.ListPortsResponse(
                          ports=[port_to_proto(p) for p in ports]))
