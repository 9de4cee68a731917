"""Bounds of the API: what one stream may queue for its client, and what an error may echo.

A servicer that reads requests while its client is not reading answers queues what it
owes that client. Every such queue has a limit here; past it the stream ends with
RESOURCE_EXHAUSTED (`StreamOverflow`) and what it held is dropped, so an unread stream
costs the daemon a bounded amount of memory whatever its client sends.

Error messages quote what the caller sent ("hostname: 'xxx...' is not a valid host
name"). `bounded_message` keeps the start and the end of a long message and leaves out
its middle before it leaves the daemon, so a 1 MB field costs ~200 bytes in its answer,
not 1 MB.
"""

from __future__ import annotations

from corral.sandbox.errors import ResourceExhausted

#: An error message longer than this many bytes (UTF-8) is cut in the middle.
MESSAGE_BYTES = 320
#: Bytes kept of a cut message: its start (field name, the value's start) and its end
#: (the value's end and the explanation), so a quoted value costs at most ~200 bytes.
ECHO_HEAD_BYTES = 144
ECHO_TAIL_BYTES = 64
#: Bytes of a refused OpenMany ref echoed in its error event (refs are at most 64 bytes;
#: a longer one still comes back whole up to this, so the client can tell which it was).
ECHO_REF_BYTES = 256
#: Bytes of events a Sessions stream may owe its client: turn events (an agent chooses a
#: turn's status text) on Open; opened, errors and turn events of all its sessions on
#: OpenMany. One MuxBatch message's worth. Token batches are not counted: they stay in
#: the session's replay log, which has its own byte budget.
QUEUED_BYTES = 1 << 20
#: Starts and resumes one OpenMany stream may have in flight; the next request is read
#: once one of them is done (back-pressure, nothing refused).
MANY_OPENING = 64
#: Acks a Tasks.SubmitStream may owe its client; then it reads no more requests until the
#: client reads (back-pressure: a submission is never refused for a slow reader).
SUBMIT_PENDING_ACKS = 4096
#: What a queued event is counted as beyond its text (the Python objects holding it).
EVENT_COST_BYTES = 64


class StreamOverflow(ResourceExhausted):
    """A stream's client fell too far behind what the daemon had to send it."""

    def __init__(self, what: str, limit: str):
        super().__init__(
            f"this stream ended: its client left {what} unread (limit {limit}); read the "
            f"stream as fast as you send requests, or open it again (sessions keep running)")


def bounded_message(message: str) -> str:
    """message, or its start and end around a marker when it is over MESSAGE_BYTES.

    Linear in the message's length (one encode): it runs on the event loop for every
    refused request.
    """
    if len(message) <= MESSAGE_BYTES // 4:
        return message
    data = message.encode("utf-8", "backslashreplace")
    if len(data) <= MESSAGE_BYTES:
        return message
    head = data[:ECHO_HEAD_BYTES].decode("utf-8", "ignore")
    tail = data[-ECHO_TAIL_BYTES:].decode("utf-8", "ignore")
    left_out = len(data) - ECHO_HEAD_BYTES - ECHO_TAIL_BYTES
    return f"{head}... [{left_out} bytes left out] ...{tail}"
