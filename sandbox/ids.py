"""Host ids of sandboxes: each gets its own range from Corral's pool; rootless maps the caller.

Root inside a sandbox is an unprivileged host uid. If two sandboxes shared that uid, one
that escaped its mounts would own the other's files and could signal its processes, and a
fixed uid 100000 is also where Debian's `useradd` starts the first user's subordinate ids.
So, as Kubernetes does for user-namespaced pods:

* Corral owns a pool of ids registered in /etc/subuid and /etc/subgid under the name
  `corral` (Docker's `dockremap` way): created by the first root run that finds none, placed
  where no other entry is, with a system user `corral` holding the name, so no user `useradd`
  makes later can be given those ids. `CORRAL_ID_POOL=START:COUNT` names a pool instead
  (nothing is written then).
* Every sandbox takes one range of `RANGE` ids from it (`allocate`), recorded as a file
  `<state>/<first id>` created with O_EXCL, so concurrent processes never take the same
  range (ranges are 65536-aligned, so even two pools that overlap name the same files).
  The file names the owning process (pid and start time) and, once it exists, the
  sandbox's PID 1 (an appended line); `release()` removes it when the sandbox is destroyed,
  and `sweep()` removes those whose owner and PID 1 are both gone. Three small file
  operations per sandbox, no lock.
* Unprivileged (`rootless()`): root inside is the caller itself, so files the sandbox writes
  belong to the caller. With a range in /etc/subuid and /etc/subgid and the setuid
  `newuidmap`/`newgidmap` installed (package `uidmap`), ids 1..N inside map to that range;
  otherwise the caller is the only id mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import random
import shutil
import subprocess
import time
from dataclasses import dataclass

from .errors import CorralError, ResourceExhausted, SandboxSetupError
from .procinfo import live_start_time, sweep_dead_owners

#: Ids per sandbox (0..65535 inside, what most images expect).
RANGE = 65536
#: Name of Corral's entry in /etc/subuid and /etc/subgid (and of the system user holding it).
POOL_NAME = "corral"
#: Where a new pool goes when that space is free: above the 100000..600100000 span that
#: useradd hands out (login.defs SUB_UID_MIN/MAX), below 2^32.
POOL_START = 1 << 30
#: Ranges in a new pool: this many sandboxes can run at once on one host (2^30 ids, so
#: the pool ends at 2^31, well below the 2^32 ids a kernel has).
POOL_SLOTS = 16384
SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"
MAX_ID = (1 << 32) - 2  # (uid_t)-1 is "no id"


class IdPoolError(CorralError):
    """Corral's id pool cannot be found, made or used."""

    grpc_status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class SubIdEntry:
    """One line of /etc/subuid or /etc/subgid."""

    name: str
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def parse_subids(text: str) -> list[SubIdEntry]:
    """Entries of a subordinate id file (malformed lines are skipped, as shadow does)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[0] or line.lstrip().startswith("#"):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0:
            out.append(SubIdEntry(parts[0], start, count))
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def free_start(taken: list[SubIdEntry], count: int, lowest: int = POOL_START) -> int:
    """The lowest RANGE-aligned start >= lowest where count ids overlap no entry."""
    start = lowest
    while start + count <= MAX_ID:
        clash = [e for e in taken if e.start < start + count and start < e.end]
        if not clash:
            return start
        end = max(e.end for e in clash)
        start = -(-end // RANGE) * RANGE
    raise IdPoolError(f"no room for {count} ids in {SUBUID}/{SUBGID} below {MAX_ID}; "
                      f"set CORRAL_ID_POOL=START:COUNT to a free span")


def _overlaps(pool: SubIdEntry, entries: list[SubIdEntry]) -> list[SubIdEntry]:
    return [e for e in entries if e.name != POOL_NAME
            and e.start < pool.end and pool.start < e.end]


def state_dir() -> str:
    return os.environ.get("CORRAL_ID_STATE") or "/run/corral/ids"


_pool_cache: dict = {}


def pool() -> SubIdEntry:
    """Corral's pool, registered in /etc/subuid and /etc/subgid if it is not there yet.

    Raises:
        IdPoolError: the files cannot be written, or another entry overlaps the pool.
    """
    configured = os.environ.get("CORRAL_ID_POOL")
    if configured:
        try:
            start, count = (int(x) for x in configured.split(":"))
        except ValueError:
            raise IdPoolError(f"CORRAL_ID_POOL={configured!r} is not START:COUNT, "
                              f"e.g. {POOL_START}:{RANGE * 64}") from None
        if start < 1 or start % RANGE or count < RANGE or start + count > MAX_ID:
            raise IdPoolError(f"CORRAL_ID_POOL={configured!r}: need START a multiple of "
                              f"{RANGE} and {RANGE} <= COUNT with START+COUNT <= {MAX_ID}")
        named = SubIdEntry(POOL_NAME, start, count)
        for path in (SUBUID, SUBGID):
            clash = _overlaps(named, parse_subids(_read(path)))
            if clash:
                e = clash[0]
                raise IdPoolError(f"CORRAL_ID_POOL={configured!r} overlaps '{e.name}:"
                                  f"{e.start}:{e.count}' in {path}; pick a span no entry has")
        return named
    key = tuple(_mtime(p) for p in (SUBUID, SUBGID))
    cached = _pool_cache.get("pool")
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _registered()
    if found is None:
        found = _register()
        key = tuple(_mtime(p) for p in (SUBUID, SUBGID))
    _pool_cache["pool"] = (key, found)
    return found


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _registered() -> SubIdEntry | None:
    """Corral's pool as both files have it; None when absent from either."""
    uids, gids = parse_subids(_read(SUBUID)), parse_subids(_read(SUBGID))
    mine_u = [e for e in uids if e.name == POOL_NAME]
    mine_g = [e for e in gids if e.name == POOL_NAME]
    if not mine_u or not mine_g:
        return None
    if (mine_u[0].start, mine_u[0].count) != (mine_g[0].start, mine_g[0].count):
        raise IdPoolError(
            f"Corral's id pool differs between {SUBUID} ({mine_u[0].start}:{mine_u[0].count}) "
            f"and {SUBGID} ({mine_g[0].start}:{mine_g[0].count}); make the two "
            f"'{POOL_NAME}:START:COUNT' lines equal")
    found = mine_u[0]
    for path, entries in ((SUBUID, uids), (SUBGID, gids)):
        clash = _overlaps(found, entries)
        if clash:
            e = clash[0]
            raise IdPoolError(
                f"{path}: '{e.name}:{e.start}:{e.count}' overlaps Corral's id pool "
                f"{found.start}:{found.count}; move one of them (sandboxes would share host "
                f"ids with {e.name}'s)")
    if found.count < RANGE or found.start % RANGE:
        raise IdPoolError(f"{SUBUID}: Corral's pool {found.start}:{found.count} must start "
                          f"at a multiple of {RANGE} and hold at least one sandbox's {RANGE} "
                          f"ids")
    return found


def _register() -> SubIdEntry:
    """Append corral:START:COUNT to both files (under a lock), like dockremap's entry."""
    if os.geteuid() != 0:
        raise IdPoolError(f"no '{POOL_NAME}' entry in {SUBUID} and {SUBGID}, and only root "
                          f"can add one; run Corral once as root or set CORRAL_ID_POOL")
    os.makedirs(state_dir(), mode=0o700, exist_ok=True)
    with open(os.path.join(state_dir(), ".pool.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _registered()  # another process may have won the race
        if found is not None:
            return found
        taken = parse_subids(_read(SUBUID)) + parse_subids(_read(SUBGID))
        count = RANGE * POOL_SLOTS
        found = SubIdEntry(POOL_NAME, free_start(taken, count), count)
        _reserve_name()
        for path in (SUBUID, SUBGID):
            try:
                text = _read(path)
                with open(path, "a") as f:
                    if text and not text.endswith("\n"):
                        f.write("\n")
                    f.write(f"{POOL_NAME}:{found.start}:{found.count}\n")
            except OSError as exc:
                raise IdPoolError(f"cannot add Corral's id pool to {path}: {exc.strerror}; "
                                  f"add '{POOL_NAME}:{found.start}:{found.count}' to "
                                  f"{SUBUID} and {SUBGID}, or set CORRAL_ID_POOL") from None
        return found


def _reserve_name() -> None:
    """A system user `corral` (no login, no home), so nobody else is ever given the name
    the pool is registered under (newuidmap hands a user the ranges of its name)."""
    try:
        pwd.getpwnam(POOL_NAME)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    with contextlib.suppress(OSError):
        subprocess.run([useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--comment", "Corral sandbox id pool",
                        POOL_NAME], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


# -- per-sandbox ranges --------------------------------------------------------------------


@dataclass
class IdRange:
    """One sandbox's host ids: base..base+count-1 (root inside is base)."""

    base: int
    count: int
    path: str | None = None  # its slot file; None when not allocated from the pool

    def note_init(self, pid: int, sandbox: str | None = None) -> None:
        """Record the sandbox's PID 1 (and the sandbox, when the range was taken before
        its own: a namespace pool's): the range stays taken while PID 1 lives, even if the
        process that made it is gone (a task whose supervisor was restarted)."""
        if self.path is None:
            return
        line = {"init_pid": pid, **({"sandbox": sandbox} if sandbox else {})}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, json.dumps(line).encode() + b"\n")
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the range back; idempotent."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def allocate(owner: str, owner_pid: int | None = None) -> IdRange:
    """Take a free range of Corral's pool for the sandbox `owner`.

    Raises:
        IdPoolError: there is no usable pool.
        ResourceExhausted: every range is taken by a live sandbox.
    """
    found = pool()
    slots = found.count // RANGE
    directory = _ensure_state_dir()
    pid = owner_pid or os.getpid()
    record = json.dumps({"pid": pid, "start": _own_start(pid), "sandbox": owner}).encode()
    for attempt in range(2):
        first = random.randrange(slots)
        for i in range(slots):
            slot = (first + i) % slots
            path = os.path.join(directory, str(found.start + slot * RANGE))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                os.write(fd, record + b"\n")
            finally:
                os.close(fd)
            return IdRange(found.start + slot * RANGE, RANGE, path)
        if attempt == 0 and not sweep():
            break
    raise ResourceExhausted(f"all {slots} id ranges of Corral's pool "
                            f"({found.start}:{found.count}) are taken by running sandboxes")


_made_dirs: set[str] = set()


def _ensure_state_dir() -> str:
    directory = state_dir()
    if directory not in _made_dirs:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _made_dirs.add(directory)
    return directory


_own_starts: dict[int, int | None] = {}


def _own_start(pid: int) -> int | None:
    """Start time of pid, remembered for this process's own pid (it does not change)."""
    if pid not in _own_starts:
        _own_starts.clear()  # a fork: another pid now
        _own_starts[pid] = live_start_time(pid)
    return _own_starts[pid]


#: A slot file younger than this whose record cannot be read is being written right now.
_WRITING_GRACE_S = 60


def _slot_alive(path: str) -> bool:
    """Does the owner, or the sandbox's PID 1, of this slot file still run?"""
    with open(path) as f:
        text = f.read()
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        owner = records[0]
        if live_start_time(int(owner["pid"])) == owner.get("start"):
            return True
        # PID 1 was noted without its start time: a reused pid keeps the range taken until
        # that process ends (a leak, never a sharing)
        return any(live_start_time(int(r["init_pid"])) is not None
                   for r in records[1:] if "init_pid" in r)
    except (ValueError, KeyError, TypeError, IndexError):
        return time.time() - os.stat(path).st_mtime < _WRITING_GRACE_S


def sweep() -> list[int]:
    """Release the ranges whose owner process and PID 1 are gone; returns their first ids."""
    directory = state_dir()

    def free(name: str) -> int:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
        return int(name)

    return sweep_dead_owners(directory, lambda name: name if name.isdigit() else None,
                             _slot_alive, free)


def in_use() -> int:
    """How many ranges are taken now."""
    try:
        return sum(1 for n in os.listdir(state_dir()) if n.isdigit())
    except FileNotFoundError:
        return 0


# -- unprivileged callers ------------------------------------------------------------------


@dataclass(frozen=True)
class Rootless:
    """How an unprivileged caller's sandbox maps its ids.

    uid/gid: the caller's, which root inside becomes. sub_uid/sub_gid: the caller's
    subordinate ranges used for ids 1..N inside (None: only the caller is mapped).
    """

    uid: int
    gid: int
    sub_uid: SubIdEntry | None
    sub_gid: SubIdEntry | None
    newuidmap: str | None
    newgidmap: str | None

    @property
    def uses_helpers(self) -> bool:
        return self.sub_uid is not None and self.sub_gid is not None and bool(
            self.newuidmap and self.newgidmap)

    @property
    def count(self) -> int:
        """Ids mapped: root, then as much of the subordinate ranges as both have."""
        if not self.uses_helpers:
            return 1
        return 1 + min(self.sub_uid.count, self.sub_gid.count, RANGE - 1)

    def uid_map(self) -> bytes:
        return f"0 {self.uid} 1\n".encode()

    def gid_map(self) -> bytes:
        return f"0 {self.gid} 1\n".encode()

    def helpers(self) -> tuple[list[str], list[str]] | None:
        """argv of newuidmap and newgidmap (argv[1] is the pid, filled in at spawn)."""
        if not self.uses_helpers:
            return None
        n = self.count - 1
        return ([self.newuidmap, "PID", "0", str(self.uid), "1", "1", str(self.sub_uid.start),
                 str(n)],
                [self.newgidmap, "PID", "0", str(self.gid), "1", "1", str(self.sub_gid.start),
                 str(n)])

    def lines(self, which: str) -> list[list[str]]:
        """uid_map/gid_map as /proc shows them ([inside, outside, count] per line)."""
        own = self.uid if which == "uid" else self.gid
        out = [["0", str(own), "1"]]
        if self.uses_helpers:
            sub = self.sub_uid if which == "uid" else self.sub_gid
            out.append(["1", str(sub.start), str(self.count - 1)])
        return out

    def describe(self) -> str:
        if self.uses_helpers:
            return (f"root inside = uid {self.uid}; ids 1..{self.count - 1} = subordinate "
                    f"uids {self.sub_uid.start}.. and gids {self.sub_gid.start}.. "
                    f"(newuidmap/newgidmap)")
        why = ("no newuidmap/newgidmap (apt-get install uidmap)"
               if self.sub_uid and self.sub_gid else f"no range in {SUBUID}/{SUBGID}")
        return f"root inside = uid {self.uid}, the only id mapped ({why})"


def map_in_background(helpers: tuple[list[str], list[str]] | None):
    """Start newuidmap and newgidmap (helpers: Rootless.helpers()) on a new user namespace,
    to run while the caller prepares the rest of the sandbox; None without helpers.

    Returns an _spawn.UserNamespaceInProgress, for spawn_init(user_namespace=...) to make
    PID 1 in; the caller close()s it after the spawn, whatever happened. Started under
    WRITE_CLONE, as every clone is.

    Raises:
        SandboxSetupError: the namespace's holder could not be cloned (EAGAIN, ENOSPC:
            this user's processes or user namespaces ran out).
    """
    if helpers is None:
        return None
    from corral.ext import _spawn

    from .workspace import CLONING, WRITE_CLONE

    try:
        with WRITE_CLONE.hold(CLONING):
            return _spawn.UserNamespaceInProgress(*helpers)
    except OSError as exc:
        raise SandboxSetupError("clone(CLONE_NEWUSER)", None, exc.errno or 5) from None


def _own_entry(entries: list[SubIdEntry], uid: int) -> SubIdEntry | None:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    for e in entries:
        if e.name == name or e.name == str(uid):
            return e
    return None


def rootless() -> Rootless:
    """The id mapping an unprivileged caller gets (see the module docstring)."""
    uid, gid = os.getuid(), os.getgid()
    mode = os.environ.get("CORRAL_ROOTLESS_IDS", "auto")  # auto | single
    sub_uid = sub_gid = None
    if mode != "single":
        sub_uid = _own_entry(parse_subids(_read(SUBUID)), uid)
        sub_gid = _own_entry(parse_subids(_read(SUBGID)), uid)
    return Rootless(uid, gid, sub_uid, sub_gid, _setuid_helper("newuidmap"),
                    _setuid_helper("newgidmap"))


def _setuid_helper(name: str) -> str | None:
    for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        # setuid root, or with file capabilities (some distributions ship it that way)
        if st.st_mode & 0o4000 or _has_caps(path):
            return path
    return None


def _has_caps(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False
