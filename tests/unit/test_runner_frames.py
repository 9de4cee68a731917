"""What a deep task's runner (runtime/tasks/runner.py) keeps of the frames its agent writes:
every RESULT, and of the PROGRESS frames read at once only the newest (a flood costs one
write, not one per frame), each before whatever came after it."""

from __future__ import annotations

import json

from corral.ext import TokenStream
from corral.ext import agent as protocol
from corral.runtime.tasks import runner as runner_mod
from corral.runtime.tasks.runner import AttemptPlan, AttemptRunner


def _frames(*frames: tuple[int, dict]) -> bytes:
    return b"".join(protocol.encode_frame(kind, json.dumps(body).encode())
                    for kind, body in frames)


class _Log:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)


def test_only_the_newest_progress_of_a_read_is_written_and_in_order(tmp_path, monkeypatch):
    runner = AttemptRunner(AttemptPlan("task-1", 1, ["true"], tasks_root=str(tmp_path)))
    runner.dir = str(tmp_path)
    written: list[tuple[str, dict]] = []

    def record(path: str, data: bytes) -> None:
        written.append((path.rsplit("/", 1)[1], json.loads(data)))

    monkeypatch.setattr(runner_mod, "replace_live", record)
    monkeypatch.setattr(runner_mod, "atomic_write", record)
    rings = []
    monkeypatch.setattr(runner, "_changed", lambda what: rings.append((len(written), what)))
    stream = TokenStream("frames")
    stream.feed(_frames(*[(protocol.PROGRESS, {"done": i}) for i in range(1000)],
                        (protocol.LOG, {"line": 1}), (protocol.PROGRESS, {"done": 1000}),
                        (protocol.RESULT, {"answer": 42}), (protocol.PROGRESS, {"done": 1001})))
    log = _Log()
    runner._drain(stream, log)
    assert written == [("progress.json", {"done": 999}), ("progress.json", {"done": 1000}),
                       ("result.json", {"answer": 42}), ("progress.json", {"done": 1001})]
    # each write is rung once, after it, naming what changed
    assert rings == [(1, b"p"), (2, b"p"), (3, b"r"), (4, b"p")]
    assert len(log.lines) == 1
    stream.feed(_frames((protocol.PROGRESS, {"done": 1002})))
    runner._drain(stream, log)  # a later read: its newest is written too
    assert written[-1] == ("progress.json", {"done": 1002})
