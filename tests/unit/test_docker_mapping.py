"""The docker backend's pure parts, without an engine: the spec -> Engine API mapping, the
seccomp option, the engine address and the base image's file plan."""

from __future__ import annotations

import io
import json
import os
import tarfile

import docker as docker_sdk
import pytest

from corral.sandbox import InvalidSpec, SandboxSpec
from corral.sandbox.backends import docker
from corral.sandbox.spec import BindMount

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _api():
    # Builds requests locally; nothing connects until a request is sent.
    return docker_sdk.APIClient(base_url="unix:///nonexistent/docker.sock",
                                version=docker.API_VERSION)


def test_container_config_maps_the_whole_spec(tmp_path):
    (tmp_path / "data").mkdir()
    spec = SandboxSpec(backend="docker", memory_bytes=64 * MiB, pids_max=33, cpus=0.25,
                       tmp_bytes=4 * MiB, nofile=77, fsize_bytes=5 * MiB, hostname="box",
                       env=(("A", "1"),), labels=(("team", "x"),),
                       binds=(BindMount(str(tmp_path / "data"), "/data", False),),
                       uid_base=100000, cpu_weight=10)  # uid_base fixed here; a sandbox
    # takes its own at start
    cfg = docker.container_config(_api(), spec, "corral-base:t", "sbx-1", "/w", True, "/f")
    hc = cfg["host_config"]
    assert (cfg["image"], cfg["command"], cfg["user"], cfg["working_dir"], cfg["hostname"]) == (
        "corral-base:t", ["sleep", "infinity"], "100000:100000", "/workspace", "box")
    assert cfg["network_disabled"] is True
    assert "A=1" in cfg["environment"]
    assert cfg["labels"][docker.LABEL] == "sbx-1"
    assert cfg["labels"][docker.LABEL_WORKSPACE] == "/w"
    assert cfg["labels"]["corral.label.team"] == "x"
    assert (hc["ReadonlyRootfs"], hc["CapDrop"], hc["NetworkMode"], hc["Init"]) == (
        True, ["ALL"], "none", True)
    assert (hc["PidsLimit"], hc["Memory"], hc["MemorySwap"], hc["NanoCpus"]) == (
        33, 64 * MiB, 64 * MiB, 250_000_000)
    assert hc["CpuShares"] == 102  # cpu_weight 10 of 100 -> 102 of the engine's 1024
    assert hc["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={4 * MiB},mode=1777"}
    assert [(m["Target"], m["Source"], m["ReadOnly"]) for m in hc["Mounts"]] == [
        ("/workspace", "/w", False), ("/data", str(tmp_path / "data"), True),
        ("/run/corral-fds", "/f", True)]
    assert cfg["labels"][docker.LABEL_FDS] == "/f"
    assert {u["Name"]: u["Hard"] for u in hc["Ulimits"]} == {
        "nofile": 77, "fsize": 5 * MiB, "core": 0}
    assert hc["SecurityOpt"][0] == "no-new-privileges:true"


def test_seccomp_option_carries_the_profile_json(tmp_path):
    opt = docker.seccomp_option("default")
    with open(os.path.join(REPO, "sandbox", "profiles", "default.json")) as f:
        assert json.loads(opt.removeprefix("seccomp=")) == json.load(f)
    assert docker.seccomp_option("unconfined") == "seccomp=unconfined"
    own = tmp_path / "p.json"
    own.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    assert json.loads(docker.seccomp_option(str(own)).removeprefix("seccomp=")) == {
        "defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    with pytest.raises(InvalidSpec, match=r"^profile: "):
        docker.seccomp_option(str(tmp_path / "missing.json"))


def test_engine_url_precedence(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert docker.engine_url() == "unix:///var/run/docker.sock"
    monkeypatch.setenv("DOCKER_HOST", "unix:///env.sock")
    assert docker.engine_url() == "unix:///env.sock"
    assert docker.engine_url("tcp://127.0.0.1:2375") == "tcp://127.0.0.1:2375"


def test_rootfs_plan_keeps_links_and_brings_python():
    plan = docker.rootfs_plan()
    paths = set(plan.files) | set(plan.links)
    assert any(p.endswith("/python3") for p in paths)
    assert any("ld-linux" in p for p in paths)  # the loader, found through ldd
    assert "/etc/passwd" in plan.generated
    assert b"corral:x:100000:100000" in plan.generated["/etc/passwd"]
    for top in ("/bin", "/lib"):
        if os.path.islink(top):
            assert plan.links[top] == os.readlink(top)
    assert not any("/site-packages/" in p or "/dist-packages/" in p for p in plan.files)
    assert plan.digest() == docker.rootfs_plan().digest()  # stable: the image tag


def test_rootfs_tar_entries_are_root_owned_and_keep_setuid(tmp_path):
    tool = tmp_path / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chmod(tool, 0o4755)
    plan = docker.RootfsPlan()
    plan.add_host_path(str(tool))
    plan.generated["/etc/hostname"] = b"x\n"
    buf = io.BytesIO()
    plan.write_tar(buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        members = {m.name: m for m in tar.getmembers()}
    entry = members[os.path.realpath(tool).lstrip("/")]
    assert entry.mode == 0o4755
    assert all((m.uid, m.gid) == (0, 0) for m in members.values())
    assert members["etc/hostname"].size == 2


def test_task_specs_keep_the_backend_through_the_api():
    from corral.runtime.api.tasks import spec_from_proto, spec_to_proto
    from corral.v1 import sandbox_pb2, task_pb2

    docker_spec = spec_from_proto(task_pb2.TaskSpec(
        argv=["true"], sandbox=sandbox_pb2.SandboxSpec(backend="docker")))
    assert docker_spec.sandbox.backend == "docker"
    assert spec_to_proto(docker_spec).sandbox.backend == "docker"
    native = spec_from_proto(task_pb2.TaskSpec(
        argv=["true"], sandbox=sandbox_pb2.SandboxSpec(backend="native")))
    # the default stays implicit (and stored as such)
    assert "backend" not in native.sandbox.to_fields()
    assert spec_to_proto(native).sandbox.backend == "native"
    with pytest.raises(InvalidSpec, match=r"^backend: 'vm' is not a backend"):
        spec_from_proto(task_pb2.TaskSpec(argv=["true"],
                                          sandbox=sandbox_pb2.SandboxSpec(backend="vm")))


def test_a_message_written_in_pieces_is_found_across_its_frames():
    """The pass_fds wrapper's "exec: X: not found" may reach the engine in several writes,
    each its own stream frame: the payloads are joined before matching (a CI failure that
    took CommandNotFound for a started command)."""
    from corral.sandbox.backends.docker.fds import _frame_payloads

    def frame(kind: int, data: bytes) -> bytes:
        return bytes([kind, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    raw = frame(2, b"corral-exec: 1: exec: no-such") + frame(2, b"-agent: not found\n")
    assert b"exec: no-such-agent: not found" not in raw
    assert _frame_payloads(raw) == b"corral-exec: 1: exec: no-such-agent: not found\n"
    # a torn last frame and bytes that are not frames end the walk
    assert _frame_payloads(raw + frame(1, b"abc")[:-1]) == _frame_payloads(raw)
    assert _frame_payloads(b"OCI runtime exec failed: ...") == b""
