"""What a deep task leaves on disk, read by the daemon (issue 18): Result within the message
limit whatever max_bytes asks, sparse files kept sparse, checkpoints paced, trees of any
depth copied and removed."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from corral.runtime.api.wire import MAX_MESSAGE_BYTES
from corral.runtime.client import ClientError
from corral.sandbox import fstree

from .helpers import FAILED, SUCCEEDED, wait_done

ONE_SLOT = """
[[nodes]]
name = "solo"
labels = { pool = "solo" }
resources = { cpu = 1 }
"""

MIB = 1 << 20
#: out/big: 300 MiB long, data only at [0, 20 MiB) and [200 MiB, 200 MiB + 4 KiB).
SPARSE_OUT = """
import os
os.makedirs('/workspace/out', exist_ok=True)
with open('/workspace/out/big', 'wb') as f:
    f.write(bytes(range(256)) * (20 * 4096))
    f.seek(200 << 20)
    f.write(b'tail' * 1024)
    f.truncate(300 << 20)
with open('/workspace/out/small.txt', 'w') as f:
    f.write('small')
"""


def _memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _expected_big() -> bytes:
    data = bytearray(300 * MIB)
    head = bytes(range(256)) * (20 * 4096)
    data[:len(head)] = head
    data[200 * MIB:200 * MIB + 4096] = b"tail" * 1024
    return bytes(data)


def test_result_of_a_300_mib_sparse_file_stays_within_the_message_limit(task_daemon, tmp_path):
    """Before: three Result(max_bytes=1 GiB) calls read 300 MiB each (2.1 GiB daemon RSS)."""
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = c.submit_task(["python3", "-c", SPARSE_OUT])
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    [stored] = glob.glob(str(d.state / "tasks" / t.id / "out" / "big"))
    st = os.stat(stored)
    assert st.st_size == 300 * MIB and st.st_blocks * 512 < 32 * MIB  # copied sparsely

    before = _memory_kib(d.pid)
    answers: list = []
    callers = [threading.Thread(target=lambda: answers.append(c.task_result(t.id, 1 << 30)))
               for _ in range(3)]
    for th in callers:
        th.start()
    for th in callers:
        th.join()
    after = _memory_kib(d.pid)
    # Each answer: one message's worth at most (the 20 MiB of data do not fit one).
    for res in answers:
        assert res.ByteSize() <= MAX_MESSAGE_BYTES
        assert [f.path for f in res.files] == ["big"]
        assert (res.files[0].offset, res.files[0].size, res.files[0].truncated) == (
            0, 300 * MIB, True)
        assert res.next_path == "big"
        assert res.next_offset == len(res.files[0].content)
    # Three answers at once cost tens of MiB, not the 300 MiB file three times over.
    assert after["VmHWM"] - before["VmRSS"] < 160 * 1024, (before, after)

    # Paging through: the big file's data, its hole skipped, then the small file.
    # Asking nothing: a page a gRPC client with its default 4 MiB receive limit can take.
    default = c.task_result(t.id)
    assert [(f.path, f.offset, len(f.content)) for f in default.files] == [("big", 0, 2 * MIB)]
    assert (default.next_path, default.next_offset) == ("big", 2 * MIB)
    assert default.ByteSize() < 4 * MIB
    pieces, pages = [], 0
    for page in c.task_result_pages(t.id, 1 << 30):
        pages += 1
        pieces += [(f.path, f.offset, len(f.content), f.size, f.truncated) for f in page.files]
    assert pages == 2
    head = len(answers[0].files[0].content)
    assert pieces == [("big", 0, head, 300 * MIB, True),
                      ("big", head, 20 * MIB - head, 300 * MIB, True),
                      ("big", 200 * MIB, 4096, 300 * MIB, False),
                      ("small.txt", 0, 5, 5, False)]

    # The CLI writes the pieces at their offsets: the same bytes, still sparse.
    out = tmp_path / "got"
    run = subprocess.run([sys.executable, "-m", "corral.runtime.cli", "task", "result", t.id,
                          "--socket", d.socket, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [f"big\t{300 * MIB} bytes", "small.txt\t5 bytes"]
    got = out / "big"
    assert os.stat(got).st_blocks * 512 < 32 * MIB
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(
        _expected_big()).digest()
    assert (out / "small.txt").read_text() == "small"


CHECKPOINTER = """
import json, os, sys
import corral_agent as agent
d = os.environ['CORRAL_CHECKPOINT_DIR']
if os.environ['CORRAL_ATTEMPT'] == '1':
    with open(d + '/big', 'wb') as f:     # 64 MiB, 4 bytes of data
        f.write(b'head')
        f.truncate(64 << 20)
    for i in range(10):
        with open(d + '/state', 'w') as f:
            f.write(str(i))
        agent.checkpoint(b'frame-%d' % i)
    sys.exit(3)
with open(os.environ['CORRAL_CHECKPOINT_FILE'], 'rb') as f:
    frame = f.read().decode()
with open(d + '/big', 'rb') as f:
    head = f.read(4).decode()
agent.result(frame=frame, state=open(d + '/state').read(), size=os.path.getsize(d + '/big'),
             head=head)
"""


def test_checkpoints_are_paced_sparse_and_the_newest_wins(task_daemon):
    """Before: ten CHECKPOINT frames made ten full copies of a 64 MiB sparse file."""
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = c.submit_task(["python3", "-c", CHECKPOINTER], retries=1)
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert done.attempt == 2
    assert json.loads(done.result_json) == {"frame": "frame-9", "state": "9",
                                            "size": 64 * MIB, "head": "head"}
    # The first frame is taken at once; the other nine wait their turn and fold into one
    # taken when the attempt ends (or into the first, had they all come in one read).
    assert done.checkpoint_seq in (1, 2)
    ckpt = d.state / "tasks" / t.id / "checkpoints"
    seq = (ckpt / "LATEST").read_text()
    assert seq == str(done.checkpoint_seq)
    big = os.stat(ckpt / seq / "files" / "big")
    assert big.st_size == 64 * MIB and big.st_blocks * 512 <= 64 * 1024


DEEP = """
import os
for top in ('/workspace/out', os.environ['CORRAL_CHECKPOINT_DIR']):
    os.makedirs(top, exist_ok=True)
    os.chdir(top)
    for i in range(1500):
        os.mkdir('d'); os.chdir('d')
    open('f', 'w').write('deep')
    os.mkfifo('fifo')
    os.symlink('/etc/passwd', 'link')
    os.chmod('.', 0o500)
"""


def test_a_1500_level_tree_in_out_and_in_checkpoints(task_daemon):
    """Before: copying and scanning recursed (RecursionError): the attempt ended in error."""
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = c.submit_task(["python3", "-c", DEEP])
    try:
        _check_deep(d, c, t)
    finally:  # the fixture's own search of tmp_path (Path.rglob) recurses
        for name in ("checkpoints", "out"):
            fstree.remove_tree(str(d.state / "tasks" / t.id / name))


def _check_deep(d, c, t) -> None:
    done = wait_done(c, t.id)
    assert (done.state, done.reason) == (SUCCEEDED, "exited 0")
    assert done.checkpoint_seq in (1, 2)  # 2: a scan saw the tree half made
    deep = "/".join(["d"] * 1500)
    files = [(f.path, f.content) for page in c.task_result_pages(t.id) for f in page.files]
    assert files == [(f"{deep}/f", b"deep")]  # no FIFO, no link
    # The attempt's workspace is gone; the task's copies of both trees are complete.
    assert glob.glob(str(d.state / "tasks" / t.id / "attempt-1" / "workspace")) == []
    ckpt = d.state / "tasks" / t.id / "checkpoints" / str(done.checkpoint_seq) / "files"
    fd = os.open(ckpt, os.O_RDONLY)
    try:
        for _ in range(1500):
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        assert sorted(os.listdir(fd)) == ["f"]
    finally:
        os.close(fd)


def test_a_fifo_in_out_never_stalls_the_attempt(task_daemon):
    t_script = ("import os; os.makedirs('/workspace/out'); os.mkfifo('/workspace/out/pipe');"
                "open('/workspace/out/ok', 'w').write('ok')")
    d = task_daemon(ONE_SLOT)
    c = d.client()
    t = c.submit_task(["python3", "-c", t_script])
    done = wait_done(c, t.id)
    assert done.state == SUCCEEDED, done.reason
    assert [(f.path, f.content) for f in c.task_result(t.id).files] == [("ok", b"ok")]
    assert done.state != FAILED
    for bad in ("../secret", "/etc/passwd"):
        with pytest.raises(ClientError) as info:
            c.task_result(t.id, path=bad)
        assert str(info.value) == f"INVALID_ARGUMENT: path: {bad!r} is not a path relative to out/"
