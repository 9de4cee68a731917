"""Generated protobuf and gRPC modules of the corral.v1 API (built by `make proto`)."""
