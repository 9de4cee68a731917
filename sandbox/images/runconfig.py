"""An image's config applied to a command as `docker run` does: Env, WorkingDir, User,
Entrypoint and Cmd. Pure functions (the User lookup reads the image's /etc through a
directory descriptor given by the caller)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import InvalidSpec

#: Config keys `corral run --image` does not honour; each present one gets a note.
UNSUPPORTED = ("Volumes", "ExposedPorts", "Healthcheck", "StopSignal", "OnBuild", "Shell",
               "StopTimeout")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]        # the image's Env, less what the spec sets itself
    cwd: str | None            # WorkingDir, or None for the default (/workspace)
    user: tuple[int, int] | None


def notes(config: dict) -> list[str]:
    """One line per config key present that is not honoured."""
    present = [key for key in UNSUPPORTED if config.get(key)]
    if not present:
        return []
    return [f"image config {', '.join(present)} not honoured by corral run (see "
            f"docs/images.md)"]


def command(config: dict, args: list[str]) -> list[str]:
    """Entrypoint + (args, else Cmd): args after -- replace Cmd, as docker does."""
    entry = list(config.get("Entrypoint") or [])
    argv = entry + (list(args) if args else list(config.get("Cmd") or []))
    if not argv:
        raise InvalidSpec("argv", "no command given and the image has no Entrypoint or Cmd")
    return argv


def environment(config: dict, spec_env: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The image's Env, without the variables the spec sets (the spec's win)."""
    ours = {key for key, _ in spec_env}
    env = {}
    for item in config.get("Env") or []:
        key, sep, value = item.partition("=")
        if sep and key not in ours:
            env[key] = value
    return env


def _read_etc(root_fd: int, name: str) -> list[list[str]]:
    """Lines of the image's /etc/NAME split on ':' ([] when absent). Each component is
    opened with O_NOFOLLOW from the sandbox's root: a symlink in the image is refused,
    never followed on the host."""
    try:
        etc = os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=root_fd)
    except FileNotFoundError:
        return []
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=etc)
    except FileNotFoundError:
        return []
    finally:
        os.close(etc)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidSpec("user", f"the image's /etc/{name} is not a regular file")
        data = f.read(4 << 20)
    return [line.split(":") for line in data.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]


def user(spec: str, root_fd: int, what: str = "the image's User") -> tuple[int, int] | None:
    """User "uid[:gid]" or "name[:group]" resolved in the image's /etc/passwd and
    /etc/group; None for root. A numeric uid alone takes its passwd entry's gid, else 0.
    `what` names the setting in errors (an Exec request's `user`)."""
    if not spec:
        return None
    name, _, group = spec.partition(":")
    passwd = None
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in _read_etc(root_fd, "passwd")
                      if len(e) > 3 and e[2] == name), None)
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    else:
        passwd = _read_etc(root_fd, "passwd")
        entry = next((e for e in passwd if len(e) > 3 and e[0] == name), None)
        if entry is None or not (entry[2].isdigit() and entry[3].isdigit()):
            raise InvalidSpec("user", f"{what} {spec!r}: no user {name!r} in its "
                                      f"/etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            entry = next((e for e in _read_etc(root_fd, "group")
                          if len(e) > 2 and e[0] == group and e[2].isdigit()), None)
            if entry is None:
                raise InvalidSpec("user", f"{what} {spec!r}: no group {group!r} "
                                          f"in its /etc/group")
            gid = int(entry[2])
    return uid, gid


def resolve(config: dict, args: list[str], spec_env: tuple[tuple[str, str], ...],
            root_fd: int) -> Command:
    """The command to run on an image: config (the image config's `config` object)."""
    return Command(argv=command(config, args), env=environment(config, spec_env),
                   cwd=config.get("WorkingDir") or None,
                   user=user(config.get("User") or "", root_fd))


def user_in(spec: str, pid: int, what: str = "the image's User") -> tuple[int, int] | None:
    """`user`, reading /etc through the root of process pid."""
    root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return user(spec, root_fd, what)
    finally:
        os.close(root_fd)


def resolve_in(config: dict, args: list[str], spec_env: tuple[tuple[str, str], ...],
               pid: int) -> Command:
    """`resolve`, reading the image's /etc through the root of process pid (a sandbox's
    PID 1, or a container's init on a local engine)."""
    root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return resolve(config, args, spec_env, root_fd)
    finally:
        os.close(root_fd)
