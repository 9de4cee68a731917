"""The probe program: tries one hostile operation from INSIDE a sandbox and reports, as JSON,
exactly what the kernel answered. Never run it anywhere else.

The suite passes this file's source to the sandbox's own python3, so it needs no mount:

    python3 -I -c "$(cat inside.py)" OP [ARG...]

(tests/linux bind this directory read-only at /probes and run `python3 -I /probes/inside.py`.)

It prints one line, {"op": OP, "ok": bool, "errno": "EPERM" | null, "value": ...}, and exits
0 whatever the outcome; the suite (sandbox/probes/suite.py) judges it. An operation the
seccomp filter kills prints nothing: the suite sees the signal instead.

Every operation is harmless if the policy failed to stop it: what it would change belongs to
the sandbox itself (its own hostname, network namespace, terminal, processes), it writes
back the value it read, removes what it creates and detaches from what it attaches to;
network operations either target 127.0.0.1 or use UDP connect(), which sends no packet.
Standard library only.
"""

import ctypes
import errno
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

#: x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR = {
    "ioctl": 16, "getpid": 39, "clone": 56, "ptrace": 101, "syslog": 103, "capset": 126,
    "personality": 135, "modify_ldt": 154, "pivot_root": 155, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "reboot": 169,
    "sethostname": 170, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
    "pidfd_getfd": 438, "mount_setattr": 442, "landlock_create_ruleset": 444,
    "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "memfd_secret": 447,
    "set_mempolicy_home_node": 450, "openat2": 437,
}
#: Syscalls whose success hands back a descriptor the probe closes at once.
RETURNS_FD = {"io_uring_setup", "userfaultfd", "perf_event_open", "fsopen", "open_tree", "bpf",
              "open_by_handle_at", "fspick", "fsmount", "pidfd_getfd", "fanotify_init",
              "memfd_secret", "openat2"}
X32_SYSCALL_BIT = 0x40000000
TIOCSTI = 0x5412
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431


class Outcome(Exception):
    """Raised by an op to report a result it judged itself (args[0] is a dict)."""


def errname(err):
    return errno.errorcode.get(err, str(err))


def raw_syscall(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *args)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _arg(text, keep):
    """'12', '0x10', '-100', 's:text' (C string), 'buf:N' (N zero bytes), 'null',
    'fd:PATH' (opened read-only; its number is passed)."""
    if text == "null":
        return None
    if text.startswith("s:"):
        value = ctypes.c_char_p(text[2:].encode())
    elif text.startswith("buf:"):
        value = ctypes.create_string_buffer(int(text[4:], 0))
    elif text.startswith("fd:"):
        return ctypes.c_long(os.open(text[3:], os.O_RDONLY | os.O_CLOEXEC))
    else:
        return ctypes.c_long(int(text, 0))
    keep.append(value)
    return value


# -- syscalls ----------------------------------------------------------------------------------


def op_syscall(name, *argv):
    """A raw syscall by name with literal arguments; closes a descriptor it returns, and a
    clone child that should never have been made leaves at once."""
    keep = []
    ret = raw_syscall(NR[name], *(_arg(a, keep) for a in argv))
    if name == "clone":
        if ret == 0:
            os._exit(0)
        os.waitpid(ret, 0)
    if name in RETURNS_FD and ret >= 0:
        os.close(ret)
    return ret


def _clone3(flags: int) -> int:
    """Fork by clone3 with `flags` (in memory, out of a filter's sight); the child exits at
    once. Returns the child's pid, as the raw syscall does."""
    args = ctypes.create_string_buffer(88)  # struct clone_args, CLONE_ARGS_SIZE_VER2
    ctypes.c_uint64.from_buffer(args, 0).value = flags
    ctypes.c_uint64.from_buffer(args, 32).value = signal.SIGCHLD  # exit_signal
    ret = raw_syscall(NR["clone3"], args, ctypes.c_size_t(88))
    if ret == 0:
        os._exit(0)
    os.waitpid(ret, 0)
    return ret


def op_clone3_newuser():
    """clone3 asking for a new user namespace (flags in memory, out of a filter's sight)."""
    return _clone3(0x10000000)  # CLONE_NEWUSER


def op_clone3():
    """clone3 with a plain fork's arguments (glibc's first choice for fork and threads)."""
    return _clone3(0)


def op_threads(count="4"):
    """Start threads (pthread_create: clone3, falling back to clone) and join them; the
    value is how many distinct thread ids ran."""
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(threading.get_native_id()))
               for _ in range(int(count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(set(seen))


def op_x32_getpid():
    """getpid through the x32 syscall table (bit 30 set): a foreign ABI for the filter."""
    return raw_syscall(X32_SYSCALL_BIT | NR["getpid"])


def op_i386_getpid():
    """getpid through int 0x80, the i386 syscall table, from a few bytes of machine code."""
    import mmap

    code = bytes.fromhex("b814000000" "cd80" "c3")  # mov eax, 20 (getpid); int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)()


def op_capset_sys_admin():
    """Ask for CAP_SYS_ADMIN in the effective and permitted sets (capset v3)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(1 << 21, 1 << 21, 0, 0, 0, 0)
    return raw_syscall(NR["capset"], header, data)


def op_ptrace_attach(pid):
    """PTRACE_ATTACH, detaching at once should it ever succeed."""
    raw_syscall(NR["ptrace"], ctypes.c_long(16), ctypes.c_long(int(pid)), None, None)
    os.waitpid(int(pid), os.WNOHANG | 0x40000000)  # __WALL
    raw_syscall(NR["ptrace"], ctypes.c_long(17), ctypes.c_long(int(pid)), None, None)
    return "attached"


def op_process_vm_readv(pid):
    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    buf = ctypes.create_string_buffer(8)
    local = Iovec(ctypes.addressof(buf), 8)
    remote = Iovec(0x400000, 8)
    return raw_syscall(NR["process_vm_readv"], ctypes.c_long(int(pid)), ctypes.byref(local),
                       ctypes.c_ulong(1), ctypes.byref(remote), ctypes.c_ulong(1),
                       ctypes.c_ulong(0))


# -- identity ----------------------------------------------------------------------------------


def op_status():
    keep = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
            "Seccomp")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keep:
                out[key] = " ".join(value.split())
    return out


def op_host_uid():
    """The host uid this process runs as: its uid pushed through every id map above it
    (only the first level is visible; an identity map there means the host's own ids)."""
    uid = os.getuid()
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, outside, count = map(int, line.split())
            if inside <= uid < inside + count:
                return {"uid": uid, "host_uid": outside + uid - inside, "map": line.split()}
    raise Outcome({"errno": None, "uid": uid, "unmapped": True})


def op_pids():
    """How many processes this PID namespace shows, and the command lines of the first few."""
    pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    names = {}
    for pid in pids[:16]:
        try:
            with open(f"/proc/{pid}/comm") as f:
                names[pid] = f.read().strip()
        except OSError:
            pass
    return {"count": len(pids), "comm": names}


def _pid_listing():
    live, everything = [], []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        everything.append(int(name))
        try:
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if state not in ("Z", "X"):
            live.append(int(name))
    return sorted(everything), sorted(live)


def op_pids_settled(settle_s="2"):
    """Every pid in this /proc ("all"), the ones still running ("live"), and this probe's.

    A runtime may start a command through a short-lived relay process inside the namespace
    (it exits, and is reaped, once the command has exec'd); the listing is repeated until
    only PID 1 and this probe remain, or `settle_s` has passed."""
    me = os.getpid()
    end = time.monotonic() + float(settle_s)
    while True:
        everything, live = _pid_listing()
        if everything == sorted({1, me}) or time.monotonic() >= end:
            return {"self": me, "all": everything, "live": live}
        time.sleep(0.01)


def op_namespaces():
    return {ns: os.readlink(f"/proc/self/ns/{ns}")
            for ns in ("user", "pid", "mnt", "net", "uts", "ipc", "cgroup")}


def op_rlimits():
    names = ("RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE")
    return {n: list(resource.getrlimit(getattr(resource, n))) for n in names}


def op_sid():
    return {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0)}


def op_kill(pid, sig):
    """Send a signal to a process of the sandbox (its PID 1, say); then wait a moment, so
    that a signal that did land has taken effect before anyone looks."""
    os.kill(int(pid), int(sig))
    time.sleep(0.2)
    return "sent"


def op_setuid_gain(path):
    """Run a setuid-root binary and read its credentials while it runs.

    The child's stderr is a pipe filled to the brim, so its first message blocks it; while
    it waits, /proc shows the uid and capabilities the setuid bit gave (or did not give) it.
    Everything it would do after the message (newgrp: start a shell) never happens: the
    child is killed once its credentials are read."""
    st = os.stat(path)
    if not st.st_mode & stat.S_ISUID:
        raise Outcome({"errno": None, "not_setuid": path})
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(write_end, 2)
            devnull = os.open("/dev/null", os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.execv(path, [path, "nogroup"])
        finally:
            os._exit(127)
    os.close(write_end)
    status = {}
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                break
            if status.get("Name", "").strip() == os.path.basename(path) and \
                    status.get("State", "").strip().startswith("S"):
                break
            time.sleep(0.01)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
    return {"path": path, "euid": status.get("Uid", "").split()[1:2],
            "CapEff": status.get("CapEff", "").strip(), "self_uid": os.getuid()}


# -- files -------------------------------------------------------------------------------------


def _flags(text):
    value = 0
    for name in text.split("|"):
        value |= getattr(os, name)
    return value


def op_open(path, flags="O_RDONLY"):
    """open(2) only: a descriptor that opens is closed unused; a file it created is removed."""
    fd = os.open(path, _flags(flags) | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    st = os.fstat(fd)
    os.close(fd)
    if "O_CREAT" in flags:
        os.unlink(path)
    return {"opened": path, "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)],
            "chr": stat.S_ISCHR(st.st_mode)}


def op_open_any(pattern, flags="O_WRONLY"):
    """open(2) the first path matching a glob that opens (none matching: ENOENT); a
    descriptor that opens is closed unused: nothing is ever written."""
    import glob

    paths = sorted(glob.glob(pattern))
    if not paths:
        raise OSError(errno.ENOENT, f"nothing matches {pattern}")
    refused = {}
    for path in paths:
        try:
            return op_open(path, flags)
        except OSError as exc:
            refused[path] = errname(exc.errno)
    first = next(iter(refused.values()))
    raise Outcome({"errno": first if len(set(refused.values())) == 1 else "various",
                   "refused": refused})


def op_rewrite(path, flags="O_WRONLY"):
    """Read a file, then write the very same bytes back (harmless if the write is let in)."""
    with open(path, "rb") as f:
        before = f.read()
    fd = os.open(path, _flags(flags) | os.O_CLOEXEC)
    try:
        os.write(fd, before)
    finally:
        os.close(fd)
    return before.decode(errors="replace")


def op_read(path, limit="4096"):
    with open(path, "rb") as f:
        return f.read(int(limit)).decode(errors="replace")


def op_read_via_symlink(target, limit="4096"):
    """Read `target` through a symlink made in /workspace (removed afterwards)."""
    link = f"/workspace/.corral-probe-link-{os.getpid()}"
    os.symlink(target, link)
    try:
        with open(link, "rb") as f:
            return f.read(int(limit)).decode(errors="replace")
    finally:
        os.unlink(link)


def op_digest(path):
    """sha256 and size of a file: compared with the host's copy without ever printing it."""
    import hashlib

    with open(path, "rb") as f:
        data = f.read(1 << 20)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def op_listdir(path):
    return sorted(os.listdir(path))


def op_stat(path):
    """lstat(2): kind, permission bits, owner, device numbers and size."""
    st = os.lstat(path)
    kind = ("chr" if stat.S_ISCHR(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
            else "reg" if stat.S_ISREG(st.st_mode) else "lnk" if stat.S_ISLNK(st.st_mode)
            else "other")
    return {"kind": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
            "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)], "size": st.st_size}


def op_readlink(path):
    return os.readlink(path)


def op_mkdir(path):
    """mkdir(2) a directory, removed at once."""
    os.mkdir(path)
    os.rmdir(path)
    return "created"


def op_write_null(path):
    """Write one byte to a file only once fstat shows it is the null device (1:3): a mask
    that failed would leave the real file there, and nothing is written to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        rdev = os.fstat(fd).st_rdev
        if (os.major(rdev), os.minor(rdev)) != (1, 3):
            raise Outcome({"errno": None, "rdev": [os.major(rdev), os.minor(rdev)]})
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def op_kallsyms():
    """The first symbols of /proc/kallsyms: are real kernel addresses readable?"""
    with open("/proc/kallsyms") as f:
        lines = [f.readline() for _ in range(64)]
    lines = [line for line in lines if line]
    nonzero = sum(1 for line in lines if int(line.split()[0], 16) != 0)
    return {"lines": len(lines), "nonzero_addresses": nonzero}  # a count: no address leaks


def op_dev_scan():
    """Every device node under /dev (not following links): kind and major:minor."""
    found = {}
    for dirpath, dirnames, filenames in os.walk("/dev"):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "chr" if stat.S_ISCHR(st.st_mode) else "blk"
                found[path] = f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return found


def op_mknod(path, kind):
    """mknod a character (1:3, the null device) or block (7:0, a loop device) node, or a
    FIFO ('fifo'); removed at once."""
    if kind == "fifo":
        os.mknod(path, stat.S_IFIFO | 0o600)
    else:
        mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
        os.mknod(path, mode, os.makedev(1, 3) if kind == "char" else os.makedev(7, 0))
    os.unlink(path)
    return "created"


def op_chmod(directory, mode, how="chmod"):
    """Make a 0644 file in `directory`, then give it `mode` (octal) by chmod, fchmod or
    fchmodat; report the mode it ends with. The file is always removed."""
    path = os.path.join(directory, f".corral-probe-mode-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        if how == "fchmod":
            os.fchmod(fd, int(mode, 8))
        elif how == "fchmodat":
            raw_syscall(268, ctypes.c_long(-100), ctypes.c_char_p(path.encode()),
                        ctypes.c_long(int(mode, 8)))
        else:
            os.chmod(path, int(mode, 8))
        return {"mode": oct(stat.S_IMODE(os.fstat(fd).st_mode))}
    finally:
        os.close(fd)
        os.unlink(path)


def op_create_mode(directory, mode, how="openat"):
    """Create a file in `directory` whose create mode is `mode` (octal), by openat, creat or
    mknodat (S_IFREG); report its mode (umask 0). Removed at once."""
    path = os.path.join(directory, f".corral-probe-create-{os.getpid()}")
    old = os.umask(0)
    try:
        if how == "mknodat":
            os.mknod(path, stat.S_IFREG | int(mode, 8))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        elif how == "creat":
            fd = raw_syscall(85, ctypes.c_char_p(path.encode()), ctypes.c_long(int(mode, 8)))
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, int(mode, 8))
    finally:
        os.umask(old)
    try:
        return {"mode": oct(stat.S_IMODE(os.fstat(fd).st_mode))}
    finally:
        os.close(fd)
        os.unlink(path)


def op_mount_proc():
    """mount a new procfs on a directory of /tmp (unmounted and removed should it work)."""
    target = f"/tmp/.corral-probe-proc-{os.getpid()}"
    os.mkdir(target)
    try:
        raw_syscall(NR["mount"], ctypes.c_char_p(b"proc"), ctypes.c_char_p(target.encode()),
                    ctypes.c_char_p(b"proc"), ctypes.c_ulong(0), None)
        libc.umount2(ctypes.c_char_p(target.encode()), 2)
        return "mounted"
    finally:
        os.rmdir(target)


def op_workspace_links(host_path):
    """Plant links in /workspace for the host-side file API to follow (the suite removes them
    with the workspace): one to a host path, one to the root directory."""
    os.symlink(host_path, "/workspace/escape-file")
    os.symlink("/", "/workspace/escape-dir")
    return sorted(os.listdir("/workspace"))


def op_join_watch(seconds, marker=None):
    """Watch for processes joining this sandbox (commands being started into it) and try to
    open each one's memory and executable for writing, as CVE-2019-5736 did with runc.
    Nothing is ever written; a descriptor that opens is closed at once and counted. A
    joiner that has already become the command the suite started (its command line carries
    `marker`) is the sandbox's own process, not the runtime's, and is only counted; without
    a marker every joiner that opens is reported."""
    seen = {int(n) for n in os.listdir("/proc") if n.isdigit()}  # there before: not joiners
    before = len(seen)
    opened, refused, own = [], {}, 0
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in seen:
                continue
            seen.add(int(name))
            for leaf, flags in (("mem", os.O_RDWR), ("exe", os.O_WRONLY)):
                try:
                    fd = os.open(f"/proc/{name}/{leaf}", flags | os.O_CLOEXEC)
                except OSError as exc:
                    key = f"{leaf}:{errname(exc.errno)}"
                    refused[key] = refused.get(key, 0) + 1
                else:
                    os.close(fd)
                    if _has_marker(name, marker):
                        own += 1
                    else:
                        opened.append(f"{name}/{leaf}")
    if opened:
        raise Outcome({"errno": None, "opened": opened, "refused": refused})
    return {"seen": len(seen) - before, "refused": refused, "own_program": own}


def _has_marker(pid, marker):
    if marker is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


# -- resources ---------------------------------------------------------------------------------


def op_forkbomb(cap):
    """Fork children that wait, until fork fails (or `cap`); then kill and reap them all."""
    children = []
    try:
        while len(children) < int(cap):
            try:
                pid = os.fork()
            except OSError as exc:
                raise Outcome({"errno": errname(exc.errno), "forked": len(children)}) from None
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
    return {"forked": len(children)}


def op_balloon(max_mib):
    """Allocate and touch 1 MiB blocks up to max_mib; the memory limit should kill first."""
    blocks = []
    try:
        for _ in range(int(max_mib)):
            blocks.append(bytearray(b"\x01" * (1 << 20)))
    except MemoryError:
        raise Outcome({"errno": "ENOMEM", "mib": len(blocks)}) from None
    return {"mib": len(blocks)}


def op_fill(path, max_bytes):
    """Write 64 KiB chunks until the kernel refuses (or max_bytes); the file is removed."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    chunk = b"\0" * 65536
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        while written < int(max_bytes):
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                raise Outcome({"errno": errname(exc.errno), "written": written}) from None
    finally:
        os.close(fd)
        os.unlink(path)
    return {"written": written}


def op_fsize(path, size, xfsz="default"):
    """Create a file and write one byte at offset `size` (just past RLIMIT_FSIZE when size
    equals it), SIGXFSZ left at its default or ignored ('ignore'); the file is removed."""
    if xfsz == "ignore":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return os.pwrite(fd, b"x", int(size))
    finally:
        os.close(fd)
        os.unlink(path)


def op_spin(seconds):
    """Busy-loop for `seconds` of wall-clock time; report the CPU seconds it got."""
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        pass
    t = os.times()
    return t.user + t.system


def op_nofile(cap):
    """Open /dev/null until EMFILE (or `cap`); report how many descriptors were open then."""
    fds = []
    try:
        while len(fds) < int(cap):
            fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise Outcome({"errno": errname(exc.errno), "highest": max(fds) + 1 if fds else 0}) \
            from None
    finally:
        for fd in fds:
            os.close(fd)
    return {"opened": len(fds)}


def op_flood(mib):
    """Write `mib` MiB to stdout as fast as the pipe takes it."""
    block = b"x" * (1 << 20)
    out = sys.stdout.buffer
    for _ in range(int(mib)):
        out.write(block)
    out.flush()
    return None


def op_survivor(marker):
    """Double-fork a process that leaves this session and sleeps, carrying `marker` in its
    command line, so the host can look for it after the sandbox is destroyed."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)",
                                      marker])
        os._exit(0)
    os.waitpid(pid, 0)
    return "forked"


# -- network -----------------------------------------------------------------------------------


def op_socket(family, type_="1", proto="0"):
    s = socket.socket(int(family, 0), int(type_, 0), int(proto, 0))
    s.close()
    return "created"


def op_socketpair(family):
    a, b = socket.socketpair(int(family, 0), socket.SOCK_STREAM)
    a.close()
    b.close()
    return "created"


def op_loopback_echo():
    """Listen on the sandbox's own 127.0.0.1 and talk to it: the loopback works."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                return conn.recv(4).decode()


def op_connect_tcp(host, port):
    with socket.create_connection((host, int(port)), timeout=5):
        return "connected"


def op_connect_unix(path):
    """Connect to a unix socket; '@name' is an abstract one. Nothing is sent."""
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(address)
    return "connected"


def op_udp_route(host, port):
    """connect() a UDP socket: the kernel picks a route, and no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        return {"via": s.getsockname()[0]}


def op_nameserver():
    """The first nameserver of /etc/resolv.conf (or none)."""
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    return None


def op_interfaces():
    with open("/proc/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


def op_netlink_setlink_mtu():
    """RTM_NEWLINK on the sandbox's own loopback, setting the MTU it already has: a change
    request through netlink (CAP_NET_ADMIN), harmless even if accepted."""
    import fcntl

    ifindex = socket.if_nametoindex("lo")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        reply = fcntl.ioctl(s, 0x8921, struct.pack("16si", b"lo", 0))  # SIOCGIFMTU
    mtu = struct.unpack_from("i", reply, 16)[0]
    ifla_mtu = struct.pack("=HHI", 8, 4, mtu)  # rtattr: len, IFLA_MTU, value
    ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    body = ifinfo + ifla_mtu
    header = struct.pack("=IHHII", 16 + len(body), 16, 0x1 | 0x4, 1, 0)  # NEWLINK, REQUEST|ACK
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
        s.settimeout(5)
        s.send(header + body)
        reply = s.recv(65536)
    err = struct.unpack_from("=i", reply, 16)[0]
    if err < 0:
        raise OSError(-err, os.strerror(-err))
    return {"mtu": mtu}


# -- terminals ---------------------------------------------------------------------------------


def op_tiocsti(where, request="0x5412"):
    """Push one harmless byte into a terminal's input queue: on descriptor 0 ('stdin'), or on
    a pty this probe creates in the sandbox's own devpts ('pty'). `request` is the ioctl's
    request number: TIOCSTI by default; with its upper bits set, or TIOCLINUX, it tests how
    exactly a filter matches."""
    fds = []
    try:
        if where == "stdin":
            target = 0
        else:
            master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            fds.append(master)
            unlock = ctypes.c_int(0)
            number = ctypes.c_uint(0)
            for req, argp in ((TIOCSPTLCK, unlock), (TIOCGPTN, number)):
                raw_syscall(NR["ioctl"], ctypes.c_long(master), ctypes.c_ulong(req),
                            ctypes.byref(argp))
            target = os.open(f"/dev/pts/{number.value}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            fds.append(target)
        byte = ctypes.c_char(b"#")
        return raw_syscall(NR["ioctl"], ctypes.c_long(target), ctypes.c_ulong(int(request, 0)),
                           ctypes.byref(byte))
    finally:
        for fd in fds:
            os.close(fd)


OPS = {name[3:]: fn for name, fn in list(globals().items()) if name.startswith("op_")}


def main(argv):
    if not argv or argv[0] not in OPS:
        print(f"usage: inside.py {{{','.join(sorted(OPS))}}} [ARG...]", file=sys.stderr)
        return 2
    result = {"op": argv[0], "ok": False, "errno": None, "value": None}
    try:
        result["value"] = OPS[argv[0]](*argv[1:])
        result["ok"] = True
    except OSError as exc:
        result["errno"] = errname(exc.errno) if exc.errno else None
        result["value"] = str(exc)
    except Outcome as outcome:
        detail = outcome.args[0]
        result["errno"] = detail.get("errno")
        result["value"] = detail
    line = json.dumps(result)
    if argv[0] == "flood":
        sys.stderr.write(line + "\n")
    else:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
