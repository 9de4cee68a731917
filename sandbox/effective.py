"""The effective policy of a running sandbox, read from the live kernel, and its mismatches.

Nothing here trusts the spec or Corral's own bookkeeping for what it reports: every value
comes from /proc, the cgroup files or netlink at the moment of the call. The spec is only
used afterwards, to say loudly where the two differ.

What each check can prove:

* namespaces: `/proc/PID/ns/*` inodes compared with the inspector's own (a namespace
  shared with the host has the same inode);
* ids: `uid_map`/`gid_map` as the kernel holds them;
* seccomp, no_new_privs, capabilities: `/proc/PID/status` (`Seccomp`, `Seccomp_filters`,
  `NoNewPrivs`, `CapEff`, `CapPrm`, `CapBnd`, `CapAmb`);
* cgroup: the process's membership (`/proc/PID/cgroup`) and the limit files of the cgroup
  it is in (not of the one Corral meant to put it in);
* mounts: `/proc/PID/mountinfo`, the mount table as the process sees it;
* landlock: the kernel shows no landlock domain in /proc, so a running process cannot be
  checked from outside. What can be proved is that a *new command* is restricted: a probe
  (`sh -c 'printf x > /proc/self/comm'`) writes a file that its DAC permissions and its
  mount allow and only landlock forbids; EACCES proves enforcement, success proves its
  absence. Existing processes went through the same exec path, which is all one can say.
* network: links, addresses and routes of the process's network namespace via netlink.
"""

from __future__ import annotations

import contextlib
import os

from .cgroups import NO_DELEGATION
from .procinfo import read_or_none
from .spec import SandboxSpec

NAMESPACES = ("user", "pid", "mnt", "net", "uts", "ipc", "cgroup")
_STATUS_KEYS = ("Name", "NSpid", "Seccomp", "Seccomp_filters", "NoNewPrivs", "CapEff",
                "CapPrm", "CapInh", "CapBnd", "CapAmb", "Uid", "Gid")


def _ns_inode(pid: int | str, name: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{name}").st_ino
    except OSError:
        return None


def process_report(pid: int) -> dict | None:
    """What the kernel says confines one process; None if it is gone."""
    status_text = read_or_none(f"/proc/{pid}/status")
    if status_text is None:
        return None
    status = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_KEYS:
            status[key] = " ".join(value.split())
    namespaces = {}
    for name in NAMESPACES:
        inode, host = _ns_inode(pid, name), _ns_inode("self", name)
        namespaces[name] = {"inode": inode, "shared_with_host": inode == host}
    mounts = []
    for line in (read_or_none(f"/proc/{pid}/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        sep = fields.index("-")
        mounts.append({"target": fields[4], "options": fields[5], "fstype": fields[sep + 1],
                       "source": fields[sep + 2]})
    cmdline = (read_or_none(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
    uid_map, gid_map = read_or_none(f"/proc/{pid}/uid_map"), read_or_none(f"/proc/{pid}/gid_map")
    if uid_map is None or gid_map is None or not os.path.exists(f"/proc/{pid}/ns"):
        return None  # it ended while we read: half a report would be a false alarm
    return {
        "pid": pid,
        "ns_pid": int(status.get("NSpid", "0").split()[-1] or 0),
        "name": status.get("Name", ""),
        "cmdline": cmdline[:200],
        "uid_map": uid_map.split(),
        "gid_map": gid_map.split(),
        "seccomp_mode": int(status.get("Seccomp", "0")),
        "seccomp_filters": int(status.get("Seccomp_filters", "0")),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "cap_eff": status.get("CapEff", ""),
        "cap_prm": status.get("CapPrm", ""),
        "cap_bnd": status.get("CapBnd", ""),
        "cap_amb": status.get("CapAmb", ""),
        "namespaces": namespaces,
        "cgroups": [line.split(":", 2)[2]
                    for line in (read_or_none(f"/proc/{pid}/cgroup") or "").splitlines()
                    if line.count(":") >= 2],
        "mounts": mounts,
    }


def cgroup_limits(pid: int) -> dict:
    """Limits of the cgroups the process is in, read from the cgroup files themselves."""
    out: dict = {}
    for line in (read_or_none(f"/proc/{pid}/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for ctrl in controllers.split(",") if controllers else [""]:
            base = f"/sys/fs/cgroup/{ctrl}{path}" if ctrl else f"/sys/fs/cgroup{path}"
            files = {"memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
                     "pids": ("pids.max",), "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
                     "": ("memory.max", "memory.swap.max", "pids.max", "cpu.max")}.get(ctrl, ())
            for name in files:
                value = read_or_none(os.path.join(base, name))
                if value is not None:
                    out[name] = value.strip()
    return out


PROBE_ARGV = ["/bin/sh", "-c", "printf x > /proc/self/comm"]


def landlock_status(sandbox=None) -> dict:
    """The host's landlock ABI, and (with a sandbox) the probe's verdict for new commands."""
    from . import landlock

    abi = 0
    with contextlib.suppress(Exception):
        abi = landlock.prepare(extra_writable=()).abi
    out = {"host_abi": abi, "new_commands": "not probed",
           "running_processes": "not observable from outside (no /proc attribute)"}
    if sandbox is None:
        return out
    try:
        proc = sandbox.exec(PROBE_ARGV, stdin=None, timeout_s=10)
        _, err = proc.communicate()
    except Exception as exc:  # a full sandbox (pids, memory) cannot run the probe
        out["new_commands"] = f"probe failed: {exc}"
        return out
    if proc.returncode == 0:
        out["new_commands"] = "NOT restricted: a write only landlock forbids succeeded"
    elif b"Permission denied" in err:
        out["new_commands"] = "restricted (a write only landlock forbids got EACCES)"
    else:
        out["new_commands"] = f"probe inconclusive: {err.decode(errors='replace').strip()}"
    return out


def report(sandbox, spec: SandboxSpec, probe: bool = True) -> dict:
    """The live report of a native Sandbox: every process, its cgroup, its network.

    Args:
        probe: run the landlock probe command in the sandbox (see the module docstring).
    """
    pids = sorted(set(sandbox.pids()) | ({sandbox.init_pid} if sandbox.init_pid else set()))
    processes = [r for r in (process_report(p) for p in pids) if r is not None]
    rep = {
        "sandbox_id": sandbox.id,
        "init_pid": sandbox.init_pid,
        "processes": processes,
        "cgroup_limits": cgroup_limits(sandbox.init_pid) if sandbox.init_pid else {},
        "landlock": landlock_status(sandbox if probe else None),
        "network": {},
        # what the sandbox runs without (no delegated cgroup: rlimits only), and its ids
        "notes": list(getattr(sandbox, "notes", ())),
        "id_mapping": getattr(sandbox, "id_mapping", ""),
    }
    if hasattr(sandbox, "id_map_lines"):
        rep["expected_id_maps"] = sandbox.id_map_lines()
    if sandbox.init_pid:
        with contextlib.suppress(OSError):
            fd = os.open(f"/proc/{sandbox.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                from . import net

                rep["network"] = net.interfaces(fd)
            except Exception as exc:  # pyroute2 missing or netlink refused: say so
                rep["network"] = ({"error": str(exc)} if os.geteuid() == 0
                                  else _proc_net(sandbox.init_pid, str(exc)))
            finally:
                os.close(fd)
    return rep


def _proc_net(pid: int, why: str) -> dict:
    """Links and routes of pid's network namespace from /proc/PID/net (an unprivileged
    runtime cannot enter it: the namespace belongs to the sandbox's user namespace)."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            names = [line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:]]
        with open(f"/proc/{pid}/net/route") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
    except OSError as exc:
        return {"error": f"{why}; /proc/{pid}/net: {exc.strerror}"}
    routes = [{"dst": "default" if r[1] == "00000000" else r[1], "gateway": r[2], "dev": r[0]}
              for r in rows if len(r) > 2]
    return {"links": [{"name": n, "state": "", "kind": "", "addresses": []}
                      for n in sorted(names)],
            "routes": routes, "source": f"/proc/{pid}/net (unprivileged: names only)"}


def mismatches(rep: dict, spec: SandboxSpec) -> list[str]:
    """Every way the live state differs from what the spec promises."""
    out = []
    expected = rep.get("expected_id_maps") or {}
    want_uid = sum(expected.get("uid", []), []) or ["0", str(spec.uid_base), str(spec.uid_count)]
    want_gid = sum(expected.get("gid", []), []) or want_uid
    for p in rep["processes"]:
        who = f"pid {p['pid']} ({p['name']})"
        for name, ns in p["namespaces"].items():
            if ns["shared_with_host"]:
                out.append(f"{who}: {name} namespace is the host's")
        if p["uid_map"] != want_uid:
            out.append(f"{who}: uid_map {' '.join(p['uid_map'])!r} != {' '.join(want_uid)!r}")
        if p["gid_map"] != want_gid:
            out.append(f"{who}: gid_map {' '.join(p['gid_map'])!r} != {' '.join(want_gid)!r}")
        if spec.profile != "unconfined" and p["seccomp_mode"] != 2:
            out.append(f"{who}: seccomp mode {p['seccomp_mode']}, expected 2 (filter)")
        if not p["no_new_privs"]:
            out.append(f"{who}: no_new_privs is off")
        for key in ("cap_eff", "cap_prm", "cap_bnd", "cap_amb"):
            if p[key] and int(p[key], 16) != 0:
                out.append(f"{who}: {key} is {p[key]}, expected none")
        out += [f"{who}: {problem}" for problem in _mount_problems(p["mounts"], spec)]
    first = rep["processes"][0]["cgroups"] if rep["processes"] else []
    for p in rep["processes"][1:]:
        if p["cgroups"] != first:
            out.append(f"pid {p['pid']} ({p['name']}): in other cgroups than PID 1: "
                       f"{p['cgroups']}")
    ll = rep["landlock"]
    if ll["host_abi"] > 0 and ll["new_commands"].startswith("NOT"):
        out.append(f"landlock: new commands are {ll['new_commands']}")
    if NO_DELEGATION in rep.get("notes", ()):  # no cgroup (said in the report): rlimits only
        return out + _network_problems(rep, spec)
    limits = rep["cgroup_limits"]
    mem = limits.get("memory.limit_in_bytes") or limits.get("memory.max")
    if mem is None or mem == "max" or int(mem) != spec.memory_bytes:
        out.append(f"cgroup memory limit is {mem}, spec says {spec.memory_bytes}")
    pids = limits.get("pids.max")
    if pids is None or pids == "max" or int(pids) != spec.pids_max:
        out.append(f"cgroup pids.max is {pids}, spec says {spec.pids_max}")
    want_quota = None if spec.cpus is None else round(spec.cpus * 100000)
    if "cpu.max" in limits:
        quota_text, _, period_text = limits["cpu.max"].partition(" ")
        quota = None if quota_text == "max" else round(
            int(quota_text) * 100000 / int(period_text or 100000))
    elif "cpu.cfs_quota_us" in limits:
        q, period = int(limits["cpu.cfs_quota_us"]), int(limits.get("cpu.cfs_period_us", 100000))
        quota = None if q < 0 else round(q * 100000 / period)
    else:
        quota = "unreadable"
    if quota != want_quota:
        out.append(f"cgroup CPU quota is {quota} per 100000us, spec says {want_quota}")
    return out + _network_problems(rep, spec)


def _network_problems(rep: dict, spec: SandboxSpec) -> list[str]:
    out = []
    net_links = {link["name"]: link for link in rep["network"].get("links", [])}
    if "error" in rep["network"]:
        out.append(f"network: could not be read: {rep['network']['error']}")
    elif spec.allow_net and _rootless_egress(rep):
        # no link at all: the proxy's sockets sit on lo (sandbox/net.py attach_rootless)
        if set(net_links) - {"lo"}:
            out.append(f"network: unexpected links {sorted(set(net_links) - {'lo'})}")
        if [r for r in rep["network"].get("routes", []) if r["dst"] == "default"]:
            out.append("network: a rootless sandbox has a default route (it must have none)")
    elif spec.allow_net:
        eth = net_links.get("eth0")
        if eth is None or "100.127.255.2/30" not in eth["addresses"]:
            out.append("network: allow_net is set but the egress link eth0 is missing")
        routes = rep["network"].get("routes", [])
        if [r for r in routes if r["dst"] == "default"] != [
                {"dst": "default", "gateway": "100.127.255.1", "dev": "eth0"}]:
            out.append("network: the default route does not lead to the egress proxy")
        if set(net_links) - {"lo", "eth0"}:
            out.append(f"network: unexpected links {sorted(set(net_links) - {'lo', 'eth0'})}")
    elif set(net_links) - {"lo"}:
        out.append(f"network: spec allows no egress, but links {sorted(set(net_links))} exist")
    return out


def _rootless_egress(rep: dict) -> bool:
    """Whether the sandbox's egress is the rootless kind (its start noted so)."""
    from .net import ROOTLESS_NOTE

    return ROOTLESS_NOTE in rep.get("notes", ())


#: Mount points that may be writable in every sandbox.
_WRITABLE_TARGETS = {"/workspace", "/tmp", "/dev/shm", "/dev/pts", "/proc"}
#: Parts of /proc that must be read-only mounts of their own (the parent /proc is rw).
_READONLY_PROC = ("/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/sysvipc")


def _mount_problems(mounts: list[dict], spec: SandboxSpec) -> list[str]:
    """The mount table against the policy: root read-only, the read-only parts of /proc
    in place, nothing else writable that the spec did not grant. Writable device nodes
    (/dev/null and friends, and the /dev/null masks over /proc files) are devtmpfs binds."""
    problems = []
    top = {}
    for m in mounts:  # a later mount on the same point hides the earlier one
        top[m["target"]] = m
    if "/" not in top:
        problems.append("no root mount visible")
    elif "ro" not in top["/"]["options"].split(","):
        problems.append("the root filesystem is writable")
    for path in _READONLY_PROC:
        m = top.get(path)
        if m is None or "ro" not in m["options"].split(","):
            problems.append(f"{path} is not a read-only mount")
    granted = _WRITABLE_TARGETS | {b.target for b in spec.binds if b.writable}
    for target, m in top.items():
        if "rw" not in m["options"].split(",") or target in granted or target == "/":
            continue
        if target.startswith(("/dev/", "/proc/")) and m["fstype"] == "devtmpfs":
            continue
        if any(target.startswith(g + "/") for g in granted - {"/proc"}):
            continue
        problems.append(f"{target} is mounted writable ({m['fstype']} {m['source']})")
    return problems


def format_table(rep: dict, problems: list[str], policy_digest: str = "") -> str:
    """The report as a human-readable table."""
    lines = [f"sandbox {rep['sandbox_id']}  init pid {rep['init_pid']}"
             + (f"  policy {policy_digest[:16]}" if policy_digest else "")]
    lines.append(f"{'PID':>7} {'NSPID':>5} {'NAME':14} {'SECCOMP':>7} {'FILTERS':>7} "
                 f"{'NNP':>3} {'CAPEFF':16} {'CAPBND':16} {'HOST NS':8} MOUNTS")
    for p in rep["processes"]:
        host_ns = ",".join(n for n, ns in p["namespaces"].items() if ns["shared_with_host"])
        lines.append(f"{p['pid']:>7} {p['ns_pid']:>5} {p['name'][:14]:14} {p['seccomp_mode']:>7} "
                     f"{p['seccomp_filters']:>7} {'yes' if p['no_new_privs'] else 'NO':>3} "
                     f"{p['cap_eff']:16} {p['cap_bnd']:16} {host_ns or 'none':8} "
                     f"{len(p['mounts'])}")
    if rep["processes"]:
        p = rep["processes"][0]
        lines.append(f"uid_map: {' '.join(p['uid_map'])}   gid_map: {' '.join(p['gid_map'])}")
    limits = sorted(rep["cgroup_limits"].items())
    if NO_DELEGATION in rep.get("notes", ()):
        lines.append("cgroup: none of its own (its processes are in the caller's)")
    else:
        lines.append("cgroup: " + (", ".join(f"{k}={v}" for k, v in limits) or "none"))
    lines += [f"note: {note}" for note in rep.get("notes", ())]
    if rep.get("id_mapping"):
        lines.append(f"ids: {rep['id_mapping']}")
    ll = rep["landlock"]
    lines.append(f"landlock: host ABI {ll['host_abi']}; new commands: {ll['new_commands']}; "
                 f"running processes: {ll['running_processes']}")
    netinfo = rep["network"]
    for link in netinfo.get("links", []):
        lines.append(f"link {link['name']:10} {link['state']:8} {' '.join(link['addresses'])}")
    for r in netinfo.get("routes", []):
        lines.append(f"route {r['dst']:18} via {r['gateway'] or '-':15} dev {r['dev']}")
    if problems:
        lines.append("")
        lines.append(f"!!! {len(problems)} MISMATCH(ES) WITH THE SPEC !!!")
        lines += [f"!!! {m}" for m in problems]
    else:
        lines.append("matches the spec")
    return "\n".join(lines)
