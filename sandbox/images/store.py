"""The content-addressed image store: verified blobs, layers unpacked once, image records.

Layout under the store's root (0700):

    blobs/sha256/HEX        manifests and configs, each verified against its digest
    layers/sha256/HEX/      one complete layer per diff_id: root/ (the tree) + layer.json
    images/HEX.json         one record per ref (HEX = sha256 of the ref)
    locks/HEX.lock          flock of one layer (exclusive while it is unpacked or removed)
    tmp/                    work in progress: an unpack, a blob, a record, a saved image
    store.lock              pulls hold it shared, rm and prune exclusive

A layer is unpacked into tmp/HEX.<pid>.<random>/ under its exclusive lock and renamed into
layers/ only when complete, verified (sha256 of the uncompressed tar against the config's
rootfs.diff_ids, and of the blob against the manifest) and synced: a directory under
layers/ is always whole. A crash leaves only a temp directory, which the next unpack of
that layer (holding its lock) or prune removes. Records and blobs are written to tmp/,
fsynced and renamed. rm and prune take store.lock exclusively, so no pull in progress ever
has a layer it just unpacked removed before its record names it.

`rootfs(ref)` is what a sandbox's overlay mount needs: the layer trees, bottom first, and
the image config. `hold(ref)` gives the same with a shared flock on each layer's lock for as
long as the sandbox runs; rm and prune leave a held layer in place (reported `in_use`) and
move a layer they remove out of layers/ in one rename before deleting it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from .. import fstree
from ..fstree import fsync_dir as _fsync_dir
from ..locks import Held
from .errors import ImageNotFound, LayerDigestMismatch, UnsupportedImage
from .sources import BlobProgress, ImageSource, canonical_ref, open_source, sha256_digest
from .unpack import unpack_layer

_HEX = re.compile(r"^[0-9a-f]{64}$")
_READ = 1 << 20


def default_root() -> str:
    """$CORRAL_IMAGE_ROOT, else <state>/images: /var/lib/corral/images for root,
    $XDG_STATE_HOME/corral/images (~/.local/state/...) for a user."""
    configured = os.environ.get("CORRAL_IMAGE_ROOT")
    if configured:
        return configured
    if os.geteuid() == 0:
        return "/var/lib/corral/images"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "corral", "images")


@dataclass(frozen=True)
class LayerRecord:
    diff_id: str
    digest: str | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class ImageRecord:
    ref: str
    #: The image's id: the digest of its config, as Docker shows it.
    id: str
    manifest_digest: str
    layers: tuple[LayerRecord, ...]
    pulled_at: float
    #: Bytes of the unpacked layers (each counted once per image).
    size: int = 0

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["layers"] = [asdict(layer) for layer in self.layers]
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> ImageRecord:
        layers = tuple(LayerRecord(**layer) for layer in doc["layers"])
        return cls(**{**doc, "layers": layers})


@dataclass(frozen=True)
class Rootfs:
    """What a sandbox's root filesystem is made of: layer trees bottom first, the config."""

    layers: tuple[str, ...]
    config: dict


@dataclass(frozen=True)
class LayerEvent:
    """One step of a pull, for a progress line: `state` is 'present' or 'unpacked'."""

    index: int
    count: int
    diff_id: str
    state: str
    bytes: int


@dataclass
class Freed:
    images: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    blobs: int = 0
    temp_dirs: int = 0
    bytes: int = 0
    #: Layers no image uses that a running sandbox still holds: left in place.
    in_use: list[str] = field(default_factory=list)


class HeldRootfs(Held):
    """A Rootfs whose layers stay in the store until `close()` (see `ImageStore.hold`)."""

    def __init__(self, rootfs: Rootfs, fds: list[int]):
        super().__init__(fds)
        self.rootfs = rootfs


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_READ):
            pass


class ImageStore:
    """A store rooted at `root` (default: `default_root()`); safe across threads and
    processes."""

    def __init__(self, root: str | None = None, *,
                 on_entry: Callable[[int], None] | None = None):
        self.root = root or default_root()
        self._on_entry = on_entry  # a test's hook, called after each unpacked tar entry
        for sub in ("", "blobs/sha256", "layers/sha256", "images", "locks", "tmp"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)

    # -- paths --------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def layer_dir(self, diff_id: str) -> str:
        return self._p("layers", "sha256", _hex(diff_id))

    def _record_path(self, ref: str) -> str:
        return self._p("images", hashlib.sha256(ref.encode()).hexdigest() + ".json")

    # -- locks --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, path: str, how: int) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    # -- pull ---------------------------------------------------------------------------------

    def pull(self, ref: str, progress: Callable[[LayerEvent], None] | None = None, *,
             on_bytes: Callable[[BlobProgress], None] | None = None) -> ImageRecord:
        """Imports REF: verifies and stores its manifest and config, unpacks missing layers.
        `on_bytes` is called as each layer blob is read (a layer already present reads none).

        Raises:
            ImageNotFound, UnsupportedImage, LayerDigestMismatch, UnsafeLayer,
            RegistryError (a registry REF).
        """
        with self._flock(self._p("store.lock"), fcntl.LOCK_SH), \
                open_source(ref, scratch=self._p("tmp")) as src:
            if on_bytes is not None:
                src.report_bytes(on_bytes)
            return self._pull(src, progress)

    def _pull(self, src: ImageSource, progress) -> ImageRecord:
        _verify(src.manifest, src.manifest_digest, f"{src.ref}: manifest")
        _verify(src.config, src.config_digest, f"{src.ref}: config")
        config = json.loads(src.config)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(src.layers):
            raise UnsupportedImage(f"{src.ref}: the config lists {len(diff_ids)} diff_ids for "
                                   f"{len(src.layers)} layers")
        layers, size = [], 0
        for i, (diff_id, layer) in enumerate(zip(diff_ids, src.layers, strict=True)):
            _hex(diff_id, f"{src.ref}: diff_id")
            state, meta = self._ensure_layer(diff_id, layer.digest, layer.open, src.ref)
            size += meta["unpacked_bytes"]
            layers.append(LayerRecord(diff_id, layer.digest, layer.media_type, layer.size))
            if progress is not None:
                progress(LayerEvent(i + 1, len(diff_ids), diff_id, state, meta["tar_bytes"]))
        self._write_blob(src.manifest, src.manifest_digest)
        self._write_blob(src.config, src.config_digest)
        record = ImageRecord(src.ref, src.config_digest, src.manifest_digest, tuple(layers),
                             time.time(), size)
        self._write_atomic(self._record_path(src.ref),
                           json.dumps(record.to_json(), indent=1).encode())
        return record

    def _ensure_layer(self, diff_id: str, digest: str | None, open_blob, ref: str):
        """('present' | 'unpacked', layer.json) of a layer, unpacking it once."""
        final = self.layer_dir(diff_id)
        meta = _read_meta(final)
        if meta is not None:
            return "present", meta
        hex_ = _hex(diff_id)
        with self._flock(self._p("locks", hex_ + ".lock"), fcntl.LOCK_EX):
            meta = _read_meta(final)
            if meta is not None:  # another pull finished it while this one waited
                return "present", meta
            self._remove_temps(hex_ + ".")
            if os.path.lexists(final):  # no layer.json: not one this store completed
                os.rename(final, self._p("tmp", f"{hex_}.broken.{secrets.token_hex(4)}"))
                self._remove_temps(hex_ + ".")
            work = self._p("tmp", f"{hex_}.{os.getpid()}.{secrets.token_hex(4)}")
            os.mkdir(work, 0o700)
            try:
                meta = self._unpack(work, diff_id, digest, open_blob, ref)
                fstree.syncfs(work)
                os.rename(work, final)
            except BaseException:
                fstree.remove_tree(work, ignore_errors=True)
                raise
            _fsync_dir(os.path.dirname(final))
            return "unpacked", meta

    def _unpack(self, work: str, diff_id: str, digest: str | None, open_blob, ref: str) -> dict:
        os.mkdir(os.path.join(work, "root"), 0o755)
        with open_blob() as raw:
            outer = _Hashing(raw)
            head = _peek(outer)
            if head.startswith(b"\x28\xb5\x2f\xfd"):
                raise UnsupportedImage(f"{ref}: layer {digest or diff_id} is zstd-compressed, "
                                       f"which this Python cannot read; re-save the image with "
                                       f"gzip layers (e.g. docker save, or skopeo copy "
                                       f"--dest-compress-format gzip)")
            stream: BinaryIO = _Prefixed(head, outer)
            if head.startswith(b"\x1f\x8b"):
                stream = gzip.GzipFile(fileobj=stream, mode="rb")
            inner = _Hashing(stream)
            root_fd = os.open(os.path.join(work, "root"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                report = unpack_layer(inner, root_fd, diff_id, on_entry=self._on_entry)
            except (OSError, EOFError, zlib.error) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                raise LayerDigestMismatch(f"{ref}: layer {digest or diff_id} is not a valid "
                                          f"compressed tar ({exc})") from None
            finally:
                os.close(root_fd)
            try:
                inner.drain()  # the zero blocks after the end marker are part of the diff
            except (OSError, EOFError, zlib.error) as exc:
                raise LayerDigestMismatch(f"{ref}: layer {digest or diff_id} is truncated "
                                          f"({exc})") from None
            outer.drain()
        got_diff = "sha256:" + inner.sha.hexdigest()
        if got_diff != diff_id:
            raise LayerDigestMismatch(f"{ref}: layer {digest or '?'} unpacks to {got_diff}, "
                                      f"not the config's diff_id {diff_id}; nothing was kept")
        got_blob = "sha256:" + outer.sha.hexdigest()
        if digest is not None and got_blob != digest:
            raise LayerDigestMismatch(f"{ref}: layer blob has digest {got_blob}, not the "
                                      f"manifest's {digest}; nothing was kept")
        meta = {"diff_id": diff_id, "blob_digest": got_blob, "tar_bytes": inner.count,
                "unpacked_bytes": _du(os.path.join(work, "root")), "entries": report.entries,
                "whiteouts": report.whiteouts, "opaque_dirs": report.opaque_dirs,
                "unpacked_at": time.time()}
        fstree.write_synced(os.path.join(work, "layer.json"), json.dumps(meta, indent=1).encode(),
                            exclusive=True)
        return meta

    # -- records ------------------------------------------------------------------------------

    def images(self) -> list[ImageRecord]:
        out = []
        for name in sorted(os.listdir(self._p("images"))):
            if name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    with open(self._p("images", name), "rb") as f:
                        out.append(ImageRecord.from_json(json.load(f)))
        return sorted(out, key=lambda r: r.ref)

    def ensure(self, ref: str, progress: Callable[[LayerEvent], None] | None = None, *,
               on_bytes: Callable[[BlobProgress], None] | None = None) -> ImageRecord:
        """The record of REF, pulling it first when the store does not hold it.

        Raises:
            as `pull` (ImageNotFound: REF is neither here nor anywhere it names).
        """
        try:
            return self.get(ref)
        except ImageNotFound:
            return self.pull(ref, progress, on_bytes=on_bytes)

    def get(self, ref: str) -> ImageRecord:
        """The record of REF (as pulled, or its id, or a unique id prefix of 12+ hex)."""
        wanted = canonical_ref(ref)
        try:
            with open(self._record_path(wanted), "rb") as f:
                return ImageRecord.from_json(json.load(f))
        except FileNotFoundError:
            pass
        key = ref.removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{12,64}", key):
            hits = [r for r in self.images() if r.id[7:].startswith(key)]
            if len({r.id for r in hits}) == 1:
                return hits[0]
            if hits:
                raise ImageNotFound(f"image id {ref!r} is ambiguous: "
                                    f"{', '.join(r.ref for r in hits)}")
        raise ImageNotFound(f"no image {ref!r} in the store {self.root}; pull it first "
                            f"(corral image pull {ref})")

    def config(self, record: ImageRecord) -> dict:
        with open(self._p("blobs", "sha256", _hex(record.id)), "rb") as f:
            return json.load(f)

    def rootfs(self, ref: str) -> Rootfs:
        """The layer trees (bottom first) and the config of REF, for an overlay mount."""
        record = self.get(ref)
        dirs = []
        for layer in record.layers:
            final = self.layer_dir(layer.diff_id)
            if _read_meta(final) is None:
                raise ImageNotFound(f"image {record.ref}: layer {layer.diff_id} is missing "
                                    f"from the store; pull the image again")
            dirs.append(os.path.join(final, "root"))
        return Rootfs(tuple(dirs), self.config(record))

    def layer_bytes(self, diff_id: str) -> int:
        """Bytes of a complete layer's unpacked tree on disk (0: not in the store)."""
        meta = _read_meta(self.layer_dir(diff_id))
        return meta["unpacked_bytes"] if meta is not None else 0

    def held(self, diff_id: str) -> bool:
        """Whether a sandbox holds the layer now (`hold`): a look, it takes no hold."""
        lock = self._p("locks", _hex(diff_id) + ".lock")
        with self._flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
            return not got

    def hold(self, ref: str) -> HeldRootfs:
        """The rootfs of REF with each layer held (a shared flock) until `close()`: rm and
        prune leave a held layer in place, so removing an image never breaks a sandbox that
        runs on it."""
        record = self.get(ref)
        fds: list[int] = []
        try:
            for layer in record.layers:
                fds.append(os.open(self._p("locks", _hex(layer.diff_id) + ".lock"),
                                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                fcntl.flock(fds[-1], fcntl.LOCK_SH)
            return HeldRootfs(self.rootfs(record.ref), fds)  # every layer checked, held
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    # -- removal ------------------------------------------------------------------------------

    def remove(self, ref: str) -> Freed:
        """Removes REF's record, then its layers and blobs no other image uses."""
        with self._flock(self._p("store.lock"), fcntl.LOCK_EX):
            record = self.get(ref)
            os.unlink(self._record_path(record.ref))
            _fsync_dir(self._p("images"))
            freed = self._collect()
            freed.images.append(record.ref)
            return freed

    def prune(self) -> Freed:
        """Removes layers and blobs no image uses and temp directories no one works in."""
        with self._flock(self._p("store.lock"), fcntl.LOCK_EX):
            freed = self._collect()
            for name in os.listdir(self._p("tmp")):
                hex_ = name.split(".", 1)[0]
                lock = self._p("locks", hex_ + ".lock") if _HEX.match(hex_) else None
                if lock is None:  # blobs, records, saved images: pulls hold store.lock
                    freed.bytes += self._remove(self._p("tmp", name))
                    freed.temp_dirs += 1
                    continue
                with self._flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
                    if got:
                        freed.bytes += self._remove(self._p("tmp", name))
                        freed.temp_dirs += 1
            # lock files of layers that never completed (refused, killed); no pull runs
            # now (store.lock), so none can be waiting on one that is unlinked
            for name in os.listdir(self._p("locks")):
                if not os.path.exists(self._p("layers", "sha256", name.removesuffix(".lock"))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._p("locks", name))
            return freed

    def _collect(self) -> Freed:
        freed = Freed()
        records = self.images()
        used_layers = {_hex(layer.diff_id) for r in records for layer in r.layers}
        used_blobs = {_hex(d) for r in records for d in (r.id, r.manifest_digest)}
        for hex_ in sorted(os.listdir(self._p("layers", "sha256"))):
            if hex_ in used_layers:
                continue
            lock = self._p("locks", hex_ + ".lock")
            with self._flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
                if not got:  # held by a running sandbox (hold()): removed by a later prune
                    freed.in_use.append("sha256:" + hex_)
                    continue
                # out of layers/ in one rename first: a crash in the middle of removing
                # must not leave a partial tree where a complete layer is looked for
                doomed = self._p("tmp", f"{hex_}.removed.{secrets.token_hex(4)}")
                os.rename(self._p("layers", "sha256", hex_), doomed)
                _fsync_dir(self._p("layers", "sha256"))
                freed.bytes += self._remove(doomed)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
            freed.layers.append("sha256:" + hex_)
        for hex_ in os.listdir(self._p("blobs", "sha256")):
            if hex_ not in used_blobs:
                freed.bytes += self._remove(self._p("blobs", "sha256", hex_))
                freed.blobs += 1
        return freed

    def _remove(self, path: str) -> int:
        size = _du(path)
        if os.path.isdir(path) and not os.path.islink(path):
            fstree.remove_tree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return size

    def _remove_temps(self, prefix: str) -> None:
        for name in os.listdir(self._p("tmp")):
            if name.startswith(prefix):
                fstree.remove_tree(self._p("tmp", name), ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------

    def _write_blob(self, data: bytes, digest: str) -> None:
        path = self._p("blobs", "sha256", _hex(digest))
        if not os.path.exists(path):
            self._write_atomic(path, data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = self._p("tmp", f"{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fstree.write_synced(tmp, data, exclusive=True)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(os.path.dirname(path))


class _Prefixed:
    """A stream whose first bytes were already read (to look at the compression magic)."""

    def __init__(self, head: bytes, rest: _Hashing):
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.rest.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(n)


def _peek(stream: _Hashing) -> bytes:
    head = b""
    while len(head) < 4:
        piece = stream.read(4 - len(head))
        if not piece:
            break
        head += piece
    return head


def _hex(digest: str, what: str = "digest") -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:") \
            or not _HEX.match(digest[7:]):
        raise UnsupportedImage(f"{what} {digest!r} is not sha256:<64 hex>")
    return digest[7:]


def _verify(data: bytes, digest: str, what: str) -> None:
    _hex(digest, what)
    got = sha256_digest(data)
    if got != digest:
        raise LayerDigestMismatch(f"{what} has digest {got}, not {digest}; nothing was kept")


def _read_meta(layer_dir: str) -> dict | None:
    try:
        with open(os.path.join(layer_dir, "layer.json"), "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _du(path: str) -> int:
    """Bytes of disk a tree uses (st_blocks: holes cost nothing, hard links count once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total += st.st_blocks * 512
    if not os.path.isdir(path) or os.path.islink(path):
        return total
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(top, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
