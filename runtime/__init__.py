"""corral.runtime: the daemon, its gRPC servicers, sessions, scheduler, audit log and CLI."""

__version__ = "0.1.0"
