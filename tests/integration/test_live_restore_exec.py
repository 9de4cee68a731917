"""Live restore of commands (runtime/command_journal.py): a daemon SIGKILLed while kept
sandboxes' commands stream output; after the restart every command is attached again
from the last seq its client saw and nothing is lost, duplicated or reordered."""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from corral.runtime.command_journal import JOURNAL_DIR
from corral.sandbox.backends.native import runtime_base

from .daemon_harness import collect_exec, wait_until
from .test_live_restore import _first, kept_daemon, reaper  # noqa: F401 (fixtures)

#: Numbered lines, paced so that the command runs across the kill and the restart.
LINES = 30000
PACED = (f'i=0; while [ $i -lt {LINES} ]; do echo "line-$i"; i=$((i+1)); '
         '[ $((i % 1000)) = 0 ] && sleep 0.1; done; echo tail >&2')
EXPECTED = b"".join(b"line-%d\n" % i for i in range(LINES))


def _read_some(events, at_least: int) -> tuple[str, bytearray, list[int]]:
    """Read an Exec stream until at_least stdout bytes came: (exec_id, bytes, seqs)."""
    exec_id, out, seqs = "", bytearray(), []
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "started":
            exec_id = ev.started.exec_id
        elif kind == "output" and ev.output.stream == 1:
            batch = ev.output.batch
            assert not batch.HasField("lost")
            out += batch.text
            seqs.extend(range(batch.first_seq, batch.first_seq + len(batch.lengths)))
            if len(out) >= at_least:
                break
    return exec_id, out, seqs


def _continuous(seqs: list[int], first: int) -> bool:
    return seqs == list(range(first, first + len(seqs)))


@pytest.mark.timeout(180)
def test_commands_resume_after_a_sigkill_with_nothing_lost(kept_daemon, reaper):  # noqa: F811
    d, c = _first(kept_daemon, reaper)
    sb = c.create_sandbox()
    reaper.pids.add(sb.init_pid)
    paced_events = c.exec(sb.id, ["sh", "-c", PACED])
    paced, seen, seen_seqs = _read_some(paced_events, 20_000)
    # a command that ends before the kill, its client having read only a part
    short_events = c.exec(sb.id, ["sh", "-c", "i=0; while [ $i -lt 5000 ]; do "
                                              "echo short-$i; i=$((i+1)); done; exit 3"])
    short, short_seen, short_seqs = _read_some(short_events, 1)
    # a command reading its stdin, kept open across the restart
    cat = collect_exec(iter([next(c.exec(sb.id, ["cat"], keep_stdin_open=True))])).exec_id
    c.send_input(sb.id, cat, b"before\n")
    # stdin closed before the restart: the holder's copy goes too, so cat sees EOF
    closed = collect_exec(iter([next(c.exec(sb.id, ["cat"], keep_stdin_open=True))])).exec_id
    c.send_input(sb.id, closed, b"bye\n", close=True)
    assert collect_exec(c.attach(sb.id, closed)).stdout == b"bye\n"
    journals = os.path.join(runtime_base(), sb.id, JOURNAL_DIR)
    assert wait_until(lambda: all(os.path.exists(os.path.join(journals, e, "command.json"))
                                  for e in (paced, short, cat)))
    assert wait_until(lambda: os.path.exists(os.path.join(journals, short, "exit.json")))

    assert d.kill() == -signal.SIGKILL
    paced_events.close()
    short_events.close()

    d2 = kept_daemon().start()
    c2 = d2.client()
    rest = collect_exec(c2.attach(sb.id, paced, stdout_after_seq=seen_seqs[-1]))
    assert _continuous(seen_seqs, 1) and _continuous(rest.stdout_seqs, seen_seqs[-1] + 1)
    whole = bytes(seen) + rest.stdout
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(EXPECTED).hexdigest()
    assert (rest.returncode, rest.stderr) == (0, b"tail\n")

    short_rest = collect_exec(c2.attach(sb.id, short, stdout_after_seq=short_seqs[-1]))
    assert _continuous(short_rest.stdout_seqs, short_seqs[-1] + 1)
    assert bytes(short_seen) + short_rest.stdout == b"".join(
        b"short-%d\n" % i for i in range(5000))
    assert short_rest.returncode == 3

    c2.send_input(sb.id, cat, b"after\n", close=True)  # the holder kept its stdin
    cat_all = collect_exec(c2.attach(sb.id, cat))
    assert (cat_all.stdout, cat_all.returncode) == (b"before\nafter\n", 0)

    # a finished command's journal goes with its sandbox; a new command works
    assert collect_exec(c2.exec(sb.id, ["echo", "again"])).stdout == b"again\n"
    c2.destroy_sandbox(sb.id)
    assert not os.path.exists(journals)
    assert d2.stop() == 0, d2.log()
