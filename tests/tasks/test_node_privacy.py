"""Nodes.List and Nodes.Get through a real daemon: a tenant sees only its own tasks on a
node; an operator sees every task."""

from __future__ import annotations

import pytest

from .helpers import CANCELLED, RUNNING, wait_done, wait_task

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ONE_NODE = """
[[nodes]]
name = "shared"
labels = { pool = "shared" }
resources = { cpu = 2 }
"""


def test_a_tenant_sees_only_its_own_tasks_on_a_node(task_daemon):
    d = task_daemon(ONE_NODE)
    acme, beta, operator = d.client("acme"), d.client("beta"), d.client()
    mine = acme.submit_task(["sleep", "60"], resources={"cpu": 1})
    theirs = beta.submit_task(["sleep", "60"], resources={"cpu": 1})
    try:
        for c, t in ((acme, mine), (beta, theirs)):
            wait_task(c, t.id, lambda task: task.state == RUNNING, what="RUNNING")
        assert [list(n.tasks) for n in acme.list_nodes()] == [[mine.id]]
        assert [list(n.tasks) for n in beta.list_nodes()] == [[theirs.id]]
        assert list(acme.get_node("shared").tasks) == [mine.id]
        assert list(beta.get_node("shared").tasks) == [theirs.id]
        assert [sorted(n.tasks) for n in operator.list_nodes()] == [sorted([mine.id, theirs.id])]
        assert sorted(operator.get_node("shared").tasks) == sorted([mine.id, theirs.id])
        # what is not private stays shown: both tasks' cpu is taken from the node
        assert acme.get_node("shared").free["cpu"] == 0
    finally:
        for c, t in ((acme, mine), (beta, theirs)):
            c.cancel_task(t.id)
            assert wait_done(c, t.id).state == CANCELLED
