"""What /proc says of a process: the facts that tell a live owner from a reused pid."""

from __future__ import annotations


def live_start_time(pid: int) -> int | None:
    """Start time of a live process in clock ticks (field 22 of /proc/PID/stat); None when
    it is gone or a zombie (an orphan nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
