"""How `corral session` prints a delegated task's news inline (runtime/cli/session.py)."""

from __future__ import annotations

import pytest

from corral.runtime.cli.session import task_line
from corral.v1 import session_pb2 as pb


@pytest.mark.parametrize(("event", "line"), [
    (pb.SessionTaskEvent(event="update", task_id="t-3f2", state="RUNNING", node="gpu-1",
                         progress_json='{"done": 2, "total": 5}'),
     "[task t-3f2 RUNNING on gpu-1: 40%]"),
    (pb.SessionTaskEvent(event="update", task_id="t-3f2", state="RUNNING", node="gpu-1",
                         progress_json='{"message": "loading"}'),
     "[task t-3f2 RUNNING on gpu-1: loading]"),
    (pb.SessionTaskEvent(event="update", task_id="t-3f2", state="QUEUED"),
     "[task t-3f2 QUEUED]"),
    (pb.SessionTaskEvent(event="accepted", task_id="t-3f2", ref="sim"),
     "[task t-3f2 accepted as sim]"),
    (pb.SessionTaskEvent(event="done", task_id="t-3f2", state="SUCCEEDED", node="gpu-1",
                         out_dir="/workspace/.corral/tasks/t-3f2"),
     "[task t-3f2 SUCCEEDED on gpu-1: result in /workspace/.corral/tasks/t-3f2]"),
    (pb.SessionTaskEvent(event="refused", ref="sim", code="INVALID_ARGUMENT",
                         message="delegate.argv: must be a list of strings"),
     "[task sim refused: INVALID_ARGUMENT delegate.argv: must be a list of strings]"),
    (pb.SessionTaskEvent(event="update", task_id="t-1", state="RUNNING",
                         progress_json='{"message": "\\u001b[2Jgone"}'),
     "[task t-1 RUNNING: \\x1b[2Jgone]"),
])
def test_task_news_prints_as_one_escaped_line(event, line):
    assert task_line(event) == line
