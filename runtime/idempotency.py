"""Client-chosen request ids: a retried Create or session start makes one object, not two.

Rules (the same as SubmitTaskRequest.request_id, runtime/tasks/scheduler.py):

* A request_id is per tenant: printable ASCII without spaces, at most 128 characters.
* The first request with an id does the work; a request with the same id and the same
  content (its fingerprint) gets what the first one made, also while the first is still
  under way (it waits for it): two racing requests make exactly one object.
* The same id with different content is ALREADY_EXISTS (RequestIdReused), naming the
  object the first request made.
* A first request that failed made nothing: its id is forgotten, and a retry does the work.
* Memory is bounded: an id is remembered for WINDOW_S after its request succeeded, and a
  tenant's oldest ids are forgotten beyond MAX_PER_TENANT. A retry after that makes a new
  object.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .tasks.model import RequestIdReused, check_request_id

#: How long a request_id is remembered after its request succeeded (seconds).
WINDOW_S = 24 * 3600.0
#: Request ids one tenant's ledger remembers at most (per kind); the oldest go first.
MAX_PER_TENANT = 4096


@dataclass
class _Entry:
    fingerprint: str
    done: asyncio.Future
    at: float = field(default_factory=time.monotonic)
    result: Any = None  # what the first request made (an id), once done


class RequestLedger:
    """The request ids of one kind of request ("sandbox", "session"), per tenant."""

    def __init__(self, kind: str, *, window_s: float = WINDOW_S,
                 max_per_tenant: int = MAX_PER_TENANT):
        self.kind = kind
        self.window_s = window_s
        self.max_per_tenant = max_per_tenant
        self._tenants: dict[str, OrderedDict[str, _Entry]] = {}

    def __len__(self) -> int:
        return sum(len(t) for t in self._tenants.values())

    def _forget_old(self, entries: OrderedDict[str, _Entry]) -> None:
        now = time.monotonic()
        while entries:
            key, entry = next(iter(entries.items()))
            over = len(entries) > self.max_per_tenant
            if not entry.done.done() or not (over or now - entry.at > self.window_s):
                break
            del entries[key]

    async def run(self, tenant: str, request_id: str, fingerprint: str,
                  make: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """make()'s result, made once per (tenant, request_id); and whether this call is a
        replay (it returns what an earlier request made).

        Args:
            fingerprint: what the request asks for; a replay must ask for the same.
            make: does the work; returns what the ledger remembers (keep it small: an id).

        Raises:
            InvalidSpec: a malformed request_id.
            RequestIdReused: the id made something for a different request.
            Whatever make() raises (the id is forgotten then).
        """
        check_request_id(request_id)
        entries = self._tenants.setdefault(tenant, OrderedDict())
        while True:
            self._forget_old(entries)
            entry = entries.get(request_id)
            if entry is None:
                break
            if entry.fingerprint != fingerprint:
                made = f" made {entry.result}" if entry.done.done() else " is under way"
                raise RequestIdReused(
                    f"request_id: {request_id!r} already{made} for a different request; "
                    "a new request needs a new request_id")
            if entry.done.done():
                return entry.result, True
            await asyncio.shield(entry.done)  # the first one's outcome; retry if it failed
            if entries.get(request_id) is entry:
                return entry.result, True
        entry = _Entry(fingerprint, asyncio.get_running_loop().create_future())
        entries[request_id] = entry
        try:
            entry.result = await make()
        except BaseException:
            if entries.get(request_id) is entry:
                del entries[request_id]
            entry.done.set_result(None)  # waiters look again (and may do the work)
            raise
        entry.at = time.monotonic()
        entries.move_to_end(request_id)
        entry.done.set_result(None)
        self._forget_old(entries)
        return entry.result, False
