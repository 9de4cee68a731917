"""tryop: try one operation from inside a sandbox and print what the kernel said, as JSON.

Run only inside a Corral sandbox (the tests bind this directory read-only at /probes):

    python3 -I /probes/tryop.py OP [ARG...]

It prints one line, {"op": OP, "ok": bool, "errno": "EPERM" | null, "value": ...}, and
exits 0 whatever the outcome; the test decides what the outcome had to be. An operation
the filter kills (x32, i386) prints nothing: the test sees the signal instead.

Every operation is chosen to be harmless if the policy failed to stop it: what it would
change belongs to the sandbox itself (its own mount table, hostname, user namespace,
terminal), it writes back the value it read, removes what it creates, and detaches from
what it attaches to. Modelled on bubblewrap's tests/try-syscall.c; standard library only,
because it runs on the host's /usr/bin/python3 inside the sandbox.
"""

import ctypes
import errno
import json
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

#: x86_64 syscall numbers of everything probed (arch/x86/entry/syscalls/syscall_64.tbl).
NR = {
    "getpid": 39, "clone": 56, "ptrace": 101, "syslog": 103, "personality": 135,
    "modify_ldt": 154, "pivot_root": 155, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "reboot": 169,
    "sethostname": 170, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    "landlock_create_ruleset": 444,
}

X32_SYSCALL_BIT = 0x40000000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
TCGETS = 0x5401


class Outcome(Exception):
    """Raised by an op to report a failure it detected without an OSError."""


def errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# -- raw syscalls ----------------------------------------------------------------------------


def _arg(text: str, keep: list):
    """'12', '0x10', '-100', 's:text' (C string), 'buf:N' (zeroed N bytes), 'null',
    'fd:PATH' (opened read-only here; the descriptor number is passed)."""
    if text == "null":
        return None
    if text.startswith("s:"):
        value = ctypes.c_char_p(text[2:].encode())
        keep.append(value)
        return value
    if text.startswith("buf:"):
        value = ctypes.create_string_buffer(int(text[4:], 0))
        keep.append(value)
        return value
    if text.startswith("fd:"):
        return ctypes.c_long(os.open(text[3:], os.O_RDONLY | os.O_CLOEXEC))
    return ctypes.c_long(int(text, 0))


def raw_syscall(nr: int, *args) -> int:
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *args)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def op_syscall(name: str, *argv: str):
    """A raw syscall by name with literal arguments; closes a descriptor it returns."""
    keep: list = []
    ret = raw_syscall(NR[name], *(_arg(a, keep) for a in argv))
    if name in ("clone",) and ret == 0:
        os._exit(0)  # the child of an escaped clone: leave at once
    if name in ("io_uring_setup", "userfaultfd", "perf_event_open", "fsopen", "open_tree",
                "fspick", "fsmount", "bpf", "pidfd_getfd", "open_by_handle_at") and ret >= 0:
        os.close(ret)
    if name == "clone" and ret > 0:
        os.waitpid(ret, 0)
    return ret


def op_clone3():
    """clone3 with a plain fork's arguments (glibc's first choice for fork and threads)."""
    args = ctypes.create_string_buffer(88)  # struct clone_args, CLONE_ARGS_SIZE_VER2
    ctypes.c_uint64.from_buffer(args, 32).value = signal.SIGCHLD  # exit_signal
    ret = raw_syscall(NR["clone3"], args, ctypes.c_size_t(88))
    if ret == 0:
        os._exit(0)
    os.waitpid(ret, 0)
    return ret


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


def op_threads(count: str = "4"):
    """Start threads (pthread_create: clone3, falling back to clone) and join them."""
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(threading.get_native_id()))
               for _ in range(int(count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(set(seen))


def op_ptrace_attach(pid: str):
    """PTRACE_ATTACH, detaching at once should it ever succeed."""
    raw_syscall(NR["ptrace"], ctypes.c_long(16), ctypes.c_long(int(pid)), None, None)
    os.waitpid(int(pid), os.WNOHANG | 0x40000000)  # __WALL
    raw_syscall(NR["ptrace"], ctypes.c_long(17), ctypes.c_long(int(pid)), None, None)
    return "attached"


def op_process_vm_readv(pid: str):
    """Read 8 bytes of another process's memory (its stack pointer page is irrelevant:
    any address answers the question whether the call is possible at all)."""

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    buf = ctypes.create_string_buffer(8)
    local = Iovec(ctypes.addressof(buf), 8)
    remote = Iovec(0x400000, 8)
    return raw_syscall(NR["process_vm_readv"], ctypes.c_long(int(pid)), ctypes.byref(local),
                       ctypes.c_ulong(1), ctypes.byref(remote), ctypes.c_ulong(1),
                       ctypes.c_ulong(0))


# -- files -----------------------------------------------------------------------------------


def _flags(text: str) -> int:
    value = 0
    for name in text.split("|"):
        value |= getattr(os, name)
    return value


def op_open(path: str, flags: str = "O_RDONLY"):
    """open(2) only: a descriptor that opens is closed unused (nothing is written)."""
    fd = os.open(path, _flags(flags) | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    created = "O_CREAT" in flags
    os.close(fd)
    if created:
        os.unlink(path)
    return "opened"


def op_rewrite(path: str, flags: str = "O_WRONLY"):
    """Read a file, then write the very same bytes back (harmless if the write is let in)."""
    with open(path, "rb") as f:
        before = f.read()
    fd = os.open(path, _flags(flags) | os.O_CLOEXEC)
    try:
        os.write(fd, before)
    finally:
        os.close(fd)
    return before.decode(errors="replace")


def op_read(path: str, limit: str = "4096"):
    with open(path, "rb") as f:
        return f.read(int(limit)).decode(errors="replace")


def op_stat(path: str):
    st = os.lstat(path)
    kind = ("chr" if stat.S_ISCHR(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
            else "reg" if stat.S_ISREG(st.st_mode) else "lnk" if stat.S_ISLNK(st.st_mode)
            else "other")
    return {"kind": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
            "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)], "size": st.st_size}


def op_readlink(path: str):
    return os.readlink(path)


def op_listdir(path: str):
    return sorted(os.listdir(path))


def op_mkdir(path: str):
    os.mkdir(path)
    os.rmdir(path)
    return "created"


def op_mknod(path: str, kind: str):
    """mknod a character device (1:3, the null device) or a FIFO; removed at once."""
    mode = (stat.S_IFCHR if kind == "char" else stat.S_IFIFO) | 0o600
    os.mknod(path, mode, os.makedev(1, 3) if kind == "char" else 0)
    os.unlink(path)
    return "created"


def op_write(path: str, data: str = "x"):
    """Write to a file that exists (a device or a masked file); nothing is created."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return os.write(fd, data.encode())
    finally:
        os.close(fd)


def op_write_null(path: str):
    """Write one byte to a file only once fstat shows it is the null device (1:3); a
    mask that failed would leave the real file there, and nothing is written to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        rdev = os.fstat(fd).st_rdev
        if (os.major(rdev), os.minor(rdev)) != (1, 3):
            raise Outcome({"errno": None, "rdev": [os.major(rdev), os.minor(rdev)]})
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def op_fill(path: str, max_bytes: str):
    """Write 64 KiB chunks until the kernel refuses (or max_bytes); the file is removed."""
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
    return written


def op_fsize(path: str, size: str, xfsz: str = "default"):
    """Write one byte at offset `size` (just past RLIMIT_FSIZE when size equals it)."""
    if xfsz == "ignore":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return os.pwrite(fd, b"x", int(size))
    finally:
        os.close(fd)
        os.unlink(path)


def op_nofile():
    """Open /dev/null until EMFILE; report how many descriptors were open then."""
    fds = []
    try:
        while len(fds) < 100000:
            fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        highest = max(fds) + 1 if fds else 0
        raise Outcome({"errno": errname(exc.errno), "highest": highest}) from None
    finally:
        for fd in fds:
            os.close(fd)
    return len(fds)


# -- terminals -------------------------------------------------------------------------------


def op_tiocsti(where: str, request: str = hex(TIOCSTI)):
    """Push one harmless byte into a terminal's input queue: on descriptor 0 ('stdin'), or
    on the slave of a pty this probe creates in the sandbox's own devpts ('pty')."""
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
                raw_syscall(16, ctypes.c_long(master), ctypes.c_ulong(req), ctypes.byref(argp))
            target = os.open(f"/dev/pts/{number.value}",
                             os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            fds.append(target)
            termios = ctypes.create_string_buffer(60)
            raw_syscall(16, ctypes.c_long(target), ctypes.c_ulong(TCGETS), termios)
        byte = ctypes.c_char(b"#")
        return raw_syscall(16, ctypes.c_long(target), ctypes.c_ulong(int(request, 0)),
                           ctypes.byref(byte))
    finally:
        for fd in fds:
            os.close(fd)


def op_sid():
    return {"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0)}


# -- network ---------------------------------------------------------------------------------


def op_socket(family: str, type_: str = "1", proto: str = "0"):
    s = socket.socket(int(family, 0), int(type_, 0), int(proto, 0))
    s.close()
    return "created"


def op_socketpair(family: str):
    a, b = socket.socketpair(int(family, 0), socket.SOCK_STREAM)
    a.close()
    b.close()
    return "created"


def op_connect(host: str, port: str):
    with socket.create_connection((host, int(port)), timeout=5):
        return "connected"


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


def op_interfaces():
    with open("/proc/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


# -- processes and identity ------------------------------------------------------------------


def op_status():
    keep = ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
            "Seccomp", "Seccomp_filters")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keep:
                out[key] = " ".join(value.split())
    return out


def op_rlimits():
    names = ("RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE")
    return {n: list(resource.getrlimit(getattr(resource, n))) for n in names}


def op_namespaces():
    return {ns: os.readlink(f"/proc/self/ns/{ns}")
            for ns in ("user", "pid", "mnt", "net", "uts", "ipc", "cgroup")}


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


def op_pids(settle_s: str = "2"):
    """Every pid in this /proc ("all"), the ones still running ("live"), and this probe's.

    The runtime starts a command through a short-lived relay process inside the namespace
    (it exits, and is reaped from outside, once the command has exec'd); the listing is
    repeated until only PID 1 and this probe remain, or `settle_s` has passed."""
    me = os.getpid()
    end = time.monotonic() + float(settle_s)
    while True:
        everything, live = _pid_listing()
        if everything == sorted({1, me}) or time.monotonic() >= end:
            return {"self": me, "all": everything, "live": live}
        time.sleep(0.01)


def op_kill(pid: str, sig: str):
    os.kill(int(pid), int(sig))
    time.sleep(0.2)  # let a signal that did land take effect before anyone looks
    return "sent"


def op_spin(seconds: str):
    """Busy-loop for `seconds` of wall-clock time; report the CPU seconds it got."""
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        pass
    t = os.times()
    return t.user + t.system


def op_join_watch(seconds: str):
    """Watch for processes appearing in the sandbox (commands being joined in) and try to
    open each one's memory and executable for writing, as CVE-2019-5736 did with runc.
    Nothing is ever written; a descriptor that opens is closed at once and counted."""
    seen = {os.getpid(), 1}
    opened, refused, comms = [], {}, {}
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
                    opened.append(f"{name}/{leaf}")
            try:
                with open(f"/proc/{name}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            comms[comm] = comms.get(comm, 0) + 1  # not the command's name: caught pre-exec
    if opened:
        raise Outcome({"errno": None, "opened": opened, "refused": refused})
    return {"seen": len(seen) - 2, "refused": refused, "comms": comms}


def op_forkbomb(cap: str = "512"):
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
    return len(children)


def op_balloon(max_mib: str = "1024"):
    """Allocate and touch 1 MiB blocks up to max_mib; the memory limit should kill first."""
    blocks = []
    for _ in range(int(max_mib)):
        blocks.append(bytearray(b"\x01" * (1 << 20)))
    return len(blocks)


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in OPS:
        print(f"usage: tryop.py {{{','.join(sorted(OPS))}}} [ARG...]", file=sys.stderr)
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
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
