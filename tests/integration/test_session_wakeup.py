"""A Sessions.Open stream never sleeps on news that arrived while it was sending.

The stream sends a turn event, and during that send the agent answers: its entries wake a
stream that is not waiting yet. That wake-up used to be lost, and the stream slept until the
session's next entry. With an idle agent there is none, and the steered answer never came:
about one steer in six stalled this way.
"""

from __future__ import annotations

import threading

import pytest

from .daemon_harness import EVENT_TOKEN, STREAM_AGENT, batch_entries

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_every_steer_is_answered_at_once(client, sandbox):
    # Each INPUT starts a turn (a turn_started event is sent first) and the agent answers
    # at once with in:TEXT and a short burst, then goes idle until the next INPUT.
    stream = client.open_session(["python3", STREAM_AGENT, "--idle", "--tokens", "20"],
                                 sandbox_id=sandbox.id)
    seen: set[str] = set()
    cond = threading.Condition()

    def read():
        for event in stream:
            if event.WhichOneof("event") == "batch":
                with cond:
                    seen.update(p.decode() for _s, k, p in batch_entries(event.batch)
                                if k == EVENT_TOKEN)
                    cond.notify_all()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for n in range(40):
            stream.send_input(f"s{n}")
            with cond:
                # generous: an answer normally takes milliseconds
                assert cond.wait_for(lambda n=n: f"in:s{n}" in seen, timeout=10), n
    finally:
        stream.close_session()
        reader.join(30)
