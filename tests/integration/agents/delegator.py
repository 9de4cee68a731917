"""Test agent for delegation (protocol v1.1): scripted by its INPUTs, reports as tokens.

Each INPUT is a JSON command:
  {"do": "delegate", "ref": R, "spec": {...}}  agent.delegate(**spec, ref=R)
  {"do": "raw", "ref": R, "arguments": ...}     a DELEGATE with these arguments, unchecked
  {"do": "cancel", "ref": R}                    cancel the delegation R
  {"do": "steer", "ref": R, "text": T}          send T to the delegated task R
  {"do": "echo", "text": T}                     say T (the session goes on)
Everything the runtime says of a task becomes one token "task:" + JSON (the message's kind
as "event", then its fields), in the order the agent read it; a line per token is also
appended to /workspace/task-ledger.jsonl, so a test can count what the agent really got.
SHUTDOWN (or the control pipe's end) makes it exit 0.
"""

import json

import corral_agent as agent

LEDGER = "/workspace/task-ledger.jsonl"


def report(kind: str, fields: dict) -> None:
    line = json.dumps({"event": kind, **fields}, sort_keys=True)
    agent.token("task:" + line)
    with open(LEDGER, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def command(text: str, handles: dict) -> None:
    cmd = json.loads(text)
    ref = cmd.get("ref", "")
    if cmd["do"] == "delegate":
        handles[ref] = agent.delegate(ref=ref, **cmd["spec"])
    elif cmd["do"] == "raw":
        agent.tool_call(agent.DELEGATE, cmd["arguments"], id=ref)
    elif cmd["do"] == "cancel":
        handles[ref].cancel()
    elif cmd["do"] == "steer":
        handles[ref].send_input(cmd["text"])
    else:
        agent.token("echo:" + cmd["text"])


def main() -> int:
    handles: dict = {}
    agent.turn_end("completed")
    while True:
        for _, message in agent.news():
            report(message.kind, message.fields)
        msg = agent.wait(0.05)
        if msg is None:
            continue
        if msg.kind == "shutdown":
            return 0
        if msg.kind == "task":  # news of a task delegated before this agent started
            fields = json.loads(msg.text)
            report(fields.pop("event"), fields)
        elif msg.kind == "input":
            command(msg.text, handles)


if __name__ == "__main__":
    raise SystemExit(main())
