"""What /proc says of a process: the facts that tell a live owner from a reused pid, the
reading of /proc and /sys files that may be absent, and the sweep of records whose owner
process is gone (the id pool's slots, the workspaces)."""

from __future__ import annotations

import os
import re


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


#: What follows the prefix of an owned name: "<pid>.<start time>", and a serial for a name
#: one process uses many times (its pool's cgroups).
_OWNED_SUFFIX = re.compile(r"(\d+)\.(\d+)(?:\.\d+)?")


def owned_name(prefix: str, pid: int | None = None) -> str:
    """``<prefix><pid>.<start time>``: a name (a cgroup's) that says which process owns it,
    so that a later process can tell a live owner from a dead one whose pid was reused.
    Default: this process."""
    pid = os.getpid() if pid is None else pid
    return f"{prefix}{pid}.{live_start_time(pid)}"


def named_owner(name: str, prefix: str) -> tuple[int, bool] | None:
    """(pid, alive) of the process an `owned_name` (optionally ``.<serial>`` after it)
    names; None when name is not such a name."""
    if not name.startswith(prefix):
        return None
    m = _OWNED_SUFFIX.fullmatch(name, len(prefix))
    if m is None:
        return None
    pid = int(m.group(1))
    return pid, live_start_time(pid) == int(m.group(2))


def owner_gone(name: str, prefix: str) -> bool:
    """Whether name is an `owned_name` whose process is gone (False for any other name)."""
    owner = named_owner(name, prefix)
    return owner is not None and not owner[1]


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
