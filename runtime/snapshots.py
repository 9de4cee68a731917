"""Sandbox state on the daemon: snapshots of running sandboxes, and the change sets of
copy-on-write workspaces, with tenant checks, quotas and audit records.

The filesystem work is sandbox/state/ (a content-addressed snapshot store, capture with
the sandbox frozen, change sets that outlive their sandbox, diff and apply); this module
decides who may do what to which: every snapshot and change set belongs to the tenant
whose sandbox made it, and another tenant gets NOT_FOUND for it, as for sandboxes.

Domain layer: no gRPC types.
"""

from __future__ import annotations

import logging

from corral.sandbox.errors import NotFound
from corral.sandbox.state import changes as change_sets
from corral.sandbox.state.diff import ApplyConflict, ApplyResult, Change, apply, diff
from corral.sandbox.state.snapshots import SnapshotRecord, SnapshotStore, check_name

from .auth import Caller
from .policy import QuotaExceeded

log = logging.getLogger("corral.snapshots")


class SandboxState:
    """Snapshots and copy-on-write change sets of one daemon's sandboxes."""

    def __init__(self, sandboxes, audit, *, snapshot_root: str, changes_root: str):
        self.sandboxes = sandboxes
        self.audit = audit
        self.store = SnapshotStore(snapshot_root)
        self.changes_root = changes_root

    def sweep(self) -> None:
        """What a crashed daemon left: capture temp dirs, dead holds, unnamed layers, change
        sets left mounted (but those of sandboxes live restore adopted: they run on them)."""
        swept = self.store.sweep()
        if swept.temp_dirs or swept.layers or swept.holds:
            log.info("snapshot store: removed %d temp dirs, %d layers, %d stale holds",
                     swept.temp_dirs, len(swept.layers), swept.holds)
        live = {msb.id for msb in self.sandboxes.all()}
        for name in change_sets.sweep(self.changes_root, live):
            log.info("change set %s: unmounted after a crash", name)

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, caller: Caller, sandbox_id: str, name: str = "") -> SnapshotRecord:
        """Capture the sandbox's writable state (frozen for the copy; it runs on after).

        Raises:
            QuotaExceeded: the tenant holds max_snapshots, or its bytes are spent.
            InvalidSpec: a bad or taken name. FailedPrecondition: nothing to capture.
        """
        check_name(name)  # a bad name is the caller's mistake, whatever its quota
        msb = self.sandboxes.get(caller, sandbox_id)
        policy = self.sandboxes.policies.of(caller)
        count, used = await self.sandboxes.run_blocking(self.store.usage, caller.tenant)
        policy.check_count("snapshots", count, "max_snapshots")
        left = None
        if policy.max_snapshot_bytes is not None:
            left = policy.max_snapshot_bytes - used
            if left <= 0:
                raise QuotaExceeded(f"this tenant's snapshots already hold {used} bytes, the "
                                    f"most its policy allows (snapshot_size = "
                                    f"{policy.max_snapshot_bytes})")
        record = await self.sandboxes.run_blocking(
            lambda: msb.sandbox.snapshot(self.store, name=name, tenant=caller.tenant,
                                         max_bytes=left), tenant=caller.tenant)
        await self.audit.record("snapshot.create", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=msb.id, session_id=msb.owner_session or "",
                                detail={"snapshot": record.id, "name": record.name,
                                        "parent": record.parent, "size_bytes": record.size_bytes,
                                        "files": record.files, "root_digest": record.root_digest,
                                        "workspace_digest": record.workspace_digest,
                                        "paused": bool(msb.paused_at)})
        return record

    def get(self, caller: Caller, ref: str) -> SnapshotRecord:
        """The caller's snapshot by id or name (another tenant's is NOT_FOUND)."""
        if not ref:
            raise NotFound("no snapshot named: give its id or name")
        return self.store.get(ref, caller.tenant)

    def list(self, caller: Caller) -> list[SnapshotRecord]:
        return self.store.list(caller.tenant)

    def in_use(self, record: SnapshotRecord) -> int:
        return self.store.in_use(record.id)

    def remove(self, caller: Caller, ref: str) -> SnapshotRecord:
        """Remove the caller's snapshot (refused while a sandbox or a snapshot uses it)."""
        record = self.store.remove(ref, caller.tenant)
        self.audit.append("snapshot.remove", tenant=caller.tenant, peer=caller.peer,
                          detail={"snapshot": record.id, "name": record.name})
        return record

    # -- copy-on-write change sets ------------------------------------------------------------

    def _change_set(self, caller: Caller, sandbox_id: str) -> change_sets.ChangeSet:
        """The change set of the caller's sandbox, live or destroyed (a change set outlives
        its sandbox, and a daemon restart; its record names its tenant).

        Raises:
            NotFound: no such sandbox of the caller, or it has no change set.
        """
        try:
            changes = change_sets.ChangeSet.open(self.changes_root, sandbox_id)
        except NotFound:
            raise NotFound(f"sandbox {sandbox_id!r} has no copy-on-write workspace changes "
                           f"(it was not made with workspace_cow, or they were applied "
                           f"and discarded)") from None
        if changes.tenant != caller.tenant:
            raise NotFound(f"sandbox {sandbox_id!r} has no copy-on-write workspace changes")
        return changes

    async def diff(self, caller: Caller, sandbox_id: str, *, patch: bool,
                   max_patch_bytes: int) -> list[Change]:
        changes = self._change_set(caller, sandbox_id)
        return await self.sandboxes.run_blocking(
            lambda: diff(changes, patch=patch, max_patch_bytes=max_patch_bytes),
            tenant=caller.tenant)

    async def apply(self, caller: Caller, sandbox_id: str, *, force: bool) -> ApplyResult:
        """Write the changes into the host directory (conflicts refused unless force). A
        live sandbox is destroyed first: the host directory is its overlay's lower layer,
        which must not change under a mounted overlay. The conflicts are checked before
        that, so a refused apply ends nothing."""
        changes = self._change_set(caller, sandbox_id)
        if not force:
            conflicts = [c.path for c in await self.diff(caller, sandbox_id, patch=False,
                                                         max_patch_bytes=0) if c.conflict]
            if conflicts:
                raise ApplyConflict(conflicts)
        destroyed = await self._end_live(caller, sandbox_id, "workspace changes applied")
        result = await self.sandboxes.run_blocking(lambda: apply(changes, force=force),
                                                   tenant=caller.tenant)
        await self.audit.record("workspace.apply", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id,
                                detail={"host_dir": changes.host_dir, "force": force,
                                        "written": len(result.written),
                                        "removed": len(result.removed),
                                        "skipped": [path for path, _ in result.skipped][:64],
                                        "destroyed": destroyed})
        return result

    async def _end_live(self, caller: Caller, sandbox_id: str, reason: str) -> bool:
        """Destroy the caller's sandbox if it still runs on its change set; True if it did."""
        if self.sandboxes.find_live(caller, sandbox_id) is None:
            return False
        await self.sandboxes.destroy(caller, sandbox_id, reason)
        return True

    async def discard(self, caller: Caller, sandbox_id: str) -> int:
        """Drop the changes; a live sandbox is destroyed first (its overlay holds them)."""
        changes = self._change_set(caller, sandbox_id)
        destroyed = await self._end_live(caller, sandbox_id, "workspace changes discarded")
        count = await self.sandboxes.run_blocking(changes.discard, tenant=caller.tenant)
        await self.audit.record("workspace.discard", tenant=caller.tenant, peer=caller.peer,
                                sandbox_id=sandbox_id,
                                detail={"host_dir": changes.host_dir, "discarded": count or 0,
                                        "destroyed": destroyed})
        return count or 0

