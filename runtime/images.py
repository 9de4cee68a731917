"""The daemon's images: its one ImageStore, pulls shared per REF on worker threads, who may
pull and remove, their audit records, the image config on Exec, and the bounded garbage
collection of unused images.

A pull runs on a thread of its own and belongs to no caller: concurrent Pulls of one REF
join it and each sees every event of it (those before it joined first), and a caller that
goes away stops watching without ending a pull others wait on. Removal never breaks a
running sandbox: the store leaves a layer a sandbox holds (ImageStore.hold) in place.

The garbage collection keeps the unpacked layers of the store under `image_store_max_bytes`
(0: no bound): after each pull and every GC_INTERVAL_S, when over the bound, it prunes
layers no image names, then removes whole images, least recently used first (the last
pull, or the last collection that found a sandbox running on it), skipping every image a
running sandbox holds and the one just pulled, until the store is under the bound.

Domain layer: no gRPC types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

from corral.sandbox.errors import (
    CorralError,
    FailedPrecondition,
    InvalidSpec,
    PermissionDenied,
    Unauthenticated,
    as_exhaustion,
)
from corral.sandbox.images.registry import RegistryError
from corral.sandbox.images.sources import BlobProgress, canonical_ref
from corral.sandbox.images.store import Freed, ImageRecord, ImageStore, LayerEvent

from .auth import Caller

log = logging.getLogger("corral.images")

#: Seconds between two garbage collections on the timer (one also follows each pull).
GC_INTERVAL_S = 300.0
#: Longest REF a request may name, in bytes.
MAX_REF_BYTES = 4096
#: A bytes event is sent each time a blob's read count passes another step of this size.
BYTES_EVENT_STEP = 1 << 20
#: REF forms that read the daemon host's own files: operators only.
HOST_PATH_FORMS = ("oci:", "docker-archive:")


@dataclass(frozen=True)
class PullDone:
    """The last event of a pull that succeeded."""

    record: ImageRecord


class PullFailed(FailedPrecondition):
    """A pull that a source refused for a reason that is neither the request's form nor a
    missing image: a registry that cannot be reached or refuses the daemon's credentials,
    a file the daemon cannot read."""


def check_ref(ref: str) -> str:
    """A REF as a request may give it: not empty, bounded, no NUL, local paths absolute
    (they are the daemon's: its working directory means nothing to a client).

    Raises:
        InvalidSpec: naming `ref`.
    """
    if not ref:
        raise InvalidSpec("ref", "is empty; name an image (e.g. oci:/path/to/layout:tag)")
    if len(ref.encode()) > MAX_REF_BYTES or "\0" in ref:
        raise InvalidSpec("ref", f"must be at most {MAX_REF_BYTES} bytes without NUL")
    for form in HOST_PATH_FORMS:
        if ref.startswith(form) and not ref[len(form):].startswith("/"):
            raise InvalidSpec("ref", f"{ref!r}: a {form} path must be absolute (a path on "
                                     f"the daemon's host)")
    return ref


class SharedPull:
    """One pull of one REF, watched by any number of Pull calls: its events are kept, so a
    late watcher sees them all, and `done` is set once it has ended either way."""

    def __init__(self, ref: str):
        self.ref = ref
        self.events: list = []
        self.error: BaseException | None = None
        self.done = False
        self.watchers = 0
        #: Set (and replaced) at each new event: a watcher waits on the one it last saw.
        self._news = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._bytes_step: dict[int, int] = {}

    def on_layer(self, event: LayerEvent) -> None:
        """From the pull's thread: a layer is present or unpacked."""
        self.loop.call_soon_threadsafe(self._add, event)

    def on_bytes(self, progress: BlobProgress) -> None:
        """From the pull's thread: one event per BYTES_EVENT_STEP of a blob, and its end."""
        step = progress.done // BYTES_EVENT_STEP
        if step > self._bytes_step.get(progress.index, -1) or progress.done == progress.total:
            self._bytes_step[progress.index] = step
            self.loop.call_soon_threadsafe(self._add, progress)

    def _add(self, event) -> None:
        self.events.append(event)
        self._announce()

    def _announce(self) -> None:
        news, self._news = self._news, asyncio.Event()
        news.set()

    def finish(self, record: ImageRecord | None, error: BaseException | None) -> None:
        if record is not None:
            self.events.append(PullDone(record))
        self.error = error
        self.done = True
        self._announce()

    async def watch(self):
        """Every event, from the first; raises the pull's error after its last event."""
        seen = 0
        while True:
            while seen < len(self.events):
                seen += 1
                yield self.events[seen - 1]
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            await self._news.wait()  # nothing new since the look above: no await between


class ImageService:
    """The daemon's images: List, Get, Pull (shared), Remove, and the GC bound."""

    def __init__(self, audit, *, max_bytes: int = 0, root: str | None = None):
        self.audit = audit
        self.store = ImageStore(root)
        self.max_bytes = max_bytes
        self._pulls: dict[str, SharedPull] = {}
        #: ref -> when a collection last found a sandbox running on it (time.time()).
        self._seen_held: dict[str, float] = {}
        self._gc_lock = threading.Lock()
        self._timer: asyncio.Task | None = None

    def start(self) -> None:
        if self.max_bytes:
            self._timer = asyncio.get_running_loop().create_task(self._collect_on_timer())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    # -- reads --------------------------------------------------------------------------------

    def list(self) -> list[ImageRecord]:
        return self.store.images()

    def get(self, ref: str) -> tuple[ImageRecord, dict]:
        """The record of REF and its config's `config` object (Env, Cmd...).

        Raises:
            InvalidSpec: a malformed ref. ImageNotFound: not in the store.
        """
        record = self.store.get(check_ref(ref))
        return record, self.store.config(record).get("config") or {}

    # -- pull ---------------------------------------------------------------------------------

    def join_pull(self, caller: Caller, ref: str) -> SharedPull:
        """The pull of REF in progress, or a new one on a thread of its own; audited
        image.pull for this caller either way.

        Raises:
            InvalidSpec: a malformed ref. PermissionDenied: a host path, not an operator.
        """
        check_ref(ref)
        if ref.startswith(HOST_PATH_FORMS) and not caller.operator:
            raise PermissionDenied(f"ref: pulling {ref.split(':', 1)[0]}: refs (files on the "
                                   f"daemon's host) needs the operator role")
        key = canonical_ref(ref)
        shared = self._pulls.get(key)
        joined = shared is not None
        if shared is None:
            shared = self._pulls[key] = SharedPull(key)
            threading.Thread(target=self._pull_thread, args=(shared,), daemon=True,
                             name="corral-image-pull").start()
        shared.watchers += 1
        self.audit.append("image.pull", tenant=caller.tenant, peer=caller.peer,
                          detail={"ref": key, "joined": joined})
        return shared

    def _pull_thread(self, shared: SharedPull) -> None:
        """Pull, then collect (never the image just pulled), then tell the watchers."""
        record, error = None, None
        try:
            record = self._pull(shared)
        except BaseException as exc:  # noqa: BLE001 - every outcome reaches the watchers
            error = exc
        loop = shared.loop
        try:
            loop.call_soon_threadsafe(self._finish, shared, record, error)
        except RuntimeError:  # the loop closed under a pull of a stopping daemon
            return
        if record is not None:
            try:
                self.collect(keep=record.ref)
            except Exception:  # noqa: BLE001 - a failed collection fails no pull
                log.exception("image garbage collection after pulling %s failed", record.ref)

    def _pull(self, shared: SharedPull) -> ImageRecord:
        """store.pull, its errors as the documented codes (never INTERNAL for a source)."""
        try:
            return self.store.pull(shared.ref, shared.on_layer, on_bytes=shared.on_bytes)
        except InvalidSpec as exc:  # the store names its own argument "image"
            raise InvalidSpec("ref", str(exc).removeprefix(f"{exc.field}: ")) from None
        except Unauthenticated as exc:  # the registry's answer to the daemon, not the caller's
            raise PullFailed(f"ref: {shared.ref}: the registry refused the daemon's "
                             f"credentials: {exc}") from None
        except RegistryError as exc:  # UNAVAILABLE would say the daemon is going away
            raise PullFailed(f"ref: {shared.ref}: {exc}") from None
        except OSError as exc:
            if as_exhaustion(exc) is not None:
                raise
            raise PullFailed(f"ref: {shared.ref}: cannot read it on the daemon's host: "
                             f"{exc.strerror or exc}") from None

    def _finish(self, shared: SharedPull, record: ImageRecord | None,
                error: BaseException | None) -> None:
        self._pulls.pop(shared.ref, None)
        if error is not None and not isinstance(error, CorralError):
            log.error("pulling %s failed", shared.ref, exc_info=error)
        with contextlib.suppress(CorralError):  # a closing log: the pull stands
            self.audit.append("image.pulled", tenant="", peer="daemon", detail={
                "ref": shared.ref, "watchers": shared.watchers,
                **({"id": record.id, "layers": len(record.layers), "size_bytes": record.size}
                   if record is not None else {"error": str(error)[:512]})})
        shared.finish(record, error)  # after the record: a watcher's `done` is on file

    # -- remove -------------------------------------------------------------------------------

    def remove(self, caller: Caller, ref: str) -> Freed:
        """Remove REF and what no other image uses (held layers stay); operators only.

        Raises:
            InvalidSpec, PermissionDenied, ImageNotFound.
        """
        check_ref(ref)
        if not caller.operator:
            raise PermissionDenied("removing an image needs the operator role: the image "
                                   "store is shared by every tenant")
        freed = self.store.remove(ref)
        self.audit.append("image.remove", tenant=caller.tenant, peer=caller.peer, detail={
            "ref": freed.images[0], "layers": freed.layers, "in_use": freed.in_use,
            "freed_bytes": freed.bytes})
        return freed

    # -- garbage collection -------------------------------------------------------------------

    async def _collect_on_timer(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL_S)
            try:
                await asyncio.to_thread(self.collect)
            except Exception:  # noqa: BLE001 - the timer outlives one failed pass
                log.exception("image garbage collection failed")

    def _layer_bytes(self, records: list[ImageRecord]) -> dict[str, int]:
        return {layer.diff_id: self.store.layer_bytes(layer.diff_id)
                for record in records for layer in record.layers}

    def collect(self, keep: str = "") -> list[str]:
        """Bring the store under max_bytes (see the module's docstring); returns the REFs
        removed. `keep`: a REF never removed in this pass (the one just pulled)."""
        if not self.max_bytes:
            return []
        with self._gc_lock:
            if sum(self._layer_bytes(self.store.images()).values()) <= self.max_bytes:
                return []
            pruned = self.store.prune()  # layers no image names go first
            records = self.store.images()
            sizes = self._layer_bytes(records)
            total = sum(sizes.values())
            now = time.time()
            # a sandbox holds every layer of its image; a layer alone may be another's too
            held = {r.ref for r in records
                    if all(self.store.held(layer.diff_id) for layer in r.layers)}
            self._seen_held.update(dict.fromkeys(held, now))
            candidates = sorted((r for r in records if r.ref not in held and r.ref != keep),
                                key=lambda r: max(r.pulled_at, self._seen_held.get(r.ref, 0)))
            removed, freed_bytes = [], pruned.bytes
            for record in candidates:
                if total <= self.max_bytes:
                    break
                freed = self.store.remove(record.ref)
                total -= sum(sizes.get(d, 0) for d in freed.layers)
                freed_bytes += freed.bytes
                removed.append(record.ref)
            self.audit.submit("image.gc", tenant="", peer="daemon", detail={
                "removed": removed, "pruned_layers": len(pruned.layers),
                "freed_bytes": freed_bytes, "store_bytes": total,
                "max_bytes": self.max_bytes, "held": sorted(held)})
            if total > self.max_bytes:
                log.warning("image store holds %d bytes of layers, over its bound of %d: "
                            "what is left is in use", total, self.max_bytes)
            return removed


# -- the image config on Exec --------------------------------------------------------------


@dataclass(frozen=True)
class ExecOnImage:
    """An Exec's command after its sandbox's image config (docker exec's rules)."""

    argv: list[str]
    env: dict[str, str] | None
    cwd: str
    user: tuple[int, int] | None


def exec_on_image(sandbox, argv: list[str], env: dict[str, str] | None,
                  cwd: str, user: str = "") -> ExecOnImage:
    """Apply the image config of the sandbox (none: unchanged) to one Exec: the image's Env
    under the request's, WorkingDir unless the request sets cwd, its User unless the
    request names one (`user`), and with an empty argv Entrypoint + Cmd. Blocking (users
    are looked up in the sandbox's /etc).

    Raises:
        InvalidSpec: an empty argv and no Entrypoint or Cmd; a user /etc lacks, or one
            outside the sandbox's ids.
    """
    asked = _request_user(sandbox, user) if user else None
    if not sandbox.spec.image:
        return ExecOnImage(argv, env, cwd, asked)
    resolved = sandbox.image_command(list(argv))  # Entrypoint + Cmd when argv is empty
    merged = {**resolved.env, **(env or {})}
    if not cwd and resolved.cwd and _is_dir_inside(sandbox, resolved.cwd):
        cwd = resolved.cwd
    return ExecOnImage(list(argv) or resolved.argv, merged or None, cwd,
                       asked if user else resolved.user)


def _request_user(sandbox, spec: str) -> tuple[int, int]:
    """A request's "uid[:gid]" / "name[:group]", resolved in the sandbox's own /etc."""
    from corral.sandbox.images import runconfig

    pid = getattr(sandbox, "init_pid", None)
    if pid and getattr(sandbox, "local", True):
        ids = runconfig.user_in(spec, pid, what="user")
    elif all(part.isdigit() for part in spec.split(":", 1)):  # numbers need no /etc
        uid, _, gid = spec.partition(":")
        ids = (int(uid), int(gid or 0))
    else:
        raise InvalidSpec("user", f"{spec!r}: a name is resolved in the sandbox's /etc, which "
                                  "a remote engine does not show; give uid[:gid]")
    ids = ids or (0, 0)
    count = sandbox.spec.uid_count
    if not (0 <= ids[0] < count and 0 <= ids[1] < count):
        raise InvalidSpec("user", f"{spec!r} is {ids[0]}:{ids[1]}; the sandbox's ids are "
                                  f"0..{count - 1}")
    return ids


def _is_dir_inside(sandbox, path: str) -> bool:
    """Whether PATH is a directory in the sandbox's root (links resolved inside it). docker
    creates a WorkingDir the image lacks; a read-only root cannot have one made, so such
    an Exec runs in /workspace instead of failing every command."""
    from corral.sandbox.ptys import open_path_in_root

    pid = getattr(sandbox, "init_pid", None)
    if not pid or not getattr(sandbox, "local", True):
        return True  # no root to look in (a remote engine): the engine decides
    try:
        os.close(open_path_in_root(f"/proc/{pid}/root", path, os.O_PATH | os.O_DIRECTORY))
    except OSError:
        return False
    return True

