"""Protocol v1.1 on the agent's side: delegate(), its handle, and the task control frames.

The runtime's end is played here with real pipes: what the agent writes is decoded with the
token core's twin, what the runtime would send is written as frames.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from corral.ext import agent as protocol
from corral.ext._stream_py import EventKind, TokenStream


@pytest.fixture
def wired():
    """An Agent on two pipes, and the runtime's ends (events read end, control write end)."""
    events_r, events_w = os.pipe()
    control_r, control_w = os.pipe()
    agent = protocol.Agent(events_w, control_r)
    yield agent, events_r, control_w
    for fd in (events_r, events_w, control_r, control_w):
        os.close(fd)


def _tool_calls(events_r: int) -> list[dict]:
    os.set_blocking(events_r, False)
    stream = TokenStream("frames")
    stream.feed(os.read(events_r, 1 << 16))
    calls = []
    while (ev := stream.next_event()) is not None:
        assert ev.kind == EventKind.TOOL_CALL
        calls.append(json.loads(ev.payload))
    return calls


def _send(control_w: int, kind: int, **fields) -> None:
    os.write(control_w, protocol.encode_frame(kind, json.dumps(fields).encode()))


def test_delegate_sends_one_tool_call_naming_the_runtime_tool(wired):
    agent, events_r, _ = wired
    handle = agent.delegate(["python3", "sim.py"], selector={"accelerator": "gpu"},
                            resources={"cpu": 2}, files=["sim.py"], max_runtime_s=60)
    assert handle.ref == "d1" and handle.task_id == "" and not handle.done
    assert _tool_calls(events_r) == [{
        "name": "corral.delegate", "id": "d1", "arguments": {
            "argv": ["python3", "sim.py"], "image": "", "selector": {"accelerator": "gpu"},
            "resources": {"cpu": 2}, "priority": 0, "max_runtime_s": 60, "retries": 0,
            "files": ["sim.py"], "labels": {}}}]


def test_updates_then_result_while_steering_waits_for_poll(wired):
    agent, events_r, control_w = wired
    handle = agent.delegate(["true"], ref="sim")
    _send(control_w, protocol.TASK_ACCEPTED, ref="sim", task_id="task-1")
    os.write(control_w, protocol.encode_frame(protocol.INPUT, b"user says hi"))
    _send(control_w, protocol.TASK_UPDATE, task_id="task-1", state="RUNNING",
          progress={"done": 4, "total": 10}, attempt=1)
    _send(control_w, protocol.TASK_DONE, task_id="task-1", state="SUCCEEDED",
          result={"answer": 42}, out_dir="/workspace/.corral/tasks/task-1")
    seen = [(m.kind, m.fields.get("state")) for m in handle.updates(timeout=5)]
    assert seen == [("accepted", None), ("update", "RUNNING"), ("done", "SUCCEEDED")]
    assert handle.task_id == "task-1" and handle.done
    assert handle.result(0)["result"] == {"answer": 42}
    # the input read while following the task is the agent's next message
    assert agent.poll() == protocol.Control("input", "user says hi")
    assert agent.poll() is None


def test_cancel_and_input_name_the_task(wired):
    agent, events_r, control_w = wired
    handle = agent.delegate(["true"], ref="x")
    _send(control_w, protocol.TASK_ACCEPTED, ref="x", task_id="task-9")
    assert agent.wait(0.2) is None  # a task frame for a handle is no message
    handle.send_input("faster")
    handle.cancel()
    calls = _tool_calls(events_r)[1:]
    assert calls == [
        {"name": "corral.task_input", "arguments": {"task_id": "task-9", "ref": "x",
                                                    "text": "faster"}},
        {"name": "corral.cancel_task", "arguments": {"task_id": "task-9", "ref": "x"}}]


def test_a_refusal_raises_from_result(wired):
    agent, _, control_w = wired
    handle = agent.delegate(["true"], ref="bad")
    _send(control_w, protocol.TASK_REFUSED, ref="bad", code="RESOURCE_EXHAUSTED",
          message="too many")
    with pytest.raises(protocol.DelegationRefused, match=r"^RESOURCE_EXHAUSTED: too many$"):
        handle.result(5)


def test_news_of_a_task_without_a_handle_is_a_task_message(wired):
    agent, _, control_w = wired
    _send(control_w, protocol.TASK_DONE, task_id="task-old", state="SUCCEEDED")
    message = agent.wait(5)
    assert message.kind == "task"
    assert json.loads(message.text) == {"event": "done", "task_id": "task-old",
                                        "state": "SUCCEEDED"}


def test_result_times_out_when_nothing_comes(wired):
    agent, _, _ = wired
    with pytest.raises(TimeoutError, match=r"^delegation 'd1' has not finished$"):
        agent.delegate(["true"]).result(0.05)


def test_without_a_runtime_a_delegation_is_refused_at_once():
    err = io.StringIO()
    agent = protocol.Agent(env={}, stdout=io.StringIO(), stderr=err)
    handle = agent.delegate(["true"])
    assert handle.done and handle.outcome.fields["code"] == "UNAVAILABLE"
    assert err.getvalue().startswith("corral delegate: ")


def test_news_gives_every_delegations_messages_without_blocking(wired):
    agent, _, control_w = wired
    first, second = agent.delegate(["true"], ref="a"), agent.delegate(["true"], ref="b")
    assert list(agent.news()) == []
    _send(control_w, protocol.TASK_ACCEPTED, ref="b", task_id="task-b")
    _send(control_w, protocol.TASK_ACCEPTED, ref="a", task_id="task-a")
    _send(control_w, protocol.TASK_DONE, task_id="task-a", state="SUCCEEDED")
    assert [(h.ref, m.kind) for h, m in agent.news()] == [
        ("a", "accepted"), ("a", "done"), ("b", "accepted")]
    assert first.done and not second.done
    assert list(agent.news()) == []
