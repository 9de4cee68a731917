"""Deep tasks as the scheduler holds them: the validated spec and the mutable record.

No gRPC types here: runtime/api/tasks.py translates. Validation errors name the request
field (``spec.selector``, ``spec.resources[gpu]``, ...) so a caller can fix the request.
"""

from __future__ import annotations

import base64
import json
import math
import posixpath
import re
from dataclasses import dataclass, field

from corral.sandbox.errors import CorralError, FailedPrecondition, InvalidSpec
from corral.sandbox.spec import SandboxSpec, check_argv

from ..labels import check_labels
from .states import TaskState

_LABEL_KEY_RE = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_RESOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")
MAX_PRIORITY = 1000
MAX_RETRIES = 100
MAX_RUNTIME_S = 30 * 86400.0
MAX_FILES_BYTES = 16 << 20


class Unsatisfiable(FailedPrecondition):
    """No node of the cluster could ever run the task (its selector or resources)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


class RequestIdReused(CorralError):
    """A Submit's request_id already made a task of this tenant, with a different spec."""

    grpc_status = "ALREADY_EXISTS"


MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> str:
    """An idempotency key: printable ASCII, at most MAX_REQUEST_ID_CHARS."""
    if len(request_id) > MAX_REQUEST_ID_CHARS or not all(" " < c <= "~" for c in request_id):
        raise InvalidSpec("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable "
                                        "ASCII characters without spaces, e.g. a UUID")
    return request_id


def check_label_key(key: str, field_name: str) -> str:
    if not _LABEL_KEY_RE.match(key or ""):
        raise InvalidSpec(field_name, f"{key!r} is not a label key (a-z, 0-9, '.', '_', '-', "
                                      "'/', at most 63 characters)")
    return key


def check_label_value(key: str, value: str, field_name: str) -> str:
    if not _LABEL_VALUE_RE.match(value or ""):
        raise InvalidSpec(field_name, f"the value {value!r} of {key!r} is not a label value "
                                      "(A-Z, a-z, 0-9, '.', '_', '-', at most 63 characters)")
    return value


def check_resource(name: str, amount: float, field_name: str) -> float:
    if not _RESOURCE_RE.match(name or ""):
        raise InvalidSpec(field_name, f"{name!r} is not a resource name (e.g. cpu, "
                                      "accelerator.h200)")
    if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
        raise InvalidSpec(f"{field_name}[{name}]", f"{amount!r} must be a positive number")
    return float(amount)


def parse_pairs(items: list[str], field_name: str) -> dict[str, str]:
    """['k=v', ...] (CLI --selector) -> {k: v}, rejecting anything else by field name."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidSpec(field_name, f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


@dataclass(frozen=True)
class TaskSpec:
    """What to run and where; validated on construction (fields named as in the API)."""

    argv: tuple[str, ...]
    #: The attempt's sandbox, less what each attempt fixes itself (workspace, devices,
    #: ids) and what the held resources set (cpus, memory_bytes: scheduler.sandbox_limits).
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    selector: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    priority: int = 0
    retries: int = 0
    max_runtime_s: float = 0.0
    files: dict[str, bytes] = field(default_factory=dict)
    #: The client's key/value metadata (runtime/labels.py rules), to find the task by.
    labels: dict[str, str] = field(default_factory=dict)
    #: An image REF (docs/images.md) the attempt's sandbox runs on, pulled by the node that
    #: runs the attempt (the task is PULLING meanwhile); "" for the host's /usr.
    image: str = ""

    def __post_init__(self):
        check_argv(self.argv, "spec.argv")
        for key, value in self.selector.items():
            check_label_key(key, "spec.selector")
            check_label_value(key, value, "spec.selector")
        for name, amount in self.resources.items():
            check_resource(name, amount, "spec.resources")
        if not isinstance(self.priority, int) or not 0 <= self.priority <= MAX_PRIORITY:
            raise InvalidSpec("spec.priority", f"{self.priority!r} must be between 0 and "
                                               f"{MAX_PRIORITY} (higher runs first)")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidSpec("spec.retries", f"{self.retries!r} must be between 0 and "
                                              f"{MAX_RETRIES}")
        if not (math.isfinite(self.max_runtime_s) and 0 <= self.max_runtime_s <= MAX_RUNTIME_S):
            raise InvalidSpec("spec.max_runtime_s", "must be between 0 (none) and 30 days")
        total = 0
        for path, content in self.files.items():
            norm = posixpath.normpath(path) if path else ""
            if not path or path.startswith("/") or norm.startswith("..") or "\0" in path:
                raise InvalidSpec("spec.files", f"{path!r} must be a relative path inside "
                                                "/workspace")
            total += len(content)
        if total > MAX_FILES_BYTES:
            raise InvalidSpec("spec.files", f"{total} bytes is over the {MAX_FILES_BYTES} limit")
        check_labels(self.labels, "spec.labels")
        self._check_image()
        _refuse_unsupported(self.sandbox)

    def _check_image(self) -> None:
        """spec.image is a REF (no NUL); spec.sandbox.image may only repeat it, or name
        it alone (a client that sets only the sandbox's field: it becomes spec.image)."""
        if not self.image and self.sandbox.image:
            object.__setattr__(self, "image", self.sandbox.image)
        if not isinstance(self.image, str) or "\0" in self.image or len(self.image) > 4096:
            raise InvalidSpec("spec.image", "must be an image REF (docs/images.md), or empty "
                                            "for the host's /usr")
        if self.sandbox.image and self.sandbox.image != self.image:
            raise InvalidSpec("spec.sandbox.image", f"{self.sandbox.image!r} differs from "
                                                    f"spec.image {self.image!r}; name a task's "
                                                    f"image once, in spec.image")

    def to_json(self) -> str:
        return json.dumps({
            "argv": list(self.argv), "sandbox": self.sandbox.to_fields(),
            "selector": self.selector,
            "resources": self.resources, "priority": self.priority, "retries": self.retries,
            "max_runtime_s": self.max_runtime_s,
            "files": {k: base64.b64encode(v).decode() for k, v in self.files.items()},
            # only when set: a task without labels is stored as before they existed
            **({"labels": self.labels} if self.labels else {}),
            **({"image": self.image} if self.image else {}),
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        """The spec of a stored row, of this version or an older one (whose sandbox was
        SandboxSpec keyword arguments: SandboxSpec.from_fields reads both)."""
        d = json.loads(text)
        d["argv"] = tuple(d["argv"])
        d["sandbox"] = SandboxSpec.from_fields(d.get("sandbox", {}))
        d["files"] = {k: base64.b64decode(v) for k, v in d.get("files", {}).items()}
        return cls(**d)


@dataclass
class DeepTask:
    """One task's record; the store persists it, the scheduler mutates it."""

    id: str
    seq: int  # submission order, for FIFO within a tenant and priority
    tenant: str
    spec: TaskSpec
    state: TaskState = TaskState.QUEUED
    node: str = ""
    attempt: int = 0
    submitted_at: float = 0.0
    updated_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    progress_json: str = ""
    reason: str = ""
    result_json: str = ""
    checkpoint_seq: int = 0
    exit_code: int = 0
    #: How the last attempt's command ended, once the task finished, as an ExitReason word
    #: ("exited", "signaled", "timeout", "oom", "cancelled"); "" when no command exit
    #: decided it (never started, image pull failed, node lost, refused).
    exit_reason: str = ""
    devices: tuple[str, ...] = ()
    #: What the executor needs to find the attempt again (JSON object).
    runner_json: str = ""
    #: Attempts that failed or were lost (drained attempts do not count).
    failures: int = 0
    #: The caller's idempotency key (SubmitTaskRequest.request_id), "" for none.
    request_id: str = ""
    #: The session that delegated it, or that Submit linked it to ("" for none).
    parent_session: str = ""
    #: The delegating agent's name for it (its DELEGATE's ref), echoed in TASK_ACCEPTED.
    parent_ref: str = ""
    #: Its end was told to its parent session (TASK_DONE): told once, even across restarts.
    delivered: bool = False
    #: In memory only: a cancel was asked for while the attempt runs.
    cancel_requested: bool = False
    #: In memory only: the node is being drained; the attempt ends and the task requeues.
    drain_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


def _refuse_unsupported(sandbox) -> None:
    """What a task's sandbox cannot have, refused at submit, not failed at each attempt: a
    host directory shown as it is (attempts and retries would write into it directly, with
    no review); copy-on-write (workspace_cow) is taken: the task's change set outlives its
    attempts, for diff, apply or discard (runner.py). Secrets (their values read by each
    attempt's runner where the daemon's store keeps them) and a snapshot (held for the
    task while it lives: holds.py) are taken too.

    Raises:
        InvalidSpec: naming the field.
    """
    if sandbox.workspace is not None and not sandbox.workspace_cow:
        raise InvalidSpec("spec.sandbox.workspace_dir", "a deep task takes a host directory "
                                                        "copy-on-write only (workspace_cow); "
                                                        "or hand it files with spec.files")
