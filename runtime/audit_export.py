"""Audit records for a SIEM: JSON lines and OCSF lines, a resumable cursor, and reading a copy back.

Both formats carry every record whole, hashes and checkpoint signatures included, so an
exported file verifies with nothing but the public key (`corral audit verify --file F
--pubkey K`: no daemon, no database):

* ``jsonl``: one canonical JSON object per record, the columns of corral.v1.AuditRecord by
  name, ``detail_json`` verbatim as stored and hashed (the format of `export_jsonl()`).
* ``ocsf``: one OCSF 1.1 *API Activity* event (class_uid 6003) per record, for SIEMs that
  map OCSF; the record itself, as in ``jsonl``, is kept under ``unmapped.corral_record``,
  which is what the verifier reads.

A cursor file holds the last seq written (text, one line); `export --cursor F` starts after
it and moves it on only once the output is flushed, so a run cut short is repeated, never
skipped (at-least-once; the seq is the dedup key).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from corral.sandbox.errors import InvalidSpec

from .audit_records import _COLUMNS, _canonical_json, jsonl_lines

NAMES = tuple(_COLUMNS.split(", "))
FORMATS = ("jsonl", "ocsf")
OCSF_VERSION = "1.1.0"
_OCSF_API_ACTIVITY = 6003
_OCSF_APPLICATION = 6


def row_to_dict(row: tuple) -> dict[str, Any]:
    return dict(zip(NAMES, row, strict=True))


def jsonl_line(row: tuple) -> str:
    return jsonl_lines((row,))


def _activity(kind: str) -> tuple[int, str]:
    verb = kind.rsplit(".", 1)[-1]
    if verb in ("create", "start", "submit", "open", "write", "upload", "put"):
        return 1, "Create"
    if verb in ("read", "query", "list", "download", "get", "inspect", "watch"):
        return 2, "Read"
    if verb in ("destroy", "delete", "remove", "reaped", "expired", "prune"):
        return 4, "Delete"
    if verb in ("update", "input", "interrupt", "reload", "resize", "signal"):
        return 3, "Update"
    return 99, "Other"


def ocsf_event(row: tuple) -> dict[str, Any]:
    """One record as an OCSF API Activity event (the record kept whole, for verification)."""
    rec = row_to_dict(row)
    activity_id, activity = _activity(rec["kind"])
    denied = rec["kind"].startswith("denied")
    event: dict[str, Any] = {
        "class_uid": _OCSF_API_ACTIVITY, "class_name": "API Activity",
        "category_uid": _OCSF_APPLICATION, "category_name": "Application Activity",
        "activity_id": activity_id, "activity_name": activity,
        "type_uid": _OCSF_API_ACTIVITY * 100 + activity_id,
        "time": int(rec["time"] * 1000),
        "severity_id": 3 if denied else 1, "severity": "Medium" if denied else "Informational",
        "status_id": 2 if denied else 1, "status": "Failure" if denied else "Success",
        "metadata": {"version": OCSF_VERSION, "uid": str(rec["seq"]),
                     "product": {"name": "Corral", "vendor_name": "Corral"},
                     "log_name": "audit", "event_code": rec["kind"]},
        "api": {"operation": rec["kind"]},
        "actor": {"user": {"name": rec["tenant"] or "daemon"}},
        "src_endpoint": {"name": rec["peer"]},
        "unmapped": {"corral_record": rec},
    }
    if rec["sandbox_id"]:
        event["resources"] = [{"uid": rec["sandbox_id"], "type": "sandbox"}]
    if rec["session_id"]:
        event["resources"] = event.get("resources", []) + [
            {"uid": rec["session_id"], "type": "session"}]
    return event


def format_rows(rows: Iterable[tuple], fmt: str) -> str:
    if fmt == "jsonl":
        return jsonl_lines(rows)
    return "".join(_canonical_json(ocsf_event(r)) + "\n" for r in rows)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidSpec("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


# -- cursor ---------------------------------------------------------------------------------


def read_cursor(path: str) -> int:
    """The last seq exported, from a cursor file (0 when it does not exist yet).

    Raises:
        InvalidSpec: the file holds something else than a seq.
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(64).strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec("cursor", f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.isdigit():
        raise InvalidSpec("cursor", f"{path} holds {text[:20]!r}, not the last exported seq; "
                                    "remove it to export from the start")
    return int(text)


def write_cursor(path: str, seq: int) -> None:
    """Replace the cursor atomically (a crash leaves the old or the new one)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{seq}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- reading a copy back ------------------------------------------------------------------------


def read_copy(lines: Iterable[str], source: str = "input") -> Iterator[tuple]:
    """Row tuples from exported lines, jsonl or ocsf (each line is either), in file order.

    Raises:
        InvalidSpec: a line that is neither, naming its line number.
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise InvalidSpec("file", f"{source} line {number}: not JSON") from None
        if isinstance(obj, dict) and "unmapped" in obj:
            obj = (obj.get("unmapped") or {}).get("corral_record")
        if not isinstance(obj, dict) or not all(n in obj for n in NAMES):
            raise InvalidSpec("file", f"{source} line {number}: not an exported audit record "
                                      f"(needs {', '.join(NAMES)})")
        yield tuple(obj[n] for n in NAMES)


def open_copy(path: str) -> IO[str]:
    try:
        return open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        raise InvalidSpec("file", f"{path}: {exc.strerror}") from None
