"""User and network namespaces made ahead (sandbox/namespace_pool.py): a privileged start
joins a ready pair instead of creating them. Each pair is one sandbox's and is never seen by
another; what a sandbox sees of it is what a new pair shows; the pool gives back every range
and descriptor it holds; a start that fails with a pair loses nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct

import pytest

from corral.ext import _spawn
from corral.sandbox import BindMount, Sandbox, SandboxSpec, ids, namespace_pool
from corral.sandbox.errors import CorralError
from corral.sandbox.undertaker import undertaker

#: ioctl on a namespace descriptor: the uid that owns a user namespace (linux/nsfs.h).
NS_GET_OWNER_UID = 0xB704


def _owner_uid(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4))[0]
    finally:
        os.close(fd)


def _inode(pid: int, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def _pool_slots() -> set[str]:
    """Id slot files that this process's namespace pool took."""
    found = set()
    directory = ids.state_dir()
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                record = json.loads(f.readline())
        except (OSError, ValueError):
            continue
        if record.get("sandbox") == namespace_pool.POOL_OWNER and record.get("pid") == os.getpid():
            found.add(path)
    return found


def _open_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return {link for link in found if link.startswith(("user:[", "net:["))}


@pytest.fixture
def held_before():
    """Namespace descriptors this process held before the test (other suites' egress)."""
    return _open_fds()


@pytest.fixture
def pool(held_before):
    made = namespace_pool.enable(2)
    assert made is not None  # root here
    undertaker.flush()  # enable() starts the first refill
    try:
        yield made
    finally:
        namespace_pool.disable()
        # every pair's range given back and both descriptors closed
        assert not _pool_slots()
        assert _open_fds() == held_before


def test_each_sandbox_joins_a_pair_of_its_own_that_no_other_sandbox_sees(pool):
    assert pool.ready() == 2
    host_net = os.stat("/proc/self/ns/net").st_ino
    seen_net, seen_user, ranges = set(), set(), set()
    sandboxes = []
    try:
        for _ in range(5):  # more than the pool holds: refills between starts
            sb = Sandbox.create(SandboxSpec())
            sandboxes.append(sb)
            seen_net.add(_inode(sb.init_pid, "net"))
            seen_user.add(_inode(sb.init_pid, "user"))
            ranges.add(sb.spec.uid_base)
            undertaker.flush()
        assert pool.hits == 5  # each take's refill made one anew before the next start
        assert len(seen_net) == len(seen_user) == len(ranges) == 5
        assert host_net not in seen_net
        # a pair's user namespace is the sandbox's, mapping its own range
        for sb in sandboxes:
            with open(f"/proc/{sb.init_pid}/uid_map") as f:
                assert f.read().split() == ["0", str(sb.spec.uid_base), str(sb.spec.uid_count)]
    finally:
        for sb in sandboxes:
            sb.destroy()
    undertaker.flush()
    # the ranges of destroyed sandboxes are free again, not the pool's
    assert not any(os.path.exists(os.path.join(ids.state_dir(), str(base))) for base in ranges)


def test_a_pooled_pair_looks_to_the_sandbox_like_one_made_at_its_start(pool):
    """Owner uid, devices, loopback and the maps: the same with and without the pool."""
    script = ("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; "
              "cat /sys/class/net/lo/operstate 2>/dev/null || echo no-sysfs; "
              "cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups")
    seen = {}
    for pooled in (True, False):
        namespace_pool._slot._pool = pool if pooled else None
        try:
            sb = Sandbox.create(SandboxSpec())
        finally:
            namespace_pool._slot._pool = pool
        try:
            out = sb.exec(["/bin/sh", "-c", script]).communicate()[0].decode()
            owner = _owner_uid(f"/proc/{sb.init_pid}/ns/user")
            seen[pooled] = (out.replace(str(sb.spec.uid_base), "BASE"), owner == sb.spec.uid_base)
            # the network namespace is owned by the sandbox's user namespace
            net_fd = os.open(f"/proc/{sb.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                parent = fcntl.ioctl(net_fd, 0xB701)  # NS_GET_USERNS: a new descriptor
            finally:
                os.close(net_fd)
            try:
                assert os.fstat(parent).st_ino == _inode(sb.init_pid, "user")
            finally:
                os.close(parent)
        finally:
            sb.destroy()
    assert seen[True] == seen[False]
    lines = seen[True][0].split("\n")
    assert lines[0] == "lo" and seen[True][1]
    assert pool.hits == 1


@pytest.mark.parametrize("gone", ["workspace", "bind"])
def test_a_start_that_fails_with_a_pair_closes_it_and_gives_its_range_back(pool, tmp_path,
                                                                           gone, held_before):
    """The workspace gone before the start (it fails before PID 1's clone), or a bind's
    source gone (PID 1 fails its mount, with the pair handed to spawn_init)."""
    taken_before = set(os.listdir(ids.state_dir()))
    vanishing = tmp_path / "vanishing"
    vanishing.mkdir()
    spec = (SandboxSpec(workspace=str(vanishing)) if gone == "workspace" else
            SandboxSpec(binds=(BindMount(str(vanishing), "/mnt/data"),)))
    vanishing.rmdir()
    with pytest.raises(CorralError):
        Sandbox.create(spec)
    assert pool.hits == 1
    undertaker.flush()
    ready = pool.ready()
    assert ready == 2  # the take's refill made one anew
    # the failed start's range is free; the pool holds exactly its ready pair's range
    assert len(_pool_slots()) == ready
    assert set(os.listdir(ids.state_dir())) - taken_before <= {
        os.path.basename(path) for path in _pool_slots()}
    assert len(_open_fds() - held_before) == 2 * ready  # nothing of the failed one


def test_spawn_init_closes_a_pair_it_was_handed_even_when_pid1_fails():
    base = ids.allocate("test")
    try:
        id_map = f"0 {base.base} {base.count}\n".encode()
        user_fd, net_fd = _spawn.sandbox_namespaces(id_map, id_map, base.base)
        plan = _spawn.ChildPlan(argv=["corral-init"],
                                mount_ops=[("mount", "none", "/nonexistent/corral-x", "tmpfs",
                                            0, None, 0)])
        with pytest.raises(_spawn.SpawnError) as failed:
            _spawn.spawn_init(plan, b"", b"", namespaces=(user_fd, net_fd))
        assert failed.value.step_name == "mount"
        for fd in (user_fd, net_fd):
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        base.release()


def test_a_forked_child_closes_its_copies_of_the_ready_pairs(pool, held_before):
    assert len(_open_fds() - held_before) == 4
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, str(len(_open_fds() - held_before)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 16) == b"0"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(_open_fds() - held_before) == 4  # the parent's stay


def test_a_refill_that_cannot_map_a_range_stops_and_leaves_nothing(pool, monkeypatch):
    def refused(*args):
        raise OSError(1, "refused")

    monkeypatch.setattr(_spawn, "sandbox_namespaces", refused)
    taken = [pool.take(), pool.take()]  # the test's now, discarded below
    try:
        assert None not in taken
        undertaker.flush()  # the refill the first take woke, which fails at once
        assert pool.ready() == 0
        assert pool.take() is None and pool.misses == 1
        undertaker.flush()
        # the failed refills released every range they allocated
        assert _pool_slots() == {pair.ids.path for pair in taken}
    finally:
        for pair in taken:
            if pair is not None:
                namespace_pool._discard(pair)


def test_enable_needs_root_and_a_size():
    assert namespace_pool.enable(0) is None
    with pytest.raises(ValueError):
        namespace_pool.NamespacePool(namespace_pool.MAX_SIZE + 1)
    assert namespace_pool.current() is None


def test_a_sandbox_with_ids_of_its_own_takes_no_pair(pool):
    spare = ids.allocate("test")
    try:
        sb = Sandbox.create(SandboxSpec(uid_base=spare.base, uid_count=spare.count))
        try:
            assert sb.spec.uid_base == spare.base
        finally:
            sb.destroy()
    finally:
        spare.release()
    assert pool.hits == 0 and pool.ready() == 2
