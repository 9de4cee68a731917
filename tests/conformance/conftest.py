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
def no_containers_left(request):
    """After a docker test: no Corral container remains on the private engine."""
    is_docker = "backend" in request.fixturenames and \
        getattr(request.node, "callspec", None) is not None and \
        request.node.callspec.params.get("backend") == "docker"
    yield
    if not is_docker:
        return
    from corral.sandbox.backends import docker

    api = docker.client(request.getfixturevalue("docker_engine").url)
    left = api.containers(all=True, filters={"label": docker.LABEL})
    for c in left:
        api.remove_container(c["Id"], force=True)
    if left:
        pytest.fail(f"{request.node.nodeid} left containers {[c['Names'] for c in left]}",
                    pytrace=False)
