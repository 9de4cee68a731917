"""Running out of descriptors, disk, memory or processes is RESOURCE_EXHAUSTED with what to
change, classified in one place (corral.sandbox.errors.as_exhaustion)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from corral.sandbox.errors import (
    AuditError,
    InvalidSpec,
    ResourceExhausted,
    SandboxSetupError,
    as_exhaustion,
)


def test_emfile_at_clone_is_resource_exhausted_with_advice():
    exc = SandboxSetupError("clone", None, errno.EMFILE)
    assert exc.grpc_status == "RESOURCE_EXHAUSTED"
    assert str(exc) == (
        "sandbox setup failed at clone: EMFILE Too many open files: the daemon is out of "
        "file descriptors (RLIMIT_NOFILE); raise its limit (LimitNOFILE= in its unit, "
        "prlimit) or lower max_sandboxes")
    assert str(as_exhaustion(exc)) == str(exc)


@pytest.mark.parametrize("code, step, words", [
    (errno.ENFILE, "clone", "fs.file-max"),
    (errno.ENOSPC, "workspace mount", "df -i"),
    (errno.EDQUOT, "open_tree", "df -i"),
    (errno.ENOMEM, "clone", "out of memory"),
    (errno.EAGAIN, "clone", "kernel.pid_max"),
])
def test_each_exhaustion_errno(code, step, words):
    exc = SandboxSetupError(step, None, code)
    assert exc.grpc_status == "RESOURCE_EXHAUSTED"
    assert words in str(exc)


def test_other_errnos_stay_internal():
    assert SandboxSetupError("pivot_root", "/x", errno.EINVAL).grpc_status == "INTERNAL"
    assert SandboxSetupError("mount", "/x", errno.EAGAIN).grpc_status == "INTERNAL"
    assert as_exhaustion(SandboxSetupError("mount", "/x", errno.EINVAL)) is None
    assert as_exhaustion(ValueError("database")) is None
    assert as_exhaustion(InvalidSpec("memory", "bad")) is None


def test_full_database_and_oserrors():
    full = as_exhaustion(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(full, ResourceExhausted)
    assert str(full).startswith("the daemon's state filesystem is full: database or disk is "
                                "full; free space on it")
    audit = as_exhaustion(AuditError("/s/audit.db", "cannot append records 4-5: database or "
                                                    "disk is full"))
    assert str(audit).startswith("the daemon's state filesystem is full (/s/audit.db): ")
    assert AuditError("/s/audit.db", "cannot append records 4-5: database or disk is full"
                      ).grpc_status == "RESOURCE_EXHAUSTED"  # also where statuses are read raw
    assert AuditError("/s/audit.db", "cannot open: locked").grpc_status == "INTERNAL"
    emfile = as_exhaustion(OSError(errno.EMFILE, "Too many open files", "/p"))
    assert str(emfile).startswith("EMFILE '/p': the daemon is out of file descriptors")
    refused = ResourceExhausted("quota")
    assert as_exhaustion(refused) is None  # already one: it keeps its own path
