"""Rebuilding a gRPC method handler around new behaviour: what the daemon's interceptors share."""

from __future__ import annotations

import grpc

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: grpc.RpcMethodHandler):
    """The function a handler runs, whatever its streaming kind."""
    if handler.response_streaming:
        return handler.unary_stream or handler.stream_stream
    return handler.unary_unary or handler.stream_unary


def rewrapped(handler: grpc.RpcMethodHandler, behavior, request_deserializer=None) -> grpc.RpcMethodHandler:
    """`handler` of the same streaming kind and serializers, running `behavior` (and parsing requests
    with `request_deserializer` when given)."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=request_deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)
