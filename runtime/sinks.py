"""Audit sinks: ship records as they commit to a rotated file, syslog (RFC 5424) or OTLP logs.

Delivery is at-least-once with the record's seq as the dedup key. The queue is the audit log
itself: each sink keeps a cursor, ``<state>/sinks/<name>.cursor`` (the last seq it
delivered, replaced atomically after each delivered batch), and a worker thread reads the
records past it. A sink that is down therefore never blocks anything: appends only wake its
thread, the records wait on disk in the log, and a restarted daemon resumes from the cursor
(records delivered but not yet acknowledged by the cursor are sent again). The queue is
bounded by ``max_lag`` records: a sink further behind skips to the newest ``max_lag``
records, counts what it skipped in ``dropped`` and logs it (`corral audit export --since`
fills such a gap). Lag, delivered seq, errors and drops are in `statistics()`, the daemon's
statistics and `corral audit status`.

A new sink starts at the head of the log (records from then on); history is
`corral audit export`'s job. Over UDP a record whose message would exceed one datagram
(65,000 bytes) is sent with its detail replaced by ``{"corral.truncated": "datagram",
"bytes": N}``: seq and hash still name it, and the whole record is in the log and the export
(use TCP or a file sink to ship it whole).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time as _time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from corral.sandbox.errors import CorralError, InvalidSpec
from corral.sandbox.spec import parse_size

from .audit_export import jsonl_line, read_cursor, write_cursor
from .audit_records import _canonical_json as _canonical

_log = logging.getLogger("corral.sinks")

SINK_TYPES = ("file", "syslog", "otlp")
DEFAULT_MAX_LAG = 1_000_000
_BATCH = 512
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: After a wake, how long a worker lets records gather before it delivers: one query, one
#: send and one cursor fsync per batch rather than per record, so a busy daemon's sinks do
#: not compete with its audit commits for the disk and the GIL record by record (issue 22:
#: a sink must not slow Create). It is also the most a record waits beyond its commit.
_GATHER_S = 0.1
_SYSLOG_FACILITY_AUDIT = 13  # RFC 5424 "log audit"
_MAX_DATAGRAM = 65000
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class SinkError(CorralError):
    """A sink could not deliver; its worker retries with backoff."""

    grpc_status = "UNAVAILABLE"


def _row_dict(row: tuple) -> dict[str, Any]:
    from .audit_export import row_to_dict

    return row_to_dict(row)


class FileSink:
    """JSON lines (the export format) appended to a file, rotated at max_bytes into
    ``<path>.1`` .. ``<path>.<keep>``."""

    def __init__(self, name: str, path: str, max_bytes: int = 64 << 20, keep: int = 5):
        self.name, self.path, self.max_bytes, self.keep = name, path, max_bytes, keep
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
        return self._fd

    def deliver(self, rows: list[tuple]) -> None:
        fd = self._open()
        data = "".join(jsonl_line(r) for r in rows).encode("utf-8", "surrogateescape")
        os.write(fd, data)
        os.fsync(fd)
        if os.fstat(fd).st_size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.close()
        for i in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        if self.keep:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sd_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(row: tuple, hostname: str, app_name: str = "corral",
                   facility: int = _SYSLOG_FACILITY_AUDIT) -> bytes:
    """One record as an RFC 5424 message: MSGID the kind, structured data
    ``[corral@32473 seq= hash= tenant= sandbox=]``, the record's export line as MSG (after
    a UTF-8 BOM). PRI: warning for denials, informational otherwise."""
    rec = _row_dict(row)
    severity = 4 if rec["kind"].startswith("denied") else 6
    stamp = datetime.fromtimestamp(rec["time"], UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    msgid = "".join(c for c in rec["kind"] if 33 <= ord(c) <= 126)[:32] or "-"
    sd = (f'[corral@32473 seq="{rec["seq"]}" hash="{rec["hash"]}" '
          f'tenant="{_sd_escape(rec["tenant"])}" sandbox="{_sd_escape(rec["sandbox_id"])}"]')
    head = f"<{facility * 8 + severity}>1 {stamp} {hostname} {app_name} {os.getpid()} {msgid} {sd} "
    return head.encode("ascii", "replace") + b"\xef\xbb\xbf" + jsonl_line(row).rstrip(
        "\n").encode("utf-8", "surrogateescape")


class SyslogSink:
    """RFC 5424 over UDP (one datagram per record) or TCP (octet-counted, RFC 6587)."""

    def __init__(self, name: str, address: str, protocol: str = "udp",
                 facility: int = _SYSLOG_FACILITY_AUDIT, app_name: str = "corral"):
        host, _, port = address.rpartition(":")
        self.name, self.host, self.port = name, host.strip("[]"), int(port)
        self.protocol, self.facility, self.app_name = protocol, facility, app_name
        self.hostname = socket.gethostname() or "-"
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
            sock = socket.socket(family, kind)
            sock.settimeout(5.0)
            try:
                sock.connect((self.host, self.port))
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def deliver(self, rows: list[tuple]) -> None:
        try:
            sock = self._connect()
            for row in rows:
                msg = syslog_message(row, self.hostname, self.app_name, self.facility)
                if self.protocol == "udp":
                    if len(msg) > _MAX_DATAGRAM:  # never a cut JSON: say where the rest is
                        msg = syslog_message(row[:7] + (_canonical({
                            "corral.truncated": "datagram", "bytes": len(msg)}),) + row[8:],
                            self.hostname, self.app_name, self.facility)
                    sock.send(msg)
                else:
                    sock.sendall(b"%d " % len(msg) + msg)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class OtlpSink:
    """OTLP logs through the OpenTelemetry SDK (opentelemetry-sdk, and
    opentelemetry-exporter-otlp-proto-grpc for the network exporter), when installed.

    Each record is one log record: body the export line, attributes corral.seq (the dedup
    key), corral.hash, corral.kind, corral.tenant; severity WARN for denials, INFO otherwise.
    The exporter runs synchronously per record and its result is checked, so a collector
    that is down fails the batch (and the cursor stays) instead of dropping it.
    """

    def __init__(self, name: str, endpoint: str, exporter=None):
        try:
            from opentelemetry._logs import LogRecord, SeverityNumber
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
                    OTLPLogExporter,
                )

                exporter = OTLPLogExporter(endpoint=endpoint, insecure=True)
        except ImportError:
            raise InvalidSpec(f"audit.sinks.{name}", "an otlp sink needs the OpenTelemetry "
                                                     "SDK: pip install opentelemetry-sdk "
                                                     "opentelemetry-exporter-otlp-proto-grpc"
                              ) from None
        self.name = name
        self._record, self._severity = LogRecord, SeverityNumber
        self._checked = _CheckedExporter(exporter)
        self._provider = LoggerProvider()
        self._provider.add_log_record_processor(SimpleLogRecordProcessor(self._checked))
        self._logger = self._provider.get_logger("corral.audit")

    def deliver(self, rows: list[tuple]) -> None:
        for row in rows:
            rec = _row_dict(row)
            self._checked.failure = ""
            denied = rec["kind"].startswith("denied")
            self._logger.emit(self._record(
                timestamp=int(rec["time"] * 1e9), body=jsonl_line(row).rstrip("\n"),
                severity_number=self._severity.WARN if denied else self._severity.INFO,
                severity_text="WARN" if denied else "INFO",
                attributes={"corral.seq": rec["seq"], "corral.hash": rec["hash"],
                            "corral.kind": rec["kind"], "corral.tenant": rec["tenant"]}))
            if self._checked.failure:
                raise SinkError(f"OTLP export of record {rec['seq']} failed: "
                                f"{self._checked.failure}")

    def close(self) -> None:
        self._provider.shutdown()


class _CheckedExporter:
    """Passes batches to an OTLP exporter and keeps why the last one failed (the SDK's
    processor only logs it)."""

    def __init__(self, inner):
        self.inner = inner
        self.failure = ""

    def export(self, batch):
        try:
            result = self.inner.export(batch)
        except Exception as exc:
            self.failure = str(exc) or type(exc).__name__
            raise
        if getattr(result, "name", "SUCCESS") != "SUCCESS":
            self.failure = f"the exporter answered {result.name}"
        return result

    def shutdown(self):
        return self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self.inner, "force_flush", None)
        return flush(timeout_millis) if flush else True


def make_sink(name: str, table: Mapping[str, Any]):
    """A sink from its [audit.sinks.NAME] table (already checked by `check_sink`)."""
    kind = table["type"]
    if kind == "file":
        return FileSink(name, table["path"], parse_size(table.get("max_size", "64M"),
                                                        f"audit.sinks.{name}.max_size"),
                        int(table.get("keep", 5)))
    if kind == "syslog":
        return SyslogSink(name, table["address"], table.get("protocol", "udp"),
                          int(table.get("facility", _SYSLOG_FACILITY_AUDIT)))
    return OtlpSink(name, table.get("endpoint", "http://127.0.0.1:4317"))


def check_sink(name: str, table: object) -> None:
    """Refuse a malformed [audit.sinks.NAME] table, naming the key.

    Raises:
        InvalidSpec: as audit.sinks.NAME.KEY.
    """
    where = f"audit.sinks.{name}"
    if not _NAME_RE.match(name):
        raise InvalidSpec(where, "a sink name is a-z, 0-9, '-' or '_' (it names its cursor "
                                 "file)")
    if not isinstance(table, dict):
        raise InvalidSpec(where, "must be a table")
    kind = table.get("type")
    if kind not in SINK_TYPES:
        raise InvalidSpec(f"{where}.type", f"{kind!r} is not one of {', '.join(SINK_TYPES)}")
    allowed = {"type", "max_lag"} | {"file": {"path", "max_size", "keep"},
                                     "syslog": {"address", "protocol", "facility"},
                                     "otlp": {"endpoint"}}[kind]
    for key in table:
        if key not in allowed:
            raise InvalidSpec(f"{where}.{key}", f"unknown setting for a {kind} sink (known: "
                                                f"{', '.join(sorted(allowed))})")
    lag = table.get("max_lag", DEFAULT_MAX_LAG)
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
        raise InvalidSpec(f"{where}.max_lag", f"{lag!r} must be a whole number of records >= 1")
    if kind == "file":
        if not isinstance(table.get("path"), str) or not os.path.isabs(table["path"]):
            raise InvalidSpec(f"{where}.path", "must be an absolute file path")
        parse_size(table.get("max_size", "64M"), f"{where}.max_size")
        keep = table.get("keep", 5)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= 1000:
            raise InvalidSpec(f"{where}.keep", f"{keep!r} must be a whole number 0-1000")
    elif kind == "syslog":
        address = table.get("address")
        host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidSpec(f"{where}.address", f"{address!r} is not HOST:PORT")
        if table.get("protocol", "udp") not in ("udp", "tcp"):
            raise InvalidSpec(f"{where}.protocol", "must be 'udp' or 'tcp'")
        facility = table.get("facility", _SYSLOG_FACILITY_AUDIT)
        if isinstance(facility, bool) or not isinstance(facility, int) or not 0 <= facility <= 23:
            raise InvalidSpec(f"{where}.facility", f"{facility!r} must be 0-23")
    else:
        make_sink(name, table)  # says so now if the SDK is missing


class SinkWorker:
    """Delivers one sink's records past its cursor, on its own thread."""

    def __init__(self, log, name: str, sink, cursor_path: str, max_lag: int = DEFAULT_MAX_LAG):
        self.log, self.name, self.sink = log, name, sink
        self.cursor_path, self.max_lag = cursor_path, max_lag
        if os.path.exists(cursor_path):
            self.delivered = read_cursor(cursor_path)
            if self.delivered > log.last_seq():  # a different (new) log: start at its head
                _log.warning("audit sink %s: its cursor %d is past the log's last record %d "
                             "(a new log?); delivering from %d on", name, self.delivered,
                             log.last_seq(), log.last_seq() + 1)
                self.delivered = log.last_seq()
                write_cursor(cursor_path, self.delivered)
        else:
            self.delivered = log.last_seq()
            write_cursor(cursor_path, self.delivered)
        self.errors = 0
        self.dropped = 0
        self.last_error = ""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._token = log.subscribe(lambda _rec: self._wake.set())
        self._thread = threading.Thread(target=self._run, name=f"corral-sink-{name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                more = self._deliver_some()
            except Exception as exc:  # noqa: BLE001 - a down sink: retry, never give up
                self.errors += 1
                if str(exc) != self.last_error:
                    _log.warning("audit sink %s: %s (retrying)", self.name, exc)
                self.last_error = str(exc) or type(exc).__name__
                self._stop.wait(_BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            if not more:
                if self._wake.wait(1.0):
                    self._stop.wait(_GATHER_S)
                self._wake.clear()

    def _deliver_some(self) -> bool:
        head = self.log.last_seq()
        if head - self.delivered > self.max_lag:
            skip_to = head - self.max_lag
            self.dropped += skip_to - self.delivered
            _log.error("audit sink %s is %d records behind (max_lag %d): records %d-%d "
                       "skipped; `corral audit export --since %d` fills the gap", self.name,
                       head - self.delivered, self.max_lag, self.delivered + 1, skip_to,
                       self.delivered)
            self.delivered = skip_to
            write_cursor(self.cursor_path, skip_to)
        records = self.log.query(after_seq=self.delivered, limit=_BATCH)
        if not records:
            return False
        rows = [(r.seq, r.time, r.tenant, r.peer, r.kind, r.sandbox_id, r.session_id,
                 r.detail_json, r.prev_hash, r.hash) for r in records]
        self.sink.deliver(rows)
        self.delivered = rows[-1][0]
        write_cursor(self.cursor_path, self.delivered)
        return len(rows) == _BATCH

    def statistics(self) -> dict:
        return {"name": self.name, "delivered_seq": self.delivered,
                "lag": max(self.log.last_seq() - self.delivered, 0), "errors": self.errors,
                "dropped": self.dropped, "last_error": self.last_error}

    def close(self, drain_s: float = 2.0) -> None:
        """Deliver what it can within drain_s, then stop (the rest waits for the next
        start: the cursor says where)."""
        self.log.unsubscribe(self._token)
        end = _time.monotonic() + drain_s
        while self.delivered < self.log.last_seq() and _time.monotonic() < end:
            self._wake.set()
            _time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.sink.close()


def start_sinks(log, tables: Mapping[str, Mapping], state_dir: str) -> list[SinkWorker]:
    folder = os.path.join(state_dir, "sinks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    workers = []
    for name, table in sorted(tables.items()):
        workers.append(SinkWorker(log, name, make_sink(name, table),
                                  os.path.join(folder, f"{name}.cursor"),
                                  int(table.get("max_lag", DEFAULT_MAX_LAG))))
    return workers
