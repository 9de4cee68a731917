"""The probe suite: every hostile thing an agent would try, each judged "contained" or
"ESCAPED" on the evidence the kernel gave (errno, signal, what was read).

A probe runs the probe program (``inside.py``) inside a sandbox of the backend under audit,
or, for what only the host can see (a process surviving its sandbox, the runtime's own
memory under an output flood, the host-side file API), runs a small host-side procedure
around it. Each probe says itself what counts as contained; backends may legitimately
answer differently (EPERM from a seccomp filter, EACCES from a permission check, ENOENT
because the path is not in the view at all).

``run_suite(backend)`` returns one ``Result`` per probe; ``render_table``,
``render_markdown`` and ``to_json`` format them. Nothing here runs a probe outside a sandbox.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import resource
import signal as signal_mod
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CorralError
from ..spec import SandboxSpec

MiB = 1 << 20
CONTAINED = "contained"
ESCAPED = "ESCAPED"
ERROR = "error"

CATEGORIES = ("identity", "kernel", "privilege", "filesystem", "resources", "network",
              "terminal")

_INSIDE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inside.py")


def inside_source() -> str:
    with open(_INSIDE_PATH) as f:
        return f.read()


def suite_spec(backend: str, profile: str = "default", **overrides) -> SandboxSpec:
    """The policy every probe runs under unless it names its own limits."""
    fields = dict(profile=profile, backend=backend, memory_bytes=128 * MiB, pids_max=64,
                  tmp_bytes=8 * MiB, nofile=256, fsize_bytes=16 * MiB, timeout_s=60.0,
                  cpus=1.0)
    fields.update(overrides)
    return SandboxSpec(**fields)


# -- outcomes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one probe saw: the program's report and how its process ended."""

    ok: bool | None  # None: the program printed nothing (it was killed)
    errno: str | None = None
    value: object = None
    returncode: int = 0
    reason: str = "exited"
    stderr: str = ""

    @property
    def short(self) -> str:
        """One comparable word: 'ok', the errno name, or 'SIGSYS' for a kill."""
        if self.ok is None:
            if self.returncode < 0:
                return signal_name(-self.returncode)
            return f"exit {self.returncode}"
        return "ok" if self.ok else (self.errno or "failed")

    def evidence(self) -> str:
        """What the kernel said, for a reader: the errno, the signal, what was read."""
        if self.ok is None:
            text = f"killed by {self.short}" if self.returncode < 0 else self.short
            if self.reason not in ("exited", "signaled"):
                text += f" ({self.reason})"
            if self.stderr.strip():
                text += f"; stderr: {self.stderr.strip()[-160:]}"
            return text
        if self.ok:
            return "ok: " + _brief(self.value)
        if isinstance(self.value, dict):
            return f"{self.short}: {_brief(self.value)}"
        name = self.errno or "failed"
        code = getattr(errno_mod, name, None)
        return f"{name} ({os.strerror(code)})" if isinstance(code, int) else name


def signal_name(number: int) -> str:
    try:
        return signal_mod.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _brief(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


def parse_report(stdout: bytes, stderr: bytes, returncode: int, reason) -> Outcome:
    reason_text = getattr(reason, "value", str(reason))
    lines = stdout.decode(errors="replace").strip().splitlines()
    if not lines:
        lines = [line for line in stderr.decode(errors="replace").splitlines()
                 if line.startswith('{"op"')]
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "op" in doc:
                return Outcome(doc["ok"], doc["errno"], doc["value"], returncode, reason_text,
                               stderr.decode(errors="replace")[-400:])
    return Outcome(None, None, None, returncode, reason_text,
                   stderr.decode(errors="replace")[-400:])


# -- probes -----------------------------------------------------------------------------------


@dataclass
class Context:
    """What a probe run knows: the backend, its sandboxes and the host-side fixtures."""

    backend: str
    profile: str
    docker_host: str | None
    shared: object = None  # the sandbox most probes run in
    scratch: dict = field(default_factory=dict)

    def spec(self, **overrides) -> SandboxSpec:
        return suite_spec(self.backend, self.profile, **overrides)

    def open(self, **overrides):
        from ..backends import open_sandbox

        return open_sandbox(self.spec(**overrides), docker_host=self.docker_host)


Judge = Callable[[Outcome, Context], bool]


@dataclass(frozen=True)
class Probe:
    name: str
    category: str
    #: What a hostile agent tries, in a few words.
    attempt: str
    #: The probe program's op and arguments (or a function of the context returning them).
    args: tuple | Callable[[Context], tuple] = ()
    #: True when the outcome shows the attempt was contained.
    contained: Judge = None
    #: Limits of a sandbox of its own (None: the shared sandbox is fine).
    own: dict | None = None
    #: A host-side procedure replacing the plain run (returns the Outcome to judge).
    procedure: Callable[[Context, Probe], Outcome] | None = None
    #: Host-side preparation (returns cleanup), e.g. a listener or a secret file.
    setup: Callable[[Context], Callable[[], None]] | None = None
    #: Show only this key of a successful report's value as the evidence.
    evidence_key: str | None = None


@dataclass(frozen=True)
class Result:
    name: str
    category: str
    attempt: str
    verdict: str  # CONTAINED, ESCAPED or ERROR
    outcome: str
    evidence: str

    def as_dict(self) -> dict:
        return {"name": self.name, "category": self.category, "attempt": self.attempt,
                "verdict": self.verdict, "outcome": self.outcome, "evidence": self.evidence}


def denied(*errnos: str, signals: tuple[int, ...] = ()) -> Judge:
    """Contained when the attempt failed with one of these errnos (or was killed by one of
    these signals)."""

    def judge(o: Outcome, _ctx) -> bool:
        if o.ok is None:
            return o.returncode < 0 and -o.returncode in signals
        return o.ok is False and o.errno in errnos

    return judge


FILTERED = ("EPERM", "ENOSYS")  # a seccomp filter's answers (EPERM: also no capability)


def status_is(key: str, expected: str) -> Judge:
    return lambda o, _ctx: bool(o.ok) and o.value.get(key) == expected


def _status(name: str, key: str, expected: str, attempt: str) -> Probe:
    return Probe(name, "identity", attempt, ("status",), status_is(key, expected),
                 evidence_key=key)


def run_inside(ctx: Context, args: tuple, sandbox=None, **exec_kw) -> Outcome:
    """Run the probe program with args in sandbox (default: the shared one)."""
    from ..backends.native import DEVNULL

    sb = sandbox or ctx.shared
    argv = ["python3", "-I", "-c", inside_source(), *map(str, args)]
    exec_kw.setdefault("stdin", DEVNULL)
    proc = sb.exec(argv, **exec_kw)
    out, err = proc.communicate()
    return parse_report(out, err, proc.returncode, proc.reason)


# -- host-side fixtures -----------------------------------------------------------------------


def _secret_file(ctx: Context):
    """A host file holding a random secret, in a host directory no sandbox is shown."""
    fd, path = tempfile.mkstemp(prefix="corral-probe-secret-", dir="/tmp")
    secret = "corral-secret-" + os.urandom(8).hex()
    os.write(fd, secret.encode())
    os.close(fd)
    os.chmod(path, 0o644)
    ctx.scratch["secret_path"], ctx.scratch["secret"] = path, secret
    return lambda: os.unlink(path)


def _not_the_secret(o: Outcome, ctx: Context) -> bool:
    if o.ok:
        return ctx.scratch["secret"] not in str(o.value)
    return o.errno in ("ENOENT", "EACCES", "EPERM", "ELOOP", "ENOTDIR")


def _tcp_listener(ctx: Context):
    """A host service on 127.0.0.1 (a stand-in for the daemon's port); counts connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    ctx.scratch["tcp_port"] = listener.getsockname()[1]
    ctx.scratch["tcp_listener"] = listener
    return listener.close


def _no_host_connection(key: str, errnos: tuple[str, ...]) -> Judge:
    def judge(o: Outcome, ctx: Context) -> bool:
        try:
            conn, _ = ctx.scratch[key].accept()
        except (BlockingIOError, OSError):
            pass
        else:
            conn.close()
            return False
        return o.ok is False and o.errno in errnos

    return judge


def _abstract_listener(ctx: Context):
    """A host service on an abstract unix socket (bound to the host's network namespace)."""
    name = "corral-probe-" + os.urandom(6).hex()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(8)
    listener.setblocking(False)
    ctx.scratch["abstract_name"] = "@" + name
    ctx.scratch["abstract_listener"] = listener
    return listener.close


def _host_sockets(ctx: Context) -> list[str]:
    """Unix sockets of engines and of the Corral daemon, as paths on this host."""
    paths = ["/var/run/docker.sock", "/run/docker.sock", "/run/corral/corral.sock",
             "/run/containerd/containerd.sock"]
    url = ctx.docker_host or os.environ.get("DOCKER_HOST", "")
    if url.startswith("unix://"):
        paths.append(url[len("unix://"):])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        paths.append(os.path.join(runtime, "corral.sock"))
    return sorted(set(paths))


def _sockets_procedure(ctx: Context, probe: Probe) -> Outcome:
    """Try every engine / daemon socket path; contained only if none connects."""
    seen = {}
    for path in _host_sockets(ctx):
        o = run_inside(ctx, ("connect_unix", path))
        seen[path] = o.short
        if o.ok:
            return Outcome(True, None, {"connected": path, "tried": seen})
    word = "ENOENT" if all(v == "ENOENT" for v in seen.values()) else "refused"
    return Outcome(False, word, {"errno": word, "tried": seen})


def _all_refused(o: Outcome, _ctx) -> bool:
    return o.ok is False and all(v in ("ENOENT", "EACCES", "ECONNREFUSED", "EPERM")
                                 for v in o.value["tried"].values())


def _host_listing(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def _not_host_listing(path: str) -> Judge:
    def judge(o: Outcome, _ctx) -> bool:
        if not o.ok:
            return o.errno in ("ENOENT", "EACCES", "EPERM")
        host = _host_listing(path)
        return not host or o.value != host

    return judge


def _not_host_file(path: str) -> Judge:
    """Contained unless the sandbox read the host's file (compared by sha256: the report
    never carries its content)."""
    import hashlib

    def judge(o: Outcome, _ctx) -> bool:
        if not o.ok:
            return o.errno in ("ENOENT", "EACCES", "EPERM")
        try:
            with open(path, "rb") as f:
                host = f.read(1 << 20)
        except OSError:
            return True
        return not host or o.value["sha256"] != hashlib.sha256(host).hexdigest()

    return judge


def _core_pattern_kept(o: Outcome, ctx: Context) -> bool:
    with open("/proc/sys/kernel/core_pattern") as f:
        now = f.read()
    return (not o.ok) and now == ctx.scratch.get("core_pattern", now)


def _remember_core_pattern(ctx: Context):
    with open("/proc/sys/kernel/core_pattern") as f:
        ctx.scratch["core_pattern"] = f.read()
    return lambda: None


def _masked_or_denied(o: Outcome, _ctx) -> bool:
    """An open that failed, or that only reached the null device (a mask)."""
    if not o.ok:
        return o.errno in ("ENOENT", "EACCES", "EPERM", "EROFS")
    return o.value.get("chr") and o.value.get("rdev") == [1, 3]


def _write_refused(o: Outcome, _ctx) -> bool:
    """Contained when every candidate refused the open for writing."""
    if o.ok:
        return False
    if o.errno == "various":
        return all(e in ("ENOENT", "EACCES", "EPERM", "EROFS") for e in o.value["refused"].values())
    return o.errno in ("ENOENT", "EACCES", "EPERM", "EROFS")


def _empty_read(o: Outcome, _ctx) -> bool:
    return (o.ok and o.value == "") or (not o.ok and o.errno in ("ENOENT", "EACCES", "EPERM"))


def _kallsyms_hidden(o: Outcome, _ctx) -> bool:
    if not o.ok:
        return o.errno in ("ENOENT", "EACCES", "EPERM")
    return not o.value["nonzero_addresses"]


#: Device nodes a sandbox may show: null, zero, full, random, urandom, tty, ptmx, pts.
_HARMLESS_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)}


def _harmless_devices(o: Outcome, _ctx) -> bool:
    if not o.ok:
        return False
    for desc in o.value.values():
        kind, numbers = desc.split()
        major, minor = map(int, numbers.split(":"))
        if kind != "chr" or ((major, minor) not in _HARMLESS_DEVICES and major != 136):
            return False
    return True


def _no_euid_gain(o: Outcome, _ctx) -> bool:
    if not o.ok:
        return o.errno in ("ENOENT", "EACCES", "EPERM") or (
            isinstance(o.value, dict) and "not_setuid" in o.value)
    euid = o.value["euid"]
    return bool(euid) and int(euid[0]) == o.value["self_uid"] and \
        o.value["CapEff"] == "0000000000000000"


def _host_uid_unprivileged(o: Outcome, _ctx) -> bool:
    return bool(o.ok) and o.value["host_uid"] != 0


def _own_pid_namespace(o: Outcome, _ctx) -> bool:
    return bool(o.ok) and o.value["count"] <= 8


def _only_loopback(o: Outcome, _ctx) -> bool:
    return bool(o.ok) and o.value == ["lo"]


# -- host-side procedures ---------------------------------------------------------------------


def _survivor_procedure(ctx: Context, probe: Probe) -> Outcome:
    """Double-fork a sleeper, destroy the sandbox, then look for it on the host."""
    marker = "corral-probe-survivor-" + os.urandom(6).hex()
    sb = ctx.open()
    try:
        inner = run_inside(ctx, ("survivor", marker), sandbox=sb)
        before = _processes_with(marker)
    finally:
        sb.destroy()
    end = time.monotonic() + 5
    left = _processes_with(marker)
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = _processes_with(marker)
    for pid in left:  # it escaped: end it, the probe's evidence is already taken
        _kill_if_marked(pid, marker)
    value = {"forked": inner.short, "seen_before_destroy": len(before),
             "alive_after_destroy": len(left)}
    if left:
        return Outcome(True, None, value)
    return Outcome(False, "ESRCH", {"errno": "ESRCH", **value})


def _kill_if_marked(pid: int, marker: str) -> None:
    """SIGKILL pid through a pidfd, only while it is still the process carrying marker
    (a number found earlier may since name another process)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            marked = marker.encode() in f.read()
        signal_mod.pidfd_send_signal(fd, 0)  # alive now: the cmdline read was its own
        if marked:
            signal_mod.pidfd_send_signal(fd, signal_mod.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{name}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                            found.append(int(name))
    return found


def _survivor_gone(o: Outcome, _ctx) -> bool:
    return o.ok is False and o.value["seen_before_destroy"] >= 1 and \
        o.value["alive_after_destroy"] == 0


def _timeout_procedure(ctx: Context, probe: Probe) -> Outcome:
    """A command that ignores its wall-clock limit (sleeps far past it)."""
    from ..backends.native import DEVNULL

    with ctx.open(timeout_s=1.0) as sb:
        started = time.monotonic()
        proc = sb.exec(["sleep", "120"], stdin=DEVNULL)
        proc.communicate()
        took = time.monotonic() - started
    reason = getattr(proc.reason, "value", str(proc.reason))
    return Outcome(None, None, None, proc.returncode, reason,
                   f"ended after {took:.1f}s of a 1s limit")


def _ended_by_timeout(o: Outcome, _ctx) -> bool:
    return o.reason == "timeout"


def _flood_procedure(ctx: Context, probe: Probe) -> Outcome:
    """256 MiB of stdout into a runtime that must stream it, not hold it."""
    from ..backends.native import DEVNULL

    counted = [0]

    def count(chunk: bytes) -> None:
        counted[0] += len(chunk)

    rss_before = _rss_bytes()
    argv = ["python3", "-I", "-c", inside_source(), "flood", "256"]
    proc = ctx.shared.exec(argv, stdin=DEVNULL)
    err = bytearray()
    proc.pump(count, err.extend)
    growth = max(0, _rss_bytes() - rss_before)
    value = {"received_mib": round(counted[0] / MiB, 1), "runtime_rss_growth_mib":
             round(growth / MiB, 1), "exit": proc.returncode}
    ok = counted[0] == 256 * MiB and growth < 64 * MiB
    return Outcome(ok, None if ok else "ENOMEM", value if ok else {"errno": "ENOMEM", **value})


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _streamed(o: Outcome, _ctx) -> bool:
    return bool(o.ok)


def _join_watch_procedure(ctx: Context, probe: Probe) -> Outcome:
    """A command watches processes being joined into its sandbox while the runtime starts
    commands there, trying to open their /proc/PID/mem and exe for writing."""
    from ..backends.native import DEVNULL

    marker = "corral-join-probe-" + os.urandom(4).hex()
    with ctx.open() as sb:
        watcher = sb.exec(["python3", "-I", "-c", inside_source(), "join_watch", "2", marker],
                          stdin=DEVNULL)
        time.sleep(0.3)
        joined = 0
        while watcher.poll() is None and joined < 200:
            sb.exec(["true", marker], stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL).wait()
            joined += 1
        out, err = watcher.communicate()
    outcome = parse_report(out, err, watcher.returncode, watcher.reason)
    if isinstance(outcome.value, dict):
        outcome.value["joined"] = joined
    return outcome


def _no_joiner_opened(o: Outcome, _ctx) -> bool:
    return bool(o.ok) and o.value["joined"] > 0 and o.value["seen"] > 0


def _file_api_procedure(ctx: Context, probe: Probe) -> Outcome:
    """The sandbox plants links in /workspace; the host-side file API must not follow them
    out of the workspace (reading a host file, or writing through a linked directory)."""
    from ..workspace import Workspace

    secret_path = ctx.scratch["secret_path"]
    with ctx.open() as sb:
        planted = run_inside(ctx, ("workspace_links", secret_path), sandbox=sb)
        api = Workspace(sb.workspace, sb.spec.uid_base, sb.spec.uid_base)
        tried = {"planted": planted.short}
        leaked = []
        try:
            data, _ = api.read("escape-file")
            tried["read escape-file"] = "ok"
            if ctx.scratch["secret"].encode() in data:
                leaked.append("read")
        except CorralError as exc:
            tried["read escape-file"] = type(exc).__name__
        target = f"corral-probe-written-{os.urandom(4).hex()}"
        try:
            api.write(f"escape-dir/tmp/{target}", b"x")
            tried["write escape-dir/tmp"] = "ok"
        except CorralError as exc:
            tried["write escape-dir/tmp"] = type(exc).__name__
        if os.path.exists(f"/tmp/{target}"):
            leaked.append("write")
            os.unlink(f"/tmp/{target}")
    if leaked:
        return Outcome(True, None, {"leaked": leaked, **tried})
    return Outcome(False, "refused", {"errno": "refused", **tried})


def _file_api_refused(o: Outcome, _ctx) -> bool:
    return o.ok is False and o.value.get("planted") == "ok"


# -- the list ---------------------------------------------------------------------------------


def _sys(name: str, *args: str, judge: Judge | None = None, category: str = "kernel",
         attempt: str = "", probe: str | None = None) -> Probe:
    return Probe(probe or name.replace("_", "-"), category, attempt or f"{name}(2)",
                 ("syscall", name, *args), judge or denied(*FILTERED))


SIGSYS = int(signal_mod.SIGSYS)
NO_CAPS = "0000000000000000"

PROBES: tuple[Probe, ...] = (
    # == identity: capabilities and seccomp mode ============================================
    _status("caps-effective", "CapEff", NO_CAPS, "use any capability (effective set)"),
    _status("caps-permitted", "CapPrm", NO_CAPS,
            "hold capabilities to raise later (permitted set)"),
    _status("caps-bounding", "CapBnd", NO_CAPS, "regain capabilities through exec (bounding)"),
    _status("caps-ambient", "CapAmb", NO_CAPS, "inherit capabilities across exec (ambient)"),
    _status("caps-inheritable", "CapInh", NO_CAPS, "pass capabilities to programs (inheritable)"),
    _status("no-new-privs", "NoNewPrivs", "1", "gain privileges through exec"),
    _status("seccomp-mode", "Seccomp", "2", "run without a syscall filter"),
    Probe("host-uid", "identity", "be root on the host", ("host_uid",), _host_uid_unprivileged),
    Probe("pid-namespace", "identity", "see the host's processes", ("pids",),
          _own_pid_namespace),
    # == kernel attack surface ===============================================================
    _sys("io_uring_setup", "8", "buf:120", attempt="io_uring ring (ops bypass the filter)"),
    _sys("userfaultfd", "0x80000", attempt="userfaultfd (stall the kernel mid-copy)"),
    _sys("keyctl", "0", "-3", "0", attempt="read the session keyring (not namespaced)"),
    _sys("add_key", "s:user", "s:corral-probe", "s:x", "1", "-2",
         attempt="add a key to a kernel keyring"),
    _sys("bpf", "0", "buf:128", "128", attempt="create an eBPF map"),
    _sys("perf_event_open", "buf:128", "0", "-1", "-1", "0", attempt="open a perf event"),
    # An unknown flag (bit 15): past the permission check the kernel says EINVAL, so even an
    # escape can never unload a loaded (crash) kernel, as 0 segments would.
    _sys("kexec_load", "0", "0", "null", "0x8000", attempt="load a new kernel"),
    _sys("kexec_file_load", "-1", "-1", "0", "s:", "0", attempt="load a kernel from a file"),
    _sys("init_module", "null", "0", "s:", attempt="load a kernel module"),
    _sys("finit_module", "-1", "s:", "0", attempt="load a kernel module from a file"),
    _sys("delete_module", "s:corral_probe_none", "0", attempt="unload a kernel module"),
    _sys("open_by_handle_at", "-100", "buf:128", "0",
         attempt="open a file by handle (escapes the path view)"),
    _sys("fsopen", "s:tmpfs", "0", attempt="new mount API: fsopen"),
    _sys("open_tree", "-100", "s:/tmp", "1", attempt="new mount API: clone a mount tree"),
    _sys("move_mount", "-1", "s:", "-100", "s:/tmp", "0", attempt="new mount API: move_mount"),
    _sys("syslog", "3", "buf:64", "64", attempt="read the kernel log", probe="syslog-read"),
    _sys("iopl", "3", attempt="raise the I/O privilege level"),
    _sys("reboot", "0", "0", "0", "null", attempt="reboot (with a bad magic: never reboots)"),
    # NUMA placement is the host's; memfd_secret fragments the kernel's direct map.
    _sys("mbind", "0", "4096", "0", "0", "0", "0", attempt="bind memory to a NUMA node"),
    _sys("set_mempolicy", "0", "0", "0", attempt="set the NUMA policy (MPOL_DEFAULT: a no-op)"),
    _sys("get_mempolicy", "null", "null", "0", "0", "0", attempt="read the NUMA policy"),
    _sys("set_mempolicy_home_node", "0", "4096", "0", "0",
         attempt="choose a NUMA home node for memory"),
    _sys("memfd_secret", "0", attempt="take pages out of the kernel's direct map"),
    _sys("settimeofday", "null", "null", attempt="set the host clock (no-op arguments)"),
    _sys("personality", "0x0400000", attempt="READ_IMPLIES_EXEC personality",
         probe="personality-rie"),
    Probe("x32-abi", "kernel", "syscall through the x32 table", ("x32_getpid",),
          denied(*FILTERED, signals=(SIGSYS,))),
    Probe("i386-abi", "kernel", "syscall through int 0x80 (i386 table)", ("i386_getpid",),
          denied(*FILTERED, signals=(SIGSYS,))),
    Probe("af-vsock", "kernel", "AF_VSOCK socket (host/guest channel)", ("socket", "40", "1"),
          denied("EAFNOSUPPORT", "EPERM", "EACCES")),
    Probe("af-alg", "kernel", "AF_ALG socket (kernel crypto API)", ("socket", "38", "5"),
          denied("EAFNOSUPPORT", "EPERM", "EACCES")),
    Probe("af-packet", "kernel", "AF_PACKET socket (raw frames)", ("socket", "17", "3", "0"),
          denied("EAFNOSUPPORT", "EPERM", "EACCES")),
    Probe("netlink-audit", "kernel", "NETLINK_AUDIT socket", ("socket", "16", "3", "9"),
          denied("EPROTONOSUPPORT", "EAFNOSUPPORT", "EPERM", "EACCES")),
    Probe("netlink-netfilter", "kernel", "NETLINK_NETFILTER socket",
          ("socket", "16", "3", "12"),
          denied("EPROTONOSUPPORT", "EAFNOSUPPORT", "EPERM", "EACCES")),
    Probe("netlink-setlink", "kernel", "change a network link through netlink (RTM_NEWLINK)",
          ("netlink_setlink_mtu",), denied("EPERM", "EACCES", "EPROTONOSUPPORT",
                                           "EAFNOSUPPORT")),
    # == privilege ===========================================================================
    _sys("unshare", "0x10000000", attempt="unshare a user namespace (gains all caps inside)",
         category="privilege", probe="unshare-user"),
    _sys("unshare", "0x00020000", attempt="unshare a mount namespace", category="privilege",
         probe="unshare-mount"),
    _sys("clone", "0x10000011", "0", "null", "null", "0", category="privilege",
         attempt="clone into a new user namespace", probe="clone-newuser"),
    Probe("clone3-newuser", "privilege", "clone3 into a new user namespace (flags in memory)",
          ("clone3_newuser",), denied(*FILTERED)),
    _sys("setns", "fd:/proc/self/ns/net", "0", category="privilege",
         attempt="join a namespace (setns)"),
    Probe("capset", "privilege", "raise CAP_SYS_ADMIN with capset", ("capset_sys_admin",),
          denied("EPERM")),
    Probe("setuid-binary", "privilege", "gain root through a setuid-root binary (newgrp)",
          ("setuid_gain", "/usr/bin/newgrp"), _no_euid_gain),
    Probe("ptrace-pid1", "privilege", "attach to the sandbox's PID 1 with ptrace",
          ("ptrace_attach", "1"), denied("EPERM", "EACCES")),
    Probe("process-vm-readv", "privilege", "read PID 1's memory (process_vm_readv)",
          ("process_vm_readv", "1"), denied("EPERM", "EACCES", "ESRCH")),
    Probe("join-hijack", "privilege",
          "open a joining command's /proc/PID/exe or mem for writing (CVE-2019-5736)",
          (), _no_joiner_opened, procedure=_join_watch_procedure),
    Probe("proc-self-exe-write", "privilege", "open /proc/self/exe for writing (runc CVE)",
          ("open", "/proc/self/exe", "O_WRONLY"), denied("EACCES", "ETXTBSY", "EROFS", "EPERM")),
    Probe("mount-proc", "privilege", "mount a fresh procfs", ("mount_proc",),
          denied("EPERM", "EACCES", "EROFS")),
    # == filesystem ==========================================================================
    Probe("host-file", "filesystem", "read a host file by its path",
          lambda ctx: ("read", ctx.scratch["secret_path"]), _not_the_secret, setup=_secret_file),
    Probe("host-file-symlink", "filesystem", "read a host file through a symlink",
          lambda ctx: ("read_via_symlink", ctx.scratch["secret_path"]), _not_the_secret,
          setup=_secret_file),
    Probe("host-file-dotdot", "filesystem", "read a host file through /workspace/../..",
          lambda ctx: ("read", "/workspace/../../.." + ctx.scratch["secret_path"]),
          _not_the_secret, setup=_secret_file),
    Probe("etc-shadow", "filesystem", "read the host's /etc/shadow (compared by digest)",
          ("digest", "/etc/shadow"), _not_host_file("/etc/shadow")),
    Probe("root-home", "filesystem", "list the host's /root", ("listdir", "/root"),
          _not_host_listing("/root")),
    Probe("core-pattern", "filesystem", "rewrite /proc/sys/kernel/core_pattern (same value)",
          ("rewrite", "/proc/sys/kernel/core_pattern", "O_WRONLY"), _core_pattern_kept,
          setup=_remember_core_pattern),
    Probe("sysrq-trigger", "filesystem", "open /proc/sysrq-trigger for writing (no write)",
          ("open", "/proc/sysrq-trigger", "O_WRONLY"), _masked_or_denied),
    Probe("proc-kcore", "filesystem", "read kernel memory from /proc/kcore",
          ("read", "/proc/kcore", "16"), _empty_read),
    Probe("kallsyms", "filesystem", "read kernel symbol addresses", ("kallsyms",),
          _kallsyms_hidden),
    Probe("sys-write", "filesystem", "rewrite a /sys attribute (lo's MTU, same value)",
          ("rewrite", "/sys/class/net/lo/mtu", "O_WRONLY"),
          denied("ENOENT", "EROFS", "EACCES", "EPERM")),
    Probe("sys-firmware", "filesystem", "list /sys/firmware", ("listdir", "/sys/firmware"),
          lambda o, _c: (o.ok and o.value == []) or o.errno in ("ENOENT", "EACCES")),
    Probe("cgroup-release-agent", "filesystem",
          "open a cgroup v1 release_agent for writing (CVE-2022-0492; no write)",
          ("open_any", "/sys/fs/cgroup/*/release_agent"), _write_refused),
    Probe("cgroup-procs", "filesystem", "open a host cgroup's cgroup.procs to move out (no write)",
          ("open_any", "/sys/fs/cgroup/*/cgroup.procs"), _write_refused),
    Probe("modprobe-path", "filesystem", "open /proc/sys/kernel/modprobe for writing (no write)",
          ("open", "/proc/sys/kernel/modprobe", "O_WRONLY"), _write_refused),
    Probe("device-nodes", "filesystem", "find disks or kernel memory devices in /dev",
          ("dev_scan",), _harmless_devices),
    Probe("mknod-char", "filesystem", "create a character device node",
          ("mknod", "/tmp/corral-probe-node", "char"), denied("EPERM", "EACCES")),
    Probe("mknod-block", "filesystem", "create a block device node",
          ("mknod", "/tmp/corral-probe-node", "block"), denied("EPERM", "EACCES")),
    # A setuid/setgid file keeps its bit on the host, owned by the sandbox's host uid.
    Probe("setuid-chmod", "privilege", "chmod 4755 a file (a setuid binary for host users)",
          ("chmod", "/tmp", "4755"), denied("EPERM")),
    Probe("setgid-fchmod", "privilege", "fchmod 2755 a file (a setgid binary for host users)",
          ("chmod", "/tmp", "2755", "fchmod"), denied("EPERM")),
    Probe("setuid-create", "privilege", "create a file with mode 4755 (open O_CREAT)",
          ("create_mode", "/tmp", "4755"), denied("EPERM")),
    Probe("setuid-mknod", "privilege", "create a regular file with mode 6755 by mknod",
          ("create_mode", "/tmp", "6755", "mknodat"), denied("EPERM")),
    Probe("write-root", "filesystem", "create a file in the root directory",
          ("open", "/corral-probe", "O_WRONLY|O_CREAT"), denied("EROFS", "EACCES")),
    Probe("write-usr", "filesystem", "open a system binary for writing (no write)",
          ("open", "/usr/bin/python3", "O_WRONLY"), denied("EROFS", "EACCES", "ETXTBSY")),
    Probe("file-api-links", "filesystem",
          "make the runtime's file API follow /workspace links out",
          (), _file_api_refused, procedure=_file_api_procedure, setup=_secret_file),
    # == resources ===========================================================================
    Probe("fork-bomb", "resources", "fork until the host runs out of pids",
          ("forkbomb", "512"), lambda o, _c: o.errno == "EAGAIN" and o.value["forked"] < 64,
          own={"pids_max": 64}),
    Probe("memory-balloon", "resources", "allocate memory until the host runs out",
          ("balloon", "512"), lambda o, _c: o.reason == "oom" or (
              o.errno == "ENOMEM" and o.value["mib"] <= 128), own={"memory_bytes": 128 * MiB}),
    Probe("disk-fill-tmp", "resources", "fill /tmp until the host disk is full",
          ("fill", "/tmp/corral-probe-fill", str(64 * MiB)),
          lambda o, _c: o.errno == "ENOSPC" and o.value["written"] <= 8 * MiB),
    Probe("disk-fill-workspace", "resources", "write one file bigger than the file size limit",
          ("fill", "/workspace/corral-probe-fill", str(32 * MiB)),
          lambda o, _c: o.errno == "EFBIG" and o.value["written"] <= 16 * MiB),
    Probe("fd-exhaustion", "resources", "open descriptors until the host table is full",
          ("nofile", "4096"), lambda o, _c: o.errno == "EMFILE" and o.value["highest"] <= 256),
    Probe("stdout-flood", "resources", "flood stdout to exhaust the runtime's memory",
          (), _streamed, procedure=_flood_procedure),
    Probe("double-fork-survivor", "resources", "leave a process behind after destroy",
          (), _survivor_gone, procedure=_survivor_procedure),
    Probe("timeout", "resources", "outlive the command's wall-clock limit", (),
          _ended_by_timeout, procedure=_timeout_procedure),
    # == network =============================================================================
    Probe("interfaces", "network", "find a network interface besides loopback",
          ("interfaces",), _only_loopback),
    Probe("host-loopback", "network", "connect to a service on the host's 127.0.0.1",
          lambda ctx: ("connect_tcp", "127.0.0.1", ctx.scratch["tcp_port"]),
          _no_host_connection("tcp_listener", ("ECONNREFUSED", "ENETUNREACH", "EACCES",
                                               "EPERM", "ETIMEDOUT")),
          setup=_tcp_listener),
    Probe("host-abstract-socket", "network", "connect to a host abstract unix socket",
          lambda ctx: ("connect_unix", ctx.scratch["abstract_name"]),
          _no_host_connection("abstract_listener", ("ECONNREFUSED", "ENOENT", "EACCES",
                                                    "EPERM")),
          setup=_abstract_listener),
    Probe("engine-sockets", "network", "reach the Docker engine's or Corral daemon's socket",
          (), _all_refused, procedure=_sockets_procedure),
    Probe("metadata-route", "network", "route to the cloud metadata address 169.254.169.254",
          ("udp_route", "169.254.169.254", "80"), denied("ENETUNREACH", "EPERM", "EACCES")),
    Probe("dns-route", "network", "route to a public DNS resolver (8.8.8.8:53)",
          ("udp_route", "8.8.8.8", "53"), denied("ENETUNREACH", "EPERM", "EACCES")),
    Probe("raw-socket", "network", "open a raw ICMP socket", ("socket", "2", "3", "1"),
          denied("EPERM", "EACCES", "EAFNOSUPPORT", "EPROTONOSUPPORT")),
    # == terminal ============================================================================
    Probe("tiocsti-stdin", "terminal", "push input into the caller's terminal (TIOCSTI)",
          ("tiocsti", "stdin"), denied("EPERM", "ENOTTY", "EIO")),
    Probe("tiocsti-pty", "terminal", "TIOCSTI on a pseudo-terminal", ("tiocsti", "pty"),
          denied("EPERM", "ENOENT", "EACCES", "EIO")),
    Probe("controlling-tty", "terminal", "open the controlling terminal (/dev/tty)",
          ("open", "/dev/tty", "O_RDWR"), denied("ENXIO", "ENOENT", "EACCES", "EIO")),
)


def probe_names() -> list[str]:
    return [p.name for p in PROBES]


# -- running ----------------------------------------------------------------------------------


def run_probe(ctx: Context, probe: Probe) -> Result:
    """Run one probe and judge it; a failure of the runner itself is an ERROR result."""
    cleanup = None
    try:
        if probe.setup is not None:
            cleanup = probe.setup(ctx)
        if probe.procedure is not None:
            outcome = probe.procedure(ctx, probe)
        else:
            args = probe.args(ctx) if callable(probe.args) else probe.args
            if probe.own is not None:
                with ctx.open(**probe.own) as sb:
                    outcome = run_inside(ctx, args, sandbox=sb)
            else:
                outcome = run_inside(ctx, args)
        contained = probe.contained(outcome, ctx)
        verdict = CONTAINED if contained else ESCAPED
        evidence = outcome.evidence()
        if probe.evidence_key and outcome.ok and isinstance(outcome.value, dict):
            evidence = f"{probe.evidence_key}: {outcome.value.get(probe.evidence_key)}"
        return Result(probe.name, probe.category, probe.attempt, verdict, outcome.short,
                      evidence)
    except Exception as exc:  # the runner broke, not the sandbox: report it as such
        return Result(probe.name, probe.category, probe.attempt, ERROR, type(exc).__name__,
                      str(exc)[:300])
    finally:
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()


def select(names: list[str] | None = None, categories: list[str] | None = None) -> list[Probe]:
    """The probes to run, by name and/or category (all when neither is given).

    Raises:
        ValueError: a name or category that does not exist.
    """
    known = {p.name for p in PROBES}
    for name in names or ():
        if name not in known:
            raise ValueError(f"no probe named {name!r}")
    for cat in categories or ():
        if cat not in CATEGORIES:
            raise ValueError(f"no category {cat!r}; categories: {', '.join(CATEGORIES)}")
    return [p for p in PROBES
            if (not names or p.name in names) and (not categories or p.category in categories)]


def run_suite(backend: str = "native", *, profile: str = "default",
              docker_host: str | None = None, probes: list[Probe] | None = None,
              on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run probes (default: all) against a backend; returns one Result per probe.

    Raises:
        CorralError: the backend cannot create a sandbox at all (no engine, no root, ...).
    """
    ctx = Context(backend, profile, docker_host)
    results = []
    ctx.shared = ctx.open()
    try:
        for probe in probes if probes is not None else PROBES:
            result = run_probe(ctx, probe)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        ctx.shared.destroy()
    return results


# -- reports ----------------------------------------------------------------------------------


def summary(results: list[Result]) -> dict[str, int]:
    counts = {CONTAINED: 0, ESCAPED: 0, ERROR: 0}
    for r in results:
        counts[r.verdict] += 1
    return counts


def to_json(results: list[Result], *, backend: str, profile: str) -> str:
    return json.dumps({"backend": backend, "profile": profile, "summary": summary(results),
                       "probes": [r.as_dict() for r in results]}, indent=2)


def render_table(results: list[Result], *, backend: str, profile: str, width: int = 120) -> str:
    name_w = max([len(r.name) for r in results] + [5])
    cat_w = max([len(r.category) for r in results] + [8])
    lines = [f"corral probe: backend {backend}, profile {profile}", ""]
    head = f"{'PROBE':<{name_w}}  {'CATEGORY':<{cat_w}}  {'VERDICT':<9}  EVIDENCE"
    lines.append(head)
    room = max(20, width - len(head) + len("EVIDENCE"))
    for r in results:
        evidence = r.evidence if len(r.evidence) <= room else r.evidence[:room - 3] + "..."
        lines.append(f"{r.name:<{name_w}}  {r.category:<{cat_w}}  {r.verdict:<9}  {evidence}")
    counts = summary(results)
    lines += ["", f"{len(results)} probes: {counts[CONTAINED]} contained, "
                  f"{counts[ESCAPED]} ESCAPED, {counts[ERROR]} errors"]
    return "\n".join(lines) + "\n"


def render_markdown(results: list[Result], *, backend: str, profile: str) -> str:
    counts = summary(results)
    out = [f"# Corral probe report: backend `{backend}`, profile `{profile}`", "",
           f"{len(results)} probes: **{counts[CONTAINED]} contained**, "
           f"**{counts[ESCAPED]} ESCAPED**, {counts[ERROR]} errors.", ""]
    for category in CATEGORIES:
        rows = [r for r in results if r.category == category]
        if not rows:
            continue
        out += [f"## {category}", "", "| probe | attempt | verdict | evidence |",
                "|---|---|---|---|"]
        for r in rows:
            verdict = r.verdict if r.verdict == CONTAINED else f"**{r.verdict}**"
            evidence = r.evidence.replace("|", "\\|")
            attempt = r.attempt.replace("|", "\\|")
            out.append(f"| `{r.name}` | {attempt} | {verdict} | {evidence} |")
        out.append("")
    return "\n".join(out)
