"""A plain agent's stdout and stderr go straight into its session's hub (runtime/sessions.py)."""

from __future__ import annotations

import asyncio
import os

import pytest

from corral.ext import EventKind
from corral.runtime.sessions import PlainOutput
from corral.runtime.streams import StreamHub, make_pipe_pair

from .test_stream_core import IMPLS, load_impl
from .test_streams import run


def entries(stream) -> list[tuple[int, int, bytes]]:
    return [(e.seq, int(e.kind), e.payload)
            for e in (stream.get(seq) for seq in range(stream.first_seq, stream.next_seq))]


@pytest.mark.parametrize("impl", IMPLS)
def test_output_is_copied_as_it_is_read_including_what_came_before(impl):
    core = load_impl(impl)

    async def main():
        r, w = make_pipe_pair()
        source = StreamHub(core.TokenStream("text"))
        target = StreamHub(core.TokenStream("frames"), end_on_eof=False)
        os.write(w, "early \u00e9".encode()[:-1])  # the é cut in half: held back
        source.attach_fd(r)
        await asyncio.sleep(0.05)
        copier = PlainOutput(source, target, EventKind.LOG)
        os.write(w, "\u00e9".encode()[1:] + b" later")
        await asyncio.sleep(0.05)
        os.close(w)
        await source.wait_eof()
        copier.stop(source)
        source.close()
        return source, target

    source, target = run(main())
    assert b"".join(p for _, _, p in entries(source.stream)) == "early \u00e9 later".encode()
    copied = entries(target.stream)
    assert {k for _, k, _ in copied} == {int(EventKind.LOG)}
    assert b"".join(p for _, _, p in copied) == "early \u00e9 later".encode()
    assert [p for _, _, p in copied] == [p for _, _, p in entries(source.stream) if p]


def test_a_stopped_copier_copies_nothing_more():
    core = load_impl("python")

    async def main():
        source = StreamHub(core.TokenStream("frames"))
        target = StreamHub(core.TokenStream("frames"))
        copier = PlainOutput(source, target, EventKind.TOKEN)
        source.append_event(EventKind.TOKEN, b"one")
        copier.stop(source)
        source.append_event(EventKind.TOKEN, b"two")
        return target

    target = run(main())
    assert entries(target.stream) == [(1, int(EventKind.TOKEN), b"one")]
