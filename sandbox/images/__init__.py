"""OCI images: a content-addressed layer store, confined layer unpacking, image sources.

`ImageStore` (store.py) keeps verified blobs, layers unpacked once by diff_id and image
records; `unpack_layer` (unpack.py) writes one layer tar beneath a directory and never
outside it; `open_source` (sources.py) reads an OCI layout, a `docker save` tarball, an
image of a local Docker engine or one of a registry (registry.py: the OCI distribution
API). docs/images.md has the layout and the rules.
"""

from __future__ import annotations

from .errors import ImageNotFound, LayerDigestMismatch, UnsafeLayer, UnsupportedImage
from .registry import RegistryAuthError, RegistryError
from .store import ImageRecord, ImageStore, Rootfs, default_root

__all__ = ["ImageNotFound", "ImageRecord", "ImageStore", "LayerDigestMismatch",
           "RegistryAuthError", "RegistryError", "Rootfs", "UnsafeLayer", "UnsupportedImage",
           "default_root"]
