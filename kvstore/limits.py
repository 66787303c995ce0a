"""Request validation at the daemon's edge: sizes, counts and names, checked before the store sees them.

Every violation is a `LimitError` whose message names the field and the limit; the servicer turns it
into INVALID_ARGUMENT. Values are never echoed back whole (a key is shown as a short hex prefix).

`request_bytes()` sizes each unary method's request from these limits: gRPC Python has one receive
limit for the whole server (`receive_bytes()`: a Put chunk, or the largest of these), so the daemon
compares a request's serialized size with its method's limit before parsing it (kvstore/server.py);
a Lookup of a million keys is turned away without building a million Python objects.

The daemon's admission at its edge lives here too: `CallLimitsInterceptor` (calls running at once,
unary request sizes, request bytes that do not parse) and `InflightBytes` (block bytes of Put
streams held in memory).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Gauge

from kvstore.config import StoreConfig, check_expires_at, check_ttl_s
from kvstore.rpc_handlers import behavior_of, rewrapped

# Namespaces become part of Redis keys and S3 object names: keep them to a safe, printable set.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._:-]+")
# Room in every request beyond its keys or slots: tags, the session handle, tier names, the TTL.
_ENVELOPE_BYTES = 4096
# Per repeated key: its tag and length prefix (at most 11 bytes together).
_KEY_FRAMING_BYTES = 11
# Per CommittedSlot beyond its key: the entry's own tag and length, slot, checksum and expiry fields.
_COMMIT_ENTRY_BYTES = 11 + 6 + 9 + 9
# Per slot of a packed uint32 list: one varint.
_SLOT_BYTES = 5
# A Put waiting for in-flight bytes notices its call was cancelled (client gone, daemon stopping) this fast.
_LIVE_CHECK_S = 0.1


class LimitError(ValueError):
    """A request breaks a limit or is malformed; the message says which field and why."""


@dataclass(frozen=True)
class Limits:
    """The daemon's per-request limits (from StoreConfig)."""

    max_message_bytes: int = 64 * 2**20
    max_keys_per_call: int = 4096
    max_key_bytes: int = 64
    max_namespace_len: int = 128

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> "Limits":
        return cls(
            max_message_bytes=cfg.max_message_bytes,
            max_keys_per_call=cfg.max_keys_per_call,
            max_key_bytes=cfg.max_key_bytes,
            max_namespace_len=cfg.max_namespace_len,
        )

    def request_bytes(self) -> dict[str, int]:
        """Unary method name -> the largest serialized request it needs: `max_keys_per_call` keys of
        `max_key_bytes` (or slots), a namespace of `max_namespace_len` characters, and headroom."""
        envelope = _ENVELOPE_BYTES + 4 * self.max_namespace_len   # UTF-8: up to 4 bytes a character
        keys = envelope + self.max_keys_per_call * (self.max_key_bytes + _KEY_FRAMING_BYTES)
        return {
            "Lookup": keys, "Get": keys, "Delete": keys, "AcquireSlots": keys,
            "CommitSlots": envelope + self.max_keys_per_call * (self.max_key_bytes + _COMMIT_ENTRY_BYTES),
            "ReleaseSlots": envelope + self.max_keys_per_call * _SLOT_BYTES,
            "AllocateSlots": envelope, "Clear": envelope, "Stats": envelope, "AttachSlab": envelope,
        }

    def receive_bytes(self, chunk_bytes: int) -> int:
        """The largest message the daemon receives: a Put stream's message (a BlockStart or data
        chunk of at most `chunk_bytes` of a block, and its framing) or the largest unary request.
        gRPC holds each call's message whole before its handler runs, outside the in-flight cap,
        so this bounds those bytes per call; one over it is refused by gRPC (RESOURCE_EXHAUSTED)."""
        put_message = min(chunk_bytes, self.max_message_bytes) + _ENVELOPE_BYTES + self.max_key_bytes
        return max(put_message, *self.request_bytes().values())

    def check_namespace(self, namespace: str) -> None:
        if not namespace:
            raise LimitError("namespace: must not be empty")
        if len(namespace) > self.max_namespace_len:
            raise LimitError(f"namespace: {len(namespace)} characters, the limit is {self.max_namespace_len}")
        if not _NAMESPACE_RE.fullmatch(namespace):   # fullmatch: $ would let "ns\n" through
            raise LimitError("namespace: only letters, digits and . _ : - are allowed")

    def check_key(self, key: bytes, index: int) -> None:
        if not key:
            raise LimitError(f"keys[{index}]: must not be empty")
        if len(key) > self.max_key_bytes:
            raise LimitError(f"keys[{index}]: {len(key)} bytes, the limit is {self.max_key_bytes}")

    def check_keys(self, keys: list[bytes]) -> None:
        if len(keys) > self.max_keys_per_call:
            raise LimitError(f"keys: {len(keys)} keys in one call, the limit is {self.max_keys_per_call}")
        for index, key in enumerate(keys):
            self.check_key(key, index)

    def check_block_count(self, count: int) -> None:
        if count > self.max_keys_per_call:
            raise LimitError(f"blocks: {count} blocks in one call, the limit (max_keys_per_call) is {self.max_keys_per_call}")

    def check_block_size(self, size: int, index: int) -> None:
        if size > self.max_message_bytes:
            raise LimitError(f"blocks[{index}]: {size} bytes, the limit (max_message_bytes) is {self.max_message_bytes}")

    def check_tiers(self, tiers: list[str], known: list[str]) -> None:
        for name in tiers:
            if name not in known:
                raise LimitError(f"tiers: unknown tier name; this store has {known}")

    @staticmethod
    def check_ttl(ttl_s: float | None) -> None:
        try:
            check_ttl_s(ttl_s)
        except ValueError as error:
            raise LimitError(str(error)) from None

    @staticmethod
    def check_expires_at(expires_at: float | None, index: int) -> None:
        try:
            check_expires_at(expires_at, time.time(), f"blocks[{index}].expires_at")
        except ValueError as error:
            raise LimitError(str(error)) from None


class InflightBytes:
    """The block bytes Put streams hold in the daemon (admitted, not yet handed to the store), kept
    at most `cap` and shown on `gauge`.

    A stream reserves a block's declared size before it receives the block's bytes and releases it
    once the block is stored or the stream ends. A reservation that does not fit waits for other
    streams to release theirs, up to a limit the caller gives (inflight_put_wait_s, and the call's
    deadline); then it is refused (the caller answers RESOURCE_EXHAUSTED). Waiters are not served in
    order: a large block may wait longer than small ones that arrive after it.
    """

    def __init__(self, cap: int, gauge: Gauge):
        self.cap = cap
        self._gauge = gauge
        self._held = 0
        self._freed = threading.Condition()

    @property
    def held(self) -> int:
        return self._held

    def reserve(self, size: int, wait_s: float = 0.0, live: Callable[[], bool] = lambda: True) -> bool:
        """Reserve `size` bytes, waiting up to `wait_s` while `live()` (the call was not cancelled)."""
        deadline = time.monotonic() + wait_s
        with self._freed:   # the gauge too: a release shown after the next reservation would pass the cap
            while self._held + size > self.cap:
                left = deadline - time.monotonic()
                if left <= 0 or not live():
                    return False
                self._freed.wait(min(left, _LIVE_CHECK_S))
            self._held += size
            self._gauge.inc(size)
        return True

    def release(self, size: int) -> None:
        if not size:
            return
        with self._freed:
            self._held -= size
            self._gauge.dec(size)
            self._freed.notify_all()


class _Unparsable:
    """Stands in for request bytes that are not the method's message."""


class _Oversized:
    """Stands in for a request too large for its method, which is left unparsed."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit


class CallLimitsInterceptor(grpc.ServerInterceptor):
    """Admits a KVStore call only while fewer than `max_calls` run (Put streams: half of them), and a
    unary request only up to its method's size (`Limits.request_bytes`), compared before parsing.

    Calls turned away get RESOURCE_EXHAUSTED (too many at once: retry later) or INVALID_ARGUMENT
    (request too large), at once; they never wait for a thread. The health service is not counted.
    """

    def __init__(self, limits: Limits, max_calls: int, service: str):
        self._service = service
        self._request_bytes = limits.request_bytes()
        self._max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls)
        self._puts = threading.BoundedSemaphore(max_calls // 2)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler is None or service != self._service:
            return handler
        if handler.request_streaming:
            deserializer = _lenient(handler.request_deserializer)
        else:
            deserializer = _size_checked(handler.request_deserializer, self._request_bytes[method])
        gates = [(self._calls, f"{self._max_calls} KVStore calls are running (max_concurrent_rpcs)")]
        if method == "Put":
            gates.append((self._puts, f"{self._max_calls // 2} Put streams are running (half of "
                                      f"max_concurrent_rpcs)"))
        behavior = behavior_of(handler)
        if handler.request_streaming:
            behavior = _stream_parsed(behavior, method)
        gated = _gated_stream if handler.response_streaming else _gated_unary
        return rewrapped(handler, gated(behavior, method, gates), deserializer)


def _lenient(deserializer):
    """`deserializer`, returning _Unparsable for bytes that are not the message: gRPC would answer
    INTERNAL ("Exception deserializing request!"), but they are the caller's bytes."""
    def parse(data: bytes):
        try:
            return deserializer(data)
        except DecodeError:
            return _Unparsable()

    return parse


def _size_checked(deserializer, limit: int):
    lenient = _lenient(deserializer)

    def parse(data: bytes):
        if len(data) > limit:
            return _Oversized(len(data), limit)
        return lenient(data)

    return parse


def _stream_parsed(behavior, method: str):
    """`behavior` of a request-streaming method, whose call is aborted (INVALID_ARGUMENT) at the
    first message of the stream that did not parse."""
    def parsed(requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        for request in requests:
            if isinstance(request, _Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                       f"request: a message of the stream is not a valid {method} request message")
            yield request

    return lambda requests, context: behavior(parsed(requests, context), context)


def _admit(request, context: grpc.ServicerContext, method: str, gates) -> list[threading.BoundedSemaphore]:
    """The semaphores taken for this call; aborts the call when it may not run."""
    if isinstance(request, _Unparsable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {method} request message")
    if isinstance(request, _Oversized):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
               f"request: {request.size} bytes, the limit for {method} is {request.limit} bytes (from max_keys_per_call, max_key_bytes and max_namespace_len)")
    held = []
    for gate, busy in gates:
        if not gate.acquire(blocking=False):
            for taken in held:
                taken.release()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{busy}; retry later")
        held.append(gate)
    return held


def _gated_unary(behavior, method: str, gates):
    def gated(request, context):
        held = _admit(request, context, method, gates)
        try:
            return behavior(request, context)
        finally:
            for gate in held:
                gate.release()

    return gated


def _gated_stream(behavior, method: str, gates):
    def gated(request, context):
        held = _admit(request, context, method, gates)
        try:
            yield from behavior(request, context)
        finally:
            for gate in held:
                gate.release()

    return gated
