"""Exec output through the real daemon is lossless and byte-exact by default (issue 17).

A command writes pseudo-random binary output (invalid UTF-8 throughout) and, at its end,
the sha256 and size of what it wrote on stderr. The client's digest of what arrived must
be the same: with a reader slower than the command (the daemon holds the command back),
with a reader that drops the stream and resumes with after_seq, and through `corral exec
| sha256sum`. Loss happens only where the request allows it, and then it is reported.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import grpc
import pytest

from corral.runtime.client import ClientError
from corral.v1 import sandbox_pb2

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

#: Output per transfer: 256 MiB by default (CORRAL_TEST_EXEC_BYTES=1073741824 for the
#: full GiB, which passes too). On this shared 2-core machine one GiB took 19 s through the
#: slow reader, 21 s dropping and resuming, 22 s through `corral exec | sha256sum`: a minute
#: of one CI run for three transfers; 256 MiB takes about 6 s each.
SIZE = int(os.environ.get("CORRAL_TEST_EXEC_BYTES", 256 << 20))

GENERATOR = r"""
import hashlib, os, sys
size = int(sys.argv[1])
digest = hashlib.sha256()
out = sys.stdout.buffer
block = os.urandom(1 << 20)
written = 0
while written < size:
    # a new block for each MiB: a replayed or skipped chunk changes the digest
    block = hashlib.sha256(block[:64]).digest() * 2 + block[64:] + block[:0]
    chunk = block[:min(len(block), size - written)]
    digest.update(chunk)
    out.write(chunk)
    written += len(chunk)
out.flush()
print(f"{digest.hexdigest()} {written}", file=sys.stderr)
"""


@pytest.fixture
def generator(client, sandbox):
    client.write_file(sandbox.id, "gen.py", GENERATOR.encode())
    return ["python3", "/workspace/gen.py", str(SIZE)]


def _expected(stderr: bytes) -> tuple[str, int]:
    digest, size = stderr.decode().split()
    return digest, int(size)


class Received:
    """What one client got: a digest per stream, the last seq of each, losses."""

    def __init__(self) -> None:
        self.digests = {1: hashlib.sha256(), 2: hashlib.sha256()}
        self.sizes = {1: 0, 2: 0}
        self.stderr = bytearray()
        self.last = {1: 0, 2: 0}
        self.lost = 0
        self.exited = None
        self.messages = 0

    def take(self, event) -> None:
        kind = event.WhichOneof("event")
        if kind == "output":
            batch, stream = event.output.batch, event.output.stream
            self.lost += batch.lost.count
            assert batch.first_seq == self.last[stream] + 1 or batch.lost.count
            self.digests[stream].update(batch.text)
            self.sizes[stream] += len(batch.text)
            if stream == 2:
                self.stderr += batch.text
            self.last[stream] = batch.first_seq + len(batch.lengths) - 1
            self.messages += 1
        elif kind == "exited":
            self.exited = event.exited


def test_binary_output_arrives_byte_exact_to_a_slow_reader(client, sandbox, generator):
    got = Received()
    for event in client.exec(sandbox.id, generator):
        got.take(event)
        if got.messages % 4 == 0:
            time.sleep(0.01)  # slower than the command: it must wait, not lose
    assert (got.exited.returncode, got.exited.reason) == (0, "exited")
    assert got.lost == 0
    assert (got.digests[1].hexdigest(), got.sizes[1]) == _expected(bytes(got.stderr))
    assert got.sizes[1] == SIZE


def test_a_reader_that_drops_and_resumes_with_after_seq_loses_nothing(client, sandbox,
                                                                      generator):
    got = Received()
    call = client.sandboxes.Exec(sandbox_pb2.ExecRequest(sandbox_id=sandbox.id, argv=generator),
                                 metadata=client.metadata)
    exec_id, drops = "", 0
    while got.exited is None:
        taken = 0
        try:
            for event in call:
                if event.WhichOneof("event") == "started":
                    exec_id = event.started.exec_id
                    continue
                got.take(event)
                taken += 1
                if taken % 4 == 0:
                    time.sleep(0.01)  # a slow reader: gRPC's buffers fill before the drop
                if taken == 16 and got.exited is None:
                    break
        finally:
            call.cancel()
        if got.exited is None:
            drops += 1
            time.sleep(0.05)  # nobody reads: the command runs on, then waits
            call = client.sandboxes.Attach(sandbox_pb2.AttachRequest(
                sandbox_id=sandbox.id, exec_id=exec_id, stdout_after_seq=got.last[1],
                stderr_after_seq=got.last[2]), metadata=client.metadata)
    assert got.exited.returncode == 0
    assert drops >= 5
    assert got.lost == 0
    assert (got.digests[1].hexdigest(), got.sizes[1]) == _expected(bytes(got.stderr))


def test_corral_exec_piped_into_sha256sum_matches(daemon, sandbox, generator):
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    cli = [sys.executable, "-m", "corral.runtime.cli", "exec", sandbox.id, "--", *generator]
    pipeline = subprocess.run(
        f"{subprocess.list2cmdline(cli)} | sha256sum; echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True, executable="/bin/bash", env=env, capture_output=True, timeout=300)
    digest, size = _expected(pipeline.stderr)
    assert size == SIZE
    assert pipeline.stdout.decode() == f"{digest}  -\nstatus 0\n"


def test_loss_only_when_asked_and_then_the_cli_says_so(daemon, sandbox):
    env = dict(os.environ, CORRAL_SOCKET=daemon.socket)
    size = 64 << 20  # eight times the daemon's 8 MiB replay log
    cli = [sys.executable, "-m", "corral.runtime.cli", "exec", "--allow-loss", sandbox.id,
           "--", "head", "-c", str(size), "/dev/zero"]
    # the consumer reads nothing for 3 s: the CLI blocks on its stdout, the daemon reads on
    pipeline = subprocess.run(
        f"{subprocess.list2cmdline(cli)} | (sleep 3; wc -c); echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True, executable="/bin/bash", env=env, capture_output=True, timeout=300)
    count, status = pipeline.stdout.decode().split("\n")[:2]
    assert status == "status 1"
    assert int(count) < size
    assert re.fullmatch(r"corral: exec: \d+ chunks of stdout of head were lost \(this reader "
                        r"was too slow; the command exited with status 0\)\n",
                        pipeline.stderr.decode()), pipeline.stderr

    # the same without --allow-loss: every byte, status 0, nothing on stderr
    pipeline = subprocess.run(
        f"{subprocess.list2cmdline([a for a in cli if a != '--allow-loss'])} "
        f"| (sleep 3; wc -c); echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True, executable="/bin/bash", env=env, capture_output=True, timeout=300)
    assert (pipeline.stdout.decode(), pipeline.stderr) == (f"{size}\nstatus 0\n", b"")


def test_a_lossy_exec_never_waits_for_its_reader(client, sandbox):
    size = 64 << 20
    events = client.exec(sandbox.id, ["head", "-c", str(size), "/dev/zero"], allow_loss=True)
    started = next(events)
    exec_id = started.started.exec_id
    deadline = time.monotonic() + 60
    while [e.running for e in client.get_sandbox(sandbox.id).execs if e.id == exec_id] != [False]:
        assert time.monotonic() < deadline, "the command was held back"
        time.sleep(0.05)
    got = Received()
    for event in events:
        got.take(event)
    assert got.exited.returncode == 0
    assert got.lost > 0 and got.sizes[1] < size


@pytest.mark.parametrize("field", ["stdout_after_seq", "stderr_after_seq"])
def test_attach_past_the_newest_entry_is_invalid_argument(client, sandbox, field):
    res = list(client.exec(sandbox.id, ["echo", "hi"]))
    exec_id = res[0].started.exec_id
    with pytest.raises(ClientError) as exc:
        list(client.attach(sandbox.id, exec_id, **{field: 10**9}))
    newest = 1 if field == "stdout_after_seq" else 0
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(exc.value) == (f"INVALID_ARGUMENT: {field}: 1000000000 is past the newest entry "
                              f"of the stream (seq {newest}); resume from 0 to {newest}")
