"""What /proc says of a process: the facts that tell a live owner from a reused pid, and
the reading of /proc and /sys files that may be absent."""

from __future__ import annotations


def read_or_none(path: str, *, strip: bool = False) -> str | None:
    """The text of `path` (stripped of surrounding whitespace if `strip`), or None when it
    cannot be read: a kernel without the file, a process gone, no permission."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text.strip() if strip else text


def live_start_time(pid: int) -> int | None:
    """Start time of a live process in clock ticks (field 22 of /proc/PID/stat); None when
    it is gone or a zombie (an orphan nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
