"""corral.v1.Images servicer: proto <-> ImageService calls (runtime/images.py)."""

from __future__ import annotations

from corral.sandbox.images.runconfig import UNSUPPORTED
from corral.sandbox.images.sources import BlobProgress
from corral.sandbox.images.store import LayerEvent
from corral.v1 import image_pb2 as pb

from ..images import PullDone
from .servicer import Servicer, streaming, unary


def image_to_proto(record) -> pb.Image:
    return pb.Image(
        ref=record.ref, id=record.id, manifest_digest=record.manifest_digest,
        layers=[pb.ImageLayer(diff_id=layer.diff_id, digest=layer.digest or "",
                              media_type=layer.media_type, size=layer.size or 0)
                for layer in record.layers],
        pulled_at=record.pulled_at, size_bytes=record.size)


def config_to_proto(config: dict) -> pb.ImageConfig:
    return pb.ImageConfig(
        env=list(config.get("Env") or []), cmd=list(config.get("Cmd") or []),
        entrypoint=list(config.get("Entrypoint") or []),
        working_dir=config.get("WorkingDir") or "", user=config.get("User") or "",
        unsupported=[key for key in UNSUPPORTED if config.get(key)])


def event_to_proto(event) -> pb.PullEvent:
    if isinstance(event, LayerEvent):
        return pb.PullEvent(layer=pb.LayerProgress(
            index=event.index, count=event.count, diff_id=event.diff_id, state=event.state,
            tar_bytes=event.bytes))
    if isinstance(event, BlobProgress):
        return pb.PullEvent(bytes=pb.BytesProgress(index=event.index, read=event.done,
                                                   total=event.total or 0))
    assert isinstance(event, PullDone)
    return pb.PullEvent(done=image_to_proto(event.record))


class ImagesServicer(Servicer):
    def __init__(self, daemon):
        super().__init__(daemon)
        self.images = daemon.images

    async def _blocking(self, fn, *args):
        return await self.daemon.sandboxes.run_blocking(fn, *args)

    @unary
    async def List(self, request, context):
        self.caller(context)
        records = await self._blocking(self.images.list)
        return pb.ListImagesResponse(images=[image_to_proto(r) for r in records])

    @unary
    async def Get(self, request, context):
        self.caller(context)
        record, config = await self._blocking(self.images.get, request.ref)
        return pb.GetImageResponse(image=image_to_proto(record),
                                   config=config_to_proto(config))

    @streaming
    async def Pull(self, request, context):
        caller = self.caller(context)
        shared = self.images.join_pull(caller, request.ref)
        async for event in shared.watch():
            yield event_to_proto(event)

    @unary
    async def Remove(self, request, context):
        caller = self.caller(context)
        freed = await self._blocking(self.images.remove, caller, request.ref)
        return pb.RemoveImageResponse(ref=freed.images[0], removed_layers=freed.layers,
                                      in_use_layers=freed.in_use, freed_bytes=freed.bytes)
