"""Generated protobuf and gRPC code for the ``executor.v1`` API (see proto/)."""
