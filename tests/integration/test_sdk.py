"""The typed SDK (`import corral`) against the real daemon: typed results, never protobufs;
sizes and durations parsed with errors naming the argument; context managers that destroy on
an exception; gRPC codes as typed exceptions; the same surface on asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime

import grpc
import pytest
from google.protobuf.message import Message

import corral
from corral.errors import error_for
from corral.runtime.client import ClientError

ECHO_AGENT = ["python3", "-c", "import sys\nprint('ready', flush=True)\n"
              "for line in sys.stdin:\n    print('echo:' + line.strip(), flush=True)"]


@pytest.fixture
def sdk(daemon):
    with corral.Client(daemon.socket) as client:
        yield client


def _no_protobuf(value, where: str = "result") -> None:
    """Fail if a protobuf message hides anywhere in a result (dataclass fields, lists, dicts)."""
    assert not isinstance(value, Message), f"{where} is a protobuf {type(value).__name__}"
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _no_protobuf(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _no_protobuf(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_protobuf(item, f"{where}[{key!r}]")


def test_sandbox_results_are_typed_dataclasses(sdk):
    with sdk.sandbox(memory="256M", ttl="10m", labels={"suite": "sdk"}) as sb:
        assert isinstance(sb.info, corral.Sandbox)
        assert (sb.info.state, sb.info.memory_bytes, sb.info.labels) == (
            "running", 256 << 20, {"suite": "sdk"})
        lifetime = sb.info.expires_at - sb.info.created_at  # datetimes, in UTC
        assert sb.info.created_at.tzinfo is datetime.UTC
        assert lifetime.total_seconds() == pytest.approx(600, abs=1)
        result = sb.run(["sh", "-c", "printf out; printf err >&2; exit 3"])
        assert isinstance(result, corral.ExecResult)
        assert (result.stdout, result.stderr, result.returncode, result.ok) == (
            b"out", b"err", 3, False)
        events = list(sb.exec(["sh", "-c", "printf '\\000\\377'"]))
        assert [type(e) for e in events] == [corral.ExecStarted, corral.ExecOutput,
                                             corral.ExecExited]
        assert events[1] == corral.ExecOutput("stdout", b"\x00\xff", 0)
        sb.run(["mkdir", "/workspace/notes"])
        assert sb.write_file("notes/a.txt", "héllo") == len("héllo".encode())
        assert sb.read_file("notes/a.txt") == "héllo".encode()
        assert sb.list_files("notes") == [corral.FileEntry("a.txt", "file", 6, 0o644,
                                                           sb.list_files("notes")[0].mtime)]
        assert [s.id for s in sdk.list_sandboxes("suite=sdk")] == [sb.id]
        assert sb.pause().state == "paused"
        assert sb.resume().state == "running"
        snap = sb.snapshot()
        assert isinstance(snap, corral.Snapshot) and snap.source_sandbox == sb.id
        fork = sdk.fork(snap.id, memory="128M")
        try:
            assert fork.read_file("notes/a.txt") == "héllo".encode()
            assert fork.info.snapshot == snap.id
        finally:
            fork.destroy()
            sdk.remove_snapshot(snap.id)
        for value in (sb.info, result, events, sb.list_files(""), snap, sb.refresh()):
            _no_protobuf(value)
    assert sb.id in [s.id for s in sdk.list_sandboxes(state="destroyed")]


def test_sizes_and_durations_refuse_bad_values_naming_the_argument(sdk):
    before = [s.id for s in sdk.list_sandboxes()]
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: memory: '12Q' is not a size; "
                             r"use e\.g\. 512M or 2G$"):
        sdk.create_sandbox(memory="12Q")
    with pytest.raises(corral.InvalidArgument,
                       match=r"^INVALID_ARGUMENT: ttl: 'soon' is not a duration; "
                             r"use e\.g\. 30s, 5m, 2h or 1m30s$"):
        sdk.create_sandbox(ttl="soon")
    with pytest.raises(corral.InvalidArgument, match=r"^INVALID_ARGUMENT: colour: not a "
                                                     r"sandbox setting \(one of: memory, "):
        sdk.create_sandbox(colour="red")
    with pytest.raises(corral.InvalidArgument, match=r"^INVALID_ARGUMENT: state: 'asleep' "
                                                     r"is not one of running, destroyed, "
                                                     r"paused$"):
        sdk.list_sandboxes(state="asleep")
    with pytest.raises(corral.InvalidArgument, match=r"^INVALID_ARGUMENT: max_runtime: "):
        sdk.submit_task(["true"], max_runtime="-5s")
    # bad input is refused before anything is made, and is a ValueError to plain Python
    assert [s.id for s in sdk.list_sandboxes()] == before
    assert issubclass(corral.InvalidArgument, ValueError)


def test_the_context_manager_destroys_the_sandbox_on_an_exception(sdk):
    with pytest.raises(RuntimeError, match="^boom$"), sdk.sandbox(memory="64M") as sb:
        assert sdk.get_sandbox(sb.id).state == "running"
        raise RuntimeError("boom")
    with pytest.raises(corral.NotFound, match=rf"^NOT_FOUND: sandbox '{sb.id}' does not "
                                              r"exist$"):
        sdk.get_sandbox(sb.id)
    assert sb.id in [s.id for s in sdk.list_sandboxes(state="destroyed")]


def test_grpc_codes_are_typed_exceptions(sdk, daemon, tmp_path):
    with pytest.raises(corral.NotFound) as missing:
        sdk.get_sandbox("sbx-000000000000")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(missing.value, ClientError | LookupError)  # the plain client's too
    with sdk.sandbox(memory="64M") as sb:
        sb.pause()
        with pytest.raises(corral.FailedPrecondition, match=r"^FAILED_PRECONDITION: .*paused"):
            sb.run(["true"])
    with pytest.raises(corral.Unavailable, match=r"^UNAVAILABLE: no daemon socket at "):
        corral.Client(str(tmp_path / "none.sock"))
    other = corral.Client(daemon.socket, tenant="sdk-other")
    with sdk.sandbox(memory="64M") as sb, pytest.raises(corral.NotFound):
        other.get_sandbox(sb.id)  # another tenant's sandbox reads as unknown
    other.close()
    expected = {
        "INVALID_ARGUMENT": corral.InvalidArgument, "NOT_FOUND": corral.NotFound,
        "PERMISSION_DENIED": corral.PermissionDenied,
        "RESOURCE_EXHAUSTED": corral.ResourceExhausted,
        "FAILED_PRECONDITION": corral.FailedPrecondition,
        "UNAVAILABLE": corral.Unavailable, "ALREADY_EXISTS": corral.AlreadyExists,
        "DATA_LOSS": corral.CorralError,
    }
    for name, cls in expected.items():
        err = error_for(grpc.StatusCode[name], "x: y")
        assert type(err) is cls and str(err) == f"{name}: x: y" and err.details == "x: y"


def test_a_session_streams_typed_events_and_steers(sdk):
    with sdk.open_session(ECHO_AGENT, memory="128M", labels={"suite": "sdk"}) as session:
        assert session.id.startswith("ses-") and session.sandbox_id
        info = sdk.get_session(session.id)
        assert isinstance(info, corral.SessionInfo)
        assert (info.state, info.labels, info.sandbox_id) == (
            "running", {"suite": "sdk"}, session.sandbox_id)
        assert [s.id for s in sdk.list_sessions("suite=sdk", state="running")] == [session.id]
        seen = []
        for event in session:
            seen.append(event)
            if isinstance(event, corral.Tokens) and event.text == "ready\n":
                session.send("hi")
            elif isinstance(event, corral.Tokens) and "echo:hi" in event.text:
                session.close()
        assert isinstance(seen[-1], corral.SessionExited)
        assert seen[-1].reason == "closed"
        _no_protobuf(seen)
    assert sdk.list_sessions("suite=sdk", state="running") == []


def test_a_session_left_by_with_is_closed(sdk):
    with sdk.open_session(ECHO_AGENT, memory="128M", labels={"suite": "sdk-left"}) as session:
        assert not session.ended
    assert session.ended
    assert sdk.list_sessions("suite=sdk-left", state="running") == []


def test_a_task_is_submitted_watched_and_read(sdk):
    task = sdk.submit_task(["sh", "-c", "echo done"], memory="128M", resources={"cpu": 0.25},
                           labels={"suite": "sdk"}, max_runtime="5m")
    assert isinstance(task, corral.Task) and task.labels == {"suite": "sdk"}
    updates = list(sdk.watch_task(task.id))
    assert updates and all(isinstance(u, corral.Task | corral.TaskLog) for u in updates)
    finished = sdk.wait_task(task.id)
    assert (finished.state, finished.done, finished.exit_code) == ("succeeded", True, 0)
    assert task.finished_at is None
    assert task.submitted_at <= finished.finished_at  # datetimes, read from the typed fields
    result = sdk.task_result(task.id)
    assert isinstance(result, corral.TaskResult) and result.task.id == task.id
    assert result.task.finished_at == finished.finished_at  # pre-encoded answers too
    assert task.id in [t.id for t in sdk.list_tasks(selector="suite=sdk")]
    _no_protobuf([updates, finished, result])
    long = sdk.submit_task(["sleep", "600"], memory="64M", resources={"cpu": 0.25})
    assert sdk.cancel_task(long.id).id == long.id
    assert sdk.wait_task(long.id).state == "cancelled"


def test_the_async_client_has_the_same_surface(daemon):
    async def main():
        async with corral.AsyncClient(daemon.socket) as client:
            with pytest.raises(corral.InvalidArgument, match=r"^INVALID_ARGUMENT: memory: "):
                await client.create_sandbox(memory="lots")
            async with client.sandbox(memory="128M") as sb:
                result = await sb.run(["sh", "-c", "printf async"])
                await sb.write_file("f", b"\x01\x02")
                files = await sb.list_files()
                events = [e async for e in sb.exec(["true"])]
            with pytest.raises(corral.NotFound):
                await client.get_sandbox(sb.id)
            session = await client.open_session(ECHO_AGENT, memory="128M", input="one")
            async with session:
                async for event in session:
                    if isinstance(event, corral.Tokens) and "echo:one" in event.text:
                        await session.close()
            return result, files, events, session
    result, files, events, session = asyncio.run(main())
    assert (result.stdout, result.returncode) == (b"async", 0)
    assert [(f.name, f.size) for f in files] == [("f", 2)]
    assert isinstance(events[-1], corral.ExecExited) and events[-1].returncode == 0
    assert session.ended and session.last_seq >= 1


def test_the_async_context_manager_destroys_on_an_exception(daemon):
    made = []

    async def main():
        async with corral.AsyncClient(daemon.socket) as client:
            async with client.sandbox(memory="64M") as sb:
                made.append(sb.id)
                raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        asyncio.run(main())
    with corral.Client(daemon.socket) as client, pytest.raises(corral.NotFound):
        client.get_sandbox(made[0])


def test_a_detached_session_resumes_after_its_last_seq_and_is_interrupted(sdk):
    session = sdk.open_session(ECHO_AGENT, memory="128M")
    for event in session:
        if isinstance(event, corral.Tokens) and event.text == "ready\n":
            break
    seq = session.last_seq
    session.detach()
    assert sdk.get_session(session.id).state == "running"
    seen = []
    with sdk.resume_session(session.id, after_seq=seq) as again:
        again.send("after")
        for event in again:
            seen.append(event)
            if isinstance(event, corral.Tokens) and "echo:after" in event.text:
                again.interrupt()
    texts = "".join(e.text for e in seen if isinstance(e, corral.Tokens))
    assert texts == "echo:after\n"  # nothing before seq again, nothing lost after it
    assert [e.status for e in seen if isinstance(e, corral.TurnEnded)] == ["interrupted"]
    assert isinstance(seen[-1], corral.SessionExited)
