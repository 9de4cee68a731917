"""Which host mounts the base mount namespace keeps (mounts.base_namespace_detach), and
what masks /proc directories: pure, no root."""

from corral.sandbox import SandboxSpec
from corral.sandbox.mounts import PROC_MASKED_DIRS, base_namespace_detach, plan

NEEDED = ("/usr", "/etc/ssl", "/proc", "/dev", "/dev/null", "/run/corral/sandboxes",
          "/srv/corral/ext/agent.py")
TREES = ("/usr", "/etc/ssl")


def drops(points):
    return base_namespace_detach(points, NEEDED, TREES)


def test_root_and_the_mounts_holding_needed_paths_stay():
    assert drops(["/", "/proc", "/dev", "/usr", "/run", "/srv"]) == []


def test_workspaces_and_unneeded_host_mounts_go():
    assert drops(["/", "/run", "/run/corral/workspaces/sbx-a", "/sys", "/home"]) == [
        "/run/corral/workspaces/sbx-a", "/sys", "/home"]


def test_mounts_below_a_recursively_bound_tree_stay_and_below_others_go():
    assert drops(["/", "/usr", "/usr/local", "/etc/ssl/private", "/dev", "/dev/shm",
                  "/dev/pts", "/proc", "/proc/sys/fs/binfmt_misc"]) == [
        "/dev/shm", "/dev/pts", "/proc/sys/fs/binfmt_misc"]


def test_only_the_top_of_a_dropped_tree_is_listed():
    # the child comes first (a later mount over its parent): the parent replaces it
    assert drops(["/", "/sys/fs/cgroup/memory", "/sys", "/sys/fs/cgroup"]) == ["/sys"]


def test_a_name_that_only_starts_like_a_needed_path_is_not_kept():
    assert drops(["/", "/usrdata", "/devices", "/run/corral/sandboxes-old"]) == [
        "/usrdata", "/devices", "/run/corral/sandboxes-old"]


def test_a_mount_stacked_twice_on_one_point_is_listed_once():
    assert drops(["/", "/mnt/x", "/mnt/x"]) == ["/mnt/x"]


def test_masked_proc_directories_bind_the_empty_directory_beside_root():
    root = "/run/corral/sandboxes/sbx-a/root"
    ops = [op for op in plan(SandboxSpec(), root, "/ws") if op.kind == "mask_dir"]
    assert [(op.target, op.source) for op in ops] == [
        (root + path, "/run/corral/sandboxes/sbx-a/empty") for path in PROC_MASKED_DIRS]
    given = plan(SandboxSpec(), root, "/ws", empty_dir="/e")
    assert {op.source for op in given if op.kind == "mask_dir"} == {"/e"}
