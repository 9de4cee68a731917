"""The errors of the image store, as branches of Corral's one error tree."""

from __future__ import annotations

from ..errors import CorralError, InvalidSpec, NotFound


class UnsafeLayer(InvalidSpec):
    """A layer tar has an entry that would land outside its directory (or is refused)."""

    def __init__(self, layer: str, entry: str, why: str):
        self.layer = layer
        self.entry = entry
        super().__init__("image", f"layer {layer}: entry {entry!r} refused: {why}; "
                                  f"nothing of the layer was kept")


class LayerDigestMismatch(CorralError):
    """A blob's sha256 is not the digest that names it; nothing of it is stored."""

    grpc_status = "DATA_LOSS"


class UnsupportedImage(CorralError):
    """A source, compression or media type this version does not handle yet."""

    grpc_status = "FAILED_PRECONDITION"


class ImageNotFound(NotFound):
    """No such image: not in the store, the layout, the archive or the engine."""
