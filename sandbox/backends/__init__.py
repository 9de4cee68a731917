"""Sandbox backends: native (namespaces, cgroups, seccomp, landlock) and Docker."""

from __future__ import annotations


def open_sandbox(spec, *, docker_host: str | None = None):
    """A started sandbox on the backend the spec names (``spec.backend``).

    Args:
        docker_host: the engine for the docker backend (default: $DOCKER_HOST, else the
            standard socket).

    Raises:
        Unavailable: the docker backend was asked for and no engine answers.
    """
    if spec.backend == "docker":
        from .docker import DockerSandbox

        return DockerSandbox.create(spec, docker_host=docker_host)
    from .native import Sandbox

    return Sandbox.create(spec)
