"""`make run`: start a daemon, run the streaming agent in a session, print its tokens live.

Steers the first turn halfway, asks for a second turn, closes the session, stops the
daemon. Everything lives under a temporary directory that is removed at the end.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from corral.runtime.client import Client, decode_batch

HERE = os.path.dirname(os.path.abspath(__file__))
CORRAL = os.path.join(os.path.dirname(sys.executable), "corral")


def main() -> int:
    return with_daemon(run_session)


def with_daemon(body, config: str = "") -> int:
    """Start a daemon in a temporary directory (with this TOML config, if any), run
    body(socket path) against it, stop it; the directory goes with it."""
    with tempfile.TemporaryDirectory(prefix="corral-demo-") as tmp:
        sock = os.path.join(tmp, "corral.sock")
        args = [CORRAL, "daemon", "--socket", sock, "--state", os.path.join(tmp, "state")]
        if config:
            with open(os.path.join(tmp, "corral.toml"), "w") as f:
                f.write(config)
            args += ["--config", os.path.join(tmp, "corral.toml")]
        with open(os.path.join(tmp, "daemon.log"), "w") as log:
            daemon = subprocess.Popen(args, stderr=log)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                if daemon.poll() is not None:
                    print(open(os.path.join(tmp, "daemon.log")).read(), file=sys.stderr)
                    return 1
                time.sleep(0.05)
            return body(sock)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)


def run_session(sock: str) -> int:
    with Client.connect(socket=sock) as client:
        sandbox = client.create_sandbox(memory_bytes=256 << 20)
        with open(os.path.join(HERE, "agents", "stream_agent.py"), "rb") as f:
            client.write_file(sandbox.id, "stream_agent.py", f.read())
        stream = client.open_session(
            ["python3", "stream_agent.py", "--tokens", "49", "--rate", "300"],
            sandbox_id=sandbox.id)
        tokens, started, steered = 0, time.monotonic(), False
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "opened":
                print(f"[session {event.opened.session_id} in {event.opened.sandbox_id}]")
            elif kind == "batch":
                batch = decode_batch(event.batch)
                tokens += len(batch.texts)
                sys.stdout.write("".join(batch.texts))
                sys.stdout.flush()
                if tokens >= 20 and not steered:
                    steered = True
                    stream.send_input("mention the audit log")
            elif kind == "turn_ended":
                print(f"\n[turn {event.turn_ended.turn}: {event.turn_ended.status}]")
                if event.turn_ended.turn == 1:
                    stream.send_input("once more, please")
                else:
                    stream.close_session()
            elif kind == "exited":
                elapsed = time.monotonic() - started
                print(f"[agent exited: {event.exited.reason}] {tokens} tokens in "
                      f"{elapsed:.2f}s = {tokens / elapsed:,.0f} tokens/s")
        client.destroy_sandbox(sandbox.id)
        verify = client.audit_verify()
        print(f"[audit chain: {'OK' if verify.ok else 'BROKEN'}, {verify.checked} records]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
