"""Clients of the kvstore daemon: `KVStoreClient` (sync) and `AsyncKVStoreClient` (asyncio).

Both mirror `TieredStore`'s methods, names, arguments and return types, so the engine can use the
daemon or an embedded store interchangeably. One channel per client is reused by every call; each call
has a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff (every RPC is
idempotent, a Put included) for as long as `RetryPolicy.deadline_s` allows, which covers a daemon
restart: the channel reconnects within about a second (`channel_options`). Both clients share one
core, `_ClientCore`: it builds each RPC (`_Rpc`: request, response decoding), decides retries and
maps errors; the two classes differ only in how they call the stub (blocking, or awaited).

Blocks travel sealed (kvstore/checksum.py): `put` checksums each block once, bound to its namespace
and key, and the daemon verifies and stores that checksum; `get` verifies the stored checksum against
the namespace and key asked for, so a block that fails it (or was stored under another key) comes
back as a miss, never as bad bytes. `put_sealed` / `get_sealed` hand over
blocks with their checksums, for a caller that computes and checks them itself (the engine, on the GPU).

URLs: `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS; `root_certificates` trusts a private CA).

Engines on the daemon's host do not send block bytes through these clients: they map the daemon's
slab and lease its slots (kvstore/slab_client.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

from kvstore.auth import bearer_metadata
from kvstore.backoff import Backoff
from kvstore.checksum import SealedBlock
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.store import LookupResult, TierUsage
from kvstore.streaming import CHUNK_BYTES, BlockAssembler, framed_block

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_MAX_MESSAGE_BYTES = 256 << 20
# A restarted daemon must be reached again within about a second: gRPC's default reconnect backoff
# starts at 1 s and grows to 120 s (and the 5 s cap used before still kept calls failing for 7.2 s
# after a restart, while the client's retries gave up after 0.35 s). Each connect attempt gets at
# least MIN_CONNECT_MS (gRPC's min_reconnect_backoff is the connect timeout's floor), so a slow TLS
# handshake is not cut short.
RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1000
MIN_CONNECT_MS = 1000
# HTTP/2 pings find a daemon host that vanished without closing its connections (a dead TCP peer is
# otherwise seen only after minutes). Not more often than the daemon allows (MIN_CLIENT_PING_INTERVAL_MS).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


class KVStoreError(RuntimeError):
    """An RPC failed for good (after retries, or with a status that retrying cannot fix)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"kvstore {method} failed: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Target:
    """Where the daemon listens, parsed from a grpc:// or grpcs:// URL."""

    address: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url)
        if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or parts.port is None:
            raise ValueError(f"kvstore url: expected grpc://host:port or grpcs://host:port, got {url!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return cls(f"{host}:{parts.port}", parts.scheme == "grpcs")


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and
    jitter, up to `attempts` attempts in all, and no new attempt starts later than `deadline_s` after
    the first (None: attempts alone bound it). The default window (3 s) covers a daemon restart: the
    channel reconnects within RECONNECT_MAX_MS of the daemon listening again."""

    attempts: int = 20
    backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    deadline_s: float | None = 3.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry: attempts must be at least 1, got {self.attempts}")
        if self.deadline_s is not None and self.deadline_s < 0:
            raise ValueError(f"retry: deadline_s must be >= 0 or None, got {self.deadline_s}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.backoff_s, max(self.backoff_s, self.max_backoff_s), jitter=0.5)


def channel_options() -> list[tuple[str, int]]:
    """Options of every channel to the daemon: message sizes, reconnect backoff, keepalive."""
    return [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
            ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1)]


def open_channel(target: Target, root_certificates: bytes | None = None, *, aio: bool = False):
    """A channel to the daemon (TLS for grpcs://): sync, or asyncio with `aio`."""
    module = grpc.aio if aio else grpc
    if target.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return module.secure_channel(target.address, creds, options=channel_options())
    return module.insecure_channel(target.address, options=channel_options())


def _sealed(namespace: str, blocks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, SealedBlock]]:
    return [(key, SealedBlock.seal(payload, namespace, key)) for key, payload in blocks]


def _payloads(blocks: list[SealedBlock | None]) -> list[bytes | None]:
    return [block.payload if block is not None else None for block in blocks]


def _put_requests(namespace: str, blocks: list[tuple[bytes, SealedBlock]], tiers: list[str] | None,
                  ttl_s: float | None, chunk_bytes: int) -> Iterator[pb.PutRequest]:
    header = pb.PutHeader(namespace=namespace, tiers=tiers or [])
    if ttl_s is not None:
        header.ttl_s = ttl_s
    yield pb.PutRequest(header=header)
    for key, block in blocks:
        yield from framed_block(pb.PutRequest, key, block, chunk_bytes)


class _GetReader:
    """Turns the Get response stream back into blocks in key order; a block that fails its checksum
    under (namespace, its key) is a miss."""

    def __init__(self, namespace: str, keys: list[bytes]):
        self.namespace = namespace
        self.keys = keys
        self.results: list[SealedBlock | None] = [None] * len(keys)
        self._next = 0
        self._assembler = BlockAssembler(max_block_bytes=_MAX_MESSAGE_BYTES)

    def feed(self, message: pb.GetResponse) -> None:
        kind = message.WhichOneof("item")
        if kind == "miss":
            self._expect(message.miss.key)
            self._next += 1
        elif kind == "block":
            self._expect(message.block.key)
            self._complete(self._assembler.start(message.block))
        elif kind == "data":
            self._complete(self._assembler.data(message.data))

    def finish(self) -> list[SealedBlock | None]:
        self._assembler.finish()
        if self._next != len(self.keys):
            raise ValueError(f"Get stream ended after {self._next} of {len(self.keys)} keys")
        return self.results

    def _expect(self, key: bytes) -> None:
        if self._next >= len(self.keys) or key != self.keys[self._next]:
            raise ValueError(f"Get stream answered key #{self._next} out of order")

    def _complete(self, done: tuple[bytes, SealedBlock] | None) -> None:
        if done is None:
            return
        key, block = done
        if block.intact(self.namespace, key):
            self.results[self._next] = block
        else:
            log.warning("kvstore Get: block #%d failed its checksum in transit; treated as a miss", self._next)
        self._next += 1


def _usage(response: pb.StatsResponse) -> dict[str, dict[str, TierUsage]]:
    usage: dict[str, dict[str, TierUsage]] = {}
    for row in response.usage:
        usage.setdefault(row.namespace, {})[row.tier] = TierUsage(blocks=row.blocks, bytes=row.bytes)
    return usage


def _health(response: pb.StatsResponse) -> dict[str, bool]:
    return {row.tier: row.up for row in response.tiers}


@dataclass(frozen=True)
class _Rpc:
    """One call, whichever client makes it: the stub method, a fresh request (a message, or an
    iterator of them for Put) for each attempt, a reader of the response stream (Get), and what the
    response (or the reader's result) is turned into."""

    method: str
    request: Callable[[], Any]
    decode: Callable[[Any], Any]
    reader: Callable[[], _GetReader] | None = None


class _Attempts:
    """The retry policy applied to one call: each failure is either retried (after the delay this
    returns) or raised as a KVStoreError."""

    def __init__(self, method: str, policy: RetryPolicy):
        self.method = method
        self._policy = policy
        self._backoff = policy.backoff
        self._started = time.monotonic()
        self._failures = 0

    def retry_after(self, error: grpc.RpcError) -> float:
        """The delay before the next attempt; raises KVStoreError when this failure is final."""
        code = error.code()
        self._failures += 1
        delay = self._backoff.delay(self._failures)
        if (code not in _RETRYABLE or self._failures >= self._policy.attempts
                or not Backoff.fits(self._started, delay, self._policy.deadline_s)):
            raise KVStoreError(self.method, code, error.details() or "") from None
        log.debug("kvstore %s: %s, retrying in %.2f s", self.method, code.name, delay)
        return delay

    def malformed(self, error: ValueError) -> KVStoreError:
        """A response stream that broke the protocol: not retried."""
        return KVStoreError(self.method, grpc.StatusCode.INTERNAL, str(error))


class _ClientCore:
    """What the sync and the asyncio client share: the target and options of every call, the RPCs
    TieredStore's methods map to, and the retry policy."""

    def __init__(self, url: str, token: str | None, timeout_s: float, retry: RetryPolicy, chunk_bytes: int):
        self.target = Target.parse(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self._metadata = bearer_metadata(token)
        self._chunk_bytes = chunk_bytes

    def options(self) -> dict:
        return {"timeout": self.timeout_s, "metadata": self._metadata}

    def attempts(self, rpc: _Rpc) -> _Attempts:
        return _Attempts(rpc.method, self.retry)

    @staticmethod
    def lookup(namespace: str, keys: list[bytes]) -> _Rpc:
        request = pb.LookupRequest(namespace=namespace, keys=keys)
        return _Rpc("Lookup", lambda: request, lambda r: LookupResult(num_hits=r.num_hits, tiers=list(r.tiers)))

    def put_sealed(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], tiers: list[str] | None,
                   ttl_s: float | None) -> _Rpc:
        return _Rpc("Put", lambda: _put_requests(namespace, blocks, tiers, ttl_s, self._chunk_bytes),
                    lambda r: r.stored)

    @staticmethod
    def get_sealed(namespace: str, keys: list[bytes]) -> _Rpc:
        request = pb.GetRequest(namespace=namespace, keys=keys)
        return _Rpc("Get", lambda: request, lambda results: results, reader=lambda: _GetReader(namespace, keys))

    @staticmethod
    def delete(namespace: str, keys: list[bytes]) -> _Rpc:
        request = pb.KeysRequest(namespace=namespace, keys=keys)
        return _Rpc("Delete", lambda: request, lambda r: r.count)

    @staticmethod
    def clear(namespace: str) -> _Rpc:
        request = pb.ClearRequest(namespace=namespace)
        return _Rpc("Clear", lambda: request, lambda r: r.count)

    @staticmethod
    def stats(decode: Callable[[pb.StatsResponse], Any]) -> _Rpc:
        return _Rpc("Stats", pb.StatsRequest, decode)


class KVStoreClient:
    """Synchronous client of the kvstore daemon with TieredStore's interface. Thread-safe."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), root_certificates: bytes | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        self._core = _ClientCore(url, token, timeout_s, retry, chunk_bytes)
        self._channel = open_channel(self._core.target, root_certificates)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    @property
    def timeout_s(self) -> float:
        return self._core.timeout_s

    def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult:
        return self._call(self._core.lookup(namespace, keys))

    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
            ttl_s: float | None = None) -> int:
        """Checksum each block here (bound to namespace and key), then store it like `put_sealed`."""
        return self.put_sealed(namespace, _sealed(namespace, blocks), tiers=tiers, ttl_s=ttl_s)

    def put_sealed(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], *, tiers: list[str] | None = None,
                   ttl_s: float | None = None) -> int:
        """Store blocks the caller sealed (`TieredStore.put_sealed`'s contract): their checksums and
        expiries are sent as they are, and the daemon refuses the call (DATA_LOSS) at the first block
        that does not match its bytes, namespace and key."""
        return self._call(self._core.put_sealed(namespace, blocks, tiers, ttl_s))

    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        return _payloads(self.get_sealed(namespace, keys))

    def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        """Blocks in key order with their stored checksums and expiries, verified here; None = miss."""
        return self._call(self._core.get_sealed(namespace, keys))

    def delete(self, namespace: str, keys: list[bytes]) -> int:
        return self._call(self._core.delete(namespace, keys))

    def clear(self, namespace: str) -> int:
        return self._call(self._core.clear(namespace))

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        return self._call(self._core.stats(_usage))

    def health(self) -> dict[str, bool]:
        return self._call(self._core.stats(_health))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "KVStoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: _Rpc):
        attempts = self._core.attempts(rpc)
        while True:
            try:
                return self._attempt(rpc)
            except grpc.RpcError as error:
                delay = attempts.retry_after(error)
            except ValueError as error:
                raise attempts.malformed(error) from None
            time.sleep(delay)

    def _attempt(self, rpc: _Rpc):
        response = getattr(self._stub, rpc.method)(rpc.request(), **self._core.options())
        if rpc.reader is None:
            return rpc.decode(response)
        reader = rpc.reader()
        for message in response:
            reader.feed(message)
        return rpc.decode(reader.finish())


class AsyncKVStoreClient:
    """asyncio client of the kvstore daemon: TieredStore's methods as coroutines."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), root_certificates: bytes | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        self._core = _ClientCore(url, token, timeout_s, retry, chunk_bytes)
        self._channel = open_channel(self._core.target, root_certificates, aio=True)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    @property
    def timeout_s(self) -> float:
        return self._core.timeout_s

    async def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult:
        return await self._call(self._core.lookup(namespace, keys))

    async def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
                  ttl_s: float | None = None) -> int:
        return await self.put_sealed(namespace, _sealed(namespace, blocks), tiers=tiers, ttl_s=ttl_s)

    async def put_sealed(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], *,
                         tiers: list[str] | None = None, ttl_s: float | None = None) -> int:
        return await self._call(self._core.put_sealed(namespace, blocks, tiers, ttl_s))

    async def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        return _payloads(await self.get_sealed(namespace, keys))

    async def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        return await self._call(self._core.get_sealed(namespace, keys))

    async def delete(self, namespace: str, keys: list[bytes]) -> int:
        return await self._call(self._core.delete(namespace, keys))

    async def clear(self, namespace: str) -> int:
        return await self._call(self._core.clear(namespace))

    async def stats(self) -> dict[str, dict[str, TierUsage]]:
        return await self._call(self._core.stats(_usage))

    async def health(self) -> dict[str, bool]:
        return await self._call(self._core.stats(_health))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: _Rpc):
        attempts = self._core.attempts(rpc)
        while True:
            try:
                return await self._attempt(rpc)
            except grpc.RpcError as error:
                delay = attempts.retry_after(error)
            except ValueError as error:
                raise attempts.malformed(error) from None
            await asyncio.sleep(delay)

    async def _attempt(self, rpc: _Rpc):
        response = getattr(self._stub, rpc.method)(rpc.request(), **self._core.options())
        if rpc.reader is None:
            return rpc.decode(await response)
        reader = rpc.reader()
        async for message in response:
            reader.feed(message)
        return rpc.decode(reader.finish())
