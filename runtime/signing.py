"""Signed checkpoints of the audit chain: Ed25519 keys, the checkpoint format and its check.

The hash chain (runtime/audit.py) proves that records were not edited *relative to each
other*; whoever can write the database and its head anchor can still re-hash the whole chain.
A checkpoint closes that gap: the daemon signs the chain head with a key the box may hold but
an auditor only needs the public half of, and stores the signature as an ordinary record of
kind ``audit.checkpoint``. A signature over record N's hash pins records 1..N (each hash
covers the one before), so a copy re-hashed after signing fails against the public key.

Checkpoint record (kind ``audit.checkpoint``, tenant "", peer "daemon"); its detail:

* ``seq``, ``hash``: the record signed (always an earlier record than the checkpoint);
* ``time``: Unix seconds when it was signed (a float);
* ``key_id``: the first 16 hex digits of sha256(raw 32-byte Ed25519 public key);
* ``reason``: ``records`` (every N records), ``interval`` (T seconds), ``stop``,
  ``policy.reload`` or ``request``;
* ``signature``: base64 (standard alphabet, padded) of the 64-byte Ed25519 signature of
  `checkpoint_message(seq, hash, time, key_id)`, i.e. the UTF-8 of the canonical JSON
  (sorted keys, no spaces, as the chain's content) of
  ``{"hash": H, "key_id": K, "seq": N, "time": T, "type": "corral.audit.checkpoint/1"}``.

`verify_signed()` checks a stream of records (a log, or an exported copy) against a public
key: the chain itself, every checkpoint's signature, that each signed hash is the hash the
chain has at that seq, and that every record but trailing checkpoints is covered by a valid
signature. It names the first record past the last valid signature when anything fails.

Keys: `FileSigner` holds a PKCS#8 PEM private key (generated at first start, 0600, with its
public key beside it as ``<key>.pub``); `CommandSigner` runs an operator's command that reads
the message on stdin and writes the signature (64 raw bytes, hex or base64) on stdout, so an
HSM or a KMS can hold the key. Either way the public key is what an auditor is given.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import threading
import time as _time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.sandbox.errors import CorralError, InvalidSpec

from .audit_chain import _ChainChecker
from .audit_records import GENESIS_HASH

_log = logging.getLogger("corral.signing")

CHECKPOINT_KIND = "audit.checkpoint"
CHECKPOINT_TYPE = "corral.audit.checkpoint/1"
REPORT_TYPE = "corral.report/1"
#: A checkpoint may sign a record at most this many records before itself and still be
#: checked by a streaming verifier (it signs the head of the moment, so the gap is the
#: records committed while it signed: a handful).
MAX_CHECKPOINT_LAG = 1 << 16
_SIGN_TIMEOUT_S = 10.0


class SigningError(CorralError):
    """The signing key cannot be read, made or used; the message says which and how to fix."""

    grpc_status = "FAILED_PRECONDITION"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def key_id(public_raw: bytes) -> str:
    """The short name of a public key: 16 hex digits of sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def checkpoint_message(seq: int, digest: str, time: float, kid: str) -> bytes:
    """The exact bytes a checkpoint signs (format in the module docstring)."""
    return _canonical({"hash": digest, "key_id": kid, "seq": seq, "time": float(time),
                       "type": CHECKPOINT_TYPE}).encode("utf-8")


# -- keys ----------------------------------------------------------------------------------------


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency of the package
        raise SigningError("signing needs the 'cryptography' package: pip install "
                           "cryptography") from None
    return ed25519


def _raw_public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str):
    """An Ed25519 public key from a file: PEM (SubjectPublicKeyInfo), or its 32 raw bytes
    as raw, hex or base64 text.

    Raises:
        SigningError: unreadable, or not an Ed25519 public key (says what it is instead).
    """
    ed25519 = _ed25519()
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as exc:
        raise SigningError(f"public key {path}: {exc.strerror}") from None
    if b"-----BEGIN" in data:
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SigningError(f"public key {path}: not a PEM public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SigningError(f"public key {path}: a {type(key).__name__}, not an Ed25519 "
                               "key; give the audit-signing.pub the daemon wrote")
        return key
    raw = _decode_bytes(data, 32)
    if raw is None:
        raise SigningError(f"public key {path}: neither PEM nor 32 bytes (raw, hex or "
                           "base64) of an Ed25519 public key")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def _decode_bytes(data: bytes, size: int) -> bytes | None:
    """`size` bytes given raw, as hex or as base64 text; None if none of these."""
    if len(data) == size:
        return data
    text = data.strip()
    try:
        raw = bytes.fromhex(text.decode("ascii"))
        if len(raw) == size:
            return raw
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) == size:
            return raw
    except (binascii.Error, ValueError):
        pass
    return None


class FileSigner:
    """An Ed25519 private key in a PEM file; `FileSigner.load_or_create(path)`."""

    def __init__(self, private_key, path: str):
        self._key = private_key
        self.path = path
        self.public_key = private_key.public_key()
        self.key_id = key_id(_raw_public(self.public_key))

    @classmethod
    def load_or_create(cls, path: str) -> FileSigner:
        """Load the key at path, or make one (0600, in a 0700 directory) if there is none;
        either way ``<path>.pub`` then holds its public key (PEM), for auditors.

        Raises:
            SigningError: the file exists but is not an unencrypted Ed25519 PEM key, is
                readable by others, or cannot be written.
        """
        from cryptography.hazmat.primitives import serialization

        ed25519 = _ed25519()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # another starter won the race: use its key
                return cls.load_or_create(path)
            except OSError as exc:
                raise SigningError(f"signing key {path}: cannot create it: "
                                   f"{exc.strerror}") from None
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            _log.info("audit signing key %s created (key id %s)", path,
                      key_id(_raw_public(key.public_key())))
        except OSError as exc:
            raise SigningError(f"signing key {path}: {exc.strerror}") from None
        else:
            try:
                st = os.fstat(fd)
                if st.st_mode & 0o077:
                    raise SigningError(f"signing key {path}: mode {st.st_mode & 0o777:04o} lets "
                                       f"others read it; chmod 600 {path}")
                data = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as exc:
                raise SigningError(f"signing key {path}: not an unencrypted PEM private key "
                                   f"({exc})") from None
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise SigningError(f"signing key {path}: a {type(key).__name__}, not Ed25519; "
                                   "remove it to have one made, or give an Ed25519 key")
        signer = cls(key, path)
        signer._write_public(path + ".pub")
        return signer

    def _write_public(self, pub_path: str) -> None:
        pem = public_pem(self.public_key)
        try:
            with open(pub_path, "rb") as f:
                if f.read() == pem:
                    return
        except OSError:
            pass
        tmp = f"{pub_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub_path)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


class CommandSigner:
    """Signs by running an operator's command (an HSM or KMS client): the message on its
    stdin, the signature (64 raw bytes, hex or base64) on its stdout, exit status 0.

    Each signature is checked against the configured public key before it is used, so a
    misconfigured command fails at start, not in an auditor's hands.
    """

    def __init__(self, argv: list[str], public_key_path: str):
        self.argv = list(argv)
        self.public_key = load_public_key(public_key_path)
        self.key_id = key_id(_raw_public(self.public_key))
        self.path = public_key_path

    def sign(self, message: bytes) -> bytes:
        from cryptography.exceptions import InvalidSignature

        name = self.argv[0]
        try:
            done = subprocess.run(self.argv, input=message, capture_output=True,
                                  timeout=_SIGN_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise SigningError(f"signing command {name!r} does not exist") from None
        except subprocess.TimeoutExpired:
            raise SigningError(f"signing command {name!r} gave no signature within "
                               f"{_SIGN_TIMEOUT_S:g}s") from None
        except OSError as exc:
            raise SigningError(f"signing command {name!r}: {exc.strerror}") from None
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip()[:200]
            raise SigningError(f"signing command {name!r} exited with {done.returncode}"
                               + (f": {err}" if err else ""))
        sig = _decode_bytes(done.stdout, 64)
        if sig is None:
            raise SigningError(f"signing command {name!r} printed no Ed25519 signature (64 "
                               "bytes raw, hex or base64)")
        try:
            self.public_key.verify(sig, message)
        except InvalidSignature:
            raise SigningError(f"signing command {name!r} signs with another key than "
                               f"{self.path} (key id {self.key_id})") from None
        return sig


def signer_from_settings(settings: Mapping[str, Any], state_dir: str):
    """The signer the daemon's ``[audit]`` settings name, or None when signing is off.

    Raises:
        SigningError, InvalidSpec: as `FileSigner` / `CommandSigner`, or a bad setting.
    """
    if settings.get("signing") is False:
        return None
    command = settings.get("signing_command")
    if command:
        argv = command.split() if isinstance(command, str) else list(command)
        pub = settings.get("signing_public_key")
        if not pub:
            raise InvalidSpec("audit.signing_public_key", "a signing_command needs the path "
                                                          "of its Ed25519 public key")
        signer = CommandSigner(argv, pub)
        signer.sign(checkpoint_message(0, "0" * 64, 0.0, signer.key_id))  # fail at start
        return signer
    path = settings.get("signing_key") or os.path.join(state_dir, "audit-signing.key")
    return FileSigner.load_or_create(path)


# -- the check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedVerifyResult:
    """Outcome of `verify_signed`."""

    ok: bool
    checked: int  # records examined
    signatures: int  # checkpoints whose signature verified and whose hash matched
    signed_through: int  # the last record pinned by a valid signature (0: none)
    last_seq: int  # the last record seen
    key_id: str
    broken_at_seq: int = 0  # when not ok: the first record past the last valid signature
    problem: str = ""
    first_seq: int = 0  # the first record seen
    # set when the only problem is records after the last signature (a live log's newest)
    unsigned_from: int = 0


def verify_signed(rows: Iterable[tuple], public_key,
                  on_chain: Callable[[tuple], tuple[int, str] | None] | None = None,
                  ) -> SignedVerifyResult:
    """Check rows (tuples in runtime/audit.py's _COLUMNS order, seq order) against a key,
    or a list of keys (a key rotated: each checkpoint names the key that signed it).

    `on_chain(row)` checks the hash chain (returns (seq, problem) at a break); by default an
    audit_chain._ChainChecker starting at the first row (a copy may start after record 1).
    """
    check = _SignedCheck(public_key, on_chain)
    try:
        for row in rows:
            check.feed(row)
        check.require_coverage()
    except _Untrusted as exc:
        return dataclasses.replace(check.past_signature(exc.problem),
                                   unsigned_from=exc.unsigned_from)
    return check.result(True)


class _Untrusted(Exception):
    """Why the records from the first one past the last valid signature cannot be trusted."""

    def __init__(self, problem: str, unsigned_from: int = 0):
        super().__init__(problem)
        self.problem = problem
        self.unsigned_from = unsigned_from  # set when only the newest records are unsigned


class _SignedCheck:
    """One `verify_signed` pass: the chain so far, the recent hashes checkpoints may sign,
    and how far valid signatures reach."""

    def __init__(self, public_key, on_chain: Callable[[tuple], tuple[int, str] | None] | None):
        self.keys = {key_id(_raw_public(k)): k for k in (
            public_key if isinstance(public_key, list | tuple) else [public_key])}
        self.kid = ",".join(self.keys)
        self.on_chain = on_chain
        self.recent: collections.OrderedDict[int, tuple[str, bool]] = collections.OrderedDict()
        self.checked = self.signatures = self.signed_through = 0
        self.last_seq = self.first_seq = 0

    def result(self, ok: bool, broken: int = 0, problem: str = "") -> SignedVerifyResult:
        return SignedVerifyResult(ok, self.checked, self.signatures, self.signed_through,
                                  self.last_seq, self.kid, broken, problem, self.first_seq)

    def past_signature(self, problem: str) -> SignedVerifyResult:
        """A failed result naming the first record no valid signature covers."""
        after = self.signed_through + 1 if self.signed_through else self.first_seq
        where = (f"the last valid signature covers records up to {self.signed_through}"
                 if self.signed_through else "no record is covered by a valid signature")
        return self.result(False, after, f"{problem}; {where}, so record {after} is the first "
                                         "that cannot be trusted")

    def feed(self, row: tuple) -> None:
        """Check one row's link in the chain and, for a checkpoint, its signature."""
        seq = row[0]
        if self.on_chain is None:
            start = seq if isinstance(seq, int) and seq > 1 else 1
            self.on_chain = _ChainChecker(start, row[8] if start > 1 else GENESIS_HASH).feed
        self.checked += 1
        problem = self.on_chain(row)
        if problem:
            raise _Untrusted(f"the hash chain breaks: {problem[1]}")
        if not self.first_seq:
            self.first_seq = seq
        self.last_seq = seq
        is_checkpoint = row[4] == CHECKPOINT_KIND
        self.recent[seq] = (row[9], is_checkpoint)
        if len(self.recent) > MAX_CHECKPOINT_LAG:
            self.recent.popitem(last=False)
        if is_checkpoint:
            self._check_checkpoint(seq, row[7])

    def _check_checkpoint(self, seq: int, detail_json: str) -> None:
        """The checkpoint at seq verifies with a given key and signs the hash the chain has."""
        from cryptography.exceptions import InvalidSignature

        c_seq, c_hash, c_time, c_kid, sig = _read_claim(seq, detail_json)
        if c_kid not in self.keys:
            given = "the given public key" if len(self.keys) == 1 else "any given public key"
            raise _Untrusted(f"record {seq}: the checkpoint is signed by key {c_kid}, not by "
                             f"{given} ({self.kid})")
        try:
            self.keys[c_kid].verify(sig, checkpoint_message(c_seq, c_hash, c_time, c_kid))
        except InvalidSignature:
            raise _Untrusted(f"record {seq}: the checkpoint's signature does not verify with "
                             "the given public key: forged or altered") from None
        if c_seq < self.first_seq:
            return  # signs a record before this copy starts: nothing here to compare
        seen = self.recent.get(c_seq)
        if seen is None:
            raise _Untrusted(f"record {seq}: signs record {c_seq}, which is not among the "
                             f"{MAX_CHECKPOINT_LAG} records before it")
        if seen[0] != c_hash:
            raise _Untrusted(
                f"record {seq}: signed hash {c_hash[:16]}... of record {c_seq}, but the chain "
                f"has {seen[0][:16]}... there: records up to {c_seq} were rewritten after "
                "they were signed")
        self.signatures += 1
        self.signed_through = max(self.signed_through, c_seq)

    def require_coverage(self) -> None:
        """Every record but trailing checkpoints is at or before a signed record."""
        unsigned = [s for s, (_h, ckpt) in self.recent.items()
                    if s > self.signed_through and not ckpt]
        if unsigned:
            raise _Untrusted(
                f"records {unsigned[0]}-{self.last_seq} are not covered by any signature (a "
                "running daemon signs every checkpoint_records records, every "
                "checkpoint_interval and when it stops)", unsigned_from=unsigned[0])


def _read_claim(seq: int, detail_json: str) -> tuple[int, str, float, str, bytes]:
    """(seq, hash, time, key_id, signature) of the checkpoint record at seq."""
    try:
        claim = json.loads(detail_json)
        c_seq, c_hash, c_time = claim["seq"], claim["hash"], float(claim["time"])
        c_kid, sig = claim["key_id"], base64.b64decode(claim["signature"], validate=True)
        if not isinstance(c_seq, int) or not isinstance(c_hash, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _Untrusted(f"record {seq}: an {CHECKPOINT_KIND} without a readable seq, hash, "
                         "time, key_id and signature") from None
    return c_seq, c_hash, c_time, c_kid, sig


# -- the daemon's checkpoints -----------------------------------------------------------------


class Checkpointer:
    """Signs the chain head every `every_records` records or `interval_s` seconds (when new
    records came) on its own thread, so appends never wait for a signature; `checkpoint()`
    signs now (at stop, after a policy reload).

    It subscribes to the log: the callback only notes the head and wakes the thread.
    """

    def __init__(self, log, signer, *, every_records: int = 1000, interval_s: float = 60.0):
        self.log = log
        self.signer = signer
        self.every_records = every_records
        self.interval_s = interval_s
        self._cv = threading.Condition()
        self._head: tuple[int, str] | None = None  # the newest non-checkpoint record
        self._since = 0  # non-checkpoint records since the last checkpoint
        self._signed_seq = 0
        self._stopping = False
        self.checkpoints = 0
        self.failures = 0
        self.last_error = ""
        self._sign_lock = threading.Lock()
        self._token = log.subscribe(self._on_record)
        self._thread = threading.Thread(target=self._run, name="corral-audit-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _on_record(self, rec) -> None:  # the appending thread, under the log's lock
        if rec.kind == CHECKPOINT_KIND:
            return
        with self._cv:
            self._head = (rec.seq, rec.hash)
            self._since += 1
            if self._since >= self.every_records:
                self._cv.notify()

    def _run(self) -> None:
        deadline = _time.monotonic() + self.interval_s
        while True:
            with self._cv:
                while not self._stopping and self._since < self.every_records:
                    left = deadline - _time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stopping:
                    return
                reason = "records" if self._since >= self.every_records else "interval"
                due = self._since > 0
            deadline = _time.monotonic() + self.interval_s
            if due:
                try:
                    future = self.checkpoint(reason, wait=False)
                except Exception as exc:  # noqa: BLE001 - retried at the next tick
                    _log.error("audit checkpoint failed: %s", exc)
                    continue
                if future is not None:
                    future.add_done_callback(lambda f: f.exception() and _log.error(
                        "audit checkpoint record not written: %s", f.exception()))

    def checkpoint(self, reason: str = "request", *, wait: bool = True):
        """Sign the newest record and append the checkpoint; returns its record (wait=True)
        or its future; None when there is nothing new to sign.

        Raises:
            SigningError: the signer failed (counted in `statistics()`).
        """
        with self._sign_lock:
            with self._cv:
                head, since = self._head, self._since
                if head is None:
                    last = self.log.last_seq()
                    if not last or last <= self._signed_seq:
                        return None
                    rec = self.log.query(after_seq=last - 1, limit=1)
                    if not rec:
                        return None
                    head = (rec[0].seq, rec[0].hash)
                if head[0] <= self._signed_seq:
                    return None
                self._since = 0
            when = _time.time()
            try:
                sig = self.signer.sign(checkpoint_message(head[0], head[1], when,
                                                          self.signer.key_id))
            except Exception as exc:
                with self._cv:
                    self._since += since
                self.failures += 1
                self.last_error = str(exc)
                raise
            self._signed_seq = head[0]
            self.checkpoints += 1
            future = self.log.submit(CHECKPOINT_KIND, tenant="", peer="daemon", detail={
                "seq": head[0], "hash": head[1], "time": when, "key_id": self.signer.key_id,
                "reason": reason, "signature": base64.b64encode(sig).decode("ascii")})
        return future.result() if wait else future

    def statistics(self) -> dict:
        with self._cv:
            pending = self._since
        return {"key_id": self.signer.key_id, "checkpoints": self.checkpoints,
                "signed_through": self._signed_seq, "unsigned_records": pending,
                "failures": self.failures, "last_error": self.last_error}

    def close(self, *, final: bool = True) -> None:
        """Stop the thread; with final=True sign the head once more (at daemon stop)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()
        self.log.unsubscribe(self._token)
        if final:
            self.checkpoint("stop")


def sign_document(signer, body: Mapping[str, Any]) -> dict:
    """A JSON document (e.g. a sandbox report) with a detached signature over the sha256 of
    its canonical JSON: {"type": REPORT_TYPE, "sha256", "key_id", "signature"}."""
    digest = hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()
    message = _canonical({"key_id": signer.key_id, "sha256": digest,
                          "type": REPORT_TYPE}).encode("utf-8")
    return {"type": REPORT_TYPE, "sha256": digest, "key_id": signer.key_id,
            "signature": base64.b64encode(signer.sign(message)).decode("ascii")}


def verify_document(body: Mapping[str, Any], signature: Mapping[str, Any], public_key) -> str:
    """'' when `signature` (from `sign_document`) signs `body` with `public_key`, else why not."""
    from cryptography.exceptions import InvalidSignature

    digest = hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()
    if signature.get("sha256") != digest:
        return "the document does not match the digest its signature covers: it was altered"
    kid = key_id(_raw_public(public_key))
    if signature.get("key_id") != kid:
        return f"signed by key {signature.get('key_id')}, not by the given key ({kid})"
    message = _canonical({"key_id": kid, "sha256": digest, "type": REPORT_TYPE}).encode("utf-8")
    try:
        public_key.verify(base64.b64decode(signature.get("signature", ""), validate=True),
                          message)
    except (InvalidSignature, binascii.Error, ValueError):
        return "the signature does not verify with the given public key"
    return ""
