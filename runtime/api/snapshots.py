"""corral.v1.Snapshots servicer: proto <-> SandboxState calls (runtime/snapshots.py)."""

from __future__ import annotations

from corral.v1 import snapshot_pb2 as pb

from .servicer import Servicer, unary


def snapshot_to_proto(record, in_use: int) -> pb.Snapshot:
    return pb.Snapshot(
        id=record.id, name=record.name, tenant=record.tenant,
        source_sandbox=record.source_sandbox, parent=record.parent, image=record.image,
        created_at=record.created_at, root_digest=record.root_digest,
        workspace_digest=record.workspace_digest, size_bytes=record.size_bytes,
        files=record.files, in_use=in_use)


class SnapshotsServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.state = daemon.state

    async def _answer(self, record) -> pb.Snapshot:
        in_use = await self.daemon.sandboxes.run_blocking(self.state.in_use, record)
        return snapshot_to_proto(record, in_use)

    @unary
    async def Create(self, request, context):
        caller = self.caller(context)
        record = await self.state.snapshot(caller, request.sandbox_id, request.name)
        return await self._answer(record)

    @unary
    async def Get(self, request, context):
        caller = self.caller(context)
        record = await self.daemon.sandboxes.run_blocking(self.state.get, caller,
                                                          request.snapshot)
        return await self._answer(record)

    @unary
    async def List(self, request, context):
        caller = self.caller(context)
        records = await self.daemon.sandboxes.run_blocking(self.state.list, caller)
        answers = []
        for record in records:
            answers.append(await self._answer(record))
        return pb.ListSnapshotsResponse(snapshots=answers)

    @unary
    async def Remove(self, request, context):
        caller = self.caller(context)
        await self.daemon.sandboxes.run_blocking(self.state.remove, caller, request.snapshot)
        return pb.RemoveSnapshotResponse()
