"""What a sandbox's layered filesystem holds in the process that started it, kept across
that process's death (live restore: runtime/restore.py, runtime/holder.py) and taken back
by the process that adopts the sandbox (native Sandbox.adopt).

A sandbox on an image, a snapshot or a copy-on-write workspace holds:

- its image's layers: a shared flock on each layer's lock file (images/store.py hold), so
  rm and GC leave them in place;
- its snapshot: an exclusive flock on its hold file (state/snapshots.py hold), so remove
  refuses the snapshot;
- the detached tmpfs mounts holding its root's and its workspace's upper layers (a
  snapshot of the running sandbox copies them; nothing else reaches them);
- its change set (state/changes.py), on disk and mounted, which needs no descriptor.

An flock belongs to the open file description, and a detached mount lives while a
descriptor of it is open: the holder keeping copies of these descriptors keeps the layers
held, the snapshot in use and the uppers reachable while no daemon runs. What cannot be
rebuilt from descriptors (the image's layer paths and config, the snapshot's hold file,
the change set's directory, the files the setup made in the root) is written to the
sandbox's state.json (`state_fields`), which `readopt` reads back.
"""

from __future__ import annotations

import os

from ..errors import FailedPrecondition

#: Holder group names (runtime/restore.py STATE_PREFIX + name) -> the sandbox attribute
#: holding one detached upper layer's tmpfs descriptor.
UPPERS = {"root_upper": "_root_upper_fd", "workspace_upper": "_workspace_upper_fd"}


def descriptors(sandbox) -> dict[str, list[int]]:
    """The descriptors to keep for sandbox, by group name (the caller copies them)."""
    groups: dict[str, list[int]] = {}
    if getattr(sandbox, "_image", None) is not None:
        groups["image"] = sandbox._image.descriptors()
    if getattr(sandbox, "_snapshot", None) is not None:
        groups["snapshot"] = sandbox._snapshot.descriptors()
    for name, attr in UPPERS.items():
        fd = getattr(sandbox, attr, -1)
        if fd >= 0:
            groups[name] = [fd]
    return groups


def state_fields(sandbox) -> dict:
    """What state.json records for readopt(): JSON values, {} for a sandbox without
    layered state."""
    fields: dict = {}
    if sandbox._image is not None:
        rootfs = sandbox._image.rootfs
        fields["image_rootfs"] = {"layers": list(rootfs.layers), "config": rootfs.config}
    if sandbox._snapshot is not None:
        fields["snapshot_hold"] = {"id": sandbox._snapshot.record.id,
                                   "path": sandbox._snapshot.paths()[0]}
    if sandbox.changes is not None:
        fields["changes"] = sandbox.changes.path
    if sandbox._setup_files:
        fields["setup_files"] = sorted(sandbox._setup_files)
    return fields


def readopt(sandbox, state: dict, held: dict[str, list[int]]) -> None:
    """Give an adopted sandbox back what descriptors() and state_fields() kept: its image
    and snapshot holds, upper layers and change set (copies of held's descriptors; the
    caller closes its own).

    Raises:
        FailedPrecondition: a part its spec needs was not kept (named).
    """
    spec, name = sandbox.spec, sandbox.id
    needed = [("image", "image_rootfs")] if spec.image else []
    if spec.snapshot:
        needed.append(("snapshot", "snapshot_hold"))
    for group, field in needed:
        if not held.get(group) or field not in state:
            raise FailedPrecondition(f"sandbox {name}: its {group} hold was not kept")
    if spec.workspace_cow and "changes" not in state:
        raise FailedPrecondition(f"sandbox {name}: its change set was not recorded")
    changes = _change_set(name, state["changes"]) if spec.workspace_cow else None
    snapshot = _snapshot(state["snapshot_hold"], held["snapshot"]) if spec.snapshot else None
    if spec.image:
        from .store import HeldRootfs, Rootfs

        rootfs = state["image_rootfs"]
        sandbox._image = HeldRootfs(Rootfs(tuple(rootfs["layers"]), rootfs["config"]),
                                    _copies(held["image"]))
    if snapshot is not None:
        sandbox._snapshot_store, sandbox._snapshot = snapshot
    for group, attr in UPPERS.items():
        if held.get(group):
            setattr(sandbox, attr, os.dup(held[group][0]))
    sandbox.changes = changes
    sandbox._setup_files = frozenset(state.get("setup_files", ()))


def _snapshot(hold: dict, fds: list[int]):
    """(its store, a HeldSnapshot) from the hold file kept locked by fds."""
    from ..state.snapshots import HeldSnapshot, SnapshotStore

    path = hold["path"]
    store = SnapshotStore(os.path.dirname(os.path.dirname(path)))  # <root>/holds/<file>
    record = store.get(hold["id"])
    roots, workspaces = store.layer_trees(record)
    return store, HeldSnapshot(record, roots, workspaces, _copies(fds), [path])


def _change_set(name: str, path: str):
    from ..state.changes import ChangeSet

    try:
        return ChangeSet(path)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPrecondition(f"sandbox {name}: its change set {path} is unreadable "
                                 f"({exc})") from None


def _copies(fds: list[int]) -> list[int]:
    out: list[int] = []
    try:
        for fd in fds:
            out.append(os.dup(fd))
    except OSError:
        for fd in out:
            os.close(fd)
        raise
    return out
