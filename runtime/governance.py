"""The daemon's evidence: signed checkpoints, audit sinks, the policy digest and its reloads.

One object the daemon starts right after its audit log opens and stops right after the
``daemon.stop`` record, so the last checkpoint signs the whole run and the sinks ship it.

``[audit]`` in the daemon's TOML:

* ``signing`` (default true); ``signing_key`` (default ``<state>/audit-signing.key``, made
  0600 at first start, its public key written beside it as ``.pub``); or
  ``signing_command`` (argv list or string: reads a message on stdin, prints its Ed25519
  signature) with ``signing_public_key``, for a key held in an HSM or a KMS;
* ``checkpoint_records`` (default 1000) and ``checkpoint_interval`` (default "60s"): sign
  the head after that many records, or after that long when records came;
* ``[audit.sinks.NAME]`` tables (runtime/sinks.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import parse_duration

log = logging.getLogger("corral.governance")

_KEYS = {"signing", "signing_key", "signing_command", "signing_public_key",
         "checkpoint_records", "checkpoint_interval", "sinks"}
DEFAULT_CHECKPOINT_RECORDS = 1000
DEFAULT_CHECKPOINT_INTERVAL_S = 60.0


def check_audit_settings(table: Mapping[str, Any]) -> dict:
    """The [audit] table, checked, with defaults and durations resolved.

    Raises:
        InvalidSpec: an unknown key or a bad value, named as audit.KEY.
    """
    from .sinks import check_sink

    for key in table:
        if key not in _KEYS:
            known = ", ".join(sorted(_KEYS))
            raise InvalidSpec(f"audit.{key}", f"unknown setting (known: {known})")
    out = dict(table)
    n = table.get("checkpoint_records", DEFAULT_CHECKPOINT_RECORDS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidSpec("audit.checkpoint_records", f"{n!r} must be a whole number >= 1")
    out["checkpoint_records"] = n
    interval = table.get("checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL_S)
    out["checkpoint_interval_s"] = (float(interval) if isinstance(interval, int | float)
                                    and not isinstance(interval, bool)
                                    else parse_duration(interval, "audit.checkpoint_interval"))
    if out["checkpoint_interval_s"] <= 0:
        raise InvalidSpec("audit.checkpoint_interval", "must be longer than zero")
    if not isinstance(table.get("signing", True), bool):
        raise InvalidSpec("audit.signing", "must be true or false")
    command = table.get("signing_command")
    if command is not None and not (
            (isinstance(command, str) and command.strip())
            or (isinstance(command, list) and command
                and all(isinstance(a, str) for a in command))):
        raise InvalidSpec("audit.signing_command", "must be a command line or a list of "
                                                   "arguments")
    for key in ("signing_key", "signing_public_key"):
        if key in table and not isinstance(table[key], str):
            raise InvalidSpec(f"audit.{key}", "must be a file path")
    sinks = table.get("sinks", {})
    if not isinstance(sinks, dict):
        raise InvalidSpec("audit.sinks", "must hold [audit.sinks.NAME] tables")
    for name, sink in sinks.items():
        check_sink(name, sink)
    out["sinks"] = sinks
    return out


class Governance:
    """Signer, checkpointer, sinks and policy reloads of one daemon."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.settings = check_audit_settings(daemon.config.audit)
        self.signer = None
        self.checkpointer = None
        self.sinks: list = []
        self.policy_digest = ""
        self.reloads = 0

    def start(self) -> None:
        """After the audit log opened: the signer (making the key at first start), the
        policy digest on every record from now on, the checkpointer and the sinks.

        Raises:
            SigningError, InvalidSpec: the key or a sink cannot be set up (the daemon
                refuses to start rather than run without the evidence it was told to keep).
        """
        from .policy_files import policy_digest
        from .signing import Checkpointer, signer_from_settings
        from .sinks import start_sinks

        cfg, audit = self.daemon.config, self.daemon.audit
        self.policy_digest = policy_digest(self.daemon.policies)
        audit.policy_digest = self.policy_digest
        self.signer = signer_from_settings(self.settings, cfg.state)
        if self.signer is not None:
            self.checkpointer = Checkpointer(
                audit, self.signer, every_records=self.settings["checkpoint_records"],
                interval_s=self.settings["checkpoint_interval_s"])
        self.sinks = start_sinks(audit, self.settings["sinks"], cfg.state)

    def start_detail(self) -> dict:
        """What the daemon.start record says about the evidence it keeps."""
        return {"policy_digest": self.policy_digest,
                "policy_file": self.daemon.config.policy_file or "",
                "signing_key_id": self.signer.key_id if self.signer else "",
                "sinks": [w.name for w in self.sinks]}

    def reload_policy(self) -> dict:
        """Re-read policy_file, swap the daemon's PolicyBook in place, record
        ``policy.reload`` (old and new digest, what widened) and sign it at once.

        A policy that does not validate is refused: the old one stays in force, and the
        refusal is recorded (``policy.reload_failed``) with the reason.
        """
        from corral.sandbox.errors import CorralError

        from .policy_files import build_book, load_source, policy_digest, widenings

        cfg, audit, book = self.daemon.config, self.daemon.audit, self.daemon.policies
        path = cfg.policy_file
        if not path:
            log.warning("SIGHUP: no policy_file configured; the policy stays as it is")
            return {}
        try:
            new = build_book(load_source(path), cfg.sandbox_ttl_s, cfg.operators)
        except CorralError as exc:
            log.error("policy reload refused, the old policy stays in force: %s", exc)
            audit.append("policy.reload_failed", tenant="", peer="daemon",
                         detail={"source": path, "error": str(exc)[:2000],
                                 "digest": self.policy_digest})
            return {"error": str(exc)}
        old_digest = self.policy_digest
        wider = widenings(book, new)
        digest = policy_digest(new)
        # In place: every manager holds this object. Each attribute swap is atomic; a
        # request racing the swap sees the old or the new policy of its tenant.
        book.per_tenant = new.per_tenant
        book.default = new.default
        self.policy_digest = digest
        audit.policy_digest = digest
        detail = {"source": path, "previous": old_digest, "digest": digest,
                  "widens": wider[:200], "widen_count": len(wider)}
        audit.append("policy.reload", tenant="", peer="daemon", detail=detail)
        self.reloads += 1
        if self.checkpointer is not None:
            self.checkpointer.checkpoint("policy.reload")
        log.info("policy reloaded from %s: %s (%d widening%s)", path, digest, len(wider),
                 "" if len(wider) == 1 else "s")
        return detail

    def statistics(self) -> dict:
        return {
            "policy_digest": self.policy_digest, "policy_reloads": self.reloads,
            "signing": self.checkpointer.statistics() if self.checkpointer else None,
            "sinks": [w.statistics() for w in self.sinks],
        }

    def stop(self) -> None:
        """After daemon.stop: sign the head, ship what the sinks can in a moment, stop."""
        try:
            if self.checkpointer is not None:
                self.checkpointer.close(final=True)
        finally:
            for worker in self.sinks:
                worker.close()
