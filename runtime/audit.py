"""The daemon's audit log: append-only, hash-chained records in SQLite, with a head anchor.

Every action the daemon takes is appended here before its result is returned. Each record holds
the hash of the one before it, so `verify()` can recompute the chain from the genesis and name
the first record that was edited, removed or reordered; a sidecar *head anchor* catches records
removed from the end, which a hash chain alone cannot see.

What a record is, how its hash is computed and how a detail is bounded: runtime/audit_records.py.
The chain check shared by `verify()`, `verify_records()` and the signed check:
runtime/audit_chain.py. Rate-limited denial records: runtime/audit_denials.py.

Head anchor (``<path>.head``)
-----------------------------
Deleting the last N records leaves a valid chain, so after each append the head's
``(seq, hash)`` is also written to a sidecar file: 256 bytes, two fixed-width text lines
``corral-audit-head 1 seq=<20 digits> hash=<64 hex> crc=<8 hex>``. Record N goes into line
N % 2 with one ``pwrite``, so a torn write (crash mid-write) spoils only that line; its CRC-32
fails and the other line, one record older, is used. `verify()` requires the chain to reach the
anchored seq and the record there to carry the anchored hash ("chain ends at record 41 but the
head anchor says 44: records were removed from the end"); a chain re-hashed end to end is caught
the same way, because its head hash changes.

The anchor is a lower bound, never ahead of the database: the record is committed (and, with
synchronous=FULL, fsynced) before the anchor is written. After a crash the anchor may lag the
chain by a record; `open()` checks the records past the anchor link up and moves the anchor on.
If `open()` finds the anchor ahead of the chain, disagreeing with it, unreadable or missing
while the log holds records, it refuses with `AuditTampered` rather than overwrite the evidence;
`open(path, readonly=True)` still lets `verify()` and `query()` inspect such a log. The anchor is
not fsynced per append: a lost write after power loss only makes it lag, which is safe. A
write-mode open holds ``flock`` on the anchor, so one process writes a log at a time.

Threat model, honestly
----------------------
* Edits, deletions and reorderings by anyone who can write the database file but not the
  anchor (a restored or hand-edited copy, a tool with database access, a bug in our own code —
  SQLite triggers also refuse UPDATE and DELETE on the records table): detected, and the first
  broken record is named.
* Records appended after the real head by such an attacker are NOT detected: the chain has no
  secret, anyone can compute a valid next record. The anchor only rules out removal and rewrite.
* Root on the host, or write access to both files, can rewrite everything, anchor included, into
  a consistent forgery. The defence is to ship records off the host as they are written
  (`export_jsonl()`, or the Watch RPC into a remote store); `verify_records()` checks a shipped
  copy, and the off-host copy's last hash pins everything before it.

Durability: synchronous=FULL, measured
--------------------------------------
A record must be on disk before the action's result is returned. In WAL mode synchronous=NORMAL
fsyncs only at checkpoints, so a power loss can drop the last committed records, and with them
records of actions already reported done; it could also leave the anchor ahead of the database.
FULL fsyncs the WAL at every commit. Measured with ``bench/audit.py`` (4,000 appends, ext4 on
a virtio disk of the project's dev VM, SQLite 3.40, Python 3.11; one append = validate, hash,
INSERT with 5 indexes, commit, anchor write; four runs, ranges):

=============  ============  ============  ===============  ===========================
synchronous    p50 append    p99 append    appends/s        4 threads: appends/s (p50)
=============  ============  ============  ===============  ===========================
FULL (chosen)  225-250 us    470-540 us    3,700-4,100      3,200-3,600 (0.6-1.1 ms)
NORMAL         48-72 us      0.3-2.6 ms    7,600-12,700     7,400-10,600 (59-83 us)
=============  ============  ============  ===============  ===========================

FULL costs one fsync (~0.2 ms here) per append; NORMAL's p99 is its checkpoint fsyncs. The
daemon appends per exec, input, interrupt, file op and denial, not per token. `append` waits for
the disk, so call it off the event loop; the daemon's loop uses `submit` instead, which queues
the record for one committer thread and returns a future (`await record(...)` is submit and
wait: the action goes on once its record is durable, and the loop serves every other
session meanwhile). That is group commit: everything
queued while a commit runs goes into the next transaction with a single fsync, so under load
the log costs one fsync per group, not per record (`append` takes what was queued before it
into its own transaction, keeping call order). Records nobody waits on (steering input,
interrupt, egress attempts) go through `submit_background`: while only such records are
queued the commit thread lets more join for up to 2 ms, so a loaded daemon writes them in
groups (bench/audit_commit.py: 8 a group instead of 1.1 at one record each 0.2 ms, about half
the CPU a record). A record anybody waits on ends the wait at once, and no caller is told a
record is durable before its commit. On the writer's path a record's hash and a flat detail's
JSON are built without json.dumps (`_chained_hash`, `_encode_flat_detail`): the same bytes as
`record_hash` and `_encode_detail`, which tests compare, at about 40% of the CPU.
`verify()` checks ~110,000 records/s,
`export_jsonl()` writes ~100,000/s, and a query by sandbox takes ~0.6 ms on a 100,000-record log.

Segments, seals and pruning
---------------------------
The log may rotate (``segment_records`` / ``segment_bytes``): the active segment ``<path>``
gets a last record of kind ``audit.seal`` and moves, read-only and out of WAL mode, to
``<path>.segments/<first seq:020d>-<last seq:020d>.db``; the next record, in a fresh ``<path>``,
has the seal's hash as its prev_hash. There is one chain across all files: `verify()` feeds
the segments in order, then the active one, to one checker, and also requires each sealed file
to start and end where its name says and to end with its seal. Pruning (``retention_s``)
removes the oldest sealed segments only after committing an ``audit.prune`` record whose
detail states ``up_to_seq`` N and ``hash`` H (the last removed record and its hash);
`verify()` then starts at the oldest record left and requires the latest ``audit.prune`` to
account exactly for the gap (oldest record N+1, prev_hash H). ``<path>.lock`` is flocked
shared by verify and export and exclusively (without waiting) by rotation and pruning.

Signed checkpoints, the policy digest, export
---------------------------------------------
Records of kind ``audit.checkpoint`` carry an Ed25519 signature over an earlier record's
``(seq, hash)`` and the signing time (runtime/signing.py has the exact message); they are
ordinary records, hashed and chained like any other, so a signature over record N's hash
pins records 1..N and ships with every export. This closes what the anchor cannot: a chain
re-hashed end to end, anchor rewritten, no longer matches what was signed, and
``corral audit verify --pubkey`` names the first record past the last valid signature. When
the daemon sets `policy_digest`, every record's detail carries it under ``corral.policy``
(merged in before the detail is bounded, put back if shrinking dropped it): the digest of the
tenant policy in force (runtime/policy_files.py). `row_batches()` streams the raw rows of
every segment; `jsonl_lines()` writes them as export lines, byte-identical to the canonical
JSON of the columns by name.

Threads
-------
One writer connection and one reader connection, each behind a lock; SQLite's statement cache
keeps the INSERT prepared. `verify()` and `export_jsonl()` use a short-lived connection of their
own, so a long check never stalls appends or queries (WAL readers see a stable snapshot).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import json.encoder
import logging
import math
import os
import re
import sqlite3
import threading
import time as _time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn, Required, TypedDict, Unpack

from corral.sandbox.errors import AuditError, AuditTampered, InvalidSpec
from corral.sandbox.fstree import fsync_dir as _fsync_dir

from .audit_chain import _ChainChecker, _head_problem, _is_hash, _prune_problem, verify_records
from .audit_denials import DENIAL_BURST, DENIAL_WINDOW_S, DenialLimiter
from .audit_records import (
    _COLUMNS,
    GENESIS_HASH,
    MAX_DETAIL_BYTES,
    POLICY_KEY,
    PRUNE_KIND,
    SEAL_KIND,
    TRUNCATED,
    AuditRecord,
    HeadAnchor,
    VerifyResult,
    _bound_text,
    _canonical_json,
    _check_count,
    _check_kind,
    _check_seconds,
    _check_text,
    _encode_detail,
    bound_detail,
    jsonl_lines,
    record_hash,
)
from .metrics import NO_METRICS
from .terminal import visible

__all__ = [
    "DENIAL_BURST",
    "DENIAL_WINDOW_S",
    "GENESIS_HASH",
    "HEAD_SUFFIX",
    "AuditLog",
    "AuditRecord",
    "AuditStatistics",
    "DenialLimiter",
    "HeadAnchor",
    "Segment",
    "MAX_DETAIL_BYTES",
    "POLICY_KEY",
    "PRUNE_KIND",
    "RecordFields",
    "SEAL_KIND",
    "TRUNCATED",
    "VerifyResult",
    "bound_detail",
    "format_record",
    "jsonl_lines",
    "list_segments",
    "record_hash",
    "verify_records",
]

_log = logging.getLogger("corral.audit")

#: The head anchor lives next to the database, at ``<path>.head``.
HEAD_SUFFIX = ".head"

# SQLite header fields that mark a file as ours (PRAGMA application_id / user_version).
_APPLICATION_ID = 0x43524C41  # "CRLA"
_FORMAT_VERSION = 1
# Per-connection; bench/audit.py overrides it to measure NORMAL. Nothing else may.
_SYNCHRONOUS = "FULL"

#: `submit_background`: how long queued background records wait for company, and how many
#: make a group worth writing at once. 2 ms is under one fsync under load here and far under
#: the 5 ms interrupt target; the records' actions have already happened.
BACKGROUND_COALESCE_S = 0.002
BACKGROUND_GROUP = 256

#: A due rotation that could not run (a verify or export holds the files, or sealing failed)
#: is retried by the first commit this long after, doubling while it fails, up to the max.
ROTATE_RETRY_S = 1.0
ROTATE_RETRY_MAX_S = 60.0

#: `query()` returns at most this many records per call; page on with after_seq.
MAX_QUERY_LIMIT = 10_000

_SCHEMA = (
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY,      -- position in the chain, from 1
        time REAL NOT NULL,           -- Unix seconds
        tenant TEXT NOT NULL,
        peer TEXT NOT NULL,
        kind TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        detail_json TEXT NOT NULL,    -- canonical JSON object, hashed as stored
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    # Each index is (column, rowid), so an equality filter also yields seq order.
    "CREATE INDEX records_by_time ON records(time)",
    "CREATE INDEX records_by_tenant ON records(tenant)",
    "CREATE INDEX records_by_kind ON records(kind)",
    "CREATE INDEX records_by_sandbox ON records(sandbox_id)",
    "CREATE INDEX records_by_session ON records(session_id)",
    # Defence in depth against our own bugs and casual edits; an attacker can drop them.
    """CREATE TRIGGER records_no_update BEFORE UPDATE ON records
       BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
    """CREATE TRIGGER records_no_delete BEFORE DELETE ON records
       BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END""",
)
_INSERT = f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"

# Head anchor: two 128-byte lines; see the module docstring.
_HEAD_LINE = "corral-audit-head 1 seq={seq:020d} hash={hash}"
_HEAD_LINE_RE = re.compile(
    rb"^corral-audit-head 1 seq=(\d{20}) hash=([0-9a-f]{64}) crc=([0-9a-f]{8})\n$"
)
_HEAD_SLOT_BYTES = 128


@dataclass(frozen=True, slots=True)
class AuditStatistics:
    last_seq: int
    appends: int  # by this AuditLog object since it was opened
    subscribers: int
    callback_errors: int  # subscriber callbacks that raised (logged, then ignored)
    head_write_errors: int  # anchor writes that failed after the record was committed
    commits: int  # transactions (fsyncs) that wrote them: appends / commits = group size


# -- head anchor file --------------------------------------------------------------------------


def _head_slot(seq: int, digest: str) -> bytes:
    line = _HEAD_LINE.format(seq=seq, hash=digest).encode("ascii")
    line += b" crc=%08x\n" % zlib.crc32(line)
    assert len(line) == _HEAD_SLOT_BYTES
    return line


def _parse_head(data: bytes) -> HeadAnchor | None:
    """The newer of the two valid slots, or None if neither is valid."""
    best: HeadAnchor | None = None
    for i in range(2):
        slot = data[i * _HEAD_SLOT_BYTES : (i + 1) * _HEAD_SLOT_BYTES]
        m = _HEAD_LINE_RE.match(slot)
        if not m or zlib.crc32(slot[: -len(b" crc=00000000\n")]) != int(m.group(3), 16):
            continue  # torn or edited: the other slot holds the previous head
        anchor = HeadAnchor(int(m.group(1)), m.group(2).decode("ascii"))
        if best is None or anchor.seq > best.seq:
            best = anchor
    return best


def _read_head(head_path: str) -> HeadAnchor | str:
    """The anchor at head_path, or the problem that prevents reading it."""
    try:
        fd = os.open(head_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return (
            f"head anchor missing: {head_path} does not exist, so records removed from the "
            "end cannot be detected"
        )
    except OSError as exc:
        return f"head anchor unreadable: {head_path}: {exc.strerror}"
    try:
        data = os.pread(fd, 2 * _HEAD_SLOT_BYTES, 0)
    finally:
        os.close(fd)
    anchor = _parse_head(data)
    if anchor is None:
        return f"head anchor unreadable: {head_path} holds no valid (seq, hash) line"
    return anchor


# -- the log -----------------------------------------------------------------------------------


def _decode_text(raw: bytes) -> str:
    # Tampered text may not be UTF-8; keep the bytes (as surrogates) so checks can report it.
    return raw.decode("utf-8", "surrogateescape")


def _batches_after(conn: sqlite3.Connection, after_seq: int,
                   batch: int) -> Iterable[list[tuple]]:
    """Rows with seq > after_seq in batches, text decoded by SQLite's own (C) decoder; a
    row that is not UTF-8 (a tampered file) makes the rest go through _decode_text, from the
    last row already given, in the same snapshot."""
    conn.text_factory = str
    last = after_seq
    while True:
        try:
            cursor = conn.execute(f"SELECT {_COLUMNS} FROM records WHERE seq > ? ORDER BY seq",
                                  (last,))
            while rows := cursor.fetchmany(batch):
                yield rows
                last = rows[-1][0]
            return
        except sqlite3.OperationalError as exc:
            if conn.text_factory is _decode_text or "decode" not in str(exc):
                raise
            conn.text_factory = _decode_text


def _connect(path: str, *, readonly: bool) -> sqlite3.Connection:
    uri = Path(path).absolute().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, cached_statements=32
        )
    except sqlite3.Error as exc:
        raise AuditError(path, f"cannot open: {exc}") from None
    conn.text_factory = _decode_text
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _check_format(conn: sqlite3.Connection, path: str, *, create: bool) -> None:
    """Make sure the database is a Corral audit log (creating the schema if empty and allowed)."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise AuditError(path, f"is not a Corral audit log ({exc})") from None
    if app_id == _APPLICATION_ID:
        if version != _FORMAT_VERSION:
            raise AuditError(
                path,
                f"has audit format version {version}; this Corral reads version {_FORMAT_VERSION}",
            )
        return
    if app_id != 0 or objects:
        raise AuditError(path, "is not a Corral audit log (a SQLite database of something else)")
    if not create:
        raise AuditError(path, "is not a Corral audit log (an empty database)")
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent; must precede the transaction
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != _APPLICATION_ID:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_FORMAT_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise AuditError(path, f"cannot create the audit schema: {exc}") from None


# -- segments ----------------------------------------------------------------------------------

#: Sealed segments live in ``<path>.segments/``, one SQLite file each, named by the records
#: they hold: ``<first seq, 20 digits>-<last seq, 20 digits>.db``.
SEGMENTS_SUFFIX = ".segments"
#: Rotation and pruning take this flock exclusively (without waiting); verify and export
#: share it, so the set of files does not change under a check.
FILES_LOCK_SUFFIX = ".lock"
_SEGMENT_NAME_RE = re.compile(r"^(\d{20})-(\d{20})\.db$")
# What a row costs beyond its text: two hashes, seq, time, SQLite's row and index overhead.
_ROW_OVERHEAD_BYTES = 200


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed segment file; first_seq and last_seq as its name states them."""

    first_seq: int
    last_seq: int
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _segment_name(first_seq: int, last_seq: int) -> str:
    return f"{first_seq:020d}-{last_seq:020d}.db"


def list_segments(path: str) -> list[Segment]:
    """The sealed segments of the log at path, oldest first (by name)."""
    folder = path + SEGMENTS_SUFFIX
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        m = _SEGMENT_NAME_RE.match(name)
        if m:
            out.append(Segment(int(m.group(1)), int(m.group(2)), os.path.join(folder, name)))
    out.sort(key=lambda seg: (seg.first_seq, seg.last_seq))
    return out


def _connect_sealed(path: str) -> sqlite3.Connection:
    """A read-only connection to a sealed segment (immutable: no locks, no side files)."""
    uri = Path(path).absolute().as_uri() + "?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise AuditError(path, f"cannot open the sealed segment: {exc}") from None
    conn.text_factory = _decode_text
    return conn


def _segment_end(segment: Segment) -> tuple[int, str]:
    """(seq, hash) of a sealed segment's last record."""
    conn = _connect_sealed(segment.path)
    try:
        row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise AuditError(segment.path, f"cannot read the sealed segment: {exc}") from None
    finally:
        conn.close()
    if row is None:
        raise AuditError(segment.path, "is a sealed segment with no records")
    return row[0], row[1]


def _files_lock(path: str, *, exclusive: bool) -> int | None:
    """flock on ``<path>.lock``: exclusive never waits (None: someone reads; try later),
    shared waits for a rotation to finish (None only for a copy we cannot lock)."""
    lock_path = path + FILES_LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            if exclusive:
                return None
            return -1  # a read-only copy nobody rotates
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)


def _open_writer(path: str) -> sqlite3.Connection:
    """The writer connection of the active segment at path (created, with schema, if new)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise AuditError(path, f"cannot open: {exc.strerror}") from None
    writer = _connect(path, readonly=False)
    try:
        _check_format(writer, path, create=True)
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")
    except BaseException:
        writer.close()
        raise
    return writer


def _finish_rotation(path: str, writer: sqlite3.Connection) -> sqlite3.Connection:
    """A rotation interrupted after its seal was committed: move the sealed file into the
    segments folder now. Returns the writer of the (new) active segment."""
    row = writer.execute(
        "SELECT seq, kind FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None or row[1] != SEAL_KIND:
        return writer
    first = writer.execute("SELECT min(seq) FROM records").fetchone()[0]
    writer.close()
    folder = path + SEGMENTS_SUFFIX
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(path, 0o400)
    os.rename(path, os.path.join(folder, _segment_name(first, row[0])))
    _fsync_dir(folder)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _log.info("audit segment %d-%d sealed before the last stop: moved into %s",
              first, row[0], folder)
    return _open_writer(path)


def _check_continues(path: str, writer: sqlite3.Connection,
                     sealed_end: tuple[int, str]) -> None:
    """The active segment's first record must follow the last seal."""
    row = writer.execute(
        "SELECT seq, prev_hash FROM records ORDER BY seq LIMIT 1").fetchone()
    if row is None:
        return
    if row[0] != sealed_end[0] + 1:
        raise AuditTampered(path, row[0], f"record {row[0]}: the active segment does not "
                                          f"follow the last sealed one (it ends at record "
                                          f"{sealed_end[0]})")
    if row[1] != sealed_end[1]:
        raise AuditTampered(path, row[0], f"record {row[0]}: prev_hash is not the hash of "
                                          f"the seal of the last sealed segment")


def _hash_at(path: str, writer: sqlite3.Connection, seq: int) -> str | None:
    row = writer.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
    if row is not None:
        return row[0]
    for segment in list_segments(path):
        if segment.first_seq <= seq <= segment.last_seq:
            conn = _connect_sealed(segment.path)
            try:
                row = conn.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
            finally:
                conn.close()
            return row[0] if row else None
    return None


def _rows_after(path: str, writer: sqlite3.Connection, after_seq: int) -> Iterable[tuple]:
    sql = f"SELECT {_COLUMNS} FROM records WHERE seq > ? ORDER BY seq"
    for segment in list_segments(path):
        if segment.last_seq > after_seq:
            conn = _connect_sealed(segment.path)
            try:
                yield from conn.execute(sql, (after_seq,)).fetchall()
            finally:
                conn.close()
    yield from writer.execute(sql, (after_seq,))


# -- records on their way in -------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """A validated record waiting for its seq, hash and commit."""

    kind: str
    tenant: str
    peer: str
    sandbox_id: str
    session_id: str
    detail_json: str
    detail_obj: dict[str, Any]
    time: float | None
    future: concurrent.futures.Future


class RecordFields(TypedDict, total=False):
    """Who did what to which object: the keyword arguments of `AuditLog.append` and `submit`.

    tenant, peer: who (tenant is required). sandbox_id, session_id: on what ("" when not
    applicable). detail: a JSON object of particulars (argv, sizes, reason...). time: Unix
    seconds; default now (read at commit, so it follows seq order unless the clock steps
    back).
    """

    tenant: Required[str]
    peer: str
    sandbox_id: str
    session_id: str
    detail: dict[str, Any] | None
    time: float | None


# json.dumps with these arguments builds this encoder on every call; one kept here encodes
# the same text (audit_records._canonical_json) without that cost per record.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
_json_text = json.encoder.encode_basestring  # a JSON string literal, as _CANONICAL writes it
_FLAT_TYPES = frozenset({str, int, bool, type(None)})


def _encode_flat_detail(detail: object) -> tuple[str, dict[str, Any]] | None:
    """`_encode_detail` for the daemon's common detail, a small dict of text keys and plain
    str/int/bool/None values: the same canonical text, and a shallow copy, which is what
    decoding that text would give back. None for anything else (too large, nested, another
    type, a lone surrogate), which the general path encodes, bounds or refuses."""
    if type(detail) is not dict or len(detail) > 32:
        return None
    for key, value in detail.items():
        if type(key) is not str or type(value) not in _FLAT_TYPES:
            return None
    text = _CANONICAL.encode(detail)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: the general path names it
        return None
    return (text, dict(detail)) if size <= MAX_DETAIL_BYTES else None


def _chained_hash(prev_hash: str, seq: int, time: float, it: _Pending) -> str:
    """`record_hash` of it at seq, written out for the writer's hot path: the canonical JSON of
    the eight fields, keys in sorted order, built directly instead of through a dict and
    json.dumps. Same bytes, so the same hash; tests compare the two on hostile text."""
    content = (
        f'{{"detail_json":{_json_text(it.detail_json)},"kind":{_json_text(it.kind)},'
        f'"peer":{_json_text(it.peer)},"sandbox_id":{_json_text(it.sandbox_id)},"seq":{seq:d},'
        f'"session_id":{_json_text(it.session_id)},"tenant":{_json_text(it.tenant)},'
        f'"time":{float.__repr__(time)}}}'
    )
    return hashlib.sha256((prev_hash + content).encode("utf-8", "surrogateescape")).hexdigest()


def _prepare(kind: str, policy: str, *, tenant: str, peer: str = "", sandbox_id: str = "",
             session_id: str = "", detail: dict[str, Any] | None = None,
             time: float | None = None) -> _Pending:
    """Validate and encode one record (the policy digest merged into its detail)."""
    _check_kind(kind)
    tenant = _bound_text("tenant", tenant)
    peer = _bound_text("peer", peer)
    sandbox_id = _bound_text("sandbox_id", sandbox_id)
    session_id = _bound_text("session_id", session_id)
    if policy and (detail is None or isinstance(detail, dict)):
        detail = {**detail, POLICY_KEY: policy} if detail else {POLICY_KEY: policy}
    detail_json, detail_obj = _encode_flat_detail(detail) or _encode_detail(detail)
    if policy and detail_obj.get(POLICY_KEY) != policy:
        # a detail shrunk to fit lost it: put it back whole (< 100 bytes over the bound)
        detail_obj[POLICY_KEY] = policy
        detail_json = _canonical_json(detail_obj)
    if time is not None:
        time = _check_seconds("time", time)
    return _Pending(kind, tenant, peer, sandbox_id, session_id, detail_json, detail_obj, time,
                    concurrent.futures.Future())


# -- the verification pass over every file -----------------------------------------------------


class _Broken(Exception):
    """The first break a verification pass found, raised out of the step that found it."""

    def __init__(self, seq: int, problem: str):
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


class _LogVerification:
    """One pass of `AuditLog.verify`: every sealed segment in order, then the active one,
    through one chain checker, then the head anchor and the prune anchor against its end."""

    def __init__(self, path: str, head_path: str):
        self.path = path
        # The anchor first, then the snapshot: the anchor is written after its record commits,
        # so the snapshot always reaches it and a live daemon never trips a false alarm.
        self.head = _read_head(head_path)
        self.head_seq = self.head.seq if isinstance(self.head, HeadAnchor) else -1
        self.segments = list_segments(path)
        self.checker = _ChainChecker()
        self.first: tuple[int, str] | None = None  # (seq, prev_hash) of the oldest record
        self.seals: dict[int, str] = {}  # seq -> hash of each seal: prune anchors point at one
        self.hash_at_head: str | None = None
        self.conn: sqlite3.Connection | None = None  # the file being read

    def run(self) -> VerifyResult:
        files: list[tuple[Segment | None, str]] = [(s, s.path) for s in self.segments]
        if os.path.isfile(self.path):
            files.append((None, self.path))
        try:
            for segment, file_path in files:
                self._check_file(segment, file_path)
            problem = _head_problem(self.head, self.checker.next_seq - 1, self.hash_at_head)
            if problem:
                raise _Broken(*problem)
            problem = _prune_problem(self.first, self.checker.prune, self.seals)
            if problem:
                raise _Broken(*problem)
        except _Broken as broken:
            return self._result(False, broken.seq, broken.problem)
        return self._result(True, 0, "")

    def _result(self, ok: bool, seq: int, problem: str) -> VerifyResult:
        return VerifyResult(ok, self.checker.checked, seq, problem, len(self.segments),
                            self.first[0] if self.first else 0)

    def _locate(self, digest: str) -> int | None:
        """The seq of the record in the current file that carries digest, if any."""
        try:
            row = self.conn.execute(
                "SELECT seq FROM records WHERE hash = ? LIMIT 1", (digest,)).fetchone()
        except (sqlite3.Error, UnicodeError):
            return None
        return row[0] if row else None

    def _check_file(self, segment: Segment | None, file_path: str) -> None:
        label = (f"sealed segment {segment.name}" if segment else
                 f"active segment {os.path.basename(file_path)}")
        next_seq = self.checker.next_seq
        try:
            self.conn = (_connect_sealed(file_path) if segment
                         else _connect(file_path, readonly=True))
        except AuditError as exc:
            raise _Broken(next_seq, f"record {next_seq} onward: {exc}") from None
        try:
            last_row = self._feed_file(segment, label)
        except sqlite3.DatabaseError as exc:
            self._name_unreadable(label, exc)
        finally:
            self.conn.close()
        if segment is not None:
            _check_sealed_end(segment, label, last_row)

    def _feed_file(self, segment: Segment | None, label: str) -> tuple | None:
        """Feed every record of the current file, in one read snapshot. -> its last row."""
        self.conn.execute("BEGIN")
        in_file = 0
        last_row = None
        cursor = self.conn.execute(f"SELECT {_COLUMNS} FROM records ORDER BY seq")
        while rows := cursor.fetchmany(2048):
            for row in rows:
                if self.first is None:
                    self._start_at(row)
                if segment and in_file == 0 and row[0] != segment.first_seq:
                    raise _Broken(row[0] if isinstance(row[0], int) else 0,
                                  f"{label}: named for records {segment.first_seq}-"
                                  f"{segment.last_seq} but starts at record {row[0]}")
                if in_file and self.checker.last_kind == SEAL_KIND:
                    raise _Broken(row[0], f"record {row[0]}: follows the seal of its segment "
                                          f"in the same file ({label})")
                problem = self.checker.feed(row)
                if problem:
                    raise _Broken(*problem)
                in_file += 1
                last_row = row
                if row[4] == SEAL_KIND:
                    self.seals[row[0]] = row[9]
                if row[0] == self.head_seq:
                    self.hash_at_head = row[9]
        self.conn.execute("COMMIT")
        return last_row

    def _start_at(self, row: tuple) -> None:
        """The oldest record there is: the chain starts here."""
        self.first = (row[0], row[8])
        if isinstance(row[0], int) and row[0] > 1 and _is_hash(row[8]):
            # pruned: start from the oldest record; the prune anchor must account for
            # everything before it (checked at the end)
            self.checker = _ChainChecker(row[0], row[8])
        self.checker.locate = self._locate

    def _name_unreadable(self, label: str, error: sqlite3.DatabaseError) -> NoReturn:
        """The batch that failed is lost: read on one record at a time to name the first one
        that cannot be read (or that breaks the chain)."""
        for seq in range(self.checker.next_seq, self.checker.next_seq + 2048):
            try:
                row = self.conn.execute(f"SELECT {_COLUMNS} FROM records WHERE seq = ?",
                                        (seq,)).fetchone()
            except sqlite3.DatabaseError as point_exc:
                error = point_exc
                break
            if row is None:
                break
            problem = self.checker.feed(row)
            if problem:
                raise _Broken(*problem)
        seq = self.checker.next_seq
        raise _Broken(seq, f"record {seq} onward: the {label} cannot be read ({error}): the "
                           "file is damaged")


def _check_sealed_end(segment: Segment, label: str, last_row: tuple | None) -> None:
    """A sealed file ends where its name says, with its seal."""
    if last_row is None:
        raise _Broken(segment.first_seq, f"{label} holds no records")
    if last_row[0] != segment.last_seq:
        raise _Broken(last_row[0] + 1, f"{label}: named for records {segment.first_seq}-"
                                       f"{segment.last_seq} but ends at record {last_row[0]}")
    if last_row[4] != SEAL_KIND:
        raise _Broken(last_row[0] + 1, f"{label} is not sealed: its last record "
                                       f"{last_row[0]} is not an {SEAL_KIND}")


# -- checks of query and open arguments --------------------------------------------------------


def _query_filter(*, since: float | None, until: float | None, sandbox_id: str | None,
                  session_id: str | None, tenant: str | None, kind: str | None,
                  after_seq: int, limit: int) -> tuple[str, list[object], int]:
    """The WHERE clause, its parameters and the limit of `AuditLog.query`, every filter
    checked (after_seq, then limit, then the others: the first bad one is named).

    Raises:
        InvalidSpec: a malformed filter, named.
    """
    where = ["seq > ?"]
    params: list[object] = [_check_count("after_seq", after_seq, 0)]
    limit = _check_count("limit", limit, 1, MAX_QUERY_LIMIT)
    if since is not None:
        where.append("time >= ?")
        params.append(_check_seconds("since", since))
    if until is not None:
        until = _check_seconds("until", until)
        if since is not None and until < since:
            raise InvalidSpec("until", f"{until!r} is before since ({since!r})")
        where.append("time < ?")
        params.append(until)
    for column, value in (("sandbox_id", sandbox_id), ("session_id", session_id),
                          ("tenant", tenant)):
        if value:
            where.append(f"{column} = ?")
            params.append(_check_text(column, value))
    if kind:
        _check_kind(kind)
        if kind.endswith("."):
            # "/" sorts right after "."; a range keeps the kind index usable.
            where.append("kind >= ? AND kind < ?")
            params += [kind, kind[:-1] + "/"]
        else:
            where.append("kind = ?")
            params.append(kind)
    return " AND ".join(where), params, limit


def _check_open_options(verify: object, segment_records: object, segment_bytes: object,
                        retention_s: object) -> None:
    """Refuse `AuditLog.open` options that are not what its docstring allows, naming them."""
    if verify not in ("tail", "full"):
        raise InvalidSpec("verify_audit", f"{verify!r} is not 'full' or 'tail'")
    _check_count("segment_bytes", segment_bytes, 0)
    if _check_count("segment_records", segment_records, 0) == 1:
        raise InvalidSpec("segment_records", "1 leaves no room beside the seal; use at "
                                             "least 2, or 0 for no limit")
    if isinstance(retention_s, bool) or not isinstance(retention_s, int | float) or not (
            math.isfinite(retention_s) and retention_s >= 0):
        raise InvalidSpec("audit_retention", f"{retention_s!r} is not a duration >= 0")


class AuditLog:
    """The daemon's audit log; create with `AuditLog.open(path)`. Thread-safe."""

    metrics = NO_METRICS  # the daemon's DaemonMetrics when --metrics is on

    def __init__(
        self,
        path: str,
        reader: sqlite3.Connection,
        writer: sqlite3.Connection | None,
        head_fd: int | None,
        last: tuple[int, str],
    ):
        self.path = path
        self.head_path = path + HEAD_SUFFIX
        self._reader = reader
        self._writer = writer
        self._head_fd = head_fd
        self._last_seq, self._last_hash = last
        self._lock = threading.Lock()  # appends, and the writer connection
        self._read_lock = threading.Lock()  # the shared reader connection
        self._subscribers: dict[int, Callable[[AuditRecord], object]] = {}
        self._subscriber_tokens = itertools.count(1)
        self._subscribers_lock = threading.Lock()
        self._appends = 0
        self._callback_errors = 0
        self._head_write_errors = 0
        self._commits = 0
        self._closed = False
        # group commit: records submitted and not yet written, and the thread writing them
        self._queue: list[_Pending] = []
        self._queue_awaited = False  # a queued record's caller waits: commit it at once
        self._queue_cv = threading.Condition(threading.Lock())
        self._committer: threading.Thread | None = None
        self._stopping = False
        self._denials: DenialLimiter | None = None
        self._denials_lock = threading.Lock()
        # segments: limits (0 = none), the active segment's size, read-only sealed connections
        self.segment_records = 0
        self.segment_bytes = 0
        self.retention_s = 0.0
        self._active_records = 0
        self._active_bytes = 0
        self._active_first = self._last_seq + 1
        self._rotating = False
        # A rotation that had to wait (a reader holds the files) or failed is retried on the
        # first commit at or after this monotonic time, backing off while it keeps failing.
        self._rotate_retry_at = 0.0
        self._rotate_backoff_s = 0.0
        self._pruning = False  # a prune holds the files lock: its own record must not rotate
        self._monotonic: Callable[[], float] = _time.monotonic  # tests replace it
        self._rotations = 0
        self._sealed: dict[str, sqlite3.Connection] = {}
        self._clock: Callable[[], float] = _time.time  # record times; tests replace it
        #: When set, every appended record's detail carries it under POLICY_KEY: the digest
        #: of the tenant policy in force (the daemon sets it, and swaps it on a reload).
        self.policy_digest = ""

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        verify: str = "tail",
        segment_records: int = 0,
        segment_bytes: int = 0,
        retention_s: float = 0.0,
    ) -> AuditLog:
        """Open (creating if needed, mode 0600) the audit log at `path` for appending.

        With readonly=True nothing is created, locked, rotated or repaired: for `verify()`,
        `query()` and `export_jsonl()` on a log the daemon refused to open, or one copied
        elsewhere (with its ``.segments`` folder).

        Args:
            verify: "tail" checks the head anchor and the records past it (milliseconds);
                "full" also recomputes the whole chain, every segment, before any append
                (streamed: memory does not grow with the log).
            segment_records, segment_bytes: seal the active segment into
                ``<path>.segments/`` once it holds this many records, or about this many
                bytes of record content; 0 = no limit of that kind.
            retention_s: remove sealed segments whose last record is older than this, with
                an `audit.prune` record in the chain; 0 = keep everything.
        Raises:
            AuditError: not a Corral audit log, unreadable, or open for writing elsewhere.
            AuditTampered: (writing only) the head anchor disagrees with the chain's end, the
                active segment does not continue the last sealed one, or (verify="full")
                any record breaks the chain.
        """
        path = os.fspath(path)
        _check_open_options(verify, segment_records, segment_bytes, retention_s)
        if readonly:
            return cls._open_readonly(path)
        log = cls._open_for_writing(path)
        log.segment_records, log.segment_bytes, log.retention_s = (
            segment_records, segment_bytes, float(retention_s))
        log._count_active()
        if verify == "full":
            result = log.verify()
            if not result.ok:
                log.close()
                raise AuditTampered(path, result.broken_at_seq, result.problem)
        if log.retention_s:
            log.prune()
        return log

    @classmethod
    def _open_readonly(cls, path: str) -> AuditLog:
        """The log at path as it is: nothing created, locked, rotated or repaired."""
        segments = list_segments(path)
        if not os.path.isfile(path) and not segments:
            raise AuditError(path, "does not exist")
        reader = None
        if os.path.isfile(path):
            reader = _connect(path, readonly=True)
            try:
                _check_format(reader, path, create=False)
                last = reader.execute(
                    "SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                ).fetchone()
            except BaseException:
                reader.close()
                raise
        else:  # a rotation stopped between its two steps: only sealed segments
            last = None
        if last is None and segments:
            last = _segment_end(segments[-1])
        return cls(path, reader, None, None, tuple(last) if last else (0, GENESIS_HASH))

    @classmethod
    def _open_for_writing(cls, path: str) -> AuditLog:
        """Lock the log, finish an interrupted rotation and check the anchor and the seal
        against the chain's end; every handle is closed again if any step refuses."""
        writer = _open_writer(path)
        reader = head_fd = None
        try:
            head_fd = cls._lock_head(path, writer)
            writer = _finish_rotation(path, writer)
            segments = list_segments(path)
            sealed_end = _segment_end(segments[-1]) if segments else None
            last = cls._reconcile_head(path, writer, head_fd, sealed_end)
            if sealed_end is not None:
                _check_continues(path, writer, sealed_end)
            reader = _connect(path, readonly=False)
            reader.execute("PRAGMA query_only = 1")
        except BaseException:
            writer.close()
            if reader is not None:
                reader.close()
            if head_fd is not None:
                os.close(head_fd)
            raise
        return cls(path, reader, writer, head_fd, last)

    def _count_active(self) -> None:
        row = self._writer.execute(
            "SELECT count(*), coalesce(sum(length(detail_json) + length(tenant) + length(peer)"
            " + length(kind) + length(sandbox_id) + length(session_id)), 0), min(seq) "
            "FROM records"
        ).fetchone()
        self._active_records = row[0]
        self._active_bytes = row[1] + row[0] * _ROW_OVERHEAD_BYTES
        self._active_first = row[2] if row[2] is not None else self._last_seq + 1

    @staticmethod
    def _lock_head(path: str, writer: sqlite3.Connection) -> int:
        """Open and flock the head anchor, creating it only for a log with no records."""
        head_path = path + HEAD_SUFFIX
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(head_path, flags)
        except FileNotFoundError:
            if writer.execute("SELECT 1 FROM records LIMIT 1").fetchone() or list_segments(path):
                problem = _read_head(head_path)
                raise AuditTampered(path, 0, str(problem)) from None
            try:
                fd = os.open(head_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another opener won the race; the flock decides
                fd = os.open(head_path, flags)
        except OSError as exc:
            raise AuditError(
                path, f"cannot open the head anchor {head_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditError(path, "is already open for writing by another process") from None
        return fd

    @staticmethod
    def _reconcile_head(path: str, writer: sqlite3.Connection, head_fd: int,
                        sealed_end: tuple[int, str] | None = None) -> tuple[int, str]:
        """Check the anchor against the chain's end; move a lagging anchor on. -> (seq, hash).

        sealed_end: (seq, hash) of the last sealed segment's seal, the chain's end when the
        active segment is still empty.
        """
        last = writer.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        last_seq, last_hash = tuple(last) if last else (sealed_end or (0, GENESIS_HASH))
        data = os.pread(head_fd, 2 * _HEAD_SLOT_BYTES, 0)
        if not data.strip(b"\x00") and last_seq == 0:
            head: HeadAnchor | str = HeadAnchor(0, GENESIS_HASH)  # created just now
        else:
            head = _parse_head(data) or (
                f"head anchor unreadable: {path + HEAD_SUFFIX} holds no valid (seq, hash) line"
            )
        hash_at_head = None
        if isinstance(head, HeadAnchor) and 0 < head.seq <= last_seq:
            hash_at_head = _hash_at(path, writer, head.seq)
            if hash_at_head is None:
                raise AuditTampered(
                    path, head.seq, f"record {head.seq}: missing, but the head anchor names it"
                )
        problem = _head_problem(head, last_seq, hash_at_head)
        if problem:
            raise AuditTampered(path, *problem)
        assert isinstance(head, HeadAnchor)
        if head.seq < last_seq:
            # A crash between commit and anchor write: the records past the anchor must link.
            checker = _ChainChecker(head.seq + 1, head.hash)
            for row in _rows_after(path, writer, head.seq):
                problem = checker.feed(row)
                if problem:
                    raise AuditTampered(path, *problem)
            _log.info("audit head anchor moved on from record %d to %d", head.seq, last_seq)
        if head.seq < last_seq or len(data) < 2 * _HEAD_SLOT_BYTES:
            # Both slots, so a fresh file is whole and a torn slot is rewritten.
            os.pwrite(head_fd, _head_slot(last_seq, last_hash) * 2, 0)
            os.fsync(head_fd)
        return last_seq, last_hash

    # -- writing -------------------------------------------------------------------------------

    def append(self, kind: str, **fields: Unpack[RecordFields]) -> AuditRecord:
        """Append one record; it is durable (fsynced) when this returns.

        Records submitted earlier and not yet written go into the same transaction first
        (they keep their lower seqs), so `append` and `submit` interleave in call order.

        Args:
            kind: what happened, a dotted name such as "exec.start" (a-z 0-9 _ . -).
            fields: who, on what, the detail and the time (`RecordFields`).
        Raises:
            InvalidSpec: a malformed argument, named.
            AuditError: the record could not be written; the action must not proceed.
        """
        item = _prepare(kind, self.policy_digest, **fields)
        with self._lock:
            self._commit_locked(item)
        return item.future.result()

    async def record(self, kind: str, **fields: Unpack[RecordFields]) -> AuditRecord:
        """`append` for the event loop: the record is durable when the await returns, and
        the loop serves everything else while the commit thread writes it (`append` there
        would stall every session and stream for the fsync, and for any group commit
        running before it). Raises what `append` raises."""
        return await asyncio.wrap_future(self.submit(kind, **fields))

    def submit(self, kind: str,
               **fields: Unpack[RecordFields]) -> concurrent.futures.Future[AuditRecord]:
        """Queue one record for the group-commit thread; never waits for the disk.

        Returns a future resolved with the record once it is durable (or failed with
        AuditError). Everything queued while one commit runs is written by the next one,
        in a single transaction with a single fsync: under load the log costs one fsync per
        group, not per record. For callers that must not block (the daemon's event loop):
        `await asyncio.wrap_future(log.submit(...))` before returning an action's result, or
        fire-and-forget for records of actions already under way (steering input,
        interrupt), whose failure is logged.

        Raises:
            InvalidSpec: a malformed argument, named (at once, nothing is queued).
            AuditError: the log is closed or read-only.
        """
        return self._enqueue(_prepare(kind, self.policy_digest, **fields), awaited=True)

    def submit_background(self, kind: str,
                          **fields: Unpack[RecordFields]) -> concurrent.futures.Future[AuditRecord]:
        """`submit` for a record nobody waits on: of an action already done and answered
        whether or not its record is written (steering input, interrupt, an egress attempt).

        When only such records are queued, the commit thread lets more join for up to
        BACKGROUND_COALESCE_S (or until BACKGROUND_GROUP of them wait) before it writes them
        in one transaction: 256 sessions' steering records then cost one fsync and one GIL
        hand-off per group instead of one each. A `submit` or `append` cuts the wait short
        and takes them along, so no record anybody waits on is delayed. Such a record is
        acknowledged to nobody before it is durable, as with `submit`; what a crash inside
        the window loses is records of actions whose callers never waited for them.

        Raises:
            InvalidSpec: a malformed argument, named (at once, nothing is queued).
            AuditError: the log is closed or read-only.
        """
        return self._enqueue(_prepare(kind, self.policy_digest, **fields), awaited=False)

    def _enqueue(self, item: _Pending, *, awaited: bool) -> concurrent.futures.Future:
        """Queue item for the commit thread (started on first use); awaited: someone waits on
        it, so the thread commits at once."""
        with self._queue_cv:
            # a rotation has no writer for a moment (the sealed file moves, a new one opens)
            # while it holds _lock, which the commit thread waits for: queue meanwhile
            if self._closed or self._stopping or (self._writer is None and not self._rotating):
                raise AuditError(self.path, "is closed" if self._closed or self._stopping
                                 else "is open read-only")
            self._queue.append(item)
            self._queue_awaited = self._queue_awaited or awaited
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._commit_loop, name="corral-audit-commit", daemon=True)
                self._committer.start()
            if awaited or len(self._queue) in (1, BACKGROUND_GROUP):
                self._queue_cv.notify()
        return item.future

    def deny(self, *, tenant: str, peer: str, status: str, method: str, reason: str,
             sandbox_id: str = "", session_id: str = "",
             ) -> concurrent.futures.Future[AuditRecord] | None:
        """Record a refused call, rate-limited per (tenant, peer host, status) by a
        `DenialLimiter`: a `denied` record (its future is returned; never waits for the disk)
        or a count in the window's `denied.summary` (None)."""
        if self._denials is None:
            with self._denials_lock:
                if self._denials is None:
                    self._denials = DenialLimiter(self)
        return self._denials.deny(tenant=tenant, peer=peer, status=status, method=method,
                                  reason=reason, sandbox_id=sandbox_id, session_id=session_id)

    def flush_denials(self) -> None:
        """Queue the `denied.summary` of every open denial window now (the daemon does so
        before its last record, daemon.stop)."""
        if self._denials is not None:
            self._denials.flush()

    def _commit_loop(self) -> None:
        while True:
            with self._queue_cv:
                while not self._queue and not self._stopping:
                    self._queue_cv.wait()
                if not self._queue:
                    return
                self._coalesce_locked()
            with self._lock:
                self._commit_locked(None)

    def _coalesce_locked(self) -> None:
        """While only background records are queued, let more join (submit_background).
        Caller holds _queue_cv, which the wait releases."""
        deadline = _time.monotonic() + BACKGROUND_COALESCE_S
        while (not self._queue_awaited and not self._stopping
               and len(self._queue) < BACKGROUND_GROUP):
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                return
            self._queue_cv.wait(remaining)

    def _commit_locked(self, item: _Pending | None) -> None:
        """Write everything queued, then item, in one transaction, or in as many as a
        segment's record limit needs (a group never runs past a seal). Caller holds _lock."""
        with self._queue_cv:
            items, self._queue, self._queue_awaited = self._queue, [], False
        if item is not None:
            items.append(item)
        while items:
            room = self._room()
            n = len(items) if room is None or room <= 0 else min(len(items), room)
            self._commit_items(items[:n])
            items = items[n:]

    def _room(self) -> int | None:
        """Records the active segment takes before its seal; None: no record limit (or the
        seal itself being written). 0 or less: a rotation that had to wait is pending."""
        if self._rotating or not self.segment_records:
            return None
        return self.segment_records - 1 - self._active_records

    def _commit_items(self, items: list[_Pending]) -> None:
        """Write items in one transaction, then rotate if the segment is full."""
        t0 = self.metrics.clock()
        if self._writer is None:
            error = AuditError(self.path, "is closed" if self._closed else "is open read-only")
            for it in items:
                it.future.set_exception(error)
            return
        rows, records = self._chain(items)
        error = self._insert(rows)
        if error is not None:
            for it in items:
                it.future.set_exception(error)
            return
        self._advance_head(rows)
        self.metrics.audit_committed(t0)
        self._deliver(items, records)
        self._rotate_if_due()

    def _rotate_if_due(self) -> None:
        """Seal the active segment if it is full. Caller holds _lock."""
        if not self._rotation_due():
            return
        try:
            self._rotate_locked()
        except Exception:  # noqa: BLE001 - the records are written; rotation retries
            self._rotation_waits()
            _log.exception("audit segment rotation failed; retrying in %.0fs",
                           self._rotate_backoff_s)

    def _rotation_waits(self) -> None:
        """A due rotation could not run: retry after 1 s, doubling up to a minute while it
        keeps failing (never a count of records: a quiet log would wait for ever)."""
        self._rotate_backoff_s = min(ROTATE_RETRY_MAX_S,
                                     max(ROTATE_RETRY_S, self._rotate_backoff_s * 2))
        self._rotate_retry_at = self._monotonic() + self._rotate_backoff_s

    def _chain(self, items: list[_Pending]) -> tuple[list[tuple], list[AuditRecord]]:
        """Give items the next seqs, their times and hashes. -> (rows to insert, records)."""
        seq, prev = self._last_seq, self._last_hash
        rows, records = [], []
        for it in items:
            seq += 1
            when = float(self._clock() if it.time is None else it.time)
            digest = _chained_hash(prev, seq, when, it)
            rows.append((seq, when, it.tenant, it.peer, it.kind, it.sandbox_id, it.session_id,
                         it.detail_json, prev, digest))
            records.append(AuditRecord(seq, when, it.tenant, it.peer, it.kind, it.sandbox_id,
                                       it.session_id, it.detail_obj, prev, digest))
            prev = digest
        return rows, records

    def _insert(self, rows: list[tuple]) -> AuditError | None:
        """Commit rows in one transaction (one fsync); the error that refused them, if any."""
        writer = self._writer
        try:
            if len(rows) == 1:
                writer.execute(_INSERT, rows[0])  # autocommit: one statement, one transaction
            else:
                writer.execute("BEGIN IMMEDIATE")
                try:
                    writer.executemany(_INSERT, rows)
                    writer.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        writer.execute("ROLLBACK")
                    raise
        except sqlite3.IntegrityError:
            return AuditError(
                self.path, f"records {rows[0][0]}-{rows[-1][0]} collide with existing ones: "
                           "something else writes to this log")
        except sqlite3.Error as exc:
            return AuditError(self.path,
                              f"cannot append records {rows[0][0]}-{rows[-1][0]}: {exc}")
        return None

    def _advance_head(self, rows: list[tuple]) -> None:
        """Committed rows become the chain's end: counters, segment size, head anchor."""
        seq, digest = rows[-1][0], rows[-1][9]
        self._last_seq, self._last_hash = seq, digest
        self._appends += len(rows)
        self._commits += 1
        self._active_records += len(rows)
        self._active_bytes += sum(
            len(r[7]) + len(r[2]) + len(r[3]) + len(r[4]) + len(r[5]) + len(r[6])
            for r in rows) + len(rows) * _ROW_OVERHEAD_BYTES
        try:
            os.pwrite(self._head_fd, _head_slot(seq, digest), (seq % 2) * _HEAD_SLOT_BYTES)
        except OSError as exc:
            # The records are committed and the anchor merely lags (still a valid lower
            # bound); failing the actions now would leave records of things undone.
            self._head_write_errors += 1
            _log.error("audit head anchor %s not updated: %s", self.head_path, exc)

    def _deliver(self, items: list[_Pending], records: list[AuditRecord]) -> None:
        """Resolve each item's future and tell the subscribers. Caller holds _lock, so every
        subscriber sees records in seq order."""
        for it, record in zip(items, records, strict=True):
            it.future.set_result(record)
            for callback in self._subscribers.values():
                try:
                    callback(record)
                except Exception:
                    self._callback_errors += 1
                    _log.exception("audit subscriber %r failed on record %d", callback,
                                   record.seq)

    # -- segments ------------------------------------------------------------------------------

    def _rotation_due(self) -> bool:
        if self._rotating or self._pruning or self._writer is None:
            return False
        # a segment holds at most segment_records records, its seal included
        full = bool((self.segment_records and self._active_records + 1 >= self.segment_records)
                    or (self.segment_bytes and self._active_bytes >= self.segment_bytes))
        return full and (not self._rotate_retry_at or self._monotonic() >= self._rotate_retry_at)

    def rotate(self) -> Segment | None:
        """Seal the active segment now (if it holds records); None when it must wait."""
        with self._lock:
            if self._writer is None:
                raise AuditError(self.path, "is closed" if self._closed else "is open read-only")
            if not self._active_records:
                return None
            return self._rotate_locked()

    def _rotate_locked(self) -> Segment | None:
        """Seal the active segment: its last record is an `audit.seal`, the file moves to
        ``<path>.segments/`` read-only, and a new active segment continues the chain (its
        first record's prev_hash is the seal's hash). Caller holds _lock.

        Returns None, writing nothing, while a verify or export reads the files or another
        process has the active segment open (retried by the first commit a second later).
        """
        lock = _files_lock(self.path, exclusive=True)
        if lock is None:
            self._rotation_waits()
            return None
        self._rotating = True
        try:
            with self._read_lock:
                self._reader.close()
                self._reader = None
                try:
                    segment = self._seal_and_move_locked()
                finally:
                    if self._writer is None:  # failed between close and reopen: reopen
                        self._writer = _finish_rotation(self.path, _open_writer(self.path))
                        self._count_active()
                    self._reader = _connect(self.path, readonly=False)
                    self._reader.execute("PRAGMA query_only = 1")
            if segment is not None and self.retention_s:
                self._prune_locked(self.retention_s, None, files_locked=True)
            return segment
        finally:
            self._rotating = False
            _release(lock)

    def _seal_and_move_locked(self) -> Segment | None:
        writer = self._writer
        # A sealed file is self-contained: no WAL. Leaving WAL needs the file to ourselves;
        # don't wait for other readers.
        writer.execute("PRAGMA busy_timeout = 0")
        try:
            mode = writer.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        except sqlite3.OperationalError:
            mode = "busy"
        finally:
            writer.execute("PRAGMA busy_timeout = 5000")
        if mode.lower() != "delete":
            self._rotation_waits()
            return None
        first = self._active_first
        seal = _prepare(SEAL_KIND, "", tenant="", peer="daemon", detail={
            "first_seq": first, "records": self._active_records + 1,
            "limit_records": self.segment_records, "limit_bytes": self.segment_bytes,
        })
        self._commit_items([seal])  # the seal alone: what is queued goes to the next segment
        try:
            last = seal.future.result().seq
        except AuditError:
            writer.execute("PRAGMA journal_mode = WAL")
            raise
        writer.close()
        self._writer = None
        folder = self.path + SEGMENTS_SUFFIX
        os.makedirs(folder, mode=0o700, exist_ok=True)
        segment = Segment(first, last, os.path.join(folder, _segment_name(first, last)))
        os.chmod(self.path, 0o400)
        os.rename(self.path, segment.path)
        _fsync_dir(folder)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._writer = _open_writer(self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._active_records = self._active_bytes = 0
        self._active_first = last + 1
        self._rotate_retry_at = self._rotate_backoff_s = 0.0
        self._rotations += 1
        _log.info("audit segment %s sealed", segment.name)
        return segment

    def prune(self, retention_s: float | None = None, *, now: float | None = None) -> int:
        """Remove the oldest sealed segments whose last record is older than retention_s
        (default: the log's retention); returns how many were removed.

        First an `audit.prune` record ("pruned up to seq N, hash H": N is the last removed
        record, H its hash) is committed; `verify()` then requires the oldest remaining
        record to follow exactly that record, so a segment removed without one, or more
        removed than it states, is reported.
        """
        with self._lock:
            if self._writer is None:
                raise AuditError(self.path, "is closed" if self._closed else "is open read-only")
            removed = self._prune_locked(
                self.retention_s if retention_s is None else retention_s, now)
            self._rotate_if_due()  # the prune record may have filled the segment
            return removed

    def _prune_locked(self, retention_s: float, now: float | None, *,
                      files_locked: bool = False) -> int:
        if not retention_s:
            return 0
        cutoff = (self._clock() if now is None else now) - retention_s
        lock = None if files_locked else _files_lock(self.path, exclusive=True)
        if lock is None and not files_locked:
            return 0  # a verify or export is reading: the next rotation prunes
        try:
            doomed: list[tuple[Segment, str]] = []
            for segment in list_segments(self.path):
                conn = _connect_sealed(segment.path)
                try:
                    row = conn.execute("SELECT seq, time, hash, kind FROM records "
                                       "ORDER BY seq DESC LIMIT 1").fetchone()
                except sqlite3.DatabaseError:
                    row = None
                finally:
                    conn.close()
                if (row is None or row[0] != segment.last_seq or row[3] != SEAL_KIND
                        or not isinstance(row[1], float | int) or row[1] >= cutoff):
                    break  # only whole, old, sealed segments, oldest first, without gaps
                doomed.append((segment, row[2]))
            if not doomed:
                return 0
            last, last_hash = doomed[-1]
            record = _prepare(PRUNE_KIND, "", tenant="", peer="daemon", detail={
                "up_to_seq": last.last_seq, "hash": last_hash,
                "first_seq": doomed[0][0].first_seq, "segments": len(doomed),
                "retention_s": retention_s, "cutoff_time": cutoff,
            })
            # The record may fill the segment, but the seal waits for the removal: its
            # rotation needs the files lock held here, and would prune these same segments.
            self._pruning = True
            try:
                self._commit_locked(record)
            finally:
                self._pruning = False
            record.future.result()  # durable before anything is removed
            with self._read_lock:
                for segment, _ in doomed:
                    conn = self._sealed.pop(segment.path, None)
                    if conn is not None:
                        conn.close()
                    os.unlink(segment.path)
            _fsync_dir(self.path + SEGMENTS_SUFFIX)
            _log.info("audit pruned up to record %d (%d segments older than %ss)",
                      last.last_seq, len(doomed), retention_s)
            return len(doomed)
        finally:
            _release(lock)

    def subscribe(self, callback: Callable[[AuditRecord], object]) -> int:
        """Call callback(record) after each append; returns a token for `unsubscribe`.

        The callback runs in the appending thread, under the append lock and in seq order:
        it must be quick, must not block, and must not append (the daemon hands the record to
        its loop with ``loop.call_soon_threadsafe``). Exceptions are logged and ignored.
        For a Watch without gaps: subscribe first, then `query(after_seq=...)` to catch up,
        and drop live records whose seq the catch-up already delivered.
        """
        if not callable(callback):
            raise InvalidSpec("callback", f"must be callable, got {type(callback).__name__}")
        with self._subscribers_lock:
            token = next(self._subscriber_tokens)
            # Copy on write: append iterates its snapshot without taking this lock.
            self._subscribers = {**self._subscribers, token: callback}
        return token

    def unsubscribe(self, token: int) -> bool:
        """Stop calling a subscriber; False if the token was not subscribed (harmless)."""
        with self._subscribers_lock:
            if token not in self._subscribers:
                return False
            self._subscribers = {t: cb for t, cb in self._subscribers.items() if t != token}
            return True

    # -- reading -------------------------------------------------------------------------------

    def last_seq(self) -> int:
        """The seq of the newest record (0 for an empty log)."""
        if self._writer is not None:
            with self._lock:
                return self._last_seq
        with self._read_lock:
            self._check_open()
            row = (self._reader.execute("SELECT max(seq) FROM records").fetchone()
                   if self._reader is not None else (None,))
        if row[0]:
            return row[0]
        segments = list_segments(self.path)
        return _segment_end(segments[-1])[0] if segments else 0

    def _sealed_conn(self, segment: Segment) -> sqlite3.Connection:
        """A cached read-only connection to a sealed segment. Caller holds _read_lock."""
        conn = self._sealed.pop(segment.path, None)
        if conn is None:
            conn = _connect_sealed(segment.path)
            if len(self._sealed) >= 16:
                self._sealed.pop(next(iter(self._sealed))).close()
        self._sealed[segment.path] = conn  # most recently used last
        return conn

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        sandbox_id: str | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
        kind: str | None = None,
        limit: int = 1000,
        after_seq: int = 0,
        latest: bool = False,
    ) -> list[AuditRecord]:
        """Records matching every given filter, oldest first (newest last), across segments.

        Args:
            since, until: Unix seconds, since <= time < until; None = unbounded.
            sandbox_id, session_id, tenant: exact match; None or "" = any.
            kind: an exact kind, or a prefix ending in "." ("sandbox." matches
                "sandbox.create"); None or "" = any.
            limit: at most this many (1..MAX_QUERY_LIMIT).
            after_seq: only records with a greater seq (page on with the last one seen).
            latest: the last `limit` matches instead of the first (for `tail`).
        Raises:
            InvalidSpec: a malformed filter, named.
        """
        where, params, limit = _query_filter(
            since=since, until=until, sandbox_id=sandbox_id, session_id=session_id,
            tenant=tenant, kind=kind, after_seq=after_seq, limit=limit)
        order = "DESC" if latest else "ASC"
        sql = f"SELECT {_COLUMNS} FROM records WHERE {where} ORDER BY seq {order} LIMIT ?"
        rows: list[tuple] = []
        with self._read_lock:
            self._check_open()
            # Newest first for `latest`; the active segment is the newest.
            sources: list[Segment | None] = [
                s for s in list_segments(self.path) if s.last_seq > after_seq]
            sources.append(None)
            if latest:
                sources.reverse()
            for source in sources:
                try:
                    conn = self._reader if source is None else self._sealed_conn(source)
                    if conn is None:
                        continue
                    rows += conn.execute(sql, (*params, limit - len(rows))).fetchall()
                except (sqlite3.DatabaseError, AuditError) as exc:
                    if source is None:
                        raise AuditError(self.path, f"cannot query: {exc}") from None
                    _log.warning("audit segment %s skipped by a query: %s", source.path, exc)
                if len(rows) >= limit:
                    break
        if latest:
            rows.reverse()
        return [AuditRecord._from_row(r) for r in rows]

    def verify(self) -> VerifyResult:
        """Recompute the whole chain, every sealed segment then the active one, from the
        genesis (or the last `audit.prune` anchor), and compare its end with the head anchor.

        Reports the first problem, whatever the damage: an edited record ("record 7: content
        does not match its hash"), bytes that are not UTF-8, a detail that is not JSON, a
        damaged hash, a removed record ("record 8: previous record 7 is missing"), reordered
        records, a record edited and re-hashed (the next record's prev_hash no longer
        matches), records removed from the end ("chain ends at record 41 but the head anchor
        says 44: ..."), a missing or unreadable anchor, a sealed segment removed, truncated
        or renamed, segments removed beyond what an `audit.prune` record states, or a file
        SQLite cannot read ("record 9 onward: ... cannot be read"). Rows are streamed: memory
        does not grow with the log.
        """
        self._check_open()
        lock = _files_lock(self.path, exclusive=False)
        try:
            result = _LogVerification(self.path, self.head_path).run()
        finally:
            _release(lock)
        # Text from a damaged file can hold anything: keep the report printable ASCII.
        return dataclasses.replace(result, problem=_printable(result.problem).encode(
            "ascii", "backslashreplace").decode("ascii"))

    def export_jsonl(self, path_or_file: str | os.PathLike[str] | IO, after_seq: int = 0) -> int:
        """Write records with seq > after_seq, from every segment, as JSON lines
        (`AuditRecord.to_dict()` fields, detail_json verbatim as stored) to a path (created
        0600) or an open file; returns how many. Ship them off the host; `verify_records()`
        checks them there.
        """
        after_seq = _check_count("after_seq", after_seq, 0)
        self._check_open()
        if isinstance(path_or_file, str | os.PathLike):
            fd = os.open(
                os.fspath(path_or_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            with open(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
                return self._export(out.write, after_seq)
        if isinstance(path_or_file, io.RawIOBase | io.BufferedIOBase) or "b" in getattr(
            path_or_file, "mode", ""
        ):
            return self._export(
                lambda s: path_or_file.write(s.encode("utf-8", "surrogateescape")), after_seq
            )
        return self._export(path_or_file.write, after_seq)

    def _export(self, write: Callable[[str], object], after_seq: int) -> int:
        count = 0
        for rows in self.row_batches(after_seq):
            write(jsonl_lines(rows))
            count += len(rows)
        return count

    def row_batches(self, after_seq: int = 0, batch: int = 2048) -> Iterable[list[tuple]]:
        """Records with seq > after_seq, every segment then the active one, as lists of row
        tuples in `_COLUMNS` order (text exactly as stored), each file read in one snapshot.

        Holds the files lock shared while it runs (a rotation waits): consume it promptly.
        """
        after_seq = _check_count("after_seq", after_seq, 0)
        self._check_open()
        lock = _files_lock(self.path, exclusive=False)
        try:
            files = [s.path for s in list_segments(self.path) if s.last_seq > after_seq]
            if os.path.isfile(self.path):
                files.append(self.path)
            for file_path in files:
                conn = (_connect(file_path, readonly=True) if file_path == self.path
                        else _connect_sealed(file_path))
                try:
                    conn.execute("BEGIN")
                    yield from _batches_after(conn, after_seq, batch)
                    conn.execute("COMMIT")
                finally:
                    conn.close()
        finally:
            _release(lock)

    # -- lifecycle -----------------------------------------------------------------------------

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(
            last_seq=self.last_seq(),
            appends=self._appends,
            subscribers=len(self._subscribers),
            callback_errors=self._callback_errors,
            head_write_errors=self._head_write_errors,
            commits=self._commits,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise AuditError(self.path, "is closed")

    def close(self) -> None:
        """Write what is queued, flush the anchor, release the log (and its writer lock);
        idempotent."""
        if self._denials is not None:
            self._denials.close()  # its summaries go into the final commit
        with self._queue_cv:
            self._stopping = True
            self._queue_cv.notify()
            committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join()
        with self._lock:
            self._commit_locked(None)
        with self._lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._reader is not None:
                self._reader.close()
            for conn in self._sealed.values():
                conn.close()
            self._sealed.clear()
            if self._head_fd is not None:
                try:
                    os.fsync(self._head_fd)
                finally:
                    os.close(self._head_fd)  # also drops the flock
                    self._head_fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else "read-only" if self._writer is None else "writing"
        return f"<AuditLog {self.path} {mode} last_seq={self._last_seq}>"


# -- for people --------------------------------------------------------------------------------

_DETAIL_DISPLAY_CHARS = 240


def _printable(text: str) -> str:
    """Escape control and format characters: audit text reaches terminals and is untrusted."""
    return visible(text, short_escapes=False)


def format_record(rec: AuditRecord) -> str:
    """One line for people: ISO 8601 UTC time, #seq, tenant, kind, ids, peer, compact detail."""
    try:
        when = datetime.fromtimestamp(rec.time, UTC).isoformat(timespec="milliseconds")
        when = when.replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError, TypeError):
        when = repr(rec.time)
    parts = [when, f"#{rec.seq}", _printable(rec.tenant) or "-", _printable(rec.kind)]
    if rec.sandbox_id:
        parts.append(f"sandbox={_printable(rec.sandbox_id)}")
    if rec.session_id:
        parts.append(f"session={_printable(rec.session_id)}")
    if rec.peer:
        peer = _printable(rec.peer)
        parts.append(f'peer="{peer}"' if " " in peer or '"' in peer else f"peer={peer}")
    if rec.detail:
        detail = _printable(rec.detail_json)
        if len(detail) > _DETAIL_DISPLAY_CHARS:
            detail = detail[: _DETAIL_DISPLAY_CHARS - 1] + "…"
        parts.append(detail)
    return " ".join(parts)
