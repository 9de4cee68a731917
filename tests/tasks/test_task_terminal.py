"""`corral task watch` through a pty: a task's log reaches a terminal filtered (text and
colours only), unchanged with --raw or into a pipe."""

from __future__ import annotations

import pytest

from ..integration.test_terminal_cli import PAYLOAD, SHOWN, WRITER, _env, _on_pty, _piped
from .helpers import SUCCEEDED, wait_done

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_task_watch_filters_a_terminal_and_passes_pipes_and_raw_unchanged(task_daemon):
    d = task_daemon()
    c = d.client()
    task = c.submit_task(WRITER)
    assert wait_done(c, task.id).state == SUCCEEDED
    env = _env(d)
    rc, out, err = _on_pty(["task", "watch", task.id], env)
    assert (rc, out) == (0, SHOWN), err
    rc, out, err = _on_pty(["task", "watch", "--raw", task.id], env)
    assert (rc, out) == (0, PAYLOAD), err
    piped = _piped(["task", "watch", task.id], env)
    assert (piped.returncode, piped.stdout) == (0, PAYLOAD), piped.stderr
