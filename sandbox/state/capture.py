"""Capturing a running sandbox's writable filesystem state into the snapshot store.

The sandbox's cgroup is frozen (every process stopped in place, none can write), its root
upper layer (image sandboxes) and its workspace are copied into a capture's temp directory,
and the cgroup is thawed, on every path, before the copy is synced and committed. The
sandbox keeps running afterwards; its processes are never checkpointed (CRIU cannot dump
on this kernel: docs/state.md).

What is copied: a sandbox forked from a snapshot has overlays whose lower layers are that
snapshot's, so only its upper layers are copied (the new snapshot's parent is the old one);
any other sandbox's whole workspace is copied (no parent), and an image sandbox's root upper
layer always (it sits on the image's layers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..cgroups import Cgroup
from ..errors import FailedPrecondition
from .layers import IdShift, copy_layer
from .snapshots import CaptureWork, SnapshotRecord, SnapshotStore


@dataclass(frozen=True)
class StateSources:
    """Where a sandbox's writable state is, as the backend knows it."""

    sandbox_id: str
    #: The cgroup frozen for the capture (None: the sandbox has none; refused).
    cgroup: Cgroup | None
    #: Paused already (its cgroup frozen): copied as it is, and left frozen.
    frozen_already: bool
    #: The tree copied as the workspace layer: the workspace's upper layer when it is an
    #: overlay on `parent`'s layers, else the whole workspace.
    workspace: str
    #: The image root's upper layer, None without an image.
    root_upper: str | None
    #: Paths in the root upper layer that the sandbox's setup made (bind-mount points,
    #: generated files): left out, a fork's setup makes them again.
    root_skip: frozenset[str]
    ids: IdShift
    #: The snapshot the sandbox started from ("" for none).
    parent: str
    image: str


def capture(store: SnapshotStore, sources: StateSources, *, name: str = "", tenant: str = "",
            max_bytes: int | None = None) -> SnapshotRecord:
    """Freeze, copy, thaw, commit; returns the new snapshot's record.

    Args:
        max_bytes: the most bytes of file data the snapshot may hold (the tenant's quota
            left); None for no cap.

    Raises:
        FailedPrecondition: the sandbox has no cgroup to freeze.
        ResourceExhausted: the state is larger than max_bytes (nothing is kept).
        InvalidSpec: the name is invalid or taken.
        SandboxSetupError: freezing failed (the cgroup is thawed again).
    """
    if sources.cgroup is None:
        raise FailedPrecondition(f"sandbox {sources.sandbox_id} has no cgroup to freeze, so "
                                 f"its state cannot be captured consistently")
    from . import snapshots

    snapshots.check_name(name)
    work = store.begin()
    try:
        _copy_frozen(sources, work, max_bytes)
    except BaseException:
        store.abort(work)
        raise
    return store.commit(work, name=name, tenant=tenant, source_sandbox=sources.sandbox_id,
                        parent=sources.parent, image=sources.image)


def _copy_frozen(sources: StateSources, work: CaptureWork, max_bytes: int | None) -> None:
    """Copy the layers while every process of the sandbox is frozen; thaw on every path."""
    cgroup = sources.cgroup
    try:
        if not sources.frozen_already:
            cgroup.freeze()
        pairs = [("workspace", sources.workspace)]
        if sources.root_upper is not None:
            pairs.insert(0, ("root", sources.root_upper))
        for kind, tree in pairs:
            left = None if max_bytes is None else max_bytes - work.data_bytes
            src = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            dst = os.open(work.path(kind), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _copy_top(src, dst, sources.ids)
                skip = sources.root_skip if kind == "root" else frozenset()
                copied = copy_layer(src, dst, sources.ids, budget=left, skip=skip)
            finally:
                os.close(src)
                os.close(dst)
            work.digests[kind] = copied.digest
            work.data_bytes += copied.data_bytes
            work.files += copied.files
    finally:
        if not sources.frozen_already:
            cgroup.thaw()


def _copy_top(src: int, dst: int, ids: IdShift) -> None:
    """The layer's top directory gets the source's owner and mode (what / or /workspace
    shows when it becomes a lower layer)."""
    st = os.fstat(src)
    os.fchown(dst, ids.inside(st.st_uid), ids.inside(st.st_gid))
    os.fchmod(dst, st.st_mode & 0o1777)
