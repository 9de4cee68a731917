"""Malformed and oversize requests: INVALID_ARGUMENT naming the field, and the daemon lives on.

Also the standard services every gRPC tool expects: health checking and reflection.
"""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from corral.runtime.client import Client, ClientError
from corral.v1 import session_pb2

from .daemon_harness import SessionRecorder, collect_exec

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

MiB = 1 << 20


def _fails(fn) -> ClientError:
    with pytest.raises(ClientError) as exc:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
    return exc.value


def _session_error(stream) -> ClientError | None:
    rec = SessionRecorder(stream)
    rec.join()
    return rec.error


EXEC_CASES = {
    "empty argv": ({"argv": []}, "argv"),
    "empty program": ({"argv": ["", "x"]}, "argv"),
    "NUL in argv": ({"argv": ["echo", "a\0b"]}, "argv"),
    "too many args": ({"argv": ["true"] * 5000}, "argv"),
    "stdin over 1 MiB": ({"argv": ["cat"], "stdin": b"x" * (MiB + 1)}, "stdin"),
    "negative timeout": ({"argv": ["true"], "timeout_s": -1.0}, "timeout_s"),
    "huge timeout": ({"argv": ["true"], "timeout_s": 1e12}, "timeout_s"),
    "NaN timeout": ({"argv": ["true"], "timeout_s": math.nan}, "timeout_s"),
    "NUL in env value": ({"argv": ["true"], "env": {"A": "x\0y"}}, "env"),
    "bad env name": ({"argv": ["true"], "env": {"A=B": "x"}}, "env"),
    "NUL in cwd": ({"argv": ["true"], "cwd": "/a\0b"}, "cwd"),
    "missing cwd": ({"argv": ["true"], "cwd": "/no/such/dir"}, "cwd"),
}


@pytest.mark.parametrize("case", list(EXEC_CASES))
def test_bad_exec_requests(client, sandbox, daemon, case):
    kw, field = EXEC_CASES[case]
    argv = kw.pop("argv")
    err = _fails(lambda: client.exec(sandbox.id, argv, **kw))
    assert err.code.name == "INVALID_ARGUMENT", err
    assert f"{field}:" in str(err)
    assert daemon.health() == "SERVING"


CREATE_CASES = {
    # (an absolute path is the policy's call: test_profile_lookup.py)
    "profile escape": ({"profile": "../default"}, "spec.profile"),
    "unknown profile": ({"profile": "nope"}, "spec.profile"),
    "tiny memory": ({"memory_bytes": 1}, "memory_bytes"),
    "one pid": ({"pids_max": 1}, "pids_max"),
    "too many pids": ({"pids_max": 2**32 - 1}, "spec.pids_max"),
    "NaN cpus": ({"cpus": math.nan}, "cpus"),
    "negative cpus": ({"cpus": -1.0}, "cpus"),
    "negative timeout": ({"command_timeout_s": -5.0}, "spec.command_timeout_s"),
    "bad hostname": ({"hostname": "a b"}, "hostname"),
    "NUL in env": ({"env": {"A": "\0"}}, "env"),
    "bad env name": ({"env": {"1A": "x"}}, "env"),
}


@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_bad_sandbox_specs(client, daemon, case):
    spec, field = CREATE_CASES[case]
    before = {b.id for b in client.list_sandboxes()}
    err = _fails(lambda: client.create_sandbox(**spec))
    assert err.code.name == "INVALID_ARGUMENT", err
    assert str(err).startswith(f"INVALID_ARGUMENT: {field}:")
    assert {b.id for b in client.list_sandboxes()} == before
    assert daemon.health() == "SERVING"


def test_bad_calls_on_a_sandbox(client, sandbox, daemon):
    sid = sandbox.id
    cases = [
        (lambda: client.signal(sid, 0), "INVALID_ARGUMENT", "signal:"),
        (lambda: client.signal(sid, 65), "INVALID_ARGUMENT", "signal:"),
        (lambda: client.signal(sid, -9), "INVALID_ARGUMENT", "signal:"),
        (lambda: client.send_input(sid, "exe-nope", b"x"), "NOT_FOUND", "exe-nope"),
        (lambda: client.attach(sid, "exe-nope"), "NOT_FOUND", "exe-nope"),
        (lambda: client.write_file(sid, "a\0b", b"x"), "INVALID_ARGUMENT", "path:"),
        (lambda: client.write_file(sid, "", b"x"), "INVALID_ARGUMENT", "path:"),
        (lambda: client.write_file(sid, "nodir/x", b"x"), "NOT_FOUND", "nodir/x"),
        (lambda: client.list_files(sid, "\0"), "INVALID_ARGUMENT", "path:"),
        (lambda: client.read_file(sid, "."), "INVALID_ARGUMENT", "path:"),
        (lambda: client.exec(sid, ["/no/such/program"]), "INVALID_ARGUMENT", "/no/such"),
        (lambda: client.get_sandbox("sbx-000000000000"), "NOT_FOUND", "sbx-000000000000"),
        (lambda: client.exec("", ["true"]), "NOT_FOUND", "sandbox"),
        (lambda: client.audit_query(kind="NOT A KIND"), "INVALID_ARGUMENT", "kind:"),
        (lambda: client.audit_query(since=math.nan), "INVALID_ARGUMENT", "since:"),
    ]
    for fn, code, needle in cases:
        err = _fails(fn)
        assert (err.code.name, needle in str(err)) == (code, True), err
    # SendInput beyond 1 MiB, to a command that is still reading.
    events = client.exec(sid, ["cat"], keep_stdin_open=True)
    exec_id = next(events).started.exec_id
    err = _fails(lambda: client.send_input(sid, exec_id, b"x" * (MiB + 1)))
    assert err.code.name == "INVALID_ARGUMENT" and "data:" in str(err)
    client.send_input(sid, exec_id, b"fine\n", close=True)
    assert collect_exec(events).stdout == b"fine\n"
    err = _fails(lambda: client.send_input(sid, exec_id, b"late"))
    assert err.code.name == "FAILED_PRECONDITION", err
    # A message over the daemon's 16 MiB limit is refused by gRPC itself.
    err = _fails(lambda: client.write_file(sid, "big", b"x" * (17 * MiB)))
    assert err.code.name == "RESOURCE_EXHAUSTED", err
    assert daemon.health() == "SERVING"
    assert collect_exec(client.exec(sid, ["echo", "still fine"])).stdout == b"still fine\n"


def test_bad_session_requests(client, sandbox, daemon):
    err = _session_error(client.open_session([], sandbox_id=sandbox.id))
    assert err.code.name == "INVALID_ARGUMENT" and "start.argv:" in str(err)
    err = _session_error(client.open_session(["true"], memory_bytes=1))
    assert err.code.name == "INVALID_ARGUMENT" and "memory_bytes:" in str(err)
    err = _session_error(client.open_session(["true"], sandbox_id=sandbox.id,
                                             env={"A": "\0"}))
    assert err.code.name == "INVALID_ARGUMENT" and "env:" in str(err)
    err = _session_error(client.resume_session("ses-000000000000"))
    assert err.code.name == "NOT_FOUND"
    # The first message must be start or resume.
    from corral.runtime.client import SessionStream

    stream = SessionStream(client.sessions, session_pb2.SessionRequest(
        input=session_pb2.SessionInput(text="hi")), client.metadata)
    err = _session_error(stream)
    assert err.code.name == "INVALID_ARGUMENT" and "request:" in str(err)
    # Input over 1 MiB into a live session.
    rec = SessionRecorder(client.open_session(
        ["python3", "/workspace/stream_agent.py", "--idle"], sandbox_id=sandbox.id))
    rec.wait_for(lambda r: r.session_id, what="opened")
    rec.stream.send_input("x" * (MiB + 1))
    rec.join()
    assert rec.error.code.name == "INVALID_ARGUMENT" and "input.text:" in str(rec.error)
    assert daemon.health() == "SERVING"


def test_a_bad_tenant_header_is_unauthenticated(daemon):
    c = daemon.client(tenant="Not/A-Tenant")
    err = _fails(c.list_sandboxes)
    assert err.code.name == "UNAUTHENTICATED" and "x-corral-tenant" in str(err)


def test_health_checking(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "corral.v1.Sandboxes", "corral.v1.Sessions", "corral.v1.Audit"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as exc:
            stub.Check(health_pb2.HealthCheckRequest(service="corral.v1.Nope"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="corral.v1.Sessions"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"corral.v1.Sandboxes", "corral.v1.Sessions", "corral.v1.Audit",
            "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    services = {s.name: [m.name for m in s.method] for f in files for s in f.service}
    assert services["Sessions"] == ["Open", "OpenMany", "Get", "List"]


def test_client_without_daemon_says_where_it_looked(tmp_path):
    err = _fails(lambda: Client.connect(socket=str(tmp_path / "none.sock")))
    assert err.code.name == "UNAVAILABLE" and "none.sock" in str(err)


def test_reflection_v1_answers_as_v1alpha_does(daemon):
    """grpc.reflection.v1 (what grpcurl and current tools ask first), with raw bytes on the
    wire: the v1 method path, the same field numbers, the same answers as v1alpha."""
    from google.protobuf import descriptor_pb2

    def ask(channel, path: str, requests) -> list:
        call = channel.stream_stream(
            path, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=5))

    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="corral.v1.Sandboxes"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
    ]
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        v1 = ask(channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", requests)
        alpha = ask(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                    requests)
    assert [r.SerializeToString() for r in v1] == [r.SerializeToString() for r in alpha]
    listed, sandboxes, reflection_v1, missing = v1
    names = {s.name for s in listed.list_services_response.service}
    assert {"corral.v1.Sandboxes", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in sandboxes.file_descriptor_response.file_descriptor_proto]
    assert "Exec" in [m.name for f in files for s in f.service if s.name == "Sandboxes"
                      for m in s.method]
    [v1_file] = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in reflection_v1.file_descriptor_response.file_descriptor_proto]
    assert (v1_file.package, [s.name for s in v1_file.service]) == (
        "grpc.reflection.v1", ["ServerReflection"])
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
