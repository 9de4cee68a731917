"""One style across the API (issue #17), seen on the wire by a client built only from the
protos: typed Timestamp/Duration beside each deprecated number (both filled by the daemon;
a request may set either, never both differently), exits as an enum with the signal as the
CLI reports it, and refusals shaped `field.path: problem`."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2, stream_pb2, task_pb2


@pytest.fixture
def stubs(client):
    """The raw stub and metadata, and the sandboxes a test made (destroyed after it)."""
    made: list[str] = []
    yield client.sandboxes, client.metadata, made
    for sandbox_id in made:
        with contextlib.suppress(ClientError):
            client.destroy_sandbox(sandbox_id)


def _create(stubs, spec: sandbox_pb2.SandboxSpec) -> sandbox_pb2.Sandbox:
    sandboxes, metadata, made = stubs
    sb = sandboxes.Create(sandbox_pb2.CreateSandboxRequest(spec=spec), metadata=metadata)
    made.append(sb.id)
    return sb


def test_a_typed_ttl_is_taken_and_both_forms_come_back(stubs):
    sb = _create(stubs, sandbox_pb2.SandboxSpec(memory_bytes=64 << 20,
                                                ttl=timedelta(seconds=90)))
    assert (sb.spec.ttl_s, sb.spec.ttl.ToTimedelta()) == (90, timedelta(seconds=90))
    assert sb.create_time.ToMicroseconds() == round(sb.created_at * 1_000_000)
    assert sb.expire_time.ToMicroseconds() == round(sb.expires_at * 1_000_000)
    assert not sb.HasField("pause_time")
    sandboxes, metadata, _made = stubs
    longer = sandboxes.SetTimeout(sandbox_pb2.SetTimeoutRequest(
        sandbox_id=sb.id, ttl=timedelta(seconds=300)), metadata=metadata)
    lifetime = longer.expire_time.ToDatetime() - sb.create_time.ToDatetime()
    assert timedelta(seconds=300) <= lifetime < timedelta(seconds=330)


def test_both_forms_set_differently_is_refused_naming_the_typed_field(stubs):
    with pytest.raises(grpc.RpcError) as caught:
        _create(stubs, sandbox_pb2.SandboxSpec(ttl_s=60, ttl=timedelta(seconds=61)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == ("spec.ttl: 61.0s differs from the deprecated ttl_s "
                                      "(60); set one of them")
    with pytest.raises(grpc.RpcError) as caught:
        _create(stubs, sandbox_pb2.SandboxSpec(command_timeout=timedelta(seconds=-1)))
    assert caught.value.details() == "spec.command_timeout: -1.0s must not be negative"
    same = _create(stubs, sandbox_pb2.SandboxSpec(memory_bytes=64 << 20, ttl_s=60,
                                                  ttl=timedelta(seconds=60)))
    assert same.spec.ttl_s == 60


def _exited(stubs, sandbox_id: str, script: str) -> sandbox_pb2.ExecExited:
    sandboxes, metadata, _made = stubs
    events = sandboxes.Exec(sandbox_pb2.ExecRequest(sandbox_id=sandbox_id,
                                                    argv=["sh", "-c", script]),
                            metadata=metadata)
    return [e.exited for e in events if e.WhichOneof("event") == "exited"][0]


def test_an_exec_exit_has_its_enum_signal_and_typed_duration(stubs):
    sb = _create(stubs, sandbox_pb2.SandboxSpec(memory_bytes=64 << 20))
    killed = _exited(stubs, sb.id, "kill -TERM $$")
    assert (killed.returncode, killed.reason, killed.exit_reason, killed.signal,
            killed.exit_status) == (-15, "signaled", stream_pb2.EXIT_REASON_SIGNALED, 15, 143)
    plain = _exited(stubs, sb.id, "exit 7")
    assert (plain.exit_reason, plain.signal, plain.exit_status) == (
        stream_pb2.EXIT_REASON_EXITED, 0, 7)
    assert plain.duration.ToMicroseconds() == round(plain.duration_s * 1_000_000)


def test_file_times_come_typed_too(stubs):
    sandboxes, metadata, _made = stubs
    sb = _create(stubs, sandbox_pb2.SandboxSpec(memory_bytes=64 << 20))
    sandboxes.WriteFile(sandbox_pb2.WriteFileRequest(sandbox_id=sb.id, path="f",
                                                     content=b"x"), metadata=metadata)
    entry = sandboxes.ListFiles(sandbox_pb2.ListFilesRequest(sandbox_id=sb.id),
                                metadata=metadata).entries[0]
    assert entry.modify_time.ToMicroseconds() == round(entry.mtime * 1_000_000)
    stat = sandboxes.StatFile(sandbox_pb2.StatFileRequest(sandbox_id=sb.id, path="f"),
                              metadata=metadata)
    assert stat.modify_time == entry.modify_time


def test_a_task_takes_a_typed_max_runtime_and_answers_typed_times(client):
    spec = task_pb2.TaskSpec(argv=["true"], sandbox=sandbox_pb2.SandboxSpec(
        memory_bytes=64 << 20), resources={"cpu": 0.25}, max_runtime=timedelta(minutes=5))
    task = client.tasks.Submit(task_pb2.SubmitTaskRequest(spec=spec), metadata=client.metadata)
    try:
        assert (task.spec.max_runtime_s, task.spec.max_runtime.ToTimedelta()) == (
            300.0, timedelta(minutes=5))
        assert task.submit_time.ToMicroseconds() == round(task.submitted_at * 1_000_000)
    finally:
        client.tasks.Cancel(task_pb2.CancelTaskRequest(task_id=task.id),
                            metadata=client.metadata)


def test_a_finished_task_reports_its_exit_as_an_exec_does(client):
    spec = task_pb2.TaskSpec(argv=["sh", "-c", "kill -TERM $$"], resources={"cpu": 0.25},
                             sandbox=sandbox_pb2.SandboxSpec(memory_bytes=64 << 20))
    task = client.tasks.Submit(task_pb2.SubmitTaskRequest(spec=spec), metadata=client.metadata)
    assert (task.signal, task.exit_status) == (0, 0)  # not finished yet
    for update in client.tasks.Watch(task_pb2.WatchTaskRequest(task_id=task.id),
                                     metadata=client.metadata):
        if update.HasField("task") and update.task.HasField("finish_time"):
            task = update.task
    assert (task.exit_code, task.signal, task.exit_status, task.reason) == (
        -15, 15, 143, "killed by signal 15")
