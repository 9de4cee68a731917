"""`corral mcp`: serve Corral's tools to an MCP client (an agent such as Claude Code) over
stdio or streamable HTTP, against a named daemon or a private one started for the purpose.

Only argparse at import time; the `mcp` SDK, grpc and the client load when the verb runs.
"""

from __future__ import annotations

import argparse
import os
import signal

from .connection import add_daemon_parser, connect, daemon_verb, usage_error
from .flags import add_flag_for

#: The tenant the tools act as on a private daemon unless --tenant names another.
PRIVATE_TENANT = "mcp"
#: The private daemon's state directory, beneath the user's, unless --state names another.
PRIVATE_STATE = "mcp"

MCP_DESCRIPTION = """\
Serve Corral as MCP tools: sandbox_create, exec, file_read/write/list, session_start/read/
steer/interrupt, task_submit/status/result, sandbox_destroy and sandbox_list. Each tool call
is one or a few RPCs to a daemon, which checks and audits it. The daemon is the one the
connection flags or $CORRAL_SOCKET name; with none, `corral mcp` starts a private `corral
daemon` (its socket in a private 0700 directory, its state in --state) and stops it when it
exits; there the tools act as tenant "mcp" (bounded by the default policy) unless --tenant
names another."""

MCP_EPILOG = """\
Add it to an MCP client (Claude Code, Cursor and others read this JSON):
  {"mcpServers": {"corral": {"command": "corral", "args": ["mcp"]}}}
or with Claude Code: claude mcp add corral -- corral mcp
Over HTTP: corral mcp --transport http --listen 127.0.0.1:8765, then point the client at
http://127.0.0.1:8765/mcp. docs/mcp.md has every tool and the security model."""


def add_parsers(sub) -> None:
    p = add_daemon_parser(sub, "mcp", help="serve Corral's tools to MCP clients (agents)",
                          description=MCP_DESCRIPTION, epilog=MCP_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                   help="stdio (default: the client starts `corral mcp`) or http "
                        "(streamable HTTP at http://LISTEN/mcp)")
    add_flag_for(p, "--transport http", "--listen", metavar="HOST:PORT",
                 default="127.0.0.1:8765", help="where to listen (default: %(default)s; "
                                                "port 0: any free one, printed on stderr)")
    add_flag_for(p, "--transport http", "--public", action="store_true",
                 help="allow a --listen address that is not loopback; needs --http-token")
    add_flag_for(p, "--transport http", "--http-token", metavar="TOKEN",
                 help="clients must send 'Authorization: Bearer TOKEN' (default: "
                      "$CORRAL_MCP_TOKEN; none: no check, loopback only)")
    p.add_argument("--state", metavar="DIR",
                   help=f"state directory of the private daemon (default: <user state dir>/"
                        f"{PRIVATE_STATE}, e.g. /var/lib/corral/{PRIVATE_STATE} for root)")
    p.set_defaults(handler=mcp_verb)


def _listen_address(args) -> tuple[str, int]:
    """(host, port) of --listen, checked against --public and the token.

    Raises:
        ClientError: INVALID_ARGUMENT naming the flag at fault.
    """
    import ipaddress

    host, sep, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise usage_error(f"--listen {args.listen!r} is not HOST:PORT, e.g. 127.0.0.1:8765")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise usage_error(f"--listen {args.listen!r}: HOST must be an IP address or "
                          "localhost") from None
    if not loopback and not args.public:
        raise usage_error(f"--listen {host} is not loopback; add --public (with "
                          "--http-token) to serve other hosts")
    if args.public and not args.http_token:
        raise usage_error("--public needs --http-token (or $CORRAL_MCP_TOKEN)")
    return host, int(port)


def _names_a_daemon(args) -> bool:
    """Whether the flags or the environment name a daemon (else a private one is made)."""
    from corral.runtime.client import SOCKET_ENV

    return bool(args.socket or args.target or os.environ.get(SOCKET_ENV))


def _exit_on_sigterm(_signum, _frame) -> None:
    raise SystemExit(128 + signal.SIGTERM)


@daemon_verb
def mcp_verb(args) -> int:
    """Serve until the client goes (EOF on stdin), SIGTERM or SIGINT; every path stops the
    private daemon, if one was started."""
    args.http_token = args.http_token or os.environ.get("CORRAL_MCP_TOKEN") or None
    listen = _listen_address(args) if args.transport == "http" else None
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise usage_error("the mcp SDK is not installed: pip install 'corral[mcp]'") from None
    from corral.runtime.mcp_server.serve import serve

    # Until the server's own signal receiver takes over: a SIGTERM still runs the finally.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    private = None
    if not _names_a_daemon(args):
        from corral.runtime.locations import default_state
        from corral.runtime.mcp_server.private_daemon import PrivateDaemon

        state = args.state or os.path.join(default_state(), PRIVATE_STATE)
        try:
            private = PrivateDaemon(state).start()
        except RuntimeError as exc:
            import grpc

            from corral.runtime.client import ClientError

            raise ClientError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        args.socket = private.socket
        # not "local", the operator: an agent is bounded by the daemon's [policy]
        args.tenant = args.tenant or PRIVATE_TENANT
    try:
        with connect(args) as client:
            serve(client, listen, args.http_token)
    finally:
        if private is not None:
            private.stop()
    return 0
