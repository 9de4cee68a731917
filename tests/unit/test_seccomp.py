"""seccomp: profile validation with exact messages, and the compiled BPF run in a real kernel.

The run tests need no namespaces and no root: a forked child sets no_new_privs, loads the
program with seccomp(SECCOMP_SET_MODE_FILTER) through ctypes, makes raw syscalls and reports
each errno through a pipe; the parent asserts the exact errno, or the exact signal.
Every probe is harmless if the filter let it through (bad pointers, invalid flags, pipe fds),
so a broken filter fails the test without touching the host.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import sys
import textwrap
import traceback

import pytest

from corral.sandbox import seccomp
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.seccomp import SeccompProfile, describe, load_profile, parse_profile, prepare

X86_64 = os.uname().machine == "x86_64"
x86_64_only = pytest.mark.skipif(not X86_64, reason="syscall numbers below are x86_64's")

# Syscalls the default profile names that libseccomp 2.5.4 (Debian 12) does not know yet.
NEWER_THAN_LIBSECCOMP = {
    "file_getattr",
    "file_setattr",
    "getxattrat",
    "listxattrat",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "mseal",
    "open_tree_attr",
    "removexattrat",
    "setxattrat",
}

# -- x86_64 syscall numbers and constants used by the probes ----------------------------------

NR = dict(
    read=0, ioctl=16, getpid=39, socket=41, socketpair=53, clone=56, ptrace=101, syslog=103,
    getppid=110, personality=135, pivot_root=155, acct=163, mount=165, umount2=166, swapon=167,
    reboot=169, iopl=172, init_module=175, delete_module=176, keyctl=250, add_key=248,
    kexec_load=246, lseek=8, unshare=272, perf_event_open=298, open_by_handle_at=304,
    name_to_handle_at=303, setns=308, process_vm_readv=310, finit_module=313, seccomp=317,
    bpf=321, userfaultfd=323, io_uring_setup=425, io_uring_enter=426, open_tree=428,
    move_mount=429, fsopen=430, fsmount=432, clone3=435, futex_requeue=456, open_tree_attr=467,
    open=2, creat=85, chmod=90, fchmod=91, mknod=133, openat=257, mknodat=259, fchmodat=268,
    openat2=437, fchmodat2=452, mbind=237, set_mempolicy=238, get_mempolicy=239,
    memfd_secret=447, set_mempolicy_home_node=450,
)  # fmt: skip
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
FIONREAD = 0x541B
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET, AF_ALG, AF_VSOCK = 1, 2, 10, 16, 17, 38, 40
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
U64 = (1 << 64) - 1


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def sc(name_or_nr: str | int, *args: int) -> int:
    """Make a raw syscall; 0 or the errno it failed with (the return value is dropped)."""
    nr = NR[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
    ctypes.set_errno(0)
    rv = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a & U64) for a in args))
    return ctypes.get_errno() if rv == -1 else 0


def sc_fd(name: str, *args: int) -> int:
    """Like sc, for a syscall returning an fd: the fd is closed, success is reported as 0."""
    ctypes.set_errno(0)
    rv = libc.syscall(ctypes.c_long(NR[name]), *(ctypes.c_ulong(a & U64) for a in args))
    if rv == -1:
        return ctypes.get_errno()
    os.close(rv)
    return 0


def load_filter(program: bytes, flags: int = 0) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), *[ctypes.c_ulong(0)] * 3) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(ctypes.c_long(NR["seccomp"]), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_ulong(flags), ctypes.byref(fprog)) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")


def in_child(program: bytes | None, probe, flags: int = 0) -> tuple[int, object]:
    """Fork; the child loads `program` (None: no filter) and runs `probe()`.

    Returns the child's wait status and the JSON value `probe` returned (None if it died).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 0
        try:
            os.close(r)
            if program is not None:
                load_filter(program, flags)
            out = json.dumps({"result": probe()})
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
            code = 3
        try:
            os.write(w, out.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks)) if chunks else None
    if report and "error" in report:
        pytest.fail(f"probe failed in the child:\n{report['error']}")
    return status, report["result"] if report else None


def run_probe(program: bytes | None, probe, flags: int = 0) -> object:
    status, result = in_child(program, probe, flags)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, describe_status(status)
    return result


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.WEXITSTATUS(status)}"


def exec_in_filter(program: bytes, argv: list[str], cwd: str | None = None) -> tuple[int, bytes]:
    """Fork, load `program`, execv argv; returns (wait status, stdout+stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            if cwd:
                os.chdir(cwd)
            load_filter(program)
            os.execv(argv[0], argv)
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(127)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks)


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return prepare(load_profile("default"))


def write_profile(tmp_path, doc: object, name: str = "p.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# -- loading -----------------------------------------------------------------------------------


def test_default_profile_loads_and_names_only_known_syscalls():
    profile = load_profile("default")
    assert profile.name == "default"
    assert profile.source == "builtin"
    assert profile.default_action == "SCMP_ACT_ERRNO"
    assert profile.default_errno_ret == errno.EPERM
    assert not profile.unconfined
    # a typo in the allowlist would be silently skipped like an unknown syscall: catch it here
    assert set(profile.skipped) <= NEWER_THAN_LIBSECCOMP
    assert all(rule.active for rule in profile.rules)


def test_digest_is_sha256_of_canonical_json(tmp_path):
    doc = {"syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_LOG"}],
           "defaultAction": "SCMP_ACT_ALLOW"}  # fmt: skip
    path = write_profile(tmp_path, json.dumps(doc, indent=7))
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    profile = load_profile(path)
    assert profile.digest == hashlib.sha256(canonical).hexdigest()
    assert profile.source == str(tmp_path / "p.json")
    assert profile.name == path


def test_default_digest_matches_shipped_file():
    here = os.path.dirname(seccomp.__file__)
    with open(os.path.join(here, "profiles", "default.json"), "rb") as f:
        doc = json.load(f)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert load_profile("default").digest == hashlib.sha256(canonical.encode()).hexdigest()


def test_unconfined_has_no_filter():
    profile = load_profile("unconfined")
    assert profile.unconfined
    assert profile.source == "builtin"
    assert prepare(profile) is None
    assert describe(profile)["unconfined"] is True


def test_prepare_returns_cached_program_for_same_digest(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}  # fmt: skip
    first = prepare(load_profile(write_profile(tmp_path, doc, "a.json")))
    second = prepare(load_profile(write_profile(tmp_path, doc, "b.json")))
    assert first is second
    assert len(first) % 8 == 0


def test_default_program_fits_the_kernel_limit(default_bpf):
    assert len(default_bpf) % 8 == 0
    assert 0 < len(default_bpf) // 8 <= 4096


def test_unknown_syscall_names_are_skipped_and_recorded(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["no_such_syscall", "getcwd", "arm_fadvise64_64"],
         "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}  # fmt: skip
    profile = load_profile(write_profile(tmp_path, doc))
    expected = ("arm_fadvise64_64", "no_such_syscall") if X86_64 else ("no_such_syscall",)
    assert profile.skipped == expected
    assert prepare(profile)  # compiles without them


def test_includes_and_excludes_select_rules_for_a_capless_sandbox(tmp_path):
    rules = [
        {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["getppid"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["s390x"]}},
        {"names": ["gettid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.1"}},
        {"names": ["getuid"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "2.6"}},
        {"names": ["getgid"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "3.2.1"}},
    ]
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules}
    profile = load_profile(write_profile(tmp_path, doc))
    assert [r.inactive_reason for r in profile.rules] == [
        "needs CAP_SYS_ADMIN; sandboxes hold no capabilities",
        "",
        "only for arches s390x",
        "needs kernel >= 99.1",
        "excluded on kernel >= 2.6",
        "",
    ]
    summary = describe(profile)
    assert summary["allowed"] == ["getgid", "getpid"]
    assert [r["rule"] for r in summary["inactive_rules"]] == [0, 2, 3, 4]


@x86_64_only
def test_native_arch_rules_apply_under_go_and_scmp_names(tmp_path):
    rules = [
        {"names": ["getcwd"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["getpid"], "action": "SCMP_ACT_ALLOW",
         "includes": {"arches": ["SCMP_ARCH_X86_64"]}},
        {"names": ["gettid"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["amd64"]}},
    ]  # fmt: skip
    profile = load_profile(write_profile(tmp_path, {"defaultAction": "SCMP_ACT_KILL",
                                                    "syscalls": rules}))  # fmt: skip
    assert [r.active for r in profile.rules] == [True, True, False]
    assert profile.rules[2].inactive_reason == "excluded on amd64"


def test_old_single_name_field_and_arch_map_are_accepted(tmp_path):
    doc = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"],
        "syscalls": [{"name": "getcwd", "action": "SCMP_ACT_ERRNO"}],
    }  # fmt: skip
    profile = load_profile(write_profile(tmp_path, doc))
    assert profile.architectures == ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
    assert profile.rules[0].names == ("getcwd",)
    assert profile.rules[0].errno_ret is None  # EPERM, as in Docker
    assert profile.load_flags == 2  # LOG; TSYNC is meaningless for a single-threaded child


def test_parse_profile_takes_text_from_the_api():
    profile = parse_profile('{"defaultAction": "SCMP_ACT_LOG"}', name="request", source="grpc")
    assert (profile.name, profile.source, profile.rules) == ("request", "grpc", ())


# -- rejected profiles: one line naming the field and the fix ------------------------------------

ACTIONS_LIST = (
    "SCMP_ACT_KILL, SCMP_ACT_KILL_THREAD, SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_ERRNO, "
    "SCMP_ACT_TRACE, SCMP_ACT_LOG, SCMP_ACT_ALLOW"
)
OPS_LIST = (
    "SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_GT, "
    "SCMP_CMP_MASKED_EQ"
)


def rule(**fields) -> dict:
    return {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["getcwd"], **fields}]}


BAD_PROFILES = [
    ("[]", "the document must be a JSON object, not an array"),
    ("{}", 'defaultAction is missing; e.g. "defaultAction": "SCMP_ACT_ERRNO"'),
    ({"defaultAction": "SCMP_ACT_DENY"},
     f"defaultAction 'SCMP_ACT_DENY' is not a seccomp action; use one of {ACTIONS_LIST}"),
    ({"defaultAction": 1}, "defaultAction must be a string, not a number"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 4096},
     "defaultErrnoRet 4096 is not an errno number (0..4095)"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1},
     "defaultErrnoRet is only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, "
     "not SCMP_ACT_ALLOW"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"},
     "defaultAction SCMP_ACT_NOTIFY needs a seccomp listener, which Corral does not run; "
     "use SCMP_ACT_ERRNO or SCMP_ACT_LOG"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/run/l.sock"},
     "listenerPath is set, but Corral runs no seccomp listener; remove it"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "defaultaction": "SCMP_ACT_ALLOW"},
     "the document has an unknown field 'defaultaction'; known fields: archMap, architectures, "
     "defaultAction, defaultErrnoRet, flags, listenerMetadata, listenerPath, syscalls"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_Z80"]},
     "architectures[0] 'SCMP_ARCH_Z80' is not a seccomp architecture; "
     "use e.g. SCMP_ARCH_X86_64"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_I386"]}]},
     "archMap[0].subArchitectures[0] 'SCMP_ARCH_I386' is not a seccomp architecture; "
     "use e.g. SCMP_ARCH_X86_64"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "archMap": [{"subArchitectures": []}]},
     "archMap[0].architecture is missing"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]},
     "flags[0] 'SECCOMP_FILTER_FLAG_NEW_LISTENER' is not supported; use "
     "SECCOMP_FILTER_FLAG_LOG, SECCOMP_FILTER_FLAG_SPEC_ALLOW, SECCOMP_FILTER_FLAG_TSYNC"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": {}},
     "syscalls must be a JSON array, not an object"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"action": "SCMP_ACT_ALLOW"}]},
     'syscalls[0] has no "names"; list the syscalls the rule is for'),
    (rule(action="SCMP_ACT_ALLOW", name="getpid"),
     'syscalls[0] has both "name" and "names"; keep "names"'),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]},
     "syscalls[0].names is empty; list at least one syscall name"),
    ({"defaultAction": "SCMP_ACT_ERRNO",
      "syscalls": [{"names": ["read", "Get CWD"], "action": "SCMP_ACT_ALLOW"}]},
     "syscalls[0].names[1] 'Get CWD' is not a syscall name (lowercase letters, digits and _)"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read", 3]}]},
     "syscalls[0].names[1] must be a string, not a number"),
    (rule(), 'syscalls[0].action is missing; e.g. "action": "SCMP_ACT_ALLOW"'),
    (rule(action="SCMP_ACT_ALOW"),
     f"syscalls[0].action 'SCMP_ACT_ALOW' is not a seccomp action; use one of {ACTIONS_LIST}"),
    (rule(action="SCMP_ACT_NOTIFY"),
     "syscalls[0].action SCMP_ACT_NOTIFY needs a seccomp listener, which Corral does not run; "
     "use SCMP_ACT_ERRNO or SCMP_ACT_LOG"),
    (rule(action="SCMP_ACT_ALLOW", errnoRet=1),
     "syscalls[0].errnoRet is only meaningful with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, "
     "not SCMP_ACT_ALLOW"),
    (rule(action="SCMP_ACT_ERRNO", errnoRet=-1),
     "syscalls[0].errnoRet -1 is not an errno number (0..4095)"),
    (rule(action="SCMP_ACT_ERRNO", errnoRet="EPERM"),
     'syscalls[0].errnoRet "EPERM" is not an errno number (0..4095)'),
    (rule(action="SCMP_ACT_ALLOW", nmes=["x"]),
     "syscalls[0] has an unknown field 'nmes'; known fields: action, args, comment, errnoRet, "
     "excludes, includes, name, names"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"index": 0, "value": 1, "op": "SCMP_CMP_EQUAL"}]),
     f"syscalls[0].args[0].op 'SCMP_CMP_EQUAL' is not a comparison; use one of {OPS_LIST}"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]),
     "syscalls[0].args[0].index 6 is not an argument index (0..5)"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"value": 1, "op": "SCMP_CMP_EQ"}]),
     "syscalls[0].args[0].index is missing"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]),
     "syscalls[0].args[0].value -1 is not an unsigned 64-bit integer"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"index": 0, "value": 1 << 64, "op": "SCMP_CMP_EQ"}]),
     "syscalls[0].args[0].value 18446744073709551616 is not an unsigned 64-bit integer"),
    (rule(action="SCMP_ACT_ALLOW",
          args=[{"index": 0, "value": 1, "valueTwo": 1.5, "op": "SCMP_CMP_MASKED_EQ"}]),
     "syscalls[0].args[0].valueTwo 1.5 is not an unsigned 64-bit integer"),
    (rule(action="SCMP_ACT_ALLOW", args=[{"index": 0, "value": True, "op": "SCMP_CMP_EQ"}]),
     "syscalls[0].args[0].value true is not an unsigned 64-bit integer"),
    ({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"name": "x-y", "action": "SCMP_ACT_LOG"}]},
     "syscalls[0].name 'x-y' is not a syscall name (lowercase letters, digits and _)"),
    (rule(action="SCMP_ACT_ALLOW", args={}),
     "syscalls[0].args must be a JSON array, not an object"),
    (rule(action="SCMP_ACT_ALLOW", includes=[]),
     "syscalls[0].includes must be a JSON object, not an array"),
    (rule(action="SCMP_ACT_ALLOW", includes={"minKernel": "5.x"}),
     "syscalls[0].includes.minKernel '5.x' is not a kernel version; use e.g. \"5.8\""),
    (rule(action="SCMP_ACT_ALLOW", excludes={"caps": ["sys_admin"]}),
     "syscalls[0].excludes.caps[0] 'sys_admin' is not a capability name"),
    (rule(action="SCMP_ACT_ALLOW", includes={"kernel": "5.8"}),
     "syscalls[0].includes has an unknown field 'kernel'; known fields: arches, caps, minKernel"),
]  # fmt: skip


@pytest.mark.parametrize("doc,message", BAD_PROFILES)
def test_invalid_profiles_are_rejected_with_one_actionable_line(tmp_path, doc, message):
    path = write_profile(tmp_path, doc)
    with pytest.raises(InvalidSpec, match=f"^{re.escape(f'profile: {path!r}: {message}')}$"):
        load_profile(path)


def test_unconditional_rule_may_not_hide_a_conditional_one(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
         "args": [{"index": 1, "value": TIOCSTI, "op": "SCMP_CMP_EQ"}]},
    ]}  # fmt: skip
    path = write_profile(tmp_path, doc)
    message = (
        f"profile: {path!r}: syscalls[1] can never apply: syscalls[0] gives 'ioctl' "
        "SCMP_ACT_ALLOW for every call, which libseccomp lets win over conditional rules; "
        "make that rule conditional too"
    )
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        load_profile(path)


def test_two_unconditional_actions_for_one_syscall_are_rejected(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd", "getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["getpid"], "action": "SCMP_ACT_KILL_PROCESS"},
    ]}  # fmt: skip
    path = write_profile(tmp_path, doc)
    message = (
        f"profile: {path!r}: syscalls[1] gives 'getpid' SCMP_ACT_KILL_PROCESS but syscalls[0] "
        "gives it SCMP_ACT_ERRNO(EACCES); keep one unconditional rule per syscall"
    )
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        load_profile(path)


def test_not_json_says_where(tmp_path):
    path = write_profile(tmp_path, '{\n  "defaultAction": "SCMP_ACT_ERRNO"\n  "syscalls": []\n}')
    message = f"profile: {path!r} is not valid JSON: Expecting ',' delimiter at line 3 column 3"
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        load_profile(path)


def test_duplicate_keys_are_ambiguous(tmp_path):
    path = write_profile(tmp_path, '{"defaultAction": "SCMP_ACT_ERRNO", '
                                   '"defaultAction": "SCMP_ACT_ALLOW"}')  # fmt: skip
    message = (
        f"profile: {path!r} is not valid JSON for a profile: "
        "key 'defaultAction' appears twice in one object"
    )
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        load_profile(path)


def test_nan_is_no_errno(tmp_path):
    path = write_profile(tmp_path, '{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": NaN}')
    message = (
        f"profile: {path!r} is not valid JSON for a profile: NaN is not a number a profile can use"
    )
    with pytest.raises(InvalidSpec, match=f"^{re.escape(message)}$"):
        load_profile(path)


def test_missing_file_and_unknown_name(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(
        InvalidSpec,
        match=f"^{re.escape(f'profile: file {missing!r} does not exist; ')}"
        r"pass the path of a Docker seccomp JSON profile$",
    ):
        load_profile(missing)
    with pytest.raises(
        InvalidSpec,
        match=r"^profile: no profile named 'strict'; use 'default', 'unconfined' "
        r"or the path of a Docker seccomp JSON profile$",
    ):
        load_profile("strict")


def test_directory_is_not_a_profile(tmp_path):
    prefix = re.escape(f"profile: cannot read {str(tmp_path)!r}: ")
    with pytest.raises(InvalidSpec, match=f"^{prefix}Is a directory$"):
        load_profile(str(tmp_path))


def test_binary_file_is_not_a_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'{"defaultAction": "\xff"}')
    with pytest.raises(
        InvalidSpec, match=f"^{re.escape(f'profile: {str(path)!r} is not UTF-8 text')} "
        r"\(bad byte at offset 19\)$",
    ):  # fmt: skip
        load_profile(str(path))


# -- the default profile, enforced by the kernel ------------------------------------------------


@x86_64_only
def test_default_denies_dangerous_syscalls_with_exact_errnos(default_bpf):
    def probe():
        return {
            # clone3 must say "not implemented" so glibc falls back to clone
            "clone3": sc("clone3", 0, 0),
            "unshare(NEWUSER)": sc("unshare", CLONE_NEWUSER),
            "unshare(NEWNET)": sc("unshare", CLONE_NEWNET),
            "setns": sc("setns", -1, 0),
            "io_uring_setup": sc("io_uring_setup", 1, 0),
            "io_uring_enter": sc("io_uring_enter", -1, 0, 0, 0, 0, 0),
            "userfaultfd": sc("userfaultfd", 0),
            "bpf": sc("bpf", 0, 0, 0),
            "keyctl": sc("keyctl", 0, 0, 0, 0, 0),
            "add_key": sc("add_key", 0, 0, 0, 0, 0),
            "perf_event_open": sc("perf_event_open", 0, 0, -1, -1, 0),
            # PTRACE_PEEKUSER of a process we do not trace: ESRCH if it got through
            "ptrace": sc("ptrace", 3, os.getppid(), 0, 0),
            "process_vm_readv": sc("process_vm_readv", os.getppid(), 0, 0, 0, 0, 0),
            # null pointers everywhere: EFAULT/EINVAL if any of these got through
            "mount": sc("mount", 0, 0, 0, 0, 0),
            "umount2": sc("umount2", 0, 0),
            "pivot_root": sc("pivot_root", 0, 0),
            "fsopen": sc("fsopen", 0, 0),
            "fsmount": sc("fsmount", -1, 0, 0),
            "open_tree": sc("open_tree", -1, 0, 0),
            "move_mount": sc("move_mount", -1, 0, -1, 0, 0),
            "open_by_handle_at": sc("open_by_handle_at", -1, 0, 0),
            "name_to_handle_at": sc("name_to_handle_at", -1, 0, 0, 0, 0),
            "init_module": sc("init_module", 0, 0, 0),
            "finit_module": sc("finit_module", -1, 0, 0),
            "delete_module": sc("delete_module", 0, 0),
            # an arch mask that is no architecture: EINVAL if it got through
            "kexec_load": sc("kexec_load", 0, 0, 0, 0xFFFF0000),
            "reboot": sc("reboot", 0, 0, 0, 0),  # bad magic
            "swapon": sc("swapon", 0, 0),
            "acct": sc("acct", 1),
            "syslog": sc("syslog", 0, 0, 0),  # SYSLOG_ACTION_CLOSE, a no-op
            "iopl": sc("iopl", 4),  # level 4 does not exist
            "personality(ADDR_NO_RANDOMIZE)": sc("personality", 0x0040000),
        }

    results = run_probe(default_bpf, probe)
    expected = {name: errno.EPERM for name in results}
    expected["clone3"] = errno.ENOSYS
    assert results == expected


@x86_64_only
def test_default_refuses_setuid_and_setgid_modes_but_not_plain_ones(default_bpf, tmp_path):
    """Every call that sets a file mode: with S_ISUID or S_ISGID in the mode, EPERM before
    the kernel sees it (high garbage bits do not matter; the kernel truncates to umode_t);
    without them, the call works. openat2 hides its mode in memory: ENOSYS."""
    target = tmp_path / "f"
    target.write_bytes(b"")
    path = ctypes.create_string_buffer(str(target).encode())
    new = ctypes.create_string_buffer(str(tmp_path / "n").encode())
    addr, new_addr = ctypes.addressof(path), ctypes.addressof(new)
    at_fdcwd = -100

    def probe():
        fd = os.open(str(target), os.O_RDONLY)
        out = {}
        for label, bits in (("suid", 0o4755), ("sgid", 0o2755), ("both", 0o6755),
                            ("suid-high", (1 << 40) | 0o4755)):
            out[f"chmod-{label}"] = sc("chmod", addr, bits)
            out[f"fchmod-{label}"] = sc("fchmod", fd, bits)
            out[f"fchmodat-{label}"] = sc("fchmodat", at_fdcwd, addr, bits)
            out[f"fchmodat2-{label}"] = sc("fchmodat2", at_fdcwd, addr, bits, 0)
            out[f"creat-{label}"] = sc("creat", new_addr, bits)
            out[f"open-{label}"] = sc("open", new_addr, os.O_CREAT | os.O_WRONLY, bits)
            out[f"openat-{label}"] = sc("openat", at_fdcwd, new_addr, os.O_CREAT | os.O_WRONLY,
                                        bits)
            out[f"mknod-{label}"] = sc("mknod", new_addr, 0o100000 | bits, 0)
            out[f"mknodat-{label}"] = sc("mknodat", at_fdcwd, new_addr, 0o100000 | bits, 0)
        out["openat2"] = sc("openat2", at_fdcwd, new_addr, 0, 24)
        out["new-file-exists"] = os.path.exists(new.value)
        out["mode-after"] = oct(os.stat(str(target)).st_mode & 0o7777)
        # plain modes still work, and a file created without the bits is fine
        out["chmod-755"] = sc("chmod", addr, 0o755)
        out["fchmod-700"] = sc("fchmod", fd, 0o700)
        out["fchmodat-1777-sticky"] = sc("fchmodat", at_fdcwd, addr, 0o1777)
        out["mode-plain"] = oct(os.stat(str(target)).st_mode & 0o7777)
        nfd = os.open(new.value, os.O_CREAT | os.O_WRONLY, 0o755)
        os.close(nfd)
        os.unlink(new.value)
        os.close(fd)
        return out

    results = run_probe(default_bpf, probe)
    expected = {k: errno.EPERM for k in results}
    expected.update({"openat2": errno.ENOSYS, "new-file-exists": False, "mode-after": "0o644",
                     "chmod-755": 0, "fchmod-700": 0, "fchmodat-1777-sticky": 0,
                     "mode-plain": "0o1777"})
    os.chmod(target, 0o644)
    assert results == expected


@x86_64_only
def test_default_denies_numa_policy_and_secret_memory(default_bpf):
    def probe():
        return {name: sc(name, *args) for name, args in (
            ("mbind", (0, 4096, 0, 0, 0, 0)),
            ("set_mempolicy", (0, 0, 0)),  # MPOL_DEFAULT: a no-op if it got through
            ("get_mempolicy", (0, 0, 0, 0, 0)),
            ("set_mempolicy_home_node", (0, 4096, 0, 0)),
            ("memfd_secret", (0,)),
        )}

    assert run_probe(default_bpf, probe) == {
        "mbind": errno.EPERM, "set_mempolicy": errno.EPERM, "get_mempolicy": errno.EPERM,
        "set_mempolicy_home_node": errno.EPERM, "memfd_secret": errno.EPERM}


@x86_64_only
def test_default_denies_clone_with_namespace_flags(default_bpf):
    def probe():
        sigchld = 17
        out = {}
        for flag in (CLONE_NEWUSER, CLONE_NEWNET, 0x20000, 0x02000000, 0x20000000):
            ctypes.set_errno(0)
            pid = libc.syscall(ctypes.c_long(NR["clone"]), ctypes.c_ulong(flag | sigchld),
                               *[ctypes.c_ulong(0)] * 4)  # fmt: skip
            if pid == 0:  # the filter let it through: leave at once, the parent fails below
                os._exit(0)
            if pid > 0:
                os.waitpid(pid, 0)
                out[hex(flag)] = 0
            else:
                out[hex(flag)] = ctypes.get_errno()
        return out

    assert run_probe(default_bpf, probe) == {
        "0x10000000": errno.EPERM,
        "0x40000000": errno.EPERM,
        "0x20000": errno.EPERM,
        "0x2000000": errno.EPERM,
        "0x20000000": errno.EPERM,
    }


@x86_64_only
def test_default_allows_only_unix_inet_and_netlink_route_sockets(default_bpf):
    def probe():
        return {
            "AF_UNIX": sc_fd("socket", AF_UNIX, SOCK_STREAM, 0),
            "AF_INET": sc_fd("socket", AF_INET, SOCK_STREAM, 0),
            "AF_INET dgram": sc_fd("socket", AF_INET, SOCK_DGRAM, 0),
            "AF_INET6": sc_fd("socket", AF_INET6, SOCK_STREAM, 0) if socket.has_ipv6 else 0,
            "AF_NETLINK route": sc_fd("socket", AF_NETLINK, SOCK_RAW, NETLINK_ROUTE),
            "AF_NETLINK netfilter": sc_fd("socket", AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER),
            "AF_VSOCK": sc_fd("socket", AF_VSOCK, SOCK_STREAM, 0),
            "AF_ALG": sc_fd("socket", AF_ALG, SOCK_SEQPACKET, 0),
            "AF_PACKET": sc_fd("socket", AF_PACKET, SOCK_RAW, 0),
            "AF_UNSPEC": sc_fd("socket", 0, SOCK_STREAM, 0),
            "AF_BLUETOOTH": sc_fd("socket", 31, SOCK_STREAM, 0),
            # the kernel reads the family as an int: high bits must not smuggle AF_VSOCK in
            "AF_VSOCK high bits": sc_fd("socket", (1 << 32) | AF_VSOCK, SOCK_STREAM, 0),
            "AF_INET high bits": sc_fd("socket", (1 << 32) | AF_INET, SOCK_STREAM, 0),
            "socketpair AF_UNIX": sc("socketpair", AF_UNIX, SOCK_STREAM, 0, 0),  # EFAULT: no fds
            "socketpair AF_VSOCK": sc("socketpair", AF_VSOCK, SOCK_STREAM, 0, 0),
        }

    assert run_probe(default_bpf, probe) == {
        "AF_UNIX": 0,
        "AF_INET": 0,
        "AF_INET dgram": 0,
        "AF_INET6": 0,
        "AF_NETLINK route": 0,
        "AF_NETLINK netfilter": errno.EPROTONOSUPPORT,
        "AF_VSOCK": errno.EAFNOSUPPORT,
        "AF_ALG": errno.EAFNOSUPPORT,
        "AF_PACKET": errno.EAFNOSUPPORT,
        "AF_UNSPEC": errno.EAFNOSUPPORT,
        "AF_BLUETOOTH": errno.EAFNOSUPPORT,
        "AF_VSOCK high bits": errno.EAFNOSUPPORT,
        "AF_INET high bits": errno.EAFNOSUPPORT,
        "socketpair AF_UNIX": errno.EFAULT,
        "socketpair AF_VSOCK": errno.EAFNOSUPPORT,
    }


@x86_64_only
def test_default_denies_tiocsti_and_tioclinux_whatever_the_high_bits(default_bpf):
    # On a pipe, an allowed TIOCSTI fails with ENOTTY and injects nothing: EPERM proves the filter.
    rng = random.Random(2)
    denied = [TIOCSTI, TIOCLINUX, (1 << 32) | TIOCSTI, (0xFFFFFFFF << 32) | TIOCLINUX]
    denied += [(rng.getrandbits(32) << 32) | rng.choice((TIOCSTI, TIOCLINUX)) for _ in range(200)]
    others = list(range(0x5400, 0x5480)) + [rng.getrandbits(64) for _ in range(3000)]
    others = [c for c in others if c & 0xFFFFFFFF not in (TIOCSTI, TIOCLINUX)]

    def probe():
        r, w = os.pipe()
        return {
            "denied": sorted({sc("ioctl", r, cmd, 0) for cmd in denied}),
            "others_eperm": [hex(cmd) for cmd in others if sc("ioctl", r, cmd, 0) == errno.EPERM],
            "FIONREAD": sc("ioctl", r, FIONREAD, ctypes.addressof(ctypes.c_int())),
            "TCGETS": sc("ioctl", r, 0x5401, 0),
        }

    assert run_probe(default_bpf, probe) == {
        "denied": [errno.EPERM],
        "others_eperm": [],
        "FIONREAD": 0,
        "TCGETS": errno.ENOTTY,
    }


@x86_64_only
def test_default_personality_allows_standard_domains_only(default_bpf):
    def probe():
        return {hex(p): sc("personality", p) for p in (0xFFFFFFFF, 0, 8, 0x20000, 0x20008,
                                                        0x0400000, (1 << 32))}  # fmt: skip

    assert run_probe(default_bpf, probe) == {
        "0xffffffff": 0,
        "0x0": 0,
        "0x8": 0,
        "0x20000": 0,
        "0x20008": 0,
        "0x400000": errno.EPERM,  # READ_IMPLIES_EXEC
        "0x100000000": errno.EPERM,
    }


@x86_64_only
def test_syscalls_newer_than_the_profile_fail_with_enosys(default_bpf):
    def probe():
        return {
            "open_tree_attr": sc("open_tree_attr", -1, 0, 0, 0, 0),
            "nr 1000": sc(1000),
            # allowed: the kernel itself refuses an empty request
            "futex_requeue": sc("futex_requeue", 0, 0, 0, 0),
            # a gap in the table, below the newest syscall the profile names: the default
            "nr 400": sc(400),
        }

    assert run_probe(default_bpf, probe) == {
        "open_tree_attr": errno.ENOSYS,
        "nr 1000": errno.ENOSYS,
        "futex_requeue": errno.EINVAL,
        "nr 400": errno.EPERM,
    }


@x86_64_only
def test_x32_syscall_numbers_kill_the_process(default_bpf):
    status, result = in_child(default_bpf, lambda: sc(X32_SYSCALL_BIT | NR["getpid"]))
    assert result is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


@x86_64_only
def test_x32_is_killed_even_for_a_profile_that_allows_everything(tmp_path):
    allow_all = prepare(load_profile(write_profile(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW"})))
    status, _ = in_child(allow_all, lambda: sc(X32_SYSCALL_BIT | NR["getpid"]))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def _int80_getpid():
    """Make the i386 getpid (nr 20) through int 0x80 from this 64-bit process."""
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)()


@x86_64_only
def test_i386_syscalls_kill_the_process(default_bpf):
    status, result = in_child(None, lambda: _int80_getpid() == os.getpid())
    if not (os.WIFEXITED(status) and result is True):
        pytest.skip(f"no ia32 emulation in this kernel (int 0x80 probe {describe_status(status)})")
    status, result = in_child(default_bpf, _int80_getpid)
    assert result is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_default_keeps_ordinary_work_working(default_bpf, tmp_path):
    import threading

    target = str(tmp_path / "data")

    def probe():
        out = {"getpid": os.getpid() > 0}
        with open(target, "w") as f:
            f.write("hello")
        with open(target) as f:
            out["read"] = f.read()
        with mmap.mmap(-1, 1 << 20) as m:
            m[:5] = b"mmap!"
            out["mmap"] = m[:5].decode()
        pid = os.fork()  # glibc fork: clone without namespace flags
        if pid == 0:
            os._exit(7)
        out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        box = []
        thread = threading.Thread(target=box.append, args=("thread",))
        thread.start()
        thread.join()
        out["thread"] = box[0]
        a, b = socket.socketpair()
        a.sendall(b"ping")
        out["socketpair"] = b.recv(4).decode()
        return out

    assert run_probe(default_bpf, probe) == {
        "getpid": True,
        "read": "hello",
        "mmap": "mmap!",
        "fork": 7,
        "thread": "thread",
        "socketpair": "ping",
    }


PYTHON_WORKLOAD = textwrap.dedent(
    """
    import asyncio, hashlib, json, os, socket, sqlite3, subprocess, sys, tempfile, threading
    assert json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]}
    results = []
    threads = [threading.Thread(target=results.append, args=(i,)) for i in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    assert sorted(results) == list(range(8))
    assert subprocess.run(["/bin/echo", "hi"], capture_output=True).stdout == b"hi\\n"
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "x.db"))
        db.execute("create table t (x)"); db.execute("insert into t values (1)"); db.commit()
        assert db.execute("select x from t").fetchone() == (1,)
    server = socket.create_server(("127.0.0.1", 0))
    def serve():
        conn, _ = server.accept(); conn.sendall(conn.recv(5)); conn.close()
    threading.Thread(target=serve).start()
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(b"hello"); assert c.recv(5) == b"hello"
    socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG)
    async def main():
        async def echo(reader, writer):
            writer.write(await reader.read(5)); await writer.drain(); writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"async"); await writer.drain()
        data = await reader.read(5)
        writer.close(); server.close(); await server.wait_closed()
        return data
    assert asyncio.run(main()) == b"async"
    print(hashlib.sha256(b"ok").hexdigest()[:8])
    """
)


def test_python_runs_under_the_default_profile(default_bpf, tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(PYTHON_WORKLOAD)
    status, output = exec_in_filter(default_bpf, [sys.executable, str(script)])
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    assert output == hashlib.sha256(b"ok").hexdigest()[:8].encode() + b"\n"


def test_shell_pipeline_runs_under_the_default_profile(default_bpf):
    status, output = exec_in_filter(default_bpf, ["/bin/sh", "-c", "ls -A / | wc -l"])
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert int(output) == len(os.listdir("/"))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_gcc_compiles_and_runs_under_the_default_profile(default_bpf, tmp_path):
    gcc = shutil.which("gcc")
    status, output = exec_in_filter(default_bpf, [gcc, "--version"])
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert output.startswith(b"gcc")
    (tmp_path / "hello.c").write_text(
        '#include <pthread.h>\n#include <stdio.h>\n'
        'static void *run(void *a) { return a; }\n'
        'int main(void) { pthread_t t; void *r; pthread_create(&t, 0, run, "threads ok");\n'
        '  pthread_join(t, &r); puts(r); return 0; }\n'
    )  # fmt: skip
    status, output = exec_in_filter(
        default_bpf, ["/bin/sh", "-c", f"{gcc} -pthread -o hello hello.c && ./hello"],
        cwd=str(tmp_path),
    )  # fmt: skip
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert output == b"threads ok\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_fetches_from_a_local_server_under_the_default_profile(default_bpf):
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from 127.0.0.1")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://localhost:{server.server_address[1]}/"  # resolved by getaddrinfo
        status, output = exec_in_filter(default_bpf, [shutil.which("curl"), "-sS", url])
    finally:
        server.shutdown()
        server.server_close()
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert output == b"hello from 127.0.0.1"


# -- custom profiles ---------------------------------------------------------------------------


def test_custom_profile_rule_applies(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}  # fmt: skip
    program = prepare(load_profile(write_profile(tmp_path, doc)))

    def probe():
        try:
            os.getcwd()
        except OSError as e:
            return {"getcwd": e.errno, "getpid": os.getpid() > 0}
        return {"getcwd": 0}

    assert run_probe(program, probe) == {"getcwd": errno.EACCES, "getpid": True}


@x86_64_only
def test_custom_profile_args_follow_runc_semantics(tmp_path):
    # one index repeated: any condition matches; distinct indexes: all must match. The
    # descriptors are past any RLIMIT_NOFILE, so an lseek the filter lets through is EBADF
    # whatever this process has open (fd 102 was once a pytest pipe: ESPIPE).
    base = 1 << 24
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["lseek"], "action": "SCMP_ACT_ERRNO", "errnoRet": 16, "args": [
            {"index": 0, "value": base + 100, "op": "SCMP_CMP_EQ"},
            {"index": 0, "value": base + 101, "op": "SCMP_CMP_EQ"}]},
        {"names": ["lseek"], "action": "SCMP_ACT_ERRNO", "errnoRet": 17, "args": [
            {"index": 0, "value": base + 200, "op": "SCMP_CMP_EQ"},
            {"index": 2, "value": 0xF0, "valueTwo": 0x10, "op": "SCMP_CMP_MASKED_EQ"}]},
    ]}  # fmt: skip
    program = prepare(load_profile(write_profile(tmp_path, doc)))

    def probe():
        return [sc("lseek", base + fd, 0, whence) for fd, whence in
                ((100, 0), (101, 0), (102, 0), (200, 0x11), (200, 0), (201, 0x11))]  # fmt: skip

    ebadf, ebusy, eexist = errno.EBADF, errno.EBUSY, errno.EEXIST
    assert run_probe(program, probe) == [ebusy, ebusy, ebadf, eexist, ebadf, ebadf]


def test_kill_process_action_kills_with_sigsys(tmp_path):
    doc = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getcwd"], "action": "SCMP_ACT_KILL_PROCESS"}]}  # fmt: skip
    program = prepare(load_profile(write_profile(tmp_path, doc)))
    status, result = in_child(program, os.getcwd)
    assert result is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_allow_default_gets_no_enosys_prologue(tmp_path):
    allow = prepare(load_profile(write_profile(tmp_path, {"defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"}]})))  # fmt: skip
    deny = prepare(load_profile(write_profile(tmp_path, {"defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ALLOW"}]}, "d.json")))  # fmt: skip
    enosys = (0x00050000 | errno.ENOSYS).to_bytes(4, sys.byteorder)
    assert enosys not in allow
    assert enosys in deny[:48]


# -- describe ----------------------------------------------------------------------------------


def test_describe_default_profile():
    summary = describe(load_profile("default"))
    assert summary["default"] == "SCMP_ACT_ERRNO(EPERM)"
    assert summary["other_architectures"] == "SCMP_ACT_KILL_PROCESS"
    assert summary["denied"]["clone3"] == "SCMP_ACT_ERRNO(ENOSYS)"
    for name in ("ptrace", "bpf", "io_uring_setup", "keyctl", "mount", "unshare", "setns"):
        assert summary["denied"][name] == "SCMP_ACT_ERRNO(EPERM)"
        assert name not in summary["allowed"]
    assert {"read", "write", "execve", "futex", "rseq"} <= set(summary["allowed"])
    assert set(summary["conditional"]) == {
        "clone", "ioctl", "personality", "socket", "socketpair",
        "chmod", "fchmod", "creat", "mknod", "fchmodat", "fchmodat2", "open", "mknodat", "openat"}
    assert summary["conditional"]["openat"] == [
        {"action": "SCMP_ACT_ALLOW", "when": ["arg3 & 0xc00 == 0x0"], "combine": "all"}
    ]
    assert summary["denied"]["openat2"] == "SCMP_ACT_ERRNO(ENOSYS)"
    for name in ("mbind", "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node",
                 "memfd_secret"):
        assert summary["denied"][name] == "SCMP_ACT_ERRNO(EPERM)"
    assert summary["conditional"]["clone"] == [
        {"action": "SCMP_ACT_ALLOW", "when": ["arg0 & 0x7e020000 == 0x0"], "combine": "all"}
    ]
    assert json.loads(json.dumps(summary)) == summary


def test_profile_is_frozen():
    profile = load_profile("default")
    with pytest.raises(AttributeError):
        profile.name = "other"  # type: ignore[misc]
    assert isinstance(profile, SeccompProfile)
