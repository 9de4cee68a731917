"""The one error tree of Corral; each class names the gRPC status it maps to, once."""

from __future__ import annotations

import errno as _errno
import os


class CorralError(Exception):
    """Root of every error Corral raises on purpose."""

    #: Name of the grpc.StatusCode this error maps to at the API boundary.
    grpc_status = "INTERNAL"
    #: Exit status of the CLI when this error ends a command.
    exit_code = 1


# -- caller faults -----------------------------------------------------------------------------


class InvalidSpec(CorralError):
    """A sandbox spec, policy or argument is malformed; the message names the field."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2

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
    """A limit of the daemon (sandboxes, sessions, buffered input) is reached."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(CorralError):
    """The daemon is shutting down or cannot be reached."""

    grpc_status = "UNAVAILABLE"


class InvalidTransition(CorralError):
    """A lifecycle move that the transition table does not allow."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, from_: str, to: str):
        self.from_ = from_
        self.to = to
        super().__init__(f"illegal transition {from_} -> {to}")


# -- runtime faults ----------------------------------------------------------------------------


class SandboxSetupError(CorralError):
    """A kernel step of containment failed; carries the step, the path and the errno."""

    grpc_status = "INTERNAL"

    def __init__(self, step: str, path: str | None, errno: int, detail: str = ""):
        self.step = step
        self.path = path
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        where = f" {path!r}" if path else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"sandbox setup failed at {step}{where}: {name} {os.strerror(errno)}{extra}"
        )


class CommandNotFound(CorralError):
    """The program to run does not exist (or is not executable) inside the sandbox."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 127

    def __init__(self, argv0: str, errno: int):
        self.argv0 = argv0
        self.errno = errno
        super().__init__(
            f"command {argv0!r} cannot be executed inside the sandbox: {os.strerror(errno)}"
        )


class UnsupportedHost(CorralError):
    """The host lacks a kernel feature the requested policy needs."""

    grpc_status = "FAILED_PRECONDITION"


class AuditError(CorralError):
    """The audit log cannot be opened or written; the action it would record must not proceed."""

    grpc_status = "INTERNAL"

    def __init__(self, path: str, message: str):
        self.path = path
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
