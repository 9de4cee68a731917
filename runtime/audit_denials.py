"""Rate-limited denial records: what refused callers cost the audit log.

Per (tenant, peer host, status), the first DENIAL_BURST denials of a DENIAL_WINDOW_S window
are ``denied`` records and the rest one ``denied.summary`` record with their ``count``; every
denial is in one or the other. `AuditLog.deny()` keeps one `DenialLimiter` per log.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.sandbox.errors import AuditError

if TYPE_CHECKING:
    from .audit import AuditLog
    from .audit_records import AuditRecord

_log = logging.getLogger("corral.audit")

#: Denials of one (tenant, peer host, status) are recorded one by one up to DENIAL_BURST per
#: window of DENIAL_WINDOW_S seconds; the rest of the window becomes one `denied.summary`.
DENIAL_WINDOW_S = 10.0
DENIAL_BURST = 16
# More keys than this in flight share one overflow key per status: a peer with many addresses
# cannot turn aggregation back into a record per call.
_MAX_DENIAL_KEYS = 256
_MAX_SUMMARY_METHODS = 32


def _peer_host(peer: str) -> str:
    """'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7': a client's ports change per connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit():
            return host
    return peer


@dataclass(slots=True)
class _DenialWindow:
    tenant: str
    peer: str
    status: str
    opened: float  # monotonic
    recorded: int = 0  # written as their own `denied` records
    suppressed: int = 0  # counted into the window's `denied.summary`
    first_time: float = 0.0
    last_time: float = 0.0
    methods: dict[str, int] = dataclasses.field(default_factory=dict)


class DenialLimiter:
    """Rate-limits and aggregates `denied` records per (tenant, peer host, status).

    An unauthenticated flood must not write a record per call at fsync speed, yet no denial
    may go uncounted: the first `burst` denials of a key in a window are `denied` records;
    the others are counted, and when the window ends (or the log closes) one
    `denied.summary` record holds their number, methods and times. So the denials that
    happened are always the `denied` records plus the sum of the summaries' ``count``.
    """

    def __init__(self, log: AuditLog, *, window_s: float = DENIAL_WINDOW_S,
                 burst: int = DENIAL_BURST, max_keys: int = _MAX_DENIAL_KEYS,
                 clock: Callable[[], float] = _time.monotonic):
        self._log = log
        self.window_s = window_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str, str], _DenialWindow] = {}
        self._cv = threading.Condition(threading.Lock())
        self._flusher: threading.Thread | None = None
        self._closed = False

    def deny(self, *, tenant: str, peer: str, status: str, method: str, reason: str,
             sandbox_id: str = "", session_id: str = "",
             ) -> concurrent.futures.Future[AuditRecord] | None:
        """Count one denial; returns the future of its own `denied` record, or None when it
        went into the window's summary."""
        with self._cv:
            if self._closed:
                raise AuditError(self._log.path, "is closed")
            now = self._clock()
            key = (tenant, _peer_host(peer), status)
            window = self._windows.get(key)
            if window is not None and now - window.opened >= self.window_s:
                self._end_locked(key)
                window = None
            if window is None:
                if len(self._windows) >= self.max_keys:
                    key = ("*", "*", status)
                    window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = _DenialWindow(*key, opened=now)
                    self._start_flusher_locked()
            if window.recorded < self.burst:
                window.recorded += 1
                return self._log.submit(
                    "denied", tenant=tenant, peer=peer, sandbox_id=sandbox_id,
                    session_id=session_id,
                    detail={"method": method, "reason": reason, "status": status})
            wall = _time.time()
            if not window.suppressed:
                window.first_time = wall
            window.suppressed += 1
            window.last_time = wall
            if method in window.methods or len(window.methods) < _MAX_SUMMARY_METHODS:
                window.methods[method] = window.methods.get(method, 0) + 1
            else:
                window.methods["other"] = window.methods.get("other", 0) + 1
            return None

    def _end_locked(self, key: tuple[str, str, str]) -> None:
        window = self._windows.pop(key)
        if window.suppressed:
            self._log.submit(
                "denied.summary", tenant=window.tenant, peer=window.peer,
                detail={"status": window.status, "count": window.suppressed,
                        "recorded": window.recorded, "window_s": self.window_s,
                        "first_time": window.first_time, "last_time": window.last_time,
                        "methods": window.methods})

    def _start_flusher_locked(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name="corral-audit-denials")
            self._flusher.start()
        self._cv.notify()

    def _flush_loop(self) -> None:
        with self._cv:
            while not self._closed:
                if not self._windows:
                    self._cv.wait()
                    continue
                now = self._clock()
                due = min(w.opened for w in self._windows.values()) + self.window_s
                if due > now:
                    self._cv.wait(due - now)
                    continue
                for key in [k for k, w in self._windows.items()
                            if now - w.opened >= self.window_s]:
                    try:
                        self._end_locked(key)
                    except AuditError as exc:
                        _log.error("denied.summary not recorded: %s", exc)

    def flush(self) -> None:
        """Write the summaries of every open window now."""
        with self._cv:
            for key in list(self._windows):
                self._end_locked(key)

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            for key in list(self._windows):
                try:
                    self._end_locked(key)
                except AuditError as exc:
                    _log.error("denied.summary not recorded: %s", exc)
            self._closed = True
            self._cv.notify_all()
            flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
