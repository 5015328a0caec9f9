"""The child runtime that runs inside the sandbox.

It imports only the standard library, grpc, protobuf and the generated code
(a unit test enforces this), so the sandbox image needs nothing else. It is
started as ``python3 -m executor.sandbox`` and talks to its parent over one
authenticated gRPC channel on a Unix socket.
"""
