"""Bearer-token authentication for the daemon: a server interceptor checked on every KVStore RPC.

The client sends `authorization: Bearer <token>` metadata. A missing or wrong token ends the call with
UNAUTHENTICATED before any handler runs. The standard health service is exempt, so load-balancer and
Kubernetes probes (which carry no token) can see whether the daemon is up; it reveals nothing else.
The token is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import logging
import os

import grpc

from kvstore.config import ConfigError

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"


def token_from_env(env_name: str | None) -> str | None:
    """The token named by the config's `auth_token_env`; None when no token is configured."""
    if env_name is None:
        return None
    token = os.environ.get(env_name)
    if not token:
        raise ConfigError(f"auth_token_env: environment variable {env_name} is not set or empty")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (empty when there is none)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that ends the call with `code`."""

    def abort(_request, context: grpc.ServicerContext):
        context.abort(code, message)

    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    factory = factories[(handler.request_streaming, handler.response_streaming)]
    return factory(abort, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose bearer token is missing or wrong with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT_PREFIX):
            return handler
        presented = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY)
        if presented is None:
            return deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                "missing bearer token: send 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(str(presented).encode(), self._expected):
            log.warning("rejected %s: wrong bearer token", handler_call_details.method)
            return deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return handler
