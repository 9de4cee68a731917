"""`corral probe`: run the conformance probe suite against a backend and report, probe by
probe, what was contained and what ESCAPED.

Exit status: 0 when every probe was contained, 1 when any ESCAPED, 3 when a probe could not
be run (and none escaped), 125 when the backend cannot make a sandbox at all, 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import sys

from .exits import EXIT_SETUP_FAILED, EXIT_USAGE
from .flags import add_docker_host, add_profile

EXIT_ESCAPED = 1
EXIT_PROBE_ERRORS = 3

EPILOG = """\
Each probe is a small program run inside a sandbox of the backend (a fresh one where it
needs limits of its own, or a host-side procedure around one) that tries one thing a hostile
agent would try, and reports what the kernel answered: capabilities and the
seccomp mode, kernel attack surface (io_uring, userfaultfd, keyctl, bpf, perf, kexec,
modules, open_by_handle_at, the new mount API, AF_VSOCK/AF_ALG/netlink), privilege (user
namespaces, setuid binaries, ptrace, /proc/self/exe), the filesystem (host paths, /proc/sys,
/sys, kcore, kallsyms, core_pattern, device nodes, symlinks, the workspace file API),
resources (fork bomb, memory, disk, descriptors, stdout flood, survivors, timeouts), the
network (host loopback, engine and daemon sockets, metadata address, raw sockets, DNS) and
the terminal (TIOCSTI). Probes are harmless if they escape.

exit status: 0 all contained, 1 something ESCAPED, 3 a probe could not run, 125 the
backend cannot create a sandbox, 2 usage error.
"""


def add_parsers(sub) -> None:
    """Register `corral probe` on the CLI's subparsers."""
    p = sub.add_parser(
        "probe", help="audit a backend: run hostile probes inside its sandboxes",
        description="Run the conformance probe suite inside sandboxes of a backend and judge "
                    "every probe 'contained' or 'ESCAPED' on the evidence the kernel gave "
                    "(errno, signal, what was read).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("native", "docker"), default="native",
                   help="backend to audit (default: %(default)s)")
    add_profile(p, "seccomp profile of the probed sandboxes")
    add_docker_host(p)
    p.add_argument("--only", action="append", default=[], metavar="PROBE",
                   help="run only this probe (repeatable)")
    p.add_argument("--category", action="append", default=[], metavar="CATEGORY",
                   help="run only this category: identity, kernel, privilege, filesystem, "
                        "resources, network, terminal (repeatable)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON document: backend, profile, summary, probes "
                          "(name, category, attempt, verdict, outcome, evidence)")
    out.add_argument("--markdown", action="store_true", help="a Markdown report")
    out.add_argument("--list", action="store_true", help="list the probes and exit")
    p.set_defaults(handler=probe_verb)


def probe_verb(args: argparse.Namespace) -> int:
    from corral.sandbox.errors import CorralError, InvalidSpec
    from corral.sandbox.probes import suite

    try:
        probes = suite.select(args.only, args.category)
    except ValueError as exc:
        print(f"corral: probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        for p in probes:
            print(f"{p.name:<22} {p.category:<11} {p.attempt}")
        return 0
    if args.backend == "native":
        from corral.sandbox import cgroups

        try:
            if cgroups.delegation_problem(cgroups.detect()) is not None:
                print(f"corral: {cgroups.NO_DELEGATION}", file=sys.stderr, flush=True)
        except CorralError:
            pass  # the first sandbox's start names what is wrong
    try:
        results = suite.run_suite(args.backend, profile=args.profile,
                                  docker_host=args.docker_host, probes=probes)
    except InvalidSpec as exc:
        print(f"corral: probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CorralError as exc:
        print(f"corral: probe: cannot create a {args.backend} sandbox: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    if args.json:
        sys.stdout.write(suite.to_json(results, backend=args.backend, profile=args.profile)
                         + "\n")
    elif args.markdown:
        sys.stdout.write(suite.render_markdown(results, backend=args.backend,
                                               profile=args.profile))
    else:
        sys.stdout.write(suite.render_table(results, backend=args.backend,
                                            profile=args.profile))
    counts = suite.summary(results)
    if counts[suite.ESCAPED]:
        return EXIT_ESCAPED
    if counts[suite.ERROR]:
        return EXIT_PROBE_ERRORS
    return 0
