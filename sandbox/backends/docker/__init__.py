"""Docker backend: the same SandboxSpec on a real Docker engine, through the Engine API.

A sandbox is one container that idles (``docker-init`` reaping ``sleep infinity``) while
commands join it with ``exec``, the same init/exec model as the native backend. The spec
maps onto the container's host config: read-only root, Corral's seccomp profile (Docker
reads the same JSON format), every capability dropped, no-new-privileges, no network,
pids / memory (no swap) / CPU limits, a size-capped tmpfs /tmp, the workspace bind, a
non-root user (uid ``spec.uid_base``, the same host id that root inside a native sandbox
maps to), rlimits, and the command timeout.

No registry is reachable, so the base image is built here: ``base_image()`` assembles a
small root filesystem from the host's own binaries (shell, coreutils, python3 with its
standard library, and the shared libraries they load), imports it with ``docker import``
and tags it by a digest of its contents, so each engine builds it once.

Every container is labelled ``corral.sandbox=<id>`` and carries its creator; ``sweep()``
removes the ones whose creator is gone, unless live restore keeps them. When no engine
answers, ``Unavailable`` says where Corral looked and how to point it elsewhere
(``DOCKER_HOST`` or ``--docker-host``).

Live restore: a container outlives the daemon that made it, so a restarted daemon adopts
it (``DockerSandbox.adopt``, checked against the container id and creation time its
restore.db row recorded). A command's stdin, stdout and stderr are the dead daemon's exec
connection, which no engine call attaches again: a command running at the restart is
killed and reported ended with reason ``daemon-shutdown`` (``LostCommand``).

Modules, one per mechanism: engine (the Engine API client), config (spec -> container
config), image (the base image), sweep (labels, creators, the sweep), process (a running
exec), fds (descriptors passed into an exec), sandbox (DockerSandbox). private_engine is a
private dockerd for tests and benchmarks, not product code.
"""

from __future__ import annotations

from .config import container_config, seccomp_option
from .engine import API_VERSION, DEFAULT_DOCKER_HOST, client, engine_url
from .fds import FDS_INSIDE
from .image import IMAGE_REPOSITORY, RootfsPlan, base_image, rootfs_plan
from .process import DockerProcess
from .sandbox import DockerSandbox, LostCommand
from .sweep import LABEL, LABEL_CREATOR, LABEL_FDS, LABEL_RUNTIME, LABEL_WORKSPACE, sweep

__all__ = [
    "API_VERSION",
    "DEFAULT_DOCKER_HOST",
    "FDS_INSIDE",
    "IMAGE_REPOSITORY",
    "LABEL",
    "LABEL_CREATOR",
    "LABEL_FDS",
    "LABEL_RUNTIME",
    "LABEL_WORKSPACE",
    "DockerProcess",
    "DockerSandbox",
    "LostCommand",
    "RootfsPlan",
    "base_image",
    "client",
    "container_config",
    "engine_url",
    "rootfs_plan",
    "seccomp_option",
    "sweep",
]

