"""One test body, every backend: the `backend` fixture runs each test on the native backend
and on the docker backend (against the session's private dockerd)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BACKENDS = ("native", "docker")


def pytest_collection_modifyitems(config, items):
    """Both backends need root here (namespaces and cgroups; a private dockerd)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="tests/conformance need root (native sandboxes, dockerd)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The backend under test; for docker, DOCKER_HOST points at the private engine."""
    if request.param == "docker":
        request.getfixturevalue("docker_host")
    return request.param


@pytest.fixture(autouse=True)
def no_leftovers(request, monkeypatch):
    """After each test: no temporary workspace of its sandboxes remains (either backend),
    and no Corral container remains on the private engine."""
    from corral.sandbox.backends import docker, native

    made: list[str] = []
    for cls in (native.Sandbox, docker.DockerSandbox):
        setup = cls._setup_workspace

        def recording_setup(self, _setup=setup):
            _setup(self)
            if self._own_workspace:
                made.append(self.workspace)

        monkeypatch.setattr(cls, "_setup_workspace", recording_setup)
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    yield
    problems = {}
    workspaces = [w for w in made if os.path.exists(w)]
    if workspaces:
        problems["workspaces"] = workspaces
    if params.get("backend") == "docker":
        api = docker.client(request.getfixturevalue("docker_engine").url)
        left = api.containers(all=True, filters={"label": docker.LABEL})
        for c in left:
            api.remove_container(c["Id"], force=True)
        if left:
            problems["containers"] = [c["Names"] for c in left]
    if problems:
        pytest.fail(f"{request.node.nodeid} left behind {problems}", pytrace=False)
