"""The API's bounds through a real daemon: an unread stream costs bounded memory, ends with
RESOURCE_EXHAUSTED, and an error never echoes a large field back whole.

Each test starts its own daemon, so its memory figures are its own.
"""

from __future__ import annotations

import time

import grpc
import pytest

from corral.runtime.api.bounds import MESSAGE_BYTES
from corral.v1 import sandbox_pb2, session_pb2, task_pb2

from .daemon_harness import wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BIG = 1 << 20  # one field of this many bytes per refused request
BIG_REQUESTS = 1000
#: Growth of the daemon's peak RSS allowed while it refuses BIG_REQUESTS x 1 MiB unread.
#: Without bounds every refusal kept its 1 MiB message queued: about 1 GiB.
RSS_GROWTH_BYTES = 200 << 20


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _bad_start(ref: str) -> session_pb2.MuxRequest:
    """A start the daemon refuses, quoting its 1 MiB hostname in the error."""
    return session_pb2.MuxRequest(ref=ref, start=session_pb2.SessionStart(
        argv=["true"], spec=sandbox_pb2.SandboxSpec(hostname="h" * BIG)))


def test_unread_open_many_stream_is_bounded_and_ends_resource_exhausted(make_daemon):
    d = make_daemon().start()
    client = d.client()
    peak_before = _status_kib(d.pid, "VmHWM")

    def requests():
        for i in range(BIG_REQUESTS):
            yield _bad_start(f"big-{i}")
        # then small refusals (an empty ref) until the daemon stops reading: what it owes
        # this unread stream passes its bound long before these run out
        for _ in range(200_000):
            yield session_pb2.MuxRequest(ref="", detach=session_pb2.SessionDetach())

    call = client.sessions.OpenMany(requests(), metadata=client.metadata)
    # Read nothing until the daemon has given up on this stream: what it owes us passed its
    # bound, so it dropped that and stopped reading our requests.
    ended = "Sessions.OpenMany of tenant local ended: its client left more than 1048576 " \
            "bytes unread"
    assert wait_until(lambda: ended in d.log(), timeout_s=240), d.log()[-2000:]
    messages = []
    with pytest.raises(grpc.RpcError) as info:
        for message in call:
            messages.append(message)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert info.value.details() == (
        "this stream ended: its client left more than 1 MiB of session events unread "
        f"(limit {1 << 20} bytes); read the stream as fast as you send requests, or open it "
        "again (sessions keep running)")

    errors = [ev.event.error for m in messages for ev in m.events
              if ev.event.WhichOneof("event") == "error"]
    assert errors, "the daemon sent no error event before it ended the stream"
    big = [e for e in errors if e.field == "hostname"]
    assert big, [e.message for e in errors[:3]]
    for e in big:
        assert e.code == "INVALID_ARGUMENT"
        # the 1 MiB value is quoted by its start and end only
        assert len(e.message.encode()) <= MESSAGE_BYTES, len(e.message.encode())
        assert e.message.startswith("hostname: 'hhhh"), e.message[:40]
        assert e.message.endswith("' is not a valid host name"), e.message[-40:]
        assert " bytes left out] " in e.message
    growth = _status_kib(d.pid, "VmHWM") - peak_before
    assert growth < RSS_GROWTH_BYTES, f"the daemon's peak RSS grew by {growth >> 20} MiB"
    # the daemon is still fine
    assert d.health() == "SERVING"
    assert client.list_sandboxes() == []


#: An agent that ends every turn at once, with a status of 900 KB (the agent's choice).
BIG_STATUS_AGENT = ["python3", "-c", (
    "import corral_agent as a\n"
    "while a.wait() is not None:\n"
    "    a.turn_end('s' * 900_000)\n")]


def test_unread_open_stream_is_bounded_and_ends_resource_exhausted(make_daemon):
    d = make_daemon().start()
    client = d.client()
    peak_before = _status_kib(d.pid, "VmHWM")

    def requests():
        yield session_pb2.SessionRequest(start=session_pb2.SessionStart(
            argv=BIG_STATUS_AGENT, spec=sandbox_pb2.SandboxSpec()))
        for i in range(300):  # each input opens a turn the agent ends with 900 KB
            # spaced, so the agent ends one turn before the next input opens another
            # (inputs that arrive within one turn share it); two turns pass the bound
            time.sleep(0.02)
            yield session_pb2.SessionRequest(input=session_pb2.SessionInput(text=str(i)))

    call = client.sessions.Open(requests(), metadata=client.metadata)
    ended = "Sessions.Open of tenant local ended: its client left more than 1048576 bytes " \
            "unread"
    assert wait_until(lambda: ended in d.log(), timeout_s=240), d.log()[-2000:]
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert info.value.details().startswith(
        "this stream ended: its client left more than 1 MiB of session events unread")
    growth = _status_kib(d.pid, "VmHWM") - peak_before
    assert growth < RSS_GROWTH_BYTES, f"the daemon's peak RSS grew by {growth >> 20} MiB"
    assert d.health() == "SERVING"


def test_unary_error_echoes_at_most_the_start_and_end_of_a_large_field(make_daemon):
    d = make_daemon().start()
    client = d.client()
    with pytest.raises(grpc.RpcError) as info:
        client.sandboxes.Create(sandbox_pb2.CreateSandboxRequest(
            spec=sandbox_pb2.SandboxSpec(hostname="h" * BIG)), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert len(details.encode()) <= MESSAGE_BYTES
    assert details.startswith("hostname: 'hhhh") and details.endswith(
        "' is not a valid host name"), details


def test_submit_stream_refusal_echoes_at_most_the_start_and_end_of_a_large_field(make_daemon):
    d = make_daemon().start()
    client = d.client()
    spec = task_pb2.TaskSpec(argv=["true"], sandbox=sandbox_pb2.SandboxSpec(hostname="h" * BIG))
    acks = list(client.tasks.SubmitStream(iter([task_pb2.SubmitTaskRequest(spec=spec)] * 3),
                                          metadata=client.metadata))
    assert [a.index for a in acks] == [0, 1, 2]
    for ack in acks:
        assert ack.error_code == "INVALID_ARGUMENT"
        assert len(ack.error.encode()) <= MESSAGE_BYTES, len(ack.error.encode())
        assert ack.error.endswith("' is not a valid host name"), ack.error[-40:]
