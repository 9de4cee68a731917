"""How a verb reaches the daemon: the connection flags, `connect`, and `daemon_verb`, which
turns a failed request into one line on stderr and an exit status.

Only argparse at import time: grpc and the client are imported when a verb connects.
"""

from __future__ import annotations

import argparse
import functools

from .exits import EXIT_USAGE
from .flags import add_flag_for
from .output import fail


def add_daemon_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of a verb that talks to a daemon (sub.add_parser's arguments), with the
    connection flags first."""
    p = sub.add_parser(name, **kwargs)
    _add_client_flags(p)
    return p


def add_target_parser(sub, name: str, *, dest: str = "sandbox_id", metavar: str = "SANDBOX",
                      **kwargs) -> argparse.ArgumentParser:
    """The parser of a daemon verb about one sandbox or task: add_daemon_parser's, with the
    id it acts on as its first positional (`dest`, shown as `metavar`)."""
    p = add_daemon_parser(sub, name, **kwargs)
    p.add_argument(dest, metavar=metavar)
    return p


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """--socket, --target, --token, --tenant and the TLS files of a daemon verb."""
    p.add_argument("--socket", metavar="PATH",
                   help="daemon socket (default: $CORRAL_SOCKET, else the default path)")
    p.add_argument("--target", metavar="HOST:PORT", help="daemon over TCP instead")
    p.add_argument("--token", metavar="TOKEN", help="bearer token for --target "
                                                     "(default: $CORRAL_TOKEN)")
    p.add_argument("--tenant", metavar="NAME", help="act as this tenant (local socket only)")
    add_flag_for(p, "--target", "--tls-ca", metavar="PEM",
                 help="verify the daemon's TLS certificate against this CA")
    add_flag_for(p, "--target", "--tls-client-cert", metavar="PEM",
                 help="client certificate for a daemon that asks for mTLS")
    p.add_argument("--tls-client-key", metavar="PEM", help="its private key")


def connect(args: argparse.Namespace):
    """A Client of the daemon that the verb's connection flags name.

    Raises:
        ClientError: INVALID_ARGUMENT for an unreadable PEM file or a certificate without
            its key; what Client.connect raises otherwise.
    """
    from corral.runtime.client import Client

    cert, key = args.tls_client_cert, args.tls_client_key
    if bool(cert) != bool(key):
        raise usage_error("--tls-client-cert and --tls-client-key go together")
    return Client.connect(socket=args.socket, target=args.target, token=args.token,
                          tenant=args.tenant, root_certificates=_read_pem(args.tls_ca, "--tls-ca"),
                          client_cert=_read_pem(cert, "--tls-client-cert"),
                          client_key=_read_pem(key, "--tls-client-key"))


def usage_error(message: str):
    """A ClientError INVALID_ARGUMENT: the flags, not the daemon, are wrong (exit 2)."""
    import grpc

    from corral.runtime.client import ClientError

    return ClientError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise usage_error(f"{flag} {path}: {exc.strerror}") from None


def daemon_verb(handler):
    """Wrap a verb's handler: an invalid value is a usage error (2), so is a request the
    daemon calls INVALID_ARGUMENT; any other refusal exits 1. Each is one line on stderr,
    `corral: VERB: MESSAGE`, escaped (the daemon's messages may quote a tenant's text)."""

    @functools.wraps(handler)
    def run_verb(args: argparse.Namespace) -> int:
        from corral.runtime.client import ClientError
        from corral.sandbox.errors import InvalidSpec

        try:
            return handler(args)
        except InvalidSpec as exc:
            return fail(f"{args.verb}: {exc}", EXIT_USAGE)
        except ClientError as exc:
            return fail(f"{args.verb}: {exc}",
                        EXIT_USAGE if exc.code.name == "INVALID_ARGUMENT" else 1)

    return run_verb
