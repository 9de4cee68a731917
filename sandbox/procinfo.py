"""What /proc says of a process: the facts that tell a live owner from a reused pid, the
reading of /proc and /sys files that may be absent, and the sweep of records whose owner
process is gone (the id pool's slots, the workspaces)."""

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


def sweep_dead_owners(directory: str, pick, alive, release) -> list:
    """Release the records in `directory` whose owner process is gone; returns what
    `release` returned for each (none when the directory does not exist).

    Args:
        pick: an entry's name -> the key of the record it holds, or None (not a record).
        alive: the entry's path -> does its owner still run? FileNotFoundError: the record
            went meanwhile (skipped); another OSError: unreadable, so its owner counts as gone.
        release: the key of a record whose owner is gone -> what to report of it.
    """
    import os

    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    released = []
    for entry in names:
        key = pick(entry)
        if key is None:
            continue
        try:
            owner_runs = alive(os.path.join(directory, entry))
        except FileNotFoundError:
            continue
        except OSError:
            owner_runs = False
        if not owner_runs:
            released.append(release(key))
    return released
