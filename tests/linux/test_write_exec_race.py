"""A program uploaded through the workspace API runs at once, while other sandboxes start.

Without the write/clone exclusion (sandbox/workspace.py) a sandbox cloned while an upload's
write descriptor is open keeps a copy of it until its own exec, and executing the uploaded
file fails with ETXTBSY in the meantime: seen as 3 agents in 256 failing to start under load.
"""

from __future__ import annotations

import shutil
import threading

from corral.sandbox import Sandbox
from corral.sandbox.workspace import CLONING, WRITE_CLONE, WRITING, Workspace

from .conftest import probe_spec


def test_uploaded_binaries_execute_while_sandboxes_are_being_spawned():
    true_bin = open(shutil.which("true"), "rb").read()  # noqa: SIM115 - read at once
    stop = threading.Event()
    spawn_errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                with Sandbox.create(probe_spec()) as other:
                    other.exec(["/bin/true"]).wait()
        except BaseException as exc:  # noqa: BLE001 - reported below
            spawn_errors.append(exc)

    with Sandbox.create(probe_spec()) as sb:
        ws = Workspace(sb.workspace, sb.spec.uid_base, sb.spec.uid_base)
        threads = [threading.Thread(target=churn) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            codes = []
            for i in range(40):
                ws.write(f"agent-{i}", true_bin, mode=0o755)
                codes.append(sb.exec([f"/workspace/agent-{i}"]).wait())
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert spawn_errors == []
    assert codes == [0] * 40


def test_the_exclusion_lets_each_kind_share_and_keeps_the_kinds_apart():
    order: list[str] = []
    lock = threading.Lock()
    writer_in = threading.Event()
    release_writer = threading.Event()

    def writer() -> None:
        with WRITE_CLONE.hold(WRITING):
            with lock:
                order.append("write-in")
            writer_in.set()
            release_writer.wait(10)
            with lock:
                order.append("write-out")

    def cloner() -> None:
        with WRITE_CLONE.hold(CLONING):
            with lock:
                order.append("clone")

    w = threading.Thread(target=writer)
    w.start()
    assert writer_in.wait(10)
    with WRITE_CLONE.hold(WRITING):  # a second writer shares the turn at once
        pass
    c = threading.Thread(target=cloner)
    c.start()
    c.join(0.2)
    assert c.is_alive(), "a clone started while a write descriptor was open"
    release_writer.set()
    w.join(10)
    c.join(10)
    assert order == ["write-in", "write-out", "clone"]
