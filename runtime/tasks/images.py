"""A task's image on the node that runs its attempt: pulled into that node's own store
(sandbox/images/store.py) before the sandbox starts on it, and the exit record of an
attempt whose pull failed.

The runner (local shim or Ray actor) calls this on its node, so every node pulls for
itself; the scheduler sees the pull as the task's PULLING state (pulling.json).
"""

from __future__ import annotations

import json
import os
import time

from corral.sandbox.errors import CorralError

from .files import atomic_write

#: Written in the attempt's directory when its pull begins; the executors report it.
PULLING_FILE = "pulling.json"


def pull_failure(ref: str, exc: BaseException) -> dict:
    """The exit record of an attempt whose image could not be pulled.

    A registry that cannot be reached (RegistryError: refused, timed out, 5xx) or a local
    I/O error may pass: "retryable" puts the attempt under the task's retry policy. The
    rest (no such image, a digest mismatch, a refused layer, denied credentials) would
    fail the same way again: the task fails at once.
    """
    from corral.sandbox.images.registry import RegistryError

    retryable = isinstance(exc, (RegistryError, OSError))
    return {"outcome": "pull_failed", "returncode": -1, "retryable": retryable,
            "reason": f"pulling image {ref} failed: {exc}"}


def pull_on_node(ref: str, attempt_dir: str, ring) -> dict | None:
    """Pull REF into this node's store unless it is there; None when the image is ready,
    else the attempt's exit record. `ring` tells the executor that pulling.json exists."""
    from corral.sandbox.images.store import ImageStore

    atomic_write(os.path.join(attempt_dir, PULLING_FILE),
                 json.dumps({"image": ref, "at": time.time()}).encode())
    ring()
    try:
        ImageStore().ensure(ref)
    except (CorralError, OSError) as exc:
        return pull_failure(ref, exc)
    return None
