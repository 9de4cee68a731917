"""The snapshot store: immutable, content-addressed layers and one small record per snapshot.

Layout under the store's root (0700; the daemon passes `<state>/snapshots`):

    layers/sha256/HEX/      one complete layer: root/ (the tree) + layer.json
    records/snap-ID.json    one record per snapshot (written last: its presence = complete)
    holds/snap-ID.HOLDER    one file per user of a snapshot, flocked for as long as it uses it
    tmp/PID.RANDOM/         a capture in progress (root/, workspace/)
    store.lock              commit, hold, remove and sweep take it

A capture copies into tmp/, is synced (syncfs), and then, under store.lock, each layer is
renamed into layers/ (or dropped when a layer with its digest is already there) and the
record is written (temp file, fsync, rename, directory fsync). A SIGKILL at any point leaves
either a temp directory or complete layers that no record names; `sweep()` removes both. A
record never names a missing layer.

A snapshot is held (`hold`) by each sandbox that runs on it, and by every snapshot taken on
top of it (its `parent`): `remove` refuses both. A hold is an exclusive flock on a file of
its own, taken under store.lock, so remove (which holds store.lock and tries each hold file
with LOCK_NB) never misses one, and a holder that died left an unlocked file that remove and
sweep delete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from .. import fstree
from ..errors import FailedPrecondition, InvalidSpec, NotFound
from ..locks import Held, flock_held
from . import state_root

_ID = re.compile(r"^snap-[0-9a-f]{12}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
#: The two layers of a snapshot, as directories of a capture's work directory.
LAYER_KINDS = ("root", "workspace")


def default_root() -> str:
    """$CORRAL_SNAPSHOT_ROOT, else /var/lib/corral/snapshots (root) or the user's state dir."""
    return state_root("CORRAL_SNAPSHOT_ROOT", "snapshots")


class SnapshotNotFound(NotFound):
    """No snapshot of that id or name (for this tenant)."""


class SnapshotInUse(FailedPrecondition):
    """A sandbox runs on the snapshot, or another snapshot was taken on top of it."""


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot, as proto corral.v1.Snapshot has it (in_use is asked of the store)."""

    id: str
    name: str
    tenant: str
    source_sandbox: str
    parent: str
    image: str
    created_at: float
    root_digest: str
    workspace_digest: str
    size_bytes: int
    files: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> SnapshotRecord:
        return cls(**doc)


@dataclass
class Swept:
    """What sweep() removed."""

    temp_dirs: int = 0
    layers: list[str] = field(default_factory=list)
    holds: int = 0


class HeldSnapshot(Held):
    """A snapshot and its parents kept from removal until `close()` (see SnapshotStore.hold).

    `root_layers` and `workspace_layers` are layer trees, top (this snapshot's) first, as
    overlayfs lists lower layers.
    """

    def __init__(self, record: SnapshotRecord, root_layers: tuple[str, ...],
                 workspace_layers: tuple[str, ...], fds: list[int], paths: list[str]):
        super().__init__(fds, paths)
        self.record = record
        self.root_layers = root_layers
        self.workspace_layers = workspace_layers


class CaptureWork:
    """A capture's temp directory: copy into `path(kind)`, then SnapshotStore.commit()."""

    def __init__(self, path: str):
        self.dir = path
        self.digests: dict[str, str] = {}
        self.data_bytes = 0
        self.files = 0

    def path(self, kind: str) -> str:
        return os.path.join(self.dir, kind)


class SnapshotStore:
    """A store rooted at `root` (default: `default_root()`); safe across threads and
    processes."""

    def __init__(self, root: str | None = None):
        self.root = root or default_root()
        for sub in ("", "layers/sha256", "records", "holds", "tmp"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def layer_dir(self, digest: str) -> str:
        m = _DIGEST.match(digest)
        if not m:
            raise InvalidSpec("digest", f"{digest!r} is not sha256:<64 hex>")
        return self._p("layers", "sha256", m.group(1))

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self._p("store.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    # -- capture ------------------------------------------------------------------------------

    def begin(self) -> CaptureWork:
        """A new temp directory for a capture (removed by abort() or a later sweep)."""
        path = self._p("tmp", f"{os.getpid()}.{secrets.token_hex(6)}")
        os.mkdir(path, 0o700)
        for kind in LAYER_KINDS:
            os.mkdir(os.path.join(path, kind), 0o755)
        return CaptureWork(path)

    def abort(self, work: CaptureWork) -> None:
        fstree.remove_tree(work.dir, ignore_errors=True)

    def commit(self, work: CaptureWork, *, name: str, tenant: str, source_sandbox: str,
               parent: str, image: str) -> SnapshotRecord:
        """Make the copied layers durable and the snapshot visible; the work is consumed.

        Raises:
            InvalidSpec: name is not [A-Za-z0-9._-]{1,63}, or the tenant has one by it.
        """
        try:
            check_name(name)
            fstree.syncfs(work.dir)
            with self._locked(fcntl.LOCK_EX):
                if name and any(r.name == name for r in self._records(tenant)):
                    raise InvalidSpec("name", f"tenant {tenant!r} already has a snapshot "
                                              f"named {name!r}")
                for kind, digest in work.digests.items():
                    self._keep_layer(work, kind, digest)
                record = SnapshotRecord(
                    id="snap-" + secrets.token_hex(6), name=name, tenant=tenant,
                    source_sandbox=source_sandbox, parent=parent, image=image,
                    created_at=time.time(), root_digest=work.digests.get("root", ""),
                    workspace_digest=work.digests.get("workspace", ""),
                    size_bytes=work.data_bytes, files=work.files)
                self._write_record(record)
        finally:
            self.abort(work)
        return record

    def _keep_layer(self, work: CaptureWork, kind: str, digest: str) -> None:
        """Rename one copied layer into layers/ unless that digest is already there."""
        final = self.layer_dir(digest)
        if os.path.exists(os.path.join(final, "layer.json")):
            return  # the same content, already stored: the copy is dropped with the work
        if os.path.lexists(final):  # a half layer no record names (a crash): replace it
            fstree.remove_tree(final)
        holder = os.path.join(work.dir, kind + ".layer")
        os.mkdir(holder, 0o700)
        os.rename(work.path(kind), os.path.join(holder, "root"))
        meta = {"digest": digest, "kind": kind, "stored_at": time.time()}
        fstree.write_synced(os.path.join(holder, "layer.json"), json.dumps(meta).encode(),
                            exclusive=True)
        fstree.fsync_dir(holder)
        os.rename(holder, final)
        fstree.fsync_dir(os.path.dirname(final))

    def _write_record(self, record: SnapshotRecord) -> None:
        final = self._p("records", record.id + ".json")
        tmp = self._p("tmp", f"{record.id}.{os.getpid()}.{secrets.token_hex(4)}.json")
        try:
            fstree.write_synced(tmp, json.dumps(record.to_json(), indent=1).encode(),
                                exclusive=True)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fstree.fsync_dir(os.path.dirname(final))

    # -- records ------------------------------------------------------------------------------

    def _records(self, tenant: str | None = None) -> list[SnapshotRecord]:
        out = []
        for entry in sorted(os.listdir(self._p("records"))):
            if not entry.endswith(".json"):
                continue
            with contextlib.suppress(FileNotFoundError):
                with open(self._p("records", entry), "rb") as f:
                    record = SnapshotRecord.from_json(json.load(f))
                if tenant is None or record.tenant == tenant:
                    out.append(record)
        return out

    def list(self, tenant: str | None = None) -> list[SnapshotRecord]:
        """Snapshots (of one tenant, or all), oldest first."""
        return sorted(self._records(tenant), key=lambda r: (r.created_at, r.id))

    def get(self, ref: str, tenant: str | None = None) -> SnapshotRecord:
        """A snapshot by id or name (names are looked up within the tenant).

        Raises:
            SnapshotNotFound: none, or another tenant's.
        """
        if isinstance(ref, str) and _ID.match(ref):
            try:
                with open(self._p("records", ref + ".json"), "rb") as f:
                    record = SnapshotRecord.from_json(json.load(f))
            except FileNotFoundError:
                record = None
            if record is not None and (tenant is None or record.tenant == tenant):
                return record
        elif isinstance(ref, str) and ref:
            for record in self._records(tenant):
                if record.name == ref:
                    return record
        raise SnapshotNotFound(f"no snapshot {ref!r}")

    def chain(self, record: SnapshotRecord) -> list[SnapshotRecord]:
        """The snapshot and its parents, itself first."""
        out = [record]
        while out[-1].parent:
            if len(out) > 4096:
                raise FailedPrecondition(f"snapshot {record.id}: its parent chain loops")
            out.append(self.get(out[-1].parent))
        return out

    def usage(self, tenant: str) -> tuple[int, int]:
        """(snapshots, bytes of their own layers) of a tenant, for its quota."""
        records = self._records(tenant)
        return len(records), sum(r.size_bytes for r in records)

    # -- holds --------------------------------------------------------------------------------

    def hold(self, ref: str, holder: str, tenant: str | None = None) -> HeldSnapshot:
        """The snapshot's layer chains, held until close(): remove refuses it meanwhile.

        Raises:
            SnapshotNotFound: no such snapshot (for this tenant).
        """
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", holder):
            raise InvalidSpec("holder", f"{holder!r} is not a sandbox id")
        fds: list[int] = []
        paths: list[str] = []
        try:
            with self._locked(fcntl.LOCK_SH):
                record = self.get(ref, tenant)
                path = self._p("holds", f"{record.id}.{holder}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fds.append(fd)
                paths.append(path)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                roots, workspaces = self.layer_trees(record)
        except FileExistsError:
            HeldSnapshot(None, (), (), fds, paths).close()
            raise FailedPrecondition(f"{holder} already holds snapshot {ref}") from None
        except BaseException:
            HeldSnapshot(None, (), (), fds, paths).close()
            raise
        return HeldSnapshot(record, roots, workspaces, fds, paths)

    def layer_trees(self, record: SnapshotRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The root and workspace layer trees of record's chain, top first."""
        chain = self.chain(record)
        roots = tuple(os.path.join(self.layer_dir(r.root_digest), "root")
                      for r in chain if r.root_digest)
        workspaces = tuple(os.path.join(self.layer_dir(r.workspace_digest), "root")
                           for r in chain if r.workspace_digest)
        return roots, workspaces

    def in_use(self, snapshot_id: str) -> int:
        """How many holders (running sandboxes) use the snapshot now."""
        return sum(1 for _ in self._live_holds(snapshot_id))

    def _live_holds(self, snapshot_id: str) -> Iterator[str]:
        """Hold files of the snapshot whose holder is alive (dead ones are deleted)."""
        prefix = snapshot_id + "."
        for entry in os.listdir(self._p("holds")):
            if not entry.startswith(prefix):
                continue
            if flock_held(self._p("holds", entry)):
                yield entry
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._p("holds", entry))

    # -- removal ------------------------------------------------------------------------------

    def remove(self, ref: str, tenant: str | None = None) -> SnapshotRecord:
        """Remove a snapshot and the layers no other snapshot uses.

        Raises:
            SnapshotNotFound: no such snapshot (for this tenant).
            SnapshotInUse: a sandbox runs on it, or a snapshot was taken on top of it.
        """
        with self._locked(fcntl.LOCK_EX):
            record = self.get(ref, tenant)
            children = [r.id for r in self._records() if r.parent == record.id]
            if children:
                raise SnapshotInUse(f"snapshot {record.id} is the parent of "
                                    f"{', '.join(children)}; remove those first")
            users = [h.split(".", 1)[1] for h in self._live_holds(record.id)]
            if users:
                raise SnapshotInUse(f"snapshot {record.id} is in use by "
                                    f"{', '.join(sorted(users))}")
            os.unlink(self._p("records", record.id + ".json"))
            fstree.fsync_dir(self._p("records"))
            self._remove_unused_layers()
        return record

    def _remove_unused_layers(self) -> list[str]:
        """Layers no record names (store.lock held exclusively)."""
        named = set()
        for r in self._records():
            named.update(d.removeprefix("sha256:") for d in (r.root_digest, r.workspace_digest)
                         if d)
        removed = []
        base = self._p("layers", "sha256")
        for hex_ in os.listdir(base):
            if hex_ not in named:
                fstree.remove_tree(os.path.join(base, hex_), ignore_errors=True)
                removed.append("sha256:" + hex_)
        return removed

    def sweep(self) -> Swept:
        """Remove what crashed captures left: temp directories of dead processes, layers
        no record names, hold files of dead holders."""
        swept = Swept()
        with self._locked(fcntl.LOCK_EX):
            for entry in os.listdir(self._p("tmp")):
                pid = entry.split(".", 1)[0]
                if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                    continue  # a capture in progress (this process's or another's)
                fstree.remove_tree(self._p("tmp", entry), ignore_errors=True)
                swept.temp_dirs += 1
            for entry in os.listdir(self._p("holds")):
                path = self._p("holds", entry)
                if not flock_held(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    swept.holds += 1
            swept.layers = self._remove_unused_layers()
        return swept


def check_name(name: str) -> None:
    """A snapshot name: empty, or [A-Za-z0-9._-], 1-63 characters, not an id's shape.

    Raises:
        InvalidSpec: naming the field `name`.
    """
    if name and (not isinstance(name, str) or not _NAME.match(name) or _ID.match(name)):
        raise InvalidSpec("name", f"{name!r} must be 1-63 of A-Z a-z 0-9 . _ - (and not "
                                  f"look like a snapshot id)")


__all__ = ["CaptureWork", "HeldSnapshot", "LAYER_KINDS", "SnapshotInUse", "SnapshotNotFound",
           "SnapshotRecord", "SnapshotStore", "Swept", "check_name", "default_root"]
