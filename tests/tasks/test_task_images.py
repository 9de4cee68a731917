"""Deep tasks on an image (TaskSpec.image): the node that runs the attempt pulls the image
into its own store while the task is PULLING, then the sandbox runs on it. On the local
executor and on Ray; an image that cannot be pulled fails the task naming the REF."""

from __future__ import annotations

import json
import os

import pytest

from ..linux.test_image_run import PYTHON, python_layer, tools_layer
from ..unit.test_image_builder import Layer, write_oci
from .helpers import FAILED, SUCCEEDED, wait_done

#: The image's own record of its Python (a file the host does not have).
VERSION_FILE = "/opt/py/VERSION"
PRINT_VERSION = ["/opt/py/bin/python3", "-I", "-S", "-c",
                 f"import sys; print(sys.prefix, open({VERSION_FILE!r}).read().strip())"]


def _version() -> str:
    return "python " + os.path.basename(PYTHON)[len("python"):] + " of the image"


def _image(path: str) -> str:
    """An OCI layout with a userland, a Python at /opt/py, and its version file."""
    version = Layer().file(VERSION_FILE.lstrip("/"), (_version() + "\n").encode())
    return write_oci(path, [tools_layer(), python_layer(), version])


def _events(client, kind: str, task_id: str) -> list[dict]:
    return [d for d in (json.loads(r.detail_json) for r in client.audit_query(kind=kind))
            if d["task_id"] == task_id]


def _log(daemon, task_id: str, attempt: int = 1) -> str:
    return (daemon.root / "state" / "tasks" / task_id / f"attempt-{attempt}" /
            "log").read_text()


@pytest.fixture
def image_root(tmp_path, monkeypatch) -> str:
    """Each test's own store (the daemon and its shims inherit CORRAL_IMAGE_ROOT)."""
    root = str(tmp_path / "images")
    monkeypatch.setenv("CORRAL_IMAGE_ROOT", root)
    return root


ONE_NODE = """
[[nodes]]
name = "local-a"
labels = { pool = "img" }
resources = { cpu = 1 }
"""


def test_a_task_on_an_oci_image_pulls_then_runs_the_images_python(
        tmp_path, image_root, task_daemon):
    from corral.sandbox.images.store import ImageStore

    ref = _image(str(tmp_path / "img"))
    d = task_daemon(ONE_NODE)
    c = d.client()
    t = c.submit_task(PRINT_VERSION, image=ref)
    assert t.spec.image == ref  # the sandbox's field named it: it is the task's image
    done = wait_done(c, t.id, timeout_s=120)
    assert (done.state, done.reason) == (SUCCEEDED, "exited 0")
    assert _log(d, t.id) == f"/opt/py {_version()}\n"
    assert [(e["node"], e["image"], e["attempt"]) for e in _events(c, "task.pulling", t.id)] \
        == [("local-a", ref, 1)]
    assert [r.ref for r in ImageStore(image_root).images()] == [ref]  # pulled on the node


def test_an_image_that_cannot_be_pulled_fails_the_task_naming_the_ref(
        tmp_path, image_root, task_daemon):
    missing = f"oci:{tmp_path}/no-such-layout"
    d = task_daemon(ONE_NODE)
    c = d.client()
    t = c.submit_task(["true"], image=missing, retries=2)
    done = wait_done(c, t.id, timeout_s=60)
    assert done.state == FAILED
    assert done.reason.startswith(f"pulling image {missing} failed: ")
    assert done.attempt == 1  # not retried: the same REF fails the same way again
    assert len(_events(c, "task.pulling", t.id)) == 1
    assert _events(c, "task.start", t.id) == []  # its command never ran


def test_a_registry_that_does_not_answer_is_retried_under_the_retry_policy(
        image_root, task_daemon):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref = f"127.0.0.1:{port}/corral/none:1"
    d = task_daemon(ONE_NODE)
    c = d.client()
    t = c.submit_task(["true"], image=ref, retries=1)
    done = wait_done(c, t.id, timeout_s=60)
    assert (done.state, done.attempt) == (FAILED, 2)
    assert done.reason.startswith(f"pulling image {ref} failed: registry 127.0.0.1:{port}: "
                                  f"connection refused")
    assert [e["attempt"] for e in _events(c, "task.pulling", t.id)] == [1, 2]


def test_sandbox_image_must_match_the_tasks_image():
    from corral.runtime.tasks.model import TaskSpec
    from corral.sandbox import SandboxSpec
    from corral.sandbox.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match=r"^spec.sandbox.image: 'oci:/b' differs from "
                                          r"spec.image 'oci:/a'; name a task's image once, "
                                          r"in spec.image$"):
        TaskSpec(argv=("true",), image="oci:/a", sandbox=SandboxSpec(image="oci:/b"))
    spec = TaskSpec(argv=("true",), sandbox=SandboxSpec(image="oci:/a"))
    assert TaskSpec.from_json(spec.to_json()).image == "oci:/a"


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory):
    """A Ray cluster whose nodes (and their actors) pull into a store of this module's:
    CORRAL_IMAGE_ROOT is set before its raylets start, so their workers inherit it."""
    pytest.importorskip("ray", reason="the Ray executor needs the corral[ray] extra")
    import shutil

    from corral.runtime.tasks.ray_executor import ray_environment

    from .test_ray import start_cluster

    root = str(tmp_path_factory.mktemp("ray-images"))
    before = os.environ.get("CORRAL_IMAGE_ROOT")
    os.environ["CORRAL_IMAGE_ROOT"] = root
    try:
        ray_environment()
        cluster, _ = start_cluster()
        try:
            yield cluster, root
        finally:
            session_dir = cluster.head_node.get_session_dir_path()
            cluster.shutdown()
            shutil.rmtree(session_dir, ignore_errors=True)
    finally:
        if before is None:
            os.environ.pop("CORRAL_IMAGE_ROOT", None)
        else:
            os.environ["CORRAL_IMAGE_ROOT"] = before


def test_a_task_on_ray_pulls_its_image_on_the_ray_node(tmp_path, ray_store, task_daemon):
    from corral.sandbox.images.store import ImageStore

    from .test_ray import _config

    cluster, root = ray_store
    ref = _image(str(tmp_path / "img"))
    d = task_daemon(_config(cluster.address))
    c = d.client()
    t = c.submit_task(PRINT_VERSION, image=ref, selector={"zone": "c"})
    done = wait_done(c, t.id, timeout_s=180)
    assert (done.state, done.reason, done.node) == (SUCCEEDED, "exited 0", "ray-c")
    assert _log(d, t.id) == f"/opt/py {_version()}\n"  # came back through the actor
    assert [(e["node"], e["image"]) for e in _events(c, "task.pulling", t.id)] == [
        ("ray-c", ref)]
    assert [r.ref for r in ImageStore(root).images()] == [ref]  # the node's store
    missing = f"oci:{tmp_path}/no-such-layout"
    t = c.submit_task(["true"], image=missing, selector={"zone": "c"})
    done = wait_done(c, t.id, timeout_s=120)
    assert done.state == FAILED and done.reason.startswith(f"pulling image {missing} failed: ")


def test_cli_submits_a_task_on_an_image_and_lists_it_by_state(
        tmp_path, image_root, task_daemon):
    import subprocess
    import sys

    ref = _image(str(tmp_path / "img"))
    d = task_daemon(ONE_NODE)

    def corral(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args[:2],
                               "--socket", d.socket, *args[2:]],
                              capture_output=True, text=True, timeout=120)

    sub = corral("task", "submit", "--image", ref, "--", *PRINT_VERSION)
    assert sub.returncode == 0, sub.stderr
    task_id = sub.stdout.strip()
    done = wait_done(d.client(), task_id, timeout_s=120)
    assert done.state == SUCCEEDED and done.spec.image == ref
    info = json.loads(corral("task", "get", task_id, "--json").stdout)
    assert (info["state"], info["spec"]["image"]) == ("SUCCEEDED", ref)
    pulling = corral("task", "ls", "--state", "pulling")
    assert (pulling.returncode, task_id in pulling.stdout) == (0, False)
