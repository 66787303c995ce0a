"""Clients of the kvstore daemon: `KVStoreClient` (sync) and `AsyncKVStoreClient` (asyncio).

Both mirror `TieredStore`'s methods, names, arguments and return types, so the engine can use the
daemon or an embedded store interchangeably. One channel per client is reused by every call; each call
has a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential backoff (every RPC is
idempotent, a Put included). Blocks travel sealed (kvstore/checksum.py): `put` checksums each block
once, bound to its namespace and key, and the daemon verifies and stores that checksum; `get` verifies
the stored checksum against the namespace and key asked for, so a block that fails it (or was stored
under another key) comes back as a miss, never as bad bytes. `put_sealed` / `get_sealed` hand over
blocks with their checksums, for a caller that computes and checks them itself (the engine, on the GPU).

URLs: `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS; `root_certificates` trusts a private CA).

Engines on the daemon's host do not send block bytes through these clients: they map the daemon's
slab and lease its slots (kvstore/slab_client.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc

from kvstore.auth import bearer_metadata
from kvstore.checksum import SealedBlock
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.store import LookupResult, TierUsage
from kvstore.streaming import CHUNK_BYTES, BlockAssembler, block_messages

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_MAX_MESSAGE_BYTES = 256 << 20


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
    """Attempts and exponential backoff (with jitter) for transient failures."""

    attempts: int = 4
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)


def _channel_options() -> list[tuple[str, int]]:
    # A restarted daemon is reached again within seconds: gRPC's default reconnect backoff grows to
    # 120 s, and every call fails at once (UNAVAILABLE) until the channel tries again.
    return [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5000)]


def open_channel(target: Target, root_certificates: bytes | None = None) -> grpc.Channel:
    """A sync channel to the daemon (TLS for grpcs://)."""
    options = _channel_options()
    if target.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(target.address, creds, options=options)
    return grpc.insecure_channel(target.address, options=options)


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
        for part in block_messages(key, block, chunk_bytes):
            yield pb.PutRequest(block=part) if isinstance(part, pb.BlockStart) else pb.PutRequest(data=part)


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


def _lookup_result(response: pb.LookupResponse) -> LookupResult:
    return LookupResult(num_hits=response.num_hits, tiers=list(response.tiers))


def _usage(response: pb.StatsResponse) -> dict[str, dict[str, TierUsage]]:
    usage: dict[str, dict[str, TierUsage]] = {}
    for row in response.usage:
        usage.setdefault(row.namespace, {})[row.tier] = TierUsage(blocks=row.blocks, bytes=row.bytes)
    return usage


def _health(response: pb.StatsResponse) -> dict[str, bool]:
    return {row.tier: row.up for row in response.tiers}


class KVStoreClient:
    """Synchronous client of the kvstore daemon with TieredStore's interface. Thread-safe."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), root_certificates: bytes | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        target = Target.parse(url)
        self.timeout_s = timeout_s
        self._retry = retry
        self._metadata = bearer_metadata(token)
        self._chunk_bytes = chunk_bytes
        self._channel = open_channel(target, root_certificates)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult:
        request = pb.LookupRequest(namespace=namespace, keys=keys)
        return _lookup_result(self._call("Lookup", lambda t: self._stub.Lookup(request, **self._opts(t))))

    def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
            ttl_s: float | None = None) -> int:
        """Checksum each block here (bound to namespace and key), then store it like `put_sealed`."""
        return self.put_sealed(namespace, _sealed(namespace, blocks), tiers=tiers, ttl_s=ttl_s)

    def put_sealed(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], *, tiers: list[str] | None = None,
                   ttl_s: float | None = None) -> int:
        """Store blocks the caller sealed (`TieredStore.put_sealed`'s contract): their checksums and
        expiries are sent as they are, and the daemon refuses the call (DATA_LOSS) at the first block
        that does not match its bytes, namespace and key."""

        def attempt(timeout: float) -> int:
            requests = _put_requests(namespace, blocks, tiers, ttl_s, self._chunk_bytes)
            return self._stub.Put(requests, **self._opts(timeout)).stored

        return self._call("Put", attempt)

    def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        return _payloads(self.get_sealed(namespace, keys))

    def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        """Blocks in key order with their stored checksums and expiries, verified here; None = miss."""
        request = pb.GetRequest(namespace=namespace, keys=keys)

        def attempt(timeout: float) -> list[SealedBlock | None]:
            reader = _GetReader(namespace, keys)
            for message in self._stub.Get(request, **self._opts(timeout)):
                reader.feed(message)
            return reader.finish()

        return self._call("Get", attempt)

    def delete(self, namespace: str, keys: list[bytes]) -> int:
        request = pb.KeysRequest(namespace=namespace, keys=keys)
        return self._call("Delete", lambda t: self._stub.Delete(request, **self._opts(t))).count

    def clear(self, namespace: str) -> int:
        request = pb.ClearRequest(namespace=namespace)
        return self._call("Clear", lambda t: self._stub.Clear(request, **self._opts(t))).count

    def stats(self) -> dict[str, dict[str, TierUsage]]:
        return _usage(self._call("Stats", lambda t: self._stub.Stats(pb.StatsRequest(), **self._opts(t))))

    def health(self) -> dict[str, bool]:
        return _health(self._call("Stats", lambda t: self._stub.Stats(pb.StatsRequest(), **self._opts(t))))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "KVStoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _opts(self, timeout: float) -> dict:
        return {"timeout": timeout, "metadata": self._metadata}

    def _call(self, method: str, attempt: Callable[[float], object]):
        for n in range(self._retry.attempts):
            try:
                return attempt(self.timeout_s)
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE or n + 1 == self._retry.attempts:
                    raise KVStoreError(method, error.code(), error.details() or "") from None
                log.debug("kvstore %s: %s, retrying", method, error.code().name)
            except ValueError as error:  # a malformed response stream
                raise KVStoreError(method, grpc.StatusCode.INTERNAL, str(error)) from None
            time.sleep(self._retry.delay(n))
        raise AssertionError("unreachable: the last attempt returns or raises")


class AsyncKVStoreClient:
    """asyncio client of the kvstore daemon: TieredStore's methods as coroutines."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), root_certificates: bytes | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        target = Target.parse(url)
        self.timeout_s = timeout_s
        self._retry = retry
        self._metadata = bearer_metadata(token)
        self._chunk_bytes = chunk_bytes
        if target.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(target.address, creds, options=_channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(target.address, options=_channel_options())
        self._stub = pb_grpc.KVStoreStub(self._channel)

    async def lookup(self, namespace: str, keys: list[bytes]) -> LookupResult:
        request = pb.LookupRequest(namespace=namespace, keys=keys)
        return _lookup_result(await self._call("Lookup", lambda t: self._stub.Lookup(request, **self._opts(t))))

    async def put(self, namespace: str, blocks: list[tuple[bytes, bytes]], *, tiers: list[str] | None = None,
                  ttl_s: float | None = None) -> int:
        return await self.put_sealed(namespace, _sealed(namespace, blocks), tiers=tiers, ttl_s=ttl_s)

    async def put_sealed(self, namespace: str, blocks: list[tuple[bytes, SealedBlock]], *,
                         tiers: list[str] | None = None, ttl_s: float | None = None) -> int:
        async def attempt(timeout: float) -> int:
            requests = _put_requests(namespace, blocks, tiers, ttl_s, self._chunk_bytes)
            return (await self._stub.Put(requests, **self._opts(timeout))).stored

        return await self._call("Put", attempt)

    async def get(self, namespace: str, keys: list[bytes]) -> list[bytes | None]:
        return _payloads(await self.get_sealed(namespace, keys))

    async def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        request = pb.GetRequest(namespace=namespace, keys=keys)

        async def attempt(timeout: float) -> list[SealedBlock | None]:
            reader = _GetReader(namespace, keys)
            async for message in self._stub.Get(request, **self._opts(timeout)):
                reader.feed(message)
            return reader.finish()

        return await self._call("Get", attempt)

    async def delete(self, namespace: str, keys: list[bytes]) -> int:
        request = pb.KeysRequest(namespace=namespace, keys=keys)
        return (await self._call("Delete", lambda t: self._stub.Delete(request, **self._opts(t)))).count

    async def clear(self, namespace: str) -> int:
        request = pb.ClearRequest(namespace=namespace)
        return (await self._call("Clear", lambda t: self._stub.Clear(request, **self._opts(t)))).count

    async def stats(self) -> dict[str, dict[str, TierUsage]]:
        return _usage(await self._call("Stats", lambda t: self._stub.Stats(pb.StatsRequest(), **self._opts(t))))

    async def health(self) -> dict[str, bool]:
        return _health(await self._call("Stats", lambda t: self._stub.Stats(pb.StatsRequest(), **self._opts(t))))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _opts(self, timeout: float) -> dict:
        return {"timeout": timeout, "metadata": self._metadata}

    async def _call(self, method: str, attempt: Callable[[float], object]):
        for n in range(self._retry.attempts):
            try:
                return await attempt(self.timeout_s)
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE or n + 1 == self._retry.attempts:
                    raise KVStoreError(method, error.code(), error.details() or "") from None
                log.debug("kvstore %s: %s, retrying", method, error.code().name)
            except ValueError as error:  # a malformed response stream
                raise KVStoreError(method, grpc.StatusCode.INTERNAL, str(error)) from None
            await asyncio.sleep(self._retry.delay(n))
        raise AssertionError("unreachable: the last attempt returns or raises")
