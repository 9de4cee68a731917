"""What one audit record is: its hashed format, its type, and the checks and bounds on what
goes into one. runtime/audit.py keeps them in a log; anything that reads a shipped copy
(runtime/audit_chain.py, the sinks, an off-host verifier) needs only this.

Record hash (the format; an off-host verifier must reproduce it byte for byte)
-------------------------------------------------------------------------------
``content`` is a JSON object with exactly the keys ``detail_json, kind, peer, sandbox_id, seq,
session_id, tenant, time``, encoded as:

* keys sorted by code point, no whitespace (separators ``,`` and ``:``), UTF-8, non-ASCII
  characters written as themselves (not ``\\u`` escapes);
* strings escaped as Python's ``json`` module does: ``\\" \\\\ \\n \\r \\t \\b \\f``, other
  characters below U+0020 as ``\\u00xx`` (lowercase hex), everything else (DEL, U+2028) raw;
* ``seq`` an integer; ``time`` (Unix seconds, a float) as the shortest decimal that reads back as
  the same double, in Python's ``repr`` form (``1712345678.25``, ``5.0``, ``1e+16``);
* ``detail_json`` is a string: the detail object itself in this same canonical encoding, so the
  stored text is hashed as is (no re-parsing, no normalisation ambiguity).

``hash = lowercase hex sha256(UTF-8(prev_hash + content))``, where ``prev_hash`` is the previous
record's hash, or 64 ``"0"`` (``GENESIS_HASH``) for record 1. `record_hash()` is the reference.

Bounded details
---------------
A record is never refused, and no action left unrecorded, for its size: a detail whose
canonical JSON exceeds MAX_DETAIL_BYTES is shrunk (`bound_detail`). Strings, lists and objects
over a level's limits become markers ``{"corral.truncated": "string"|"list"|"nesting", ...}``
(a kept ``head`` / first items, the original ``chars`` / ``items`` / ``keys`` count and the
``sha256`` of the full value), tighter levels are tried in turn, and the last resort is
``{"corral.truncated": "detail", "bytes", "sha256", "keys", "key_count"}``. The stored text is
what is hashed, as for any record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import json.encoder
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.sandbox.errors import InvalidSpec

#: prev_hash of record 1.
GENESIS_HASH = "0" * 64

_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_MAX_KIND_CHARS = 128
_MAX_TEXT_CHARS = 1024
#: The canonical detail JSON of one record never exceeds this (bytes of UTF-8): a larger
#: detail is shrunk to fit (see `bound_detail`), never refused.
MAX_DETAIL_BYTES = 64 * 1024
#: Kinds the log writes itself: the last record of a sealed segment, and the record that
#: accounts for removed segments ("pruned up to seq N, hash H").
SEAL_KIND = "audit.seal"
PRUNE_KIND = "audit.prune"
#: The key (or marker value) that says a part of a detail was shortened.
TRUNCATED = "corral.truncated"
#: The detail key naming the digest of the tenant policy in force when a record was written
#: (set by the daemon through `AuditLog.policy_digest`; runtime/policy_files.py).
POLICY_KEY = "corral.policy"
# (longest string kept, most list items / dict keys kept, deepest nesting kept), tried in
# order until the detail fits; past the last one the detail becomes a summary of itself.
_SHRINK_LEVELS = ((4096, 256, 8), (512, 32, 6), (64, 8, 4))
#: A record's columns, in the order of every row this package reads or writes.
_COLUMNS = "seq, time, tenant, peer, kind, sandbox_id, session_id, detail_json, prev_hash, hash"


# -- records -----------------------------------------------------------------------------------


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(
    prev_hash: str,
    *,
    seq: int,
    time: float,
    tenant: str,
    peer: str,
    kind: str,
    sandbox_id: str,
    session_id: str,
    detail_json: str,
) -> str:
    """The reference implementation of a record's hash (format in the module docstring)."""
    content = _canonical_json(
        {
            "detail_json": detail_json,
            "kind": kind,
            "peer": peer,
            "sandbox_id": sandbox_id,
            "seq": seq,
            "session_id": session_id,
            "tenant": tenant,
            "time": float(time),
        }
    )
    # surrogateescape: text read back from a tampered database may hold undecodable bytes;
    # they hash as those bytes (and so mismatch) instead of crashing the check.
    return hashlib.sha256((prev_hash + content).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record, mirroring corral.v1.AuditRecord; `detail` is the parsed detail_json."""

    seq: int
    time: float  # Unix seconds
    tenant: str
    peer: str
    kind: str
    sandbox_id: str
    session_id: str
    detail: dict[str, Any]  # treat as read-only: detail_json is derived from it
    prev_hash: str
    hash: str

    @property
    def detail_json(self) -> str:
        """The detail in canonical JSON, exactly as stored and hashed."""
        return _canonical_json(self.detail)

    def to_dict(self) -> dict[str, Any]:
        """The proto's fields by name (detail as detail_json), e.g. for AuditRecord(**d)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "tenant": self.tenant,
            "peer": self.peer,
            "kind": self.kind,
            "sandbox_id": self.sandbox_id,
            "session_id": self.session_id,
            "detail_json": self.detail_json,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditRecord:
        """The inverse of `to_dict()` (e.g. one line of `export_jsonl()` output)."""
        return cls(
            seq=int(d["seq"]),
            time=float(d["time"]),
            tenant=d["tenant"],
            peer=d["peer"],
            kind=d["kind"],
            sandbox_id=d["sandbox_id"],
            session_id=d["session_id"],
            detail=_parse_detail(d["detail_json"]),
            prev_hash=d["prev_hash"],
            hash=d["hash"],
        )

    @classmethod
    def _from_row(cls, row: tuple) -> AuditRecord:
        seq, t, tenant, peer, kind, sandbox_id, session_id, detail_json, prev_hash, h = row
        return cls(
            seq, t, tenant, peer, kind, sandbox_id, session_id,
            _parse_detail(detail_json), prev_hash, h,
        )  # fmt: skip


def _parse_detail(detail_json: str) -> dict[str, Any]:
    try:
        detail = json.loads(detail_json)
    except (TypeError, ValueError):
        detail = None
    if not isinstance(detail, dict):
        # Only a tampered database gets here; show the text rather than fail the query.
        return {"corral.unparsable_detail_json": str(detail_json)}
    return detail


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a chain check, mirroring corral.v1.AuditVerifyResponse."""

    ok: bool
    checked: int  # records examined
    broken_at_seq: int = 0  # when not ok: the first record that breaks the chain (0: none)
    problem: str = ""
    # sealed segments checked (the active one not counted)
    segments: int = dataclasses.field(default=0, compare=False)
    # the oldest record there is (> 1 after pruning; 0: empty log)
    first_seq: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class HeadAnchor:
    """What `<path>.head` says the head of the chain is."""

    seq: int
    hash: str


# -- input checks ------------------------------------------------------------------------------


def _check_kind(kind: object, field: str = "kind") -> str:
    if not isinstance(kind, str):
        raise InvalidSpec(field, f"must be a string, got {type(kind).__name__}")
    if not kind:
        raise InvalidSpec(field, "is empty; use a dotted name such as 'exec.start'")
    if len(kind) > _MAX_KIND_CHARS or not _KIND_RE.match(kind):
        raise InvalidSpec(
            field,
            f"{kind[:_MAX_KIND_CHARS]!r} is not a kind: use at most {_MAX_KIND_CHARS} of "
            "a-z 0-9 _ . -, starting with a letter, such as 'exec.start'",
        )
    return kind


def _check_text(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidSpec(field, f"must be a string, got {type(value).__name__}")
    if len(value) > _MAX_TEXT_CHARS:
        raise InvalidSpec(field, f"is {len(value)} characters; the limit is {_MAX_TEXT_CHARS}")
    if "\x00" in value:
        raise InvalidSpec(field, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSpec(field, "is not valid Unicode (a lone surrogate)") from None
    return value


def _check_seconds(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpec(field, f"must be Unix seconds (a number), got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidSpec(field, f"{value!r} is not a time; use Unix seconds >= 0")
    return seconds


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _shrink(value: Any, chars: int, items: int, depth: int,
            digests: dict[int, str] | None = None) -> Any:
    """value with long strings, long lists, wide dicts and deep nesting replaced by markers
    that keep a head, the original size and the sha256 of what was cut. `digests` keeps
    each container's sha256 by id across the levels of one `bound_detail` (encoding a
    large value again at every level is what made big records slow)."""
    digests = {} if digests is None else digests

    def digest(v: Any) -> str:
        key = id(v)
        if key not in digests:
            digests[key] = _sha256(_canonical_json(v))
        return digests[key]

    if isinstance(value, str):
        if len(value) <= chars:
            return value
        return {TRUNCATED: "string", "head": value[:chars], "chars": len(value),
                "sha256": _sha256(value)}
    if isinstance(value, list | tuple | dict) and depth <= 0:
        return {TRUNCATED: "nesting", "sha256": digest(value)}
    if isinstance(value, list | tuple):
        out = [_shrink(v, chars, items, depth - 1, digests) for v in value[:items]]
        if len(value) > items:
            out.append({TRUNCATED: "list", "items": len(value), "sha256": digest(value)})
        return out
    if isinstance(value, dict):
        keys = sorted(value)
        out = {}
        for key in keys[:items]:
            out[key[:chars]] = _shrink(value[key], chars, items, depth - 1, digests)
        if len(keys) > items or any(len(k) > chars for k in keys[:items]):
            out[TRUNCATED] = {"keys": len(keys), "sha256": digest(value)}
        return out
    return value


def _over_json_bytes(value: Any, limit: int) -> bool:
    """Whether value's JSON is surely over limit bytes: its strings (with their quotes)
    alone pass it. A cheap walk that lets `bound_detail` skip encoding a level whose result
    cannot fit."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, dict):
            for k, item in v.items():
                total += len(k) + 3 if isinstance(k, str) else 3
                stack.append(item)
        elif isinstance(v, list | tuple):
            total += len(v) + 1
            stack.extend(v)
        else:
            total += 1
        if total > limit:
            return True
    return False


def bound_detail(detail: dict[str, Any], text: str | None = None,
                 size: int | None = None) -> str:
    """The canonical JSON of detail, shrunk to at most MAX_DETAIL_BYTES.

    `text` is detail's canonical JSON and `size` its UTF-8 length, when the caller has them
    (a detail surely too large is not encoded whole: its parts are, for their digests).
    Tenant input (argv, paths, labels, task ids...) reaches details, and an action must
    never go unrecorded, or be refused, because its record is large: long strings keep
    their head, long lists their first items, each with a ``corral.truncated`` marker
    holding the original length and the sha256 of the full value, so the record still pins
    exactly what was asked.
    """
    if text is not None and size is not None and size <= MAX_DETAIL_BYTES:
        return text
    digests: dict[int, str] = {}
    for chars, items, depth in _SHRINK_LEVELS:
        candidate = _shrink(detail, chars, items, depth, digests)
        if _over_json_bytes(candidate, MAX_DETAIL_BYTES):
            continue  # cannot fit: not worth encoding
        shrunk = _canonical_json(candidate)
        if len(shrunk.encode("utf-8")) <= MAX_DETAIL_BYTES:
            return shrunk
    if text is None:
        text = _canonical_json(detail)
    keys = sorted(detail)
    return _canonical_json({TRUNCATED: "detail", "bytes": len(text.encode("utf-8")),
                            "sha256": _sha256(text),
                            "keys": [k[:64] for k in keys[:16]], "key_count": len(keys)})


def _encode_detail(detail: object) -> tuple[str, dict[str, Any]]:
    """(canonical detail_json, the detail as a reader will get it back), at most
    MAX_DETAIL_BYTES (a larger detail is shrunk, see `bound_detail`)."""
    if detail is None:
        return "{}", {}
    if not isinstance(detail, dict):
        raise InvalidSpec("detail", f"must be a dict, got {type(detail).__name__}")
    try:
        if _over_json_bytes(detail, MAX_DETAIL_BYTES):  # no need to encode it all first
            text = bound_detail(detail)
        else:
            text = _canonical_json(detail)
            size = len(text.encode("utf-8"))
            if size > MAX_DETAIL_BYTES:
                text = bound_detail(detail, text, size)
    except (TypeError, ValueError) as exc:  # unserialisable, NaN, circular, mixed key types
        if isinstance(exc, UnicodeEncodeError):
            raise InvalidSpec("detail", "is not valid Unicode (a lone surrogate)") from None
        raise InvalidSpec("detail", f"is not JSON-serializable: {exc}") from None
    # Tuples become lists, int keys become strings: hand back what a query will return.
    return text, json.loads(text)


def _bound_text(field: str, value: object) -> str:
    """A record's text column from (possibly tenant-given) text: checked, and cut to
    _MAX_TEXT_CHARS with its sha256 rather than refused, so the record is always written."""
    if isinstance(value, str) and len(value) > _MAX_TEXT_CHARS:
        digest = _sha256(value)[:32]
        value = f"{value[:_MAX_TEXT_CHARS - 128]}…[{TRUNCATED} {len(value)} chars sha256:{digest}]"
    return _check_text(field, value)


def _check_count(field: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(field, f"must be an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise InvalidSpec(field, f"{value} must be {bounds}")
    return value


_EXPORT_NAMES = _COLUMNS.split(", ")
_escape = json.encoder.encode_basestring  # C-accelerated: exactly what json.dumps writes


def jsonl_lines(rows: Iterable[tuple]) -> str:
    """Rows as export lines: each the canonical JSON object of its columns by name, and a
    newline. Built field by field (about twice json.dumps' speed) and byte-identical to
    `_canonical_json(dict(zip(names, row)))`, which a row of unexpected types (only a
    tampered file has them) goes through instead."""
    out = []
    for r in rows:
        seq, t, tenant, peer, kind, sandbox_id, session_id, detail, prev_hash, digest = r
        if (type(seq) is int and type(t) is float and math.isfinite(t)
                and type(tenant) is type(peer) is type(kind) is type(sandbox_id) is str
                and type(session_id) is type(detail) is type(prev_hash) is type(digest) is str):
            try:
                out.append(
                    f'{{"detail_json":{_escape(detail)},"hash":{_escape(digest)},'
                    f'"kind":{_escape(kind)},"peer":{_escape(peer)},'
                    f'"prev_hash":{_escape(prev_hash)},"sandbox_id":{_escape(sandbox_id)},'
                    f'"seq":{seq},"session_id":{_escape(session_id)},'
                    f'"tenant":{_escape(tenant)},"time":{t!r}}}\n')
                continue
            except UnicodeError:
                pass
        out.append(_canonical_json(dict(zip(_EXPORT_NAMES, r, strict=True))) + "\n")
    return "".join(out)
