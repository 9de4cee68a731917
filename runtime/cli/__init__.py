"""The `corral` command line: one module per verb group, assembled here.

Each verb module registers its verbs with `add_parsers(sub)` and names each verb's handler
(`set_defaults(handler=...)`); `main` parses and calls it. Verbs that talk to a daemon wrap
their handler in `connection.daemon_verb`, which turns a refused request into one line and
an exit status; `exits` holds the exit statuses every verb shares.

Start-up cost matters (`corral run -- /bin/true` is measured): building the parser imports
only argparse, the standard library and the terminal filter; a handler imports what its
verb uses (grpc, the client, the sandbox) when it runs.
"""

from __future__ import annotations

import argparse
import sys

from .exits import EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The whole `corral` parser; the verbs are listed in `corral --help` in this order."""
    from corral.runtime import doctor

    from . import (
        audit,
        cp,
        daemon,
        exec,
        governance,
        image,
        listing,
        mcp,
        probe,
        run,
        sandboxes,
        session,
        state,
        tasks,
    )

    parser = argparse.ArgumentParser(
        prog="corral",
        description="Corral: run untrusted agent code in Linux sandboxes.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add_parsers in (run.add_parsers, probe.add_parsers, doctor.add_parser,
                        daemon.add_parsers, listing.add_parsers, sandboxes.add_parsers,
                        cp.add_parsers, image.add_parsers, exec.add_parsers,
                        session.add_parsers, state.add_parsers, audit.add_parsers,
                        governance.add_parsers, tasks.add_parsers, mcp.add_parsers):
        add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `corral ARGV...` (default: sys.argv); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from corral.runtime import __version__

        print(f"corral {__version__}")
        return 0
    if args.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)
