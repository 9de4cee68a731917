"""What a sandbox remembers of its commands is bounded: a tenant running many commands with
huge argvs cannot make Get/List answers (or the daemon's memory) grow without end."""

from __future__ import annotations

import pytest

from corral.runtime.api.sandboxes import SHOWN_ARGV_BYTES
from corral.runtime.sandboxes import MAX_FINISHED_EXECS, MAX_FINISHED_OUTPUT_BYTES

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def test_finished_commands_are_retired_and_argvs_cut(client, sandbox):
    big = ["true"] + ["y" * 1000] * 300  # 300 KB: allowed (the limit is 1 MiB)
    first = None
    for _ in range(MAX_FINISHED_EXECS + 6):
        events = list(client.exec(sandbox.id, big))
        first = first or events[0].started.exec_id
        assert events[-1].exited.returncode == 0
    got = client.get_sandbox(sandbox.id)
    assert len(got.execs) == MAX_FINISHED_EXECS
    assert first not in {e.id for e in got.execs}
    for info in got.execs:
        assert sum(len(a) for a in info.argv[:-1]) == SHOWN_ARGV_BYTES
        assert info.argv[-1] == "...(296 arguments cut, 295908 bytes)"
    assert got.ByteSize() < 2 * MAX_FINISHED_EXECS * SHOWN_ARGV_BYTES
    # listing every sandbox stays far under the 16 MiB message limit
    assert sum(s.ByteSize() for s in client.list_sandboxes()) < 1 << 20


def test_finished_commands_keep_at_most_64_mib_of_output_together(client, sandbox):
    # each command writes 20 MiB: its replay log keeps all of it (8 MiB // 4 + 24 MiB), so
    # by count 64 would stay (1.3 GiB of daemon memory); by bytes only the newest 3 do
    assert MAX_FINISHED_OUTPUT_BYTES == 64 << 20
    ids = []
    for _ in range(6):
        events = list(client.exec(sandbox.id, ["head", "-c", str(20 << 20), "/dev/zero"]))
        assert events[-1].exited.returncode == 0
        ids.append(events[0].started.exec_id)
    kept = [e.id for e in client.get_sandbox(sandbox.id).execs]
    assert kept == ids[-3:]
