"""The hash chain check: feed records in seq order, get the first break, named as precisely
as the damage allows. `AuditLog.verify()` (across segment files), `verify_records()` (a
shipped copy) and runtime/signing.py's `verify_signed` all feed the one `_ChainChecker`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .audit_records import (
    _COLUMNS,
    GENESIS_HASH,
    PRUNE_KIND,
    AuditRecord,
    HeadAnchor,
    VerifyResult,
    record_hash,
)


class _ChainChecker:
    """Feeds rows in seq order; returns (broken_at_seq, problem) at the first break.

    Rows are tuples in `_COLUMNS` order. `locate(hash)` (optional) finds the seq of the record
    that carries a hash, which turns "does not link" into "records were reordered".
    """

    def __init__(
        self,
        next_seq: int = 1,
        prev_hash: str = GENESIS_HASH,
        locate: Callable[[str], int | None] | None = None,
    ):
        self.next_seq = next_seq
        self.prev_hash = prev_hash
        self.locate = locate
        self.checked = 0
        self.last_kind = ""
        self.prune: tuple[int, int, str] | None = None  # the latest audit.prune claim

    def feed(self, row: tuple) -> tuple[int, str] | None:
        seq, prev_hash, stored_hash = row[0], row[8], row[9]
        self.checked += 1
        expected = self.next_seq
        if not isinstance(seq, int) or isinstance(seq, bool):
            return expected, f"record {expected}: its seq is not an integer (damaged)"
        if seq != expected:
            if seq > expected:
                if seq - 1 == expected:
                    return seq, f"record {seq}: previous record {expected} is missing"
                return seq, f"record {seq}: previous records {expected}-{seq - 1} are missing"
            return seq, f"record {seq}: out of sequence after record {expected - 1}"
        try:
            content_ok = stored_hash == record_hash(
                prev_hash, seq=seq, time=row[1], tenant=row[2], peer=row[3], kind=row[4],
                sandbox_id=row[5], session_id=row[6], detail_json=row[7],
            )  # fmt: skip
        except (TypeError, ValueError):  # a column of the wrong type: tampered with
            content_ok = False
        # A hash that matches is a sha256 hex digest, and a prev_hash equal to the previous
        # one is too: look closer only when something fails (the check stays fast).
        if prev_hash != self.prev_hash:
            if not _is_hash(prev_hash):
                return seq, f"record {seq}: its prev_hash is not 64 hex digits (damaged)"
            found = self.locate(prev_hash) if self.locate else None
            if found is not None and found != seq:
                return seq, (
                    f"record {seq}: out of order: its prev_hash is the hash of record {found}, "
                    f"not of record {seq - 1}: records were reordered"
                )
            if not content_ok:
                return seq, _content_problem(row)
            if seq == 1:
                return seq, "record 1: prev_hash is not the genesis value"
            return seq, (
                f"record {seq}: prev_hash does not match the hash of record {seq - 1}: "
                f"record {seq - 1} was edited and re-hashed"
            )
        if not content_ok:
            return seq, _content_problem(row)
        detail = row[7]
        if not (detail.startswith("{") and detail.endswith("}")):
            # hashed as stored, so only a writer that re-hashed it gets here
            return seq, f"record {seq}: detail_json is not a JSON object"
        self.next_seq = seq + 1
        self.prev_hash = stored_hash
        self.last_kind = row[4]
        if row[4] == PRUNE_KIND:
            self.prune = _prune_claim(seq, detail)
        return None


_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and _HASH_RE.match(value) is not None


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _content_problem(row: tuple) -> str:
    """Why a record's hash fails, as precisely as the damage allows."""
    seq = row[0]
    if not _is_hash(row[9]):
        return f"record {seq}: its hash is not 64 hex digits (damaged)"
    for name, value in zip(_COLUMNS.split(", ")[1:8], row[1:8], strict=True):
        if name == "time":
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"record {seq}: its time is not a number (damaged)"
            continue
        if not isinstance(value, str):
            return f"record {seq}: its {name} is not text (damaged)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"record {seq}: its {name} is not valid UTF-8 (damaged bytes)"
    if not isinstance(_loads_or_none(row[7]), dict):
        return f"record {seq}: content does not match its hash (detail_json is not JSON)"
    return f"record {seq}: content does not match its hash"


def _prune_claim(seq: int, detail_json: str) -> tuple[int, int, str] | None:
    """(seq of the audit.prune record, up_to_seq, hash) it states, or None if malformed."""
    detail = _loads_or_none(detail_json)
    if isinstance(detail, dict):
        up_to, digest = detail.get("up_to_seq"), detail.get("hash")
        if isinstance(up_to, int) and not isinstance(up_to, bool) and _is_hash(digest):
            return seq, up_to, digest
    return None


def _head_problem(
    head: HeadAnchor | str, last_seq: int, hash_at_head: str | None
) -> tuple[int, str] | None:
    """Compare the chain's end with the anchor: (broken_at_seq, problem), or None if it holds.

    `head` is the anchor or the problem reading it; `hash_at_head` is the stored hash of
    record head.seq (None if there is no such record).
    """
    if isinstance(head, str):
        return 0, head
    if head.seq > last_seq:
        end = f"chain ends at record {last_seq}" if last_seq else "chain is empty"
        return last_seq + 1, (
            f"{end} but the head anchor says {head.seq}: records were removed from the end"
        )
    if head.seq > 0 and hash_at_head != head.hash:
        return head.seq, (
            f"record {head.seq}: hash does not match the head anchor: the chain was rewritten"
        )
    return None


def _prune_problem(first: tuple[int, str] | None, claim: tuple[int, int, str] | None,
                   seals: dict[int, str]) -> tuple[int, str] | None:
    """Records before the oldest one must be accounted for by the latest audit.prune record
    ("pruned up to seq N, hash H"), and what it names must be true."""
    if first is None:
        return None
    first_seq, first_prev = first
    if claim is None:
        if first_seq == 2:
            return 2, "record 2: previous record 1 is missing"
        if first_seq > 2:  # and no audit.prune record accounts for them
            return first_seq, f"record {first_seq}: previous records 1-{first_seq - 1} are missing"
        return None
    at, up_to, digest = claim
    if up_to < first_seq - 1:
        return up_to + 1, (f"records {up_to + 1}-{first_seq - 1} are missing: the log was "
                           f"pruned only up to record {up_to} (record {at})")
    expected = first_prev if up_to == first_seq - 1 else seals.get(up_to)
    if expected != digest:
        return at, (f"record {at}: {PRUNE_KIND} says record {up_to} had hash "
                    f"{digest[:16]}..., which does not match the chain")
    return None


def verify_records(records: Iterable[AuditRecord | Mapping[str, Any]]) -> VerifyResult:
    """Check a shipped copy of the chain (e.g. `export_jsonl()` lines, parsed) in seq order.

    Mappings are used as they are (their detail_json text is hashed verbatim). A copy that
    starts after record 1 is checked from its first record on, trusting that record's
    prev_hash; compare its last hash with the source's to pin the rest.
    """
    checker: _ChainChecker | None = None
    for rec in records:
        d = rec.to_dict() if isinstance(rec, AuditRecord) else rec
        row = tuple(d.get(c) for c in _COLUMNS.split(", "))
        if not isinstance(row[0], int) or isinstance(row[0], bool):
            checked = (checker.checked if checker else 0) + 1
            return VerifyResult(False, checked, 0, f"entry {checked}: has no integer seq")
        if checker is None:
            start = max(row[0], 1)
            checker = _ChainChecker(start, row[8] if start > 1 else GENESIS_HASH)
        problem = checker.feed(row)
        if problem:
            return VerifyResult(False, checker.checked, *problem)
    return VerifyResult(True, checker.checked if checker else 0)
