"""The descriptor budget: an idle sandbox costs the daemon 2 descriptors, and at the limit
Create is refused with RESOURCE_EXHAUSTED (never the kernel's EMFILE as INTERNAL) while
what runs keeps working."""

from __future__ import annotations

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, collect_exec, wait_until
from .test_leaks import quiet_fd_count

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NOFILE = 300


class LimitedDaemon(DaemonProcess):
    """A daemon whose hard RLIMIT_NOFILE is NOFILE (it cannot raise its soft limit past)."""

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *super().command()]


def test_descriptors_run_out_as_resource_exhausted(tmp_path):
    daemon = LimitedDaemon(tmp_path, args=("--max-sandboxes", "10000",
                                           "--workspace-root", str(tmp_path / "ws")))
    daemon.start()
    try:
        client = daemon.client()
        first = client.create_sandbox()
        # counted at rest: each create's namespace pair is made anew just after it returns
        before = quiet_fd_count(daemon.pid)
        ids = [client.create_sandbox().id for _ in range(20)]
        assert (quiet_fd_count(daemon.pid) - before) / 20 == 2  # PID 1's pidfd, status pipe

        refused = None
        for _ in range(NOFILE):
            try:
                ids.append(client.create_sandbox().id)
            except ClientError as exc:
                refused = exc
                break
        assert refused is not None
        assert refused.code.name == "RESOURCE_EXHAUSTED"
        assert str(refused).startswith(
            "RESOURCE_EXHAUSTED: cannot start a new sandbox: the daemon has ")
        assert str(refused).endswith(
            f"of its {NOFILE} descriptors open (RLIMIT_NOFILE) and keeps {NOFILE // 4} for "
            "itself; end idle sandboxes or sessions, or raise the daemon's descriptor limit "
            "(LimitNOFILE=, prlimit)")
        assert len(ids) >= 80  # (300 - 75 kept - what the daemon holds) / 2
        # health says so too, and names the reason in the log
        assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "NOT_SERVING",
                          timeout_s=10)
        assert daemon.health("corral.v1.Audit") == "SERVING"
        assert f"of {NOFILE} descriptors open (RLIMIT_NOFILE), too few left beside the " \
               f"{NOFILE // 4} kept for the daemon for a new sandbox" in daemon.log()
        # what exists still works: an exec, a file, a destroy, then a create again
        res = collect_exec(client.exec(first.id, ["echo", "still"]))
        assert (res.returncode, res.stdout) == (0, b"still\n")
        client.write_file(first.id, "f.txt", b"x")
        for sandbox_id in ids[:10]:
            client.destroy_sandbox(sandbox_id)
        assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "SERVING",
                          timeout_s=10)
        client.create_sandbox()
        assert "Too many open files" not in daemon.log()
        assert daemon.stop() == 0
    finally:
        daemon.ensure_stopped()
