"""Flags and arguments several verbs share: the command after `--`, the terminal flags of
run, exec and session, the sandbox flags of run and probe, the workspace, snapshot, file and
environment flags of the daemon verbs that make a sandbox (create, session, task submit),
and `add_flag_for`, the form of a flag that acts only with another."""

from __future__ import annotations

import argparse

TTY_HELP = ("give the command a terminal (a pty inside the sandbox, sized like yours); "
            "stdin must be a terminal")
INTERACTIVE_HELP = ("with -t: send your keys to the command, your terminal raw meanwhile; "
                    "without -t stdin is passed as it always is (run streams it, exec "
                    "sends a pipe or file whole)")
RAW_HELP = ("write the output to a terminal unchanged (default: only text, newlines, tabs "
            "and colours reach a terminal; pipes and files always get every byte)")


def add_command(p: argparse.ArgumentParser) -> None:
    """The trailing `-- CMD [ARGS...]`; `command_argv` reads it back."""
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def command_argv(args: argparse.Namespace) -> list[str]:
    """CMD [ARGS...] as given, without the `--` that may separate it from the flags."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    return argv


def add_flag_for(p, needs: str, *names: str, help: str, **kwargs) -> None:
    """A flag that acts only together with another (`needs`: "--attach", "--transport
    http"); its help opens with "with NEEDS: ", the one wording every such flag uses.
    `p` is a parser or an argument group; the rest is add_argument's."""
    p.add_argument(*names, help=f"with {needs}: {help}", **kwargs)


def add_from_flag(p, help: str) -> None:
    """--from SNAPSHOT (args.from_snapshot): the snapshot, by id or name, that what the verb
    makes starts from. `p` is a parser or an argument group."""
    p.add_argument("--from", dest="from_snapshot", metavar="SNAPSHOT", help=help)


def add_terminal_flags(p: argparse.ArgumentParser) -> None:
    """--raw, -i and -t of a verb that runs a command (run, exec)."""
    p.add_argument("--raw", action="store_true", help=RAW_HELP)
    p.add_argument("-i", "--interactive", action="store_true", help=INTERACTIVE_HELP)
    p.add_argument("-t", "--tty", action="store_true", help=TTY_HELP)


def add_label_flags(p: argparse.ArgumentParser, thing: str, lister: str,
                    request_id_help: str) -> None:
    """--label KEY=VALUE (to find `thing` by with `corral LISTER --selector`) and
    --request-id ID, the idempotency key of a verb that makes one."""
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a label to find the {thing} by (`corral {lister} --selector`); "
                        "repeatable")
    p.add_argument("--request-id", metavar="ID", default="", help=request_id_help)


def add_env_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--env KEY=VALUE (repeatable; parse_env reads them back)."""
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_put_flag(p: argparse.ArgumentParser, into: str) -> None:
    """--put FILE[:PATH] (repeatable): a local file copied to `into` (e.g. "the task's
    /workspace") before the command starts."""
    p.add_argument("--put", action="append", default=[], metavar="FILE[:PATH]",
                   help=f"copy a local file into {into} (repeatable)")


def add_host_workspace_flags(p: argparse.ArgumentParser, cow_help: str,
                             needs_cow: bool = False) -> None:
    """--workspace DIR, a directory on the daemon's host shown at /workspace, and --cow, its
    copy-on-write view (`cow_help` says what the verb does with the changes); `needs_cow`:
    the verb takes DIR only with --cow."""
    p.add_argument("--workspace", metavar="DIR",
                   help=("with --cow: " if needs_cow else "") +
                        "a directory on the daemon's host to show at /workspace (the "
                        "tenant's policy host_dirs must allow it)")
    p.add_argument("--cow", action="store_true", help=cow_help)


def add_profile(p: argparse.ArgumentParser, what: str) -> None:
    """--profile NAME|FILE, the seccomp profile of `what` (e.g. 'seccomp profile')."""
    p.add_argument("--profile", default="default", metavar="NAME|FILE",
                   help=f"{what}: 'default', 'unconfined' or a Docker-format JSON file "
                        "(default: %(default)s)")


def add_docker_host(p: argparse.ArgumentParser) -> None:
    """--docker-host URL, the engine of --backend docker."""
    p.add_argument("--docker-host", metavar="URL",
                   help="Docker engine for --backend docker (default: $DOCKER_HOST, else "
                        "unix:///var/run/docker.sock)")


def parse_labels(items) -> dict[str, str]:
    """--label KEY=VALUE flags (a bare KEY is an empty value); the daemon checks them."""
    from corral.sandbox.errors import InvalidSpec

    labels = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key:
            raise InvalidSpec("label", f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def parse_env(items) -> dict[str, str]:
    """--env KEY=VALUE flags as a dict; the '=' is required (KEY= sets an empty value)."""
    from corral.sandbox.errors import InvalidSpec

    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSpec("env", f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


def add_secret_flag(p: argparse.ArgumentParser, source: str) -> None:
    """--secret NAME@HOST[,HOST...] (repeatable; parse_secrets reads them back), its value
    taken from `source` (e.g. "your variable NAME", "the daemon's secret store")."""
    p.add_argument("--secret", action="append", default=[], metavar="NAME@HOST[,HOST...]",
                   help=f"give the command the secret NAME, its value taken from {source}: "
                        "inside, $NAME holds a placeholder, and the egress proxy puts the "
                        "value in its place only in requests to HOST (HOST or *.DOMAIN, over "
                        "HTTPS; it implies --allow-net HOST:443 and :80); repeatable (see "
                        "docs/policy.md, Secrets)")


def parse_secrets(items):
    """--secret flags as SecretBindings (validated with the spec).

    Raises:
        InvalidSpec: on field "secrets", naming the flag that is not NAME@HOST[,HOST...].
    """
    from corral.sandbox.spec import SecretBinding

    return tuple(SecretBinding.parse(item) for item in items)


def secret_values_from_env(bindings, environ=None) -> dict[str, str]:
    """The values of a local run's secrets: each from the caller's variable NAME.

    Raises:
        InvalidSpec: on field "secret", naming the first variable that is not set (the
            message never holds a value).
    """
    import os

    from corral.sandbox.errors import InvalidSpec

    env = os.environ if environ is None else environ
    values = {}
    for binding in bindings:
        value = env.get(binding.name)
        if not value:
            raise InvalidSpec("secret", f"{binding.name} is not set in your environment; "
                                        f"export {binding.name}=... (its value) first")
        values[binding.name] = value
    return values
