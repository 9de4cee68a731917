"""runtime/api/sandboxes.py sandbox_wire: List's cached Sandbox encoding is the message
sandbox_to_proto builds, after every change a listed field can go through."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import pytest

from corral.runtime.api.sandboxes import sandbox_to_proto, sandbox_wire
from corral.runtime.api.wire import fill_typed
from corral.runtime.sandboxes import DestroyedSandbox, ExecHandle, ManagedSandbox
from corral.sandbox import SandboxSpec
from corral.v1 import sandbox_pb2 as pb


def _fresh(msb) -> bytes:
    """msb as a one-sandbox ListSandboxesResponse, encoded as the message classes do."""
    return pb.ListSandboxesResponse(
        sandboxes=[fill_typed(sandbox_to_proto(msb))]).SerializeToString()


def _same(cached: bytes, fresh: bytes) -> bool:
    """The same message: protobuf leaves the order of a map's entries (labels) open, so
    two right encodings of one message may differ in bytes; decoded, they are equal."""
    return (pb.ListSandboxesResponse.FromString(cached)
            == pb.ListSandboxesResponse.FromString(fresh))


@pytest.fixture
def msb():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield ManagedSandbox(id="sbx-0123456789ab", tenant="t", spec=SandboxSpec(),
                         sandbox=types.SimpleNamespace(init_pid=4321), policy_digest="d" * 64,
                         created_at=1_700_000_000.25, expires_at=1_700_003_600.25,
                         workspace=None, labels={"team": "ml"}, seq=1)
    asyncio.set_event_loop(None)
    loop.close()


def _exec(exec_id: str) -> ExecHandle:
    return ExecHandle(id=exec_id, sandbox_id="sbx-0123456789ab", argv=("sleep", "9"),
                      process=None, stdout=None, stderr=None, stdin=None, started_at=0.0)


def test_the_cache_follows_every_listed_change(msb):
    first = sandbox_wire(msb)
    assert first == _fresh(msb)
    assert sandbox_wire(msb) is first  # unchanged: the kept bytes, not a new encoding
    changes = [
        lambda: setattr(msb, "paused_at", 1_700_000_100.5),
        lambda: setattr(msb, "paused_at", 0.0),
        lambda: setattr(msb, "expires_at", msb.expires_at + 60),
        lambda: setattr(msb, "labels", {"team": "infra", "gpu": ""}),
        lambda: msb.execs.__setitem__("exec-1", _exec("exec-1")),
        lambda: setattr(msb.execs["exec-1"], "returncode", 0),
        lambda: setattr(msb.execs["exec-1"], "reason", "EXITED"),
        lambda: setattr(msb, "spec", dataclasses.replace(msb.spec, env=(("A", "1"),))),
        lambda: setattr(msb, "sandbox", types.SimpleNamespace(init_pid=99)),
        lambda: setattr(msb, "destroyed", True),
    ]
    before = first
    for change in changes:
        change()
        now = sandbox_wire(msb)
        assert _same(now, _fresh(msb))
        assert not _same(now, before)  # each change shows in the listed message
        before = now
    shown = pb.ListSandboxesResponse.FromString(now).sandboxes[0]
    assert shown.execs[0].id == "exec-1" and not shown.execs[0].running
    assert shown.create_time.ToMicroseconds() == 1_700_000_000_250_000


def test_a_remembered_sandbox_encodes_as_destroyed(msb):
    gone = DestroyedSandbox(id=msb.id, tenant=msb.tenant, spec=msb.spec,
                            policy_digest=msb.policy_digest, created_at=msb.created_at,
                            expires_at=msb.expires_at, labels=msb.labels, seq=msb.seq)
    shown = pb.ListSandboxesResponse.FromString(sandbox_wire(gone)).sandboxes[0]
    assert shown.state == pb.SANDBOX_STATE_DESTROYED
    assert _same(sandbox_wire(gone), _fresh(gone))
