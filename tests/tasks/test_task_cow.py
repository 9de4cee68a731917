"""A deep task on a copy-on-write workspace, through the real daemon (issue 14).

The host directory is the overlay's lower layer and is not touched while the task runs;
its change set (named after the task, under <state>/changes) survives a lost attempt and a
daemon SIGKILL, so the retried attempt sees what the first one wrote; the Sandboxes calls
Diff/Apply/Discard take the task id, with the same conflict refusal as for sandboxes.
"""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2 as pb

from ..integration.daemon_harness import reap
from .helpers import RUNNING, SUCCEEDED, shims_under, wait_done, wait_task, wait_until_true

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

#: Attempt 1 changes the workspace and waits (to be lost with its shim); attempt 2 finds
#: attempt 1's changes and adds its own.
COW_AGENT = r"""
set -eu
cd /workspace
if [ ! -f mark ]; then
    echo "attempt $CORRAL_ATTEMPT" > mark
    printf 'one\n2\nthree\n' > keep.txt
    rm gone.txt
    while :; do sleep 1; done
fi
cat mark > seen.txt
echo task > other.txt
"""


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ClientError) as exc:
        fn()
    return exc.value.code, str(exc.value)


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "keep.txt").write_text("one\ntwo\nthree\n")
    (root / "gone.txt").write_text("bye\n")
    (root / "other.txt").write_text("host\n")
    return root


def test_a_cow_task_keeps_its_changes_across_a_lost_attempt_until_apply(task_daemon,
                                                                        project):
    d = task_daemon()
    c = d.client()
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    task = c.submit_task(["sh", "-c", COW_AGENT], retries=1, workspace_dir=str(project),
                         workspace_cow=True)
    upper = d.root / "state" / "changes" / task.id / "mnt" / "upper"
    assert wait_until_true(lambda: (upper / "mark").exists(), 60), c.get_task(task.id).reason
    assert wait_task(c, task.id, lambda t: t.state == RUNNING, 30).attempt == 1
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before  # untouched
    assert sorted(ch.path for ch in c.diff(task.id)) == ["gone.txt", "keep.txt", "mark"]
    code, message = _code(lambda: c.apply(task.id))  # its attempt runs on the changes
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "still runs" in message
    assert _code(lambda: c.discard(task.id))[0] == grpc.StatusCode.FAILED_PRECONDITION
    d.kill()  # the daemon, and the attempt's shim with its sandbox: a lost attempt
    shims = shims_under(str(d.root))
    for pid in shims:
        os.kill(pid, signal.SIGKILL)
    reap(shims)
    d.start()
    c = d.client()
    done = wait_done(c, task.id, 120)
    assert (done.state, done.attempt) == (SUCCEEDED, 2), done.reason
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before
    changes = {ch.path: pb.ChangeKind.Name(ch.kind) for ch in c.diff(task.id)}
    assert changes == {"gone.txt": "CHANGE_KIND_DELETED", "keep.txt": "CHANGE_KIND_MODIFIED",
                       "mark": "CHANGE_KIND_ADDED", "other.txt": "CHANGE_KIND_MODIFIED",
                       "seen.txt": "CHANGE_KIND_ADDED"}  # no .corral/: the runner's own
    (project / "other.txt").write_text("edited on the host\n")
    assert [ch.path for ch in c.diff(task.id) if ch.conflict] == ["other.txt"]
    code, message = _code(lambda: c.apply(task.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'other.txt'" in message
    assert (project / "keep.txt").read_text() == "one\ntwo\nthree\n"  # nothing written
    done = c.apply(task.id, force=True)
    assert sorted(done.removed) == ["gone.txt"]
    assert (project / "seen.txt").read_text() == "attempt 1\n"  # attempt 2 saw attempt 1
    assert (project / "keep.txt").read_text() == "one\n2\nthree\n"
    assert (project / "other.txt").read_text() == "task\n"
    assert not (project / ".corral").exists()
    owner = os.stat(project)
    for path in project.rglob("*"):
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (owner.st_uid, owner.st_gid)
    assert c.discard(task.id) == 0
    assert _code(lambda: list(c.diff(task.id)))[0] == grpc.StatusCode.NOT_FOUND


def test_a_task_takes_a_host_directory_only_copy_on_write(task_daemon, project):
    c = task_daemon().client()
    code, message = _code(lambda: c.submit_task(["true"], workspace_dir=str(project)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.sandbox.workspace_dir: " in message and "workspace_cow" in message
    assert c.list_tasks() == []


#: Attempt 1 edits one of the spec's files, deletes the other and fails; attempt 2 finds
#: the workspace as attempt 1 left it (the spec's files are not written again).
SPEC_FILES_AGENT = r"""
set -eu
cd /workspace
if [ "$CORRAL_ATTEMPT" = 1 ]; then
    echo "edited by attempt 1" > notes.txt
    rm given/drop.txt
    exit 3
fi
{ cat notes.txt; ls given; test -e given/drop.txt && echo drop-back || echo drop-gone; } \
    > seen.txt
"""


def test_a_cow_retry_keeps_the_agents_edits_to_the_spec_files(task_daemon, project):
    d = task_daemon()
    c = d.client()
    task = c.submit_task(["sh", "-c", SPEC_FILES_AGENT], retries=1, workspace_dir=str(project),
                         workspace_cow=True,
                         files={"notes.txt": b"from the spec\n", "given/drop.txt": b"x\n",
                                "given/stay.txt": b"y\n"})
    done = wait_done(c, task.id, 120)
    assert (done.state, done.attempt) == (SUCCEEDED, 2), done.reason
    marker = d.root / "state" / "changes" / task.id / "spec-files-written"
    assert marker.exists()
    changes = {ch.path: pb.ChangeKind.Name(ch.kind) for ch in c.diff(task.id)}
    assert changes == {"notes.txt": "CHANGE_KIND_ADDED", "given": "CHANGE_KIND_ADDED",
                       "given/stay.txt": "CHANGE_KIND_ADDED",
                       "seen.txt": "CHANGE_KIND_ADDED"}, changes
    c.apply(task.id)
    assert (project / "seen.txt").read_text() == "edited by attempt 1\nstay.txt\ndrop-gone\n"
    assert (project / "notes.txt").read_text() == "edited by attempt 1\n"
    assert not (project / "given" / "drop.txt").exists()
