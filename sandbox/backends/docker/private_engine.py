"""A private dockerd for tests and benchmarks (not product code): its own data root,
socket and cgroup, started and stopped with everything it ran.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal as signal_mod
import socket
import subprocess
import tempfile
import time

from ...errors import Unavailable, UnsupportedHost
from ...procinfo import read_or_none
from .engine import API_VERSION, _clients, _clients_lock, _sdk
from .image import _image_lock, _images
from .sandbox import DockerSandbox
from .sweep import LABEL_FDS, LABEL_WORKSPACE, _creator, _creator_alive, _remove_workspace


class PrivateEngine:
    """A dockerd of our own: private socket, data root and containerd, no host networking
    (no bridge, no iptables rules, --ip-forward=false: dockerd would otherwise turn the
    host's net.ipv4.ip_forward on).

    For tests, benchmarks and probe runs on a machine that has dockerd installed but
    should not share (or does not run) a system engine. ``stop()`` ends it and removes
    everything it stored.
    """

    def __init__(self, base: str | None = None, storage_driver: str | None = None):
        #: The host's net.ipv4.ip_forward when the engine started (it must not change it).
        self.ip_forward_before: str | None = None
        #: Its containerd namespace and cgroup parent ("corral-dockerd-<hex>").
        self.name: str | None = None
        self.dir = tempfile.mkdtemp(prefix="corral.dockerd.", dir=base)
        self.socket = os.path.join(self.dir, "docker.sock")
        self.url = "unix://" + self.socket
        self.storage_driver = storage_driver
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 60.0) -> PrivateEngine:
        """Start dockerd and wait until it answers.

        Raises:
            UnsupportedHost: dockerd is not installed.
            Unavailable: it did not come up (its log's tail is in the message).
        """
        dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin")
        if dockerd is None:
            raise UnsupportedHost("dockerd is not installed (Debian: apt-get install docker.io)")
        PrivateEngine.sweep(os.path.dirname(self.dir))
        self.ip_forward_before = read_or_none("/proc/sys/net/ipv4/ip_forward", strip=True)
        # containerd namespaces and the cgroup parent: [A-Za-z0-9._-] only
        name = self.name = "corral-dockerd-" + os.urandom(4).hex()
        with open(os.path.join(self.dir, "owner"), "w") as f:
            f.write(f"{_creator()}\n{name}\n")
        argv = [dockerd, "--host", self.url, "--data-root", os.path.join(self.dir, "data"),
                "--exec-root", os.path.join(self.dir, "exec"),
                "--pidfile", os.path.join(self.dir, "dockerd.pid"),
                "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--ip-forward=false",
                "--bridge=none",
                "--containerd-namespace", name, "--containerd-plugins-namespace", name + "-p",
                "--cgroup-parent", "/" + name,
                "--log-level=warn", "--no-new-privileges"]
        for driver in ([self.storage_driver] if self.storage_driver else ["overlay2", "vfs"]):
            self._log = open(os.path.join(self.dir, "dockerd.log"), "ab")
            self.proc = subprocess.Popen([*argv, f"--storage-driver={driver}"],
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready(timeout_s):
                self.storage_driver = driver
                return self
            self._end_process()
        tail = self.log_tail()
        self.stop()
        raise Unavailable(f"private dockerd did not start: {tail}")

    @classmethod
    def sweep(cls, base: str | None = None) -> list[str]:
        """Stop and remove private engines whose owner process is gone (a test run that was
        killed before its stop()); returns their directories."""
        removed = []
        for path in glob.glob(os.path.join(base or tempfile.gettempdir(), "corral.dockerd.*")):
            try:
                with open(os.path.join(path, "owner")) as f:
                    owner, name = f.read().split()
            except (OSError, ValueError):
                continue  # starting right now, or not ours
            if _creator_alive(owner):
                continue
            stale = cls.__new__(cls)
            stale.dir, stale.name, stale.proc, stale._log = path, name, None, None
            stale.url = "unix://" + os.path.join(path, "docker.sock")
            stale._kill_everything()
            # Its containers' temporary directories, named in their labels on disk.
            for config in glob.glob(os.path.join(path, "data", "containers", "*",
                                                 "config.v2.json")):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    with open(config) as f:
                        labels = (json.load(f).get("Config") or {}).get("Labels") or {}
                    for label in (LABEL_WORKSPACE, LABEL_FDS):
                        _remove_workspace(labels.get(label))
            stale._unmount_all()
            stale._remove_cgroups()
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def _wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            if os.path.exists(self.socket):
                with contextlib.suppress(OSError):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(2)
                        s.connect(self.socket)
                        s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                        if b"OK" in s.recv(4096):
                            return True
            time.sleep(0.1)
        return False

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            with open(os.path.join(self.dir, "dockerd.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        return ""

    def _end_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal_mod.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal_mod.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Remove every container, stop dockerd (and its containerd), remove its data."""
        with _clients_lock:
            _clients.pop(self.url, None)
        with _image_lock:
            _images.pop(self.url, None)
        DockerSandbox._swept.discard(self.url)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                api = _sdk().APIClient(base_url=self.url, version=API_VERSION, timeout=30)
                for info in api.containers(all=True):
                    api.remove_container(info["Id"], force=True, v=True)
                    for label in (LABEL_WORKSPACE, LABEL_FDS):
                        _remove_workspace((info.get("Labels") or {}).get(label))
        self._end_process()
        self._unmount_all()
        self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_everything(self) -> None:
        """SIGKILL what an engine whose owner died left running: dockerd, containerd and
        the shims (their command lines name its containerd namespace), then every process
        in its containers' cgroups."""
        for _ in range(50):
            victims = set()
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                    if self.name.encode() in cmdline or self.dir.encode() in cmdline:
                        victims.add(int(pid))
            for procs in glob.glob(f"/sys/fs/cgroup/*/{self.name}/**/cgroup.procs",
                                   recursive=True):
                with contextlib.suppress(OSError, ValueError):
                    with open(procs) as f:
                        victims.update(int(x) for x in f.read().split())
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal_mod.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        """rmdir the (by now empty) cgroup parent its containers lived under."""
        if not self.name:
            return
        for parent in sorted(glob.glob(f"/sys/fs/cgroup/*/{self.name}")
                             + glob.glob(f"/sys/fs/cgroup/{self.name}"), reverse=True):
            for dirpath, _dirs, _files in sorted(os.walk(parent), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _unmount_all(self) -> None:
        """Detach mounts the engine left under its directories (overlay, shm, netns)."""
        with contextlib.suppress(OSError):
            with open("/proc/self/mountinfo") as f:
                targets = [line.split()[4] for line in f]
            for target in sorted((t for t in targets if t.startswith(self.dir + "/")),
                                 key=len, reverse=True):
                subprocess.run(["umount", "-l", target], capture_output=True)

    def __enter__(self) -> PrivateEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
