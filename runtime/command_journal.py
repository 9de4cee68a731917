"""A kept sandbox's commands across a daemon restart (live restore): what each one is,
its output's replay windows on disk, and how a restarted daemon rebuilds its handle.

Each command of a kept sandbox has a directory `<sandbox runtime dir>/journal/<exec_id>/`
(tmpfs under /run/corral; removed with the sandbox's runtime directory at destroy):
`command.json` (argv, pids, modes, limits: written once, off the Exec's path, on live
restore's writer thread), `exit.json` once its exit was collected, and one
runtime/journal.py OutputJournal per output (`stdout/`, `stderr/`). The directory goes
when the daemon forgets the finished command (_retire_finished) or the sandbox goes.

After a restart, `rebuild` makes an ExecHandle for each: the hubs' logs come back from the
journals with their seqs, a running command's output pipes (from the holder) are attached
again and its exit comes from PID 1's report (native Sandbox.adopt_command); a command that
ended before the restart is restored finished, with its exit. stdin: the holder keeps the
write end of a command's stdin while the daemon has it open, so SendInput works after the
restart; bytes queued in the dead daemon but not yet written to the pipe are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

from corral.sandbox import ptys
from corral.sandbox.procinfo import live_start_time

from .journal import Loaded, OutputJournal, load_each, write_json

#: The directory of a sandbox's command journals, in its runtime directory.
JOURNAL_DIR = "journal"
COMMAND_FILE = "command.json"
EXIT_FILE = "exit.json"
OUTPUTS = ("stdout", "stderr")
#: The holder's key of a command's stdin write end: its command key plus this.
STDIN_SUFFIX = "/stdin"


@dataclass
class CommandRecord:
    """What a restarted daemon needs to know of a command beyond its descriptors."""

    exec_id: str
    argv: list[str]
    pid: int
    ns_pid: int
    start_time: int  # of pid (procinfo.live_start_time): a reused pid is not it
    started_wall: float
    deadline_wall: float  # 0: no wall-clock limit
    stdout_mode: str
    stderr_mode: str
    lossless: bool
    log_bytes: int
    hold_bytes: int  # 0 for a hub that is not lossless


class CommandJournal:
    """One command's directory (module docstring)."""

    def __init__(self, directory: str, log_bytes: int) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.outputs = {name: OutputJournal(os.path.join(directory, name), log_bytes)
                        for name in OUTPUTS}

    @classmethod
    def for_sandbox(cls, sandbox_runtime_dir: str, exec_id: str,
                    log_bytes: int) -> CommandJournal:
        return cls(os.path.join(sandbox_runtime_dir, JOURNAL_DIR, exec_id), log_bytes)

    def write_record(self, record: CommandRecord) -> None:
        write_json(os.path.join(self.directory, COMMAND_FILE), asdict(record))

    def write_exit(self, returncode: int, reason: str, duration_s: float) -> None:
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to keep
            write_json(os.path.join(self.directory, EXIT_FILE), {
                "returncode": returncode, "reason": reason, "duration_s": duration_s})

    def remove(self) -> None:
        for journal in self.outputs.values():
            journal.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LoadedCommand:
    """A command's directory as a restarted daemon found it."""

    record: CommandRecord
    journal: CommandJournal
    logs: dict[str, Loaded | None]
    exit: dict | None


def _load_command(directory: str) -> LoadedCommand:
    with open(os.path.join(directory, COMMAND_FILE)) as f:
        record = CommandRecord(**json.load(f))
    journal = CommandJournal(directory, record.log_bytes)
    logs = {out: journal.outputs[out].load() for out in OUTPUTS}
    exit_ = None
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(directory, EXIT_FILE)) as f:
            exit_ = json.load(f)
    return LoadedCommand(record, journal, logs, exit_)


def load_commands(sandbox_runtime_dir: str) -> tuple[list[LoadedCommand], list[str]]:
    """The commands whose journals a sandbox's runtime directory holds, oldest first, and
    the problems met (a directory that cannot be read back is removed and named)."""
    found, problems = load_each(os.path.join(sandbox_runtime_dir, JOURNAL_DIR),
                                _load_command, "{name}: {error}")
    found.sort(key=lambda c: c.record.started_wall)
    return found, problems


def adoptable_pid(record: CommandRecord) -> int:
    """record's host pid if that very process still runs, else 0."""
    if record.pid and live_start_time(record.pid) == record.start_time:
        return record.pid
    return 0


def remaining_timeout(record: CommandRecord) -> float | None:
    if not record.deadline_wall:
        return None
    return max(0.0, record.deadline_wall - time.time())


def output_window(stream_log_bytes: int, exec_replay_bytes: int,
                  lossless: bool) -> tuple[int, int]:
    """(log_bytes, hold_bytes) of a command output's hub: a lossless one holds the
    command back once a quarter of stream_log_bytes is unread and keeps exec_replay_bytes
    already sent on top; another keeps stream_log_bytes (hold 0)."""
    if not lossless:
        return stream_log_bytes, 0
    hold = stream_log_bytes // 4
    return hold + exec_replay_bytes, hold


def output_hub(mode: str, log_bytes: int, hold: int, journal: OutputJournal | None = None,
               first_seq: int = 1):
    """A StreamHub for one output of a command (hold 0: not lossless)."""
    from corral.ext import TokenStream

    from .streams import StreamHub

    stream = TokenStream(mode, log_bytes=log_bytes, first_seq=first_seq)
    if not hold:
        return StreamHub(stream, journal=journal)
    return StreamHub(stream, lossless=True, hold_bytes=hold, journal=journal)


def keep(live_restore, msb, handle, journal: CommandJournal, outputs: list[int],
         lossless: bool) -> None:
    """Hand a kept sandbox's new command to live restore: its output read ends and stdin's
    write end to the holder, its command.json to its journal directory (both on the
    restore writer thread). Closing stdin later lets the holder's copy go too, so that
    the command sees EOF."""
    stdout = handle.stdout.stream.statistics()
    hold = handle.stdout.hold_limit if lossless else 0
    process = handle.process
    record = CommandRecord(
        exec_id=handle.id, argv=list(handle.argv), pid=handle.pid,
        ns_pid=getattr(process, "ns_pid", 0), start_time=0, started_wall=time.time(),
        deadline_wall=(time.time() + process.remaining()) if process.deadline else 0.0,
        stdout_mode=stdout.mode, stderr_mode=handle.stderr.stream.statistics().mode,
        lossless=lossless, log_bytes=stdout.log_bytes_limit, hold_bytes=hold)
    stdin = handle.stdin
    stdin_fd = stdin.fd if stdin is not None and not stdin.closed else -1
    live_restore.keep_command(msb.id, handle.id, outputs, stdin_fd, journal, record)
    if stdin_fd >= 0:
        stdin.on_close = lambda: live_restore.forget_stdin(msb.id, handle.id)


def rebuild(manager, msb, held: dict[str, list[int]]) -> tuple[int, list[str]]:
    """Rebuild the ExecHandles of a sandbox adopted at start (module docstring); held:
    holder key -> descriptors, from which the keys used are taken. Returns how many were
    rebuilt and the problems met (each named)."""
    from corral.sandbox import Process

    from .restore import command_key

    loop = asyncio.get_running_loop()
    commands, problems = load_commands(msb.sandbox.runtime_dir)
    for command in commands:
        record = command.record
        key = command_key(msb.id, record.exec_id)
        outputs, stdin_fds = held.pop(key, []), held.pop(key + STDIN_SUFFIX, [])
        hubs = []
        for name, mode in zip(OUTPUTS, (record.stdout_mode, record.stderr_mode), strict=True):
            loaded = command.logs[name]
            hub = output_hub(mode, record.log_bytes, record.hold_bytes,
                             command.journal.outputs[name], loaded.first_seq if loaded else 1)
            if loaded:
                hub.restore_log(loaded.records)
            hubs.append(hub)
        if command.exit is not None or len(outputs) != 2:
            _close_all(outputs + stdin_fds)
            for hub in hubs:
                hub.close()  # its output ended before the restart (or was never held)
            outputs = stdin_fds = []
        if command.exit is not None:
            process = Process(msb.sandbox, 0, record.ns_pid, record.argv, None, None, None, None)
        else:
            process = msb.sandbox.adopt_command(
                adoptable_pid(record), record.ns_pid, record.argv, remaining_timeout(record),
                pty_fd=ptys.master_copy(outputs[0]) if outputs else -1)  # a tty: resize
        handle = _handle(manager, msb, command, process, hubs, outputs, stdin_fds, loop)
        msb.execs[record.exec_id] = handle
        if command.exit is None:
            manager._follow_exit(handle, loop)
    for key in [k for k in held if k.endswith(STDIN_SUFFIX)]:  # no journal: no writer
        _close_all(held.pop(key))
        sandbox_id, _, exec_id = key[:-len(STDIN_SUFFIX)].partition("/")
        manager.live_restore.forget_stdin(sandbox_id, exec_id)  # the command sees EOF
    return len(commands), problems


def _handle(manager, msb, command: LoadedCommand, process, hubs, outputs: list[int],
            stdin_fds: list[int], loop):
    from .sandboxes import ExecHandle, StdinWriter

    record = command.record
    for hub, fd in zip(hubs, outputs, strict=False):
        hub.attach_fd(fd, loop=loop)
    writer = None
    if stdin_fds:
        writer = StdinWriter(stdin_fds[0], loop)
        _close_all(stdin_fds[1:])
        writer.on_close = lambda: manager.live_restore.forget_stdin(msb.id, record.exec_id)
    age = max(0.0, time.time() - record.started_wall)
    handle = ExecHandle(record.exec_id, msb.id, tuple(record.argv), process, hubs[0], hubs[1],
                        writer, time.monotonic() - age, pid=record.pid,
                        journal=command.journal)
    if command.exit is not None:
        handle.returncode = command.exit["returncode"]
        handle.reason = command.exit["reason"]
        handle.duration_s = command.exit["duration_s"]
        handle.exited.set()
    return handle


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
