"""`corral task submit --workspace DIR --cow | --from SNAPSHOT | --secret` and `corral task
diff|apply|discard`, as a developer types them, against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..tasks.helpers import SUCCEEDED, wait_done

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def _corral(daemon, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    return subprocess.run([sys.executable, "-m", "corral.runtime.cli", *args],
                          capture_output=True, env=env, timeout=120, check=False, text=True)


def test_task_state_verbs(make_daemon, tmp_path):
    d = make_daemon("tasks").start()
    c = d.client()
    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("one\ntwo\nthree\n")
    made = _corral(d, "task", "submit", "--workspace", str(project), "--cow", "--",
                   "sh", "-c", "echo changed > /workspace/keep.txt")
    assert made.returncode == 0, made.stderr
    task_id = made.stdout.strip()
    assert wait_done(c, task_id).state == SUCCEEDED
    assert (project / "keep.txt").read_text() == "one\ntwo\nthree\n"
    stat = _corral(d, "task", "diff", task_id, "--stat")
    assert (stat.returncode, stat.stdout.splitlines()) == (0, [
        "modified keep.txt | +1 -3", "1 paths changed, +1 -3 lines"]), stat.stderr
    applied = _corral(d, "task", "apply", task_id)
    assert (applied.returncode, applied.stdout) == (0, "1 written, 0 removed\n"), applied.stderr
    assert (project / "keep.txt").read_text() == "changed\n"
    discarded = _corral(d, "task", "discard", task_id)
    assert (discarded.returncode, discarded.stdout) == (0, "0 changed paths discarded\n")

    sb = c.create_sandbox()
    assert _corral(d, "exec", sb.id, "--", "sh", "-c", "echo kept > /workspace/f").returncode == 0
    assert _corral(d, "snapshot", sb.id, "--name", "seed").returncode == 0
    c.destroy_sandbox(sb.id)
    forked = _corral(d, "task", "submit", "--from", "seed", "--", "sh", "-c",
                     "mkdir -p /workspace/out && cp /workspace/f /workspace/out/f")
    assert forked.returncode == 0, forked.stderr
    fork_id = forked.stdout.strip()
    assert wait_done(c, fork_id).state == SUCCEEDED
    files = {f.path: f.content for page in c.task_result_pages(fork_id) for f in page.files}
    assert files == {"f": b"kept\n"}
    assert _corral(d, "snapshot", "rm", "seed").returncode == 0

    plain = _corral(d, "task", "submit", "--workspace", str(project), "--", "true")
    assert plain.returncode == 2 and "--workspace DIR --cow" in plain.stderr
    bad = _corral(d, "task", "submit", "--secret", "NO_HOSTS", "--", "true")
    assert bad.returncode == 2 and "secrets" in bad.stderr
    missing = _corral(d, "task", "submit", "--secret", "API_TOKEN@api.test", "--", "true")
    assert missing.returncode == 1 and "'API_TOKEN'" in missing.stderr
    assert [t.id for t in c.list_tasks()] == [fork_id, task_id]
    assert d.stop() == 0
