"""The gRPC edge of a task: who may call, how much, what each call does, and the server.

Each task gets its own server (:mod:`~executor.rpc.server`) on its own Unix
socket. An interceptor (:mod:`~executor.rpc.auth`) checks the task's token on
every call against an explicit method map that fails closed and charges the call
to the task's budget (:mod:`~executor.rpc.limits`); the servicer
(:mod:`~executor.rpc.servicer`) only converts protobuf to plain values and calls
:class:`~executor.rpc.session.TaskSession`.
"""

from __future__ import annotations

# The one service the sandbox may call (as the generated code names it).
SERVICE_NAME = "executor.v1.Sandbox"
