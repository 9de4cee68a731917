"""A SandboxSpec as a container's config: host config (read-only root, seccomp,
no capabilities, limits, tmpfs, the workspace bind), user and rlimits.
"""

from __future__ import annotations

import json
import os

from ... import seccomp
from ...cgroups import shares_of_weight
from ...spec import SandboxSpec
from .engine import _sdk
from .fds import FDS_INSIDE
from .sweep import LABEL, LABEL_CREATOR, LABEL_FDS, LABEL_WORKSPACE, _creator


def seccomp_option(profile: str) -> str:
    """The security option carrying the spec's seccomp profile (validated first)."""
    loaded = seccomp.load_profile(profile)
    if loaded.unconfined:
        return "seccomp=unconfined"
    if loaded.source == "builtin":
        path = os.path.join(os.path.dirname(seccomp.__file__), "profiles", f"{profile}.json")
    else:
        path = loaded.source
    with open(path, "rb") as f:
        doc = json.load(f)
    return "seccomp=" + json.dumps(doc, separators=(",", ":"))


#: Where a container on an image (spec.image) finds what Corral brings: its idle PID
#: (the static corral-init: an image need not have `sleep`) and the agent helper.
IMAGE_INIT = "/opt/corral/bin/corral-init"


def _support_mounts(docker) -> list:
    """Read-only binds of corral-init and the agent helper (the base image has copies)."""
    from ... import contain

    files = {IMAGE_INIT: contain.init_binary(), **contain.support_files()}
    return [docker.types.Mount(inside, host, type="bind", read_only=True)
            for inside, host in sorted(files.items())]


def container_config(api, spec: SandboxSpec, image: str, sandbox_id: str, workspace: str,
                     own_workspace: bool, fds_dir: str | None = None,
                     on_image: bool = False) -> dict:
    """The create-container request for a spec (keyword arguments of create_container);
    on_image: `image` is spec.image's, not Corral's base image."""
    docker = _sdk()
    user = f"{spec.uid_base}:{spec.uid_base}"
    mounts = [docker.types.Mount("/workspace", workspace, type="bind", read_only=False)]
    if on_image:
        mounts += _support_mounts(docker)
    for b in spec.binds:
        mounts.append(docker.types.Mount(b.target, b.source, type="bind",
                                         read_only=not b.writable))
    if fds_dir is not None:  # FIFOs for pass_fds; writable as FIFOs even on a read-only bind
        mounts.append(docker.types.Mount(FDS_INSIDE, fds_dir, type="bind", read_only=True))
    host_config = api.create_host_config(
        read_only=True,
        security_opt=["no-new-privileges:true", seccomp_option(spec.profile)],
        cap_drop=["ALL"],
        network_mode="none",
        ipc_mode="private",
        pids_limit=spec.pids_max,
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,  # no swap
        nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
        cpu_shares=shares_of_weight(spec.cpu_weight) if spec.cpu_weight else None,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={spec.tmp_bytes},mode=1777"},
        shm_size=spec.tmp_bytes,
        mounts=mounts,
        ulimits=[
            docker.types.Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
            docker.types.Ulimit(name="fsize", soft=spec.fsize_bytes, hard=spec.fsize_bytes),
            docker.types.Ulimit(name="core", soft=0, hard=0),
        ],
        init=True,
    )
    labels = {LABEL: sandbox_id, LABEL_CREATOR: _creator()}
    if own_workspace:
        labels[LABEL_WORKSPACE] = workspace
    if fds_dir is not None:
        labels[LABEL_FDS] = fds_dir
    labels.update({f"corral.label.{k}": v for k, v in spec.labels})
    return dict(
        image=image, command=[IMAGE_INIT] if on_image else ["sleep", "infinity"],
        entrypoint=[] if on_image else None, hostname=spec.hostname, user=user,
        working_dir="/workspace", environment=spec.environment(), labels=labels,
        host_config=host_config, network_disabled=True, stop_signal="SIGKILL",
        name=f"corral-{sandbox_id}",
    )
