"""The one error tree of Corral; each class names the gRPC status it maps to, once.

It sits at the bottom of the layers and imports nothing of Corral, so the sandbox, the
domain (sandboxes, sessions, tasks) and the servicers all raise the same classes; which
exit status a CLI verb returns for one is that verb's decision, not the error's.
"""

from __future__ import annotations

import errno as _errno
import os


class CorralError(Exception):
    """Root of every error Corral raises on purpose."""

    #: Name of the grpc.StatusCode this error maps to at the API boundary.
    grpc_status = "INTERNAL"


# -- caller faults -----------------------------------------------------------------------------


class InvalidSpec(CorralError):
    """A sandbox spec, policy or argument is malformed; the message names the field."""

    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class NotFound(CorralError):
    grpc_status = "NOT_FOUND"


class PermissionDenied(CorralError):
    grpc_status = "PERMISSION_DENIED"


class Unauthenticated(CorralError):
    """No credentials, or credentials the daemon does not know."""

    grpc_status = "UNAUTHENTICATED"


class ResourceExhausted(CorralError):
    """A limit of the daemon (sandboxes, sessions, buffered input) or of the host
    (descriptors, disk, memory) is reached."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(CorralError):
    """The daemon is shutting down or cannot be reached."""

    grpc_status = "UNAVAILABLE"


# -- what a request is about is in the wrong state --------------------------------------------


class FailedPrecondition(CorralError):
    """What a request is about is not in a state that allows it (ended, not finished yet,
    closed, not supported here); the request itself may be fine another time."""

    grpc_status = "FAILED_PRECONDITION"


class InvalidTransition(FailedPrecondition):
    """A lifecycle move that the transition table does not allow."""

    def __init__(self, from_: str, to: str):
        self.from_ = from_
        self.to = to
        super().__init__(f"illegal transition {from_} -> {to}")


class Ended(FailedPrecondition):
    """The command, its stdin or the session a request is about has already ended."""


class NotFinished(FailedPrecondition):
    """The task has no result yet."""


class ControlClosed(FailedPrecondition):
    """The control pipe is gone: the agent closed its end, or the runtime closed ours."""


class ControlQueueFull(ResourceExhausted):
    """The agent is not reading its control pipe and the bounded queue is full."""

    def __init__(self, queued: int, limit: int, size: int) -> None:
        self.queued = queued
        self.limit = limit
        self.size = size
        super().__init__(
            f"the agent is not reading its control pipe: {queued} bytes of control frames are "
            f"already queued (limit {limit}); refused a frame of {size} bytes")


# -- runtime faults ----------------------------------------------------------------------------


class SandboxSetupError(CorralError):
    """A kernel step of containment failed; carries the step, the path and the errno.

    A step that failed because the host ran out of something (descriptors, disk, memory,
    processes) is the operator's to fix, not a bug: it maps to RESOURCE_EXHAUSTED and its
    message says what ran out and what to change.
    """

    grpc_status = "INTERNAL"

    def __init__(self, step: str, path: str | None, errno: int, detail: str = ""):
        self.step = step
        self.path = path
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        where = f" {path!r}" if path else ""
        extra = f" ({detail})" if detail else ""
        advice = exhaustion_advice(errno, step)
        if advice:
            self.grpc_status = "RESOURCE_EXHAUSTED"
            extra += f": {advice}"
        super().__init__(
            f"sandbox setup failed at {step}{where}: {name} {os.strerror(errno)}{extra}"
        )


#: What SQLite says when the filesystem under a database (the audit log, the task store) is full.
SQLITE_DISK_FULL = "database or disk is full"

#: errnos that say the host or the daemon ran out of something, not that a request is bad.
EXHAUSTION_ERRNOS = frozenset({
    _errno.EMFILE, _errno.ENFILE, _errno.ENOSPC, _errno.EDQUOT, _errno.ENOMEM,
})


def exhaustion_advice(errno: int, step: str = "") -> str:
    """What ran out and what an operator can do about it; "" when errno is no exhaustion.

    EAGAIN counts only from a process-creating step (clone, fork): there it means a pid,
    thread or memory limit, elsewhere it is a retry hint.
    """
    if errno == _errno.EMFILE:
        return ("the daemon is out of file descriptors (RLIMIT_NOFILE); raise its limit "
                "(LimitNOFILE= in its unit, prlimit) or lower max_sandboxes")
    if errno == _errno.ENFILE:
        return "the host is out of file descriptors (fs.file-max); raise it or run fewer sandboxes"
    if errno in (_errno.ENOSPC, _errno.EDQUOT):
        return "a filesystem or quota is full; free space (df, df -i) or lower workspace caps"
    if errno == _errno.ENOMEM:
        return "the host is out of memory or kernel memory; run fewer or smaller sandboxes"
    if errno == _errno.EAGAIN and step.startswith(("clone", "fork", "spawn")):
        return ("the host refused a new process (pid, thread or memory limit: "
                "kernel.pid_max, kernel.threads-max, the daemon's RLIMIT_NPROC)")
    return ""


def as_exhaustion(exc: BaseException) -> ResourceExhausted | None:
    """The ResourceExhausted an exception that is not one already really is, or None; the
    one classifier of exhaustion (used where errors become statuses).

    Covers an OSError with an exhaustion errno, SQLite's "database or disk is full" (also
    inside an AuditError) and a SandboxSetupError already classified as exhaustion.
    """
    if isinstance(exc, ResourceExhausted):
        return None  # already says so, in its own words (and may be a tenant's denial)
    if isinstance(exc, SandboxSetupError):
        return ResourceExhausted(str(exc)) if exc.grpc_status == "RESOURCE_EXHAUSTED" else None
    text = str(exc)
    if SQLITE_DISK_FULL in text:
        where = f" ({exc.path})" if isinstance(exc, AuditError) else ""
        return ResourceExhausted(
            f"the daemon's state filesystem is full{where}: {text}; free space on it "
            "(df on the --state directory); the daemon serves again once it has room")
    if isinstance(exc, OSError) and exc.errno is not None:
        advice = exhaustion_advice(exc.errno)
        if advice:
            name = _errno.errorcode.get(exc.errno, str(exc.errno))
            what = f" {exc.filename!r}" if exc.filename else ""
            return ResourceExhausted(f"{name}{what}: {advice}")
    return None


class CommandNotFound(InvalidSpec):
    """The program to run does not exist (or is not executable) inside the sandbox.

    An InvalidSpec naming `argv[0]`, so it reads as every other refused argument; callers
    that tell it apart (the CLI exits 127 for it) catch it before InvalidSpec.
    """

    def __init__(self, argv0: str, errno: int):
        self.argv0 = argv0
        self.errno = errno
        super().__init__("argv[0]", f"{argv0!r} cannot be executed inside the sandbox: "
                                    f"{os.strerror(errno)}")


class UnsupportedHost(FailedPrecondition):
    """The host lacks a kernel feature the requested policy needs."""


class AuditError(CorralError):
    """The audit log cannot be opened or written; the action it would record must not proceed."""

    grpc_status = "INTERNAL"

    def __init__(self, path: str, message: str):
        self.path = path
        if SQLITE_DISK_FULL in message:  # the operator's to fix, not a bug
            self.grpc_status = "RESOURCE_EXHAUSTED"
        super().__init__(f"audit log {path}: {message}")


class AuditTampered(AuditError):
    """The audit log fails its integrity check; carries the first broken record and why."""

    grpc_status = "DATA_LOSS"

    def __init__(self, path: str, broken_at_seq: int, problem: str):
        self.broken_at_seq = broken_at_seq
        self.problem = problem
        super().__init__(
            path,
            f"failed its integrity check: {problem}; keep it as evidence (move it and its "
            f".head aside) and start a new log",
        )
