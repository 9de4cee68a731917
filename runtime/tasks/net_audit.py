"""The egress records of a deep task's attempt (local or on Ray), into the daemon's audit log.

A sandbox the daemon runs hands its proxy's records (net.connect, net.secret, ...) to the
daemon directly (runtime/sandboxes.py). A deep task's sandbox runs in its shim, which may
outlive the daemon: the runner appends each record to the attempt's NET_EVENTS_FILE (one
JSON object a line) and rings the task's bell, and the daemon audits what is new here. The
offset audited so far is kept beside the file (NET_AUDITED_FILE), so a daemon restarted
in between audits each record once (one written just before a crash may be audited twice:
at least once, never lost). Records name a secret, never its value (sandbox/intercept.py).
An attempt on a Ray node writes the same file in its actor's directory; the daemon copies
what is new with each poll (ray_executor.py) and audits its copy here, the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref

from .files import atomic_write
from .runner import NET_EVENTS_FILE

log = logging.getLogger("corral.tasks.net")

#: The offset of NET_EVENTS_FILE audited so far (decimal text).
NET_AUDITED_FILE = "net.audited"
#: The most bytes of records one call reads; the rest waits for the next bell.
MAX_READ_BYTES = 1 << 20
#: One audit pass at a time per attempt directory (bells come faster than passes end).
_passes: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _read_new(attempt_dir: str) -> tuple[list[dict], int]:
    """The complete records after the audited offset, and the offset after them."""
    try:
        with open(os.path.join(attempt_dir, NET_AUDITED_FILE)) as f:
            done = int(f.read() or 0)
    except (OSError, ValueError):
        done = 0
    try:
        with open(os.path.join(attempt_dir, NET_EVENTS_FILE), "rb") as f:
            f.seek(done)
            data = f.read(MAX_READ_BYTES)
    except FileNotFoundError:
        return [], done
    complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits
    records = []
    for line in complete.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                records.append(event)
    return records, done + len(complete)


async def audit_net_events(audit, tenant: str, task_id: str, attempt: int,
                           attempt_dir: str) -> int:
    """Audit the attempt's egress records not yet audited; returns how many.

    Called at every bell of the attempt (each PROGRESS is one): an attempt with no egress
    record has no NET_EVENTS_FILE, and that stat, here on the loop, is all it costs (no
    pass on a worker thread, whose wake-ups and GIL hand-offs delay the loop)."""
    if not os.path.exists(os.path.join(attempt_dir, NET_EVENTS_FILE)):
        return 0
    lock = _passes.setdefault(attempt_dir, asyncio.Lock())
    async with lock:
        return await _audit_pass(audit, tenant, task_id, attempt, attempt_dir)


async def _audit_pass(audit, tenant: str, task_id: str, attempt: int, attempt_dir: str) -> int:
    loop = asyncio.get_running_loop()
    records, offset = await loop.run_in_executor(None, _read_new, attempt_dir)
    if not records:
        return 0
    futures = []
    for event in records:
        detail = dict(event)
        kind = str(detail.pop("kind", "net.connect"))
        sandbox_id = str(detail.pop("sandbox_id", ""))
        detail.update(task_id=task_id, attempt=attempt)
        futures.append(asyncio.wrap_future(audit.submit(
            kind, tenant=tenant, peer="egress", sandbox_id=sandbox_id, detail=detail)))
    for outcome in await asyncio.gather(*futures, return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.error("a task's egress audit record was lost: %s", outcome)
    await loop.run_in_executor(None, atomic_write, os.path.join(attempt_dir, NET_AUDITED_FILE),
                               str(offset).encode())
    return len(records)
