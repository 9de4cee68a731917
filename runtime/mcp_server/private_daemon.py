"""The daemon `corral mcp` starts for itself when no daemon is named: a real `corral daemon`
child on a unix socket in a private 0700 directory, stopped with the server on every path.

Its output goes to a log file in its state directory, never to our stdout (over stdio that
is the MCP wire). It is told to die with us (PR_SET_PDEATHSIG) so that even a SIGKILL of
`corral mcp` does not leave it running (only its empty socket directory stays then).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_PR_SET_PDEATHSIG = 1
#: How long the daemon gets to come up, and to stop on SIGTERM before it is killed.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class PrivateDaemon:
    """One `corral daemon` child; `socket` is where it listens once `start` returns."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.socket = ""
        self.log_path = os.path.join(state_dir, "mcp-daemon.log")
        self._run_dir = ""
        self._proc: subprocess.Popen | None = None

    def start(self) -> PrivateDaemon:
        """Start the daemon and wait until its health check says SERVING.

        Raises:
            RuntimeError: it exited or did not come up in time (its log's tail in the
                message); the child and the private directory are gone by then.
        """
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"--state {self.state_dir}: {exc.strerror}") from None
        self._run_dir = tempfile.mkdtemp(prefix="corral-mcp-")  # mode 0700
        self.socket = os.path.join(self._run_dir, "corral.sock")
        cmd = [sys.executable, "-m", "corral.runtime.cli", "daemon",
               "--socket", self.socket, "--state", self.state_dir]
        try:
            with open(self.log_path, "ab") as log:
                # a session of its own: an MCP client that signals our process group
                # at shutdown reaches us, and we stop the daemon in order
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=_die_with_parent)
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the private daemon exited with {self._proc.returncode} "
                                   f"while starting:\n{self._log_tail()}")
            if os.path.exists(self.socket):
                with grpc.insecure_channel(f"unix:{self.socket}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    with contextlib.suppress(grpc.RpcError):
                        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
            time.sleep(0.05)
        raise RuntimeError(f"the private daemon was not serving after {START_TIMEOUT_S:g}s:"
                           f"\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if it lingers; remove the private directory. Returns
        the daemon's exit status (None when it never started). Safe to call twice; a
        SIGTERM meanwhile (the MCP client escalating) is ignored, as we are stopping."""
        rc = None
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if self._proc is not None:
                if self._proc.poll() is None:
                    self._proc.send_signal(signal.SIGTERM)
                try:
                    rc = self._proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    rc = self._proc.wait()
        finally:
            if self._run_dir:
                shutil.rmtree(self._run_dir, ignore_errors=True)
                self._run_dir = ""
            signal.signal(signal.SIGTERM, previous)
        return rc
