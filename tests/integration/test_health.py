"""Health tells the truth: NOT_SERVING for the mutating services while the state disk is
full (with the reason in the log and in the refusal), SERVING again once it has room."""

from __future__ import annotations

import pytest

from corral.runtime.client import ClientError

from .daemon_harness import DaemonProcess, wait_until
from .smallfs import fill, small_tmpfs

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

MUTATING = ("", "corral.v1.Sandboxes", "corral.v1.Sessions", "corral.v1.Tasks")


def test_health_follows_the_state_disk(tmp_path):
    with small_tmpfs(tmp_path / "state", "32M"):
        daemon = DaemonProcess(tmp_path, args=(
            "--disk-reserve", "2M", "--workspace-root", str(tmp_path / "ws")))
        daemon.start()
        try:
            client = daemon.client()
            assert [daemon.health(s) for s in MUTATING] == ["SERVING"] * 4
            assert (tmp_path / "state" / ".reserve").stat().st_size == 2 << 20

            filler = tmp_path / "state" / "filler"
            fill(filler)
            assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "NOT_SERVING",
                              timeout_s=10)
            assert [daemon.health(s) for s in MUTATING] == ["NOT_SERVING"] * 4
            assert daemon.health("corral.v1.Audit") == "SERVING"  # reading still works
            # the reserve was given up so the daemon's own records still fit
            assert not (tmp_path / "state" / ".reserve").exists()
            assert ("refusing new sandboxes, commands and tasks: filesystem of "
                    f"{tmp_path / 'state'} has") in daemon.log()
            with pytest.raises(ClientError) as refused:
                client.create_sandbox()
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"
            assert str(refused.value).startswith(
                f"RESOURCE_EXHAUSTED: cannot start a new sandbox: filesystem of "
                f"{tmp_path / 'state'} has ")
            assert str(refused.value).endswith("free space there")
            with pytest.raises(ClientError) as refused:
                client.submit_task(["true"])
            assert refused.value.code.name == "RESOURCE_EXHAUSTED"

            filler.unlink()
            assert wait_until(lambda: daemon.health("corral.v1.Sandboxes") == "SERVING",
                              timeout_s=10)
            assert [daemon.health(s) for s in MUTATING] == ["SERVING"] * 4
            assert "health: SERVING again" in daemon.log()
            assert (tmp_path / "state" / ".reserve").exists()  # taken back
            sb = client.create_sandbox()
            client.destroy_sandbox(sb.id)
            assert daemon.stop() == 0
        finally:
            daemon.ensure_stopped()
