"""A process with a strict umask (077, as some services run) still makes working sandboxes:
the directories Corral makes for a sandbox get their modes after mkdir, not from it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_umask_of_077_still_makes_a_working_sandbox():
    code = textwrap.dedent("""
        import os
        os.umask(0o077)
        from corral.sandbox import PIPE, Sandbox, SandboxSpec
        with Sandbox.create(SandboxSpec()) as sb:
            mode = os.stat(sb.runtime_dir).st_mode & 0o777
            proc = sb.exec(["/bin/sh", "-c", "echo hi > /tmp/x && cat /tmp/x"], stdout=PIPE)
            out = proc.stdout.read()
            print(oct(mode), proc.wait(), out.decode().strip())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0o711", "0", "hi"]
