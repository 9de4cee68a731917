"""gRPC servicers: translate corral.v1 messages to domain calls and back, nothing else."""
