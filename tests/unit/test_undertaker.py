"""The undertaker: removal jobs off the caller's path, in order, bounded, flushed."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from corral.sandbox import undertaker as undertaker_mod
from corral.sandbox.undertaker import MAX_BACKLOG, Undertaker


@pytest.fixture
def u():
    made = Undertaker()
    yield made
    made.stop()


def test_jobs_run_on_another_thread_in_the_order_given(u):
    ran = []
    for i in range(5):
        u.bury(lambda i=i: ran.append((i, threading.current_thread().name)))
    u.flush()
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {name for _, name in ran} == {"corral-undertaker"}
    assert u.pending() == 0


def test_a_full_backlog_runs_the_next_job_on_the_callers_thread(u):
    gate = threading.Event()
    u.bury(gate.wait)  # holds the thread
    while u.pending() != 1 or u._jobs:  # the thread took it off the queue
        threading.Event().wait(0.001)
    for _ in range(MAX_BACKLOG):
        u.bury(lambda: None)
    where = []
    u.bury(lambda: where.append(threading.current_thread()))
    assert where == [threading.current_thread()]  # ran before bury returned
    gate.set()
    u.flush()
    assert u.pending() == 0


def test_a_failing_job_is_logged_and_the_next_still_runs(u, caplog):
    ran = []
    u.bury(lambda: 1 / 0)
    u.bury(lambda: ran.append(True))
    with caplog.at_level(logging.ERROR, logger="corral.sandbox"):
        u.flush()
    assert ran == [True]
    assert "leftovers failed" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_stop_drains_and_ends_the_thread_and_a_later_bury_starts_another(u):
    ran = []
    u.bury(lambda: ran.append(1))
    first = u._thread
    u.stop()
    assert ran == [1] and not first.is_alive() and u._thread is None
    u.bury(lambda: ran.append(2))
    u.flush()
    assert ran == [1, 2] and u._thread is not first


def test_a_forked_child_starts_with_no_thread_and_an_empty_backlog():
    gate = threading.Event()
    undertaker_mod.undertaker.bury(gate.wait)  # the parent's thread is busy at the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its own undertaker works, the parent's job is not its
        try:
            child = undertaker_mod.undertaker
            state = (child._thread is None, child.pending())
            done = []
            child.bury(lambda: done.append(1))
            child.flush()
            os.write(w, repr((state, done)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    gate.set()
    undertaker_mod.undertaker.flush()
    assert answer == "((True, 0), [1])"
