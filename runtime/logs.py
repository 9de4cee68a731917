"""The daemon's log lines: text or JSON (`--log-format json`), with the ids they concern.

A JSON line is one object: time (UTC, ISO 8601, milliseconds), level, logger, message, and
tenant, sandbox_id, session_id, task_id when known, plus exc with the traceback of a logged
exception. The ids come from, first to last:
  1. the record's own attributes: `log.info("...", extra={"sandbox_id": ...})`;
  2. the RPC running in this task (`bind_request`, `bind`: the error mapper binds the
     request's ids and the caller's tenant, runtime/api/errors.py);
  3. the message's arguments that have the shape of an id (`log.info("sandbox %s ...", id)`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

#: The fields of a JSON line that name what a line concerns.
ID_FIELDS = ("tenant", "sandbox_id", "session_id", "task_id")
#: Ids as Corral makes them: sandboxes sbx-<12 hex>, sessions ses-<12 hex>, tasks
#: task-<16 hex> (an exec exe-<12 hex> is not one of the fields).
_ID_SHAPES = (
    (re.compile(r"^sbx-[0-9a-f]{12}$"), "sandbox_id"),
    (re.compile(r"^ses-[0-9a-f]{12}$"), "session_id"),
    (re.compile(r"^task-[0-9a-f]{16}$"), "task_id"),
)
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

#: The ids bound to the task running now (a dict of ID_FIELDS; empty when none).
_bound: contextvars.ContextVar = contextvars.ContextVar("corral_log_ids", default=None)


def bind(**ids: str) -> None:
    """Attach ids (tenant=, sandbox_id=, ...) to every line this task logs from now on."""
    current = _bound.get()
    merged = dict(current) if current else {}
    merged.update({k: v for k, v in ids.items() if v and k in ID_FIELDS})
    _bound.set(merged)


def bind_request(request) -> None:
    """Bind the sandbox, session and task ids a request message names (if any)."""
    ids = {}
    for name in ("sandbox_id", "session_id", "task_id"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            ids[name] = value[:64]
    if ids:
        bind(**ids)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _bound.get() or {}
        for name in ID_FIELDS:
            value = getattr(record, name, None) or bound.get(name)
            if value:
                line[name] = str(value)
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, str):
                for shape, name in _ID_SHAPES:
                    if name not in line and shape.match(arg):
                        line[name] = arg
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str = "text", stream=None) -> logging.Handler:
    """The daemon's logging: INFO and up on stderr, as text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return handler
