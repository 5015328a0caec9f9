"""Who may call a task's server: the token check and the method map that fails closed."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import grpc

from executor.rpc import SERVICE_NAME
from executor.rpc.limits import CallLimiter, RequestWatch, guarded, rate_limit_trailers
from executor.sandbox.contract import TOKEN_METADATA_KEY

if TYPE_CHECKING:
    from collections.abc import Callable

# Every RPC and who may call it. A method missing here is refused, so a new
# RPC stays closed until someone decides its policy (a unit test checks that
# this map covers the service exactly).
METHOD_POLICY: dict[str, str] = {
    f"/{SERVICE_NAME}/GetTask": "task-token",
    f"/{SERVICE_NAME}/Heartbeat": "task-token",
    f"/{SERVICE_NAME}/SendMessage": "task-token",
    f"/{SERVICE_NAME}/ReceiveMessage": "task-token",
    f"/{SERVICE_NAME}/OpenBulkSend": "task-token",
    f"/{SERVICE_NAME}/Mailbox": "task-token",
    f"/{SERVICE_NAME}/SendSecureShares": "task-token",
    f"/{SERVICE_NAME}/GetSecureShares": "task-token",
    f"/{SERVICE_NAME}/Report": "task-token",
    f"/{SERVICE_NAME}/Finish": "task-token",
}


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    code: grpc.StatusCode,
    message: str,
    trailers: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that only aborts, without waiting for (or parsing) any request.

    It takes a request stream whatever the method's shape, so grpc calls it at
    once instead of first waiting for a request message that may never come.
    """

    def deny(requests: Any, context: grpc.ServicerContext) -> Any:
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Admit a call only if its method is mapped, it carries this task's token, and limits allow.

    The call is charged to the task's bucket here, before grpc gives it a
    thread, so a refused call costs the parent as little as possible.
    """

    def __init__(
        self, token: str, limiter: CallLimiter | None = None, watch: RequestWatch | None = None
    ) -> None:
        self._token = token.encode()
        self._limiter = limiter or CallLimiter()
        self._watch = watch or RequestWatch()
        # Each method's handler and its guarded form, made on its first call:
        # grpc hands the same handler for a method every time, and the guard
        # holds no per-call state, so one serves every call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the real handler, or one that aborts the call."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if METHOD_POLICY.get(handler_call_details.method) != "task-token":
            return _abort_handler(handler, grpc.StatusCode.PERMISSION_DENIED, "method not allowed")
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        if not hmac.compare_digest(presented, self._token):
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid or missing token")
        refused = self._limiter.take()
        if refused is not None:
            return _abort_handler(
                handler, grpc.StatusCode.RESOURCE_EXHAUSTED, refused, rate_limit_trailers(refused)
            )
        method = handler_call_details.method
        made = self._guarded.get(method)
        if made is None or made[0] is not handler:
            made = (handler, guarded(handler, self._limiter, self._watch, method))
            self._guarded[method] = made
        return made[1]
