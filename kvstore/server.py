"""The kvstore daemon: the KVStore gRPC servicer over a TieredStore, plus server start and stop.

`serve(cfg)` starts a real gRPC server (thread pool, optional TLS and bearer token, the standard health
service, metrics) and returns a `ServerHandle` with `.port` and `.stop()`; tests use it in-process and
`kvstore serve` runs it as the daemon.

A client must not be able to take the daemon's threads (every sync gRPC call holds one while it runs)
or its memory: `CallLimitsInterceptor` (kvstore/limits.py) turns away KVStore calls beyond
`max_concurrent_rpcs` (Put streams beyond half of it) and unary requests larger than their method
needs, before any handler work; Put blocks are admitted against `max_inflight_put_bytes` before
they are received (`InflightBytes`); `IdleWatchdog` cancels streams whose peer went quiet, and ends
those still running when a stop's grace period is over; keepalive pings drop dead connections.
The thread pool holds HEALTH_THREADS more threads than KVStore calls may take, so the health service
answers while the data calls are saturated; with `health_port` a server of its own answers health
checks too (kvstore/health_server.py), never queued behind the data calls' messages: the port for
Kubernetes probes. The server receives no message larger than a Put chunk or the largest unary
request (`Limits.receive_bytes`), so gRPC's buffers of the calls it admits stay bounded.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore import metrics
from kvstore.auth import TokenAuthInterceptor, token_from_env
from kvstore.checksum import SealedBlock
from kvstore.config import ConfigError, StoreConfig
from kvstore.health_server import HealthServicer, start_health_server
from kvstore.limits import CallLimitsInterceptor, InflightBytes, LimitError, Limits
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.slab_sessions import CommitEntry, SlabError, SlabSessions
from kvstore.store import TieredStore
from kvstore.streaming import CHUNK_BYTES, BlockAssembler, IdleWatchdog, StreamDraining, StreamIdle, framed_block

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
# Puts are handed to the store in batches of about this many bytes, so a Put stream of many large
# blocks never holds more than one batch in daemon memory.
PUT_FLUSH_BYTES = 64 << 20
# Gets read this many keys from the store at a time (bounded memory, still batched for Redis / S3).
GET_BATCH_KEYS = 16
# Threads beyond max_concurrent_rpcs: for the health service, and for turning excess calls away.
HEALTH_THREADS = 8
# Clients may ping this often on a connection without calls before the daemon closes it (too_many_pings).
MIN_CLIENT_PING_INTERVAL_MS = 10_000
HEALTH_POLL_S = 1.0
# After the grace period, how long streams have to take their next message and end themselves
# (UNAVAILABLE "shutting down") before gRPC cancels every call left.
DRAIN_CUT_S = 0.25
_SLAB_CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "unavailable": grpc.StatusCode.FAILED_PRECONDITION,
               "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED}


def tier_service_name(tier: str) -> str:
    """The health-service name under which one tier's status is published."""
    return f"{SERVICE_NAME}/tier/{tier}"


class KVStoreServicer(pb_grpc.KVStoreServicer):
    """Validates each request against the limits, then calls the store."""

    def __init__(self, store: TieredStore, limits: Limits, tier_names: list[str], slab: SlabSessions,
                 idle: IdleWatchdog, inflight: InflightBytes, inflight_wait_s: float):
        self._store = store
        self._inflight = inflight
        self._inflight_wait_s = inflight_wait_s
        self._limits = limits
        self._tier_names = tier_names
        self._slab = slab
        self._idle = idle

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        keys = self._checked(context, request.namespace, list(request.keys))
        result = self._store.lookup(request.namespace, keys)
        return pb.LookupResponse(num_hits=result.num_hits, tiers=result.tiers)

    def Put(self, request_iterator: Iterator[pb.PutRequest], context: grpc.ServicerContext) -> pb.PutResponse:
        stream = self._idle.incoming(context, request_iterator)
        try:
            first = next(stream, None)
            if first is None or first.WhichOneof("item") != "header":
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                       "the first message of a Put stream must be a PutHeader")
            header = first.header
            tiers, ttl_s = self._put_target(header)
            return pb.PutResponse(stored=self._put_blocks(stream, header.namespace, tiers, ttl_s, context))
        except LimitError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StreamIdle as error:
            _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        except StreamDraining as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def _put_target(self, header: pb.PutHeader) -> tuple[list[str] | None, float | None]:
        """A Put header's (tiers, TTL), checked against the limits; raises LimitError."""
        ttl_s = header.ttl_s if header.HasField("ttl_s") else None
        tiers = list(header.tiers) or None
        self._limits.check_namespace(header.namespace)
        self._limits.check_tiers(tiers or [], self._tier_names)
        self._limits.check_ttl(ttl_s)
        return tiers, ttl_s

    def _put_blocks(self, stream, namespace: str, tiers: list[str] | None, ttl_s: float | None,
                    context: grpc.ServicerContext) -> int:
        assembler = BlockAssembler(self._limits.max_message_bytes)
        batch = _PutBatch(lambda blocks: self._store_batch(namespace, blocks, tiers, ttl_s, "Put"), self._inflight)
        remaining = context.time_remaining()
        wait_s = self._inflight_wait_s if remaining is None else min(self._inflight_wait_s, remaining)
        try:
            for message in stream:
                kind = message.WhichOneof("item")
                if kind == "block":
                    index = assembler.blocks_started
                    self._limits.check_key(message.block.key, index)
                    self._limits.check_block_count(index + 1)
                    self._limits.check_expires_at(message.block.expires_at or None, index)
                    self._limits.check_block_size(message.block.size, index)
                    assembler.check_between_blocks()
                    if not batch.admit(message.block.size, wait_s, context.is_active):
                        _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"blocks[{index}]: {message.block.size} bytes did not fit the daemon's bytes of Put "
                               f"streams in flight ({self._inflight.cap}, max_inflight_put_bytes) within {wait_s:g} s "
                               f"(inflight_put_wait_s or the call's deadline); {batch.stored} earlier blocks were "
                               f"stored, retry the rest later")
                    done = assembler.start(message.block)
                elif kind == "data":
                    done = assembler.data(message.data)
                else:
                    raise LimitError("a Put stream carries one PutHeader, first; then BlockStart and data messages")
                if done is None:
                    continue
                key, block = done
                if not block.intact(namespace, key):
                    _abort(context, grpc.StatusCode.DATA_LOSS,
                           f"blocks[{assembler.blocks_started - 1}]: checksum mismatch, the payload was corrupted in "
                           f"transit or sealed for another namespace or key; {batch.stored} earlier blocks were "
                           f"stored, resend the rest")
                batch.add(key, block)
            assembler.finish()
            batch.flush()
            return batch.stored
        finally:
            batch.close()

    def _store_batch(self, namespace: str, batch: list[tuple[bytes, SealedBlock]], tiers: list[str] | None,
                     ttl_s: float | None, method: str) -> int:
        """Store verified blocks with the checksum they arrived with (no second pass over the bytes)."""
        if not batch:
            return 0
        metrics.RPC_BYTES.labels(method=method).inc(sum(len(block.payload) for _, block in batch))
        return self._store.put_sealed(namespace, batch, tiers=tiers, ttl_s=ttl_s)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetResponse]:
        keys = self._checked(context, request.namespace, list(request.keys))
        try:
            yield from self._idle.outgoing(context, self._get_messages(request.namespace, keys))
        except StreamDraining as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def _get_messages(self, namespace: str, keys: list[bytes]) -> Iterator[pb.GetResponse]:
        for first in range(0, len(keys), GET_BATCH_KEYS):
            batch = keys[first : first + GET_BATCH_KEYS]
            for key, block in zip(batch, self._store.get_sealed(namespace, batch)):
                if block is None:
                    yield pb.GetResponse(miss=pb.Miss(key=key))
                    continue
                metrics.RPC_BYTES.labels(method="Get").inc(len(block.payload))
                yield from framed_block(pb.GetResponse, key, block, CHUNK_BYTES)

    def Delete(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        keys = self._checked(context, request.namespace, list(request.keys))
        return pb.CountResponse(count=self._store.delete(request.namespace, keys))

    def Clear(self, request: pb.ClearRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        self._checked(context, request.namespace, [])
        return pb.CountResponse(count=self._store.clear(request.namespace))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        usage = [
            pb.TierUsage(namespace=namespace, tier=tier, blocks=u.blocks, bytes=u.bytes)
            for namespace, tiers in self._store.stats().items()
            for tier, u in tiers.items()
        ]
        tiers = [pb.TierHealth(tier=tier, up=up) for tier, up in self._store.health().items()]
        return pb.StatsResponse(usage=usage, tiers=tiers)

    def AttachSlab(self, request: pb.AttachSlabRequest, context: grpc.ServicerContext) -> Iterator[pb.SlabSession]:
        try:
            session = self._slab.attach()
        except SlabError as error:
            _abort(context, _SLAB_CODES[error.kind], str(error))
        try:
            # The call ends when the client cancels it or its connection dies: its leases go with it.
            if context.add_callback(session.ended.set):
                yield pb.SlabSession(**self._slab.describe(session))
                session.ended.wait()
        finally:
            self._slab.detach(session.session_id)

    def AllocateSlots(self, request: pb.AllocateSlotsRequest,
                      context: grpc.ServicerContext) -> pb.AllocateSlotsResponse:
        def allocate() -> pb.AllocateSlotsResponse:
            if request.count > self._limits.max_keys_per_call:
                raise LimitError(f"count: {request.count} slots in one call, the limit (max_keys_per_call) is "
                                 f"{self._limits.max_keys_per_call}")
            return pb.AllocateSlotsResponse(slots=self._slab.allocate(self._session(request), request.count))

        return self._slab_call(context, allocate)

    def AcquireSlots(self, request: pb.AcquireSlotsRequest, context: grpc.ServicerContext) -> pb.AcquireSlotsResponse:
        keys = self._checked(context, request.namespace, list(request.keys))

        def acquire() -> pb.AcquireSlotsResponse:
            blocks = self._slab.acquire(self._session(request), request.namespace, keys)
            return pb.AcquireSlotsResponse(blocks=[
                pb.SlotBlock(slot=b.slot, checksum=b.checksum, expires_at=b.expires_at or 0.0, length=b.length)
                for b in blocks])

        return self._slab_call(context, acquire)

    def CommitSlots(self, request: pb.CommitSlotsRequest, context: grpc.ServicerContext) -> pb.PutResponse:
        def commit() -> pb.PutResponse:
            tiers, ttl_s = self._put_target(request.header)
            self._limits.check_block_count(len(request.blocks))
            for i, block in enumerate(request.blocks):
                self._limits.check_key(block.key, i)
                self._limits.check_expires_at(block.expires_at or None, i)
            entries = [CommitEntry(b.key, b.slot, b.checksum, b.expires_at or None) for b in request.blocks]
            return pb.PutResponse(stored=self._slab.commit(self._session(request), request.header.namespace,
                                                           entries, tiers, ttl_s))

        return self._slab_call(context, commit)

    def ReleaseSlots(self, request: pb.ReleaseSlotsRequest, context: grpc.ServicerContext) -> pb.ReleaseSlotsResponse:
        def release() -> pb.ReleaseSlotsResponse:
            if len(request.slots) > self._limits.max_keys_per_call:
                raise LimitError(f"slots: {len(request.slots)} slots in one call, the limit (max_keys_per_call) "
                                 f"is {self._limits.max_keys_per_call}")
            self._slab.release(self._session(request), list(request.slots))
            return pb.ReleaseSlotsResponse()

        return self._slab_call(context, release)

    def _session(self, request):
        return self._slab.session(request.session.session_id, request.session.nonce)

    @staticmethod
    def _slab_call(context: grpc.ServicerContext, call):
        try:
            return call()
        except LimitError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except SlabError as error:
            _abort(context, _SLAB_CODES[error.kind], str(error))

    def _checked(self, context: grpc.ServicerContext, namespace: str, keys: list[bytes]) -> list[bytes]:
        try:
            self._limits.check_namespace(namespace)
            self._limits.check_keys(keys)
        except LimitError as error:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return keys


class _PutBatch:
    """The verified blocks of one Put stream not yet stored, handed to the store every
    PUT_FLUSH_BYTES, and the in-flight bytes they (and the block being received) hold."""

    def __init__(self, store: Callable[[list[tuple[bytes, SealedBlock]]], int], inflight: InflightBytes):
        self._store = store
        self._inflight = inflight
        self._blocks: list[tuple[bytes, SealedBlock]] = []
        self._bytes = 0
        self._reserved = 0
        self.stored = 0

    def admit(self, size: int, wait_s: float, live: Callable[[], bool]) -> bool:
        """Reserve a block's bytes before they arrive. When they do not fit, this stream's own blocks
        go to the store first (so that it waits holding nothing, and two streams never wait on each
        other), then it waits up to `wait_s` for others; False when they still do not fit."""
        if not self._inflight.reserve(size):
            self.flush()
            if not self._inflight.reserve(size, wait_s, live):
                return False
        self._reserved += size
        return True

    def add(self, key: bytes, block: SealedBlock) -> None:
        self._blocks.append((key, block))
        self._bytes += len(block.payload)
        if self._bytes >= PUT_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Store the blocks held (between blocks: every reserved byte belongs to them) and release."""
        blocks, self._blocks, self._bytes = self._blocks, [], 0
        self.stored += self._store(blocks)
        self.close()

    def close(self) -> None:
        """Release what this stream holds (its end, or a failure)."""
        self._inflight.release(self._reserved)
        self._reserved = 0


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, message)


@dataclass
class ServerHandle:
    """A running daemon: its bound port, and how to stop it."""

    port: int
    host: str
    store: TieredStore
    slab: SlabSessions
    _server: grpc.Server
    _health: health.HealthServicer
    _idle: IdleWatchdog
    _owns_store: bool
    _metrics_http: object | None = None
    _health_server: grpc.Server | None = None
    health_port: int | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _monitor: threading.Thread | None = None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_http.server_port if self._metrics_http is not None else None

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting calls, let running ones finish for `grace_s`, then close the store. Streams
        still running then end UNAVAILABLE "shutting down" at their next message; gRPC cancels
        whatever is left DRAIN_CUT_S later."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        # AttachSlab streams last as long as their sessions: end them, or every stop waits out the grace.
        self.slab.end_all()
        self._idle.drain(time.monotonic() + grace_s)
        self._server.stop(grace_s + DRAIN_CUT_S).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self._idle.drained:
            log.info("%d stream(s) still running after the %g s grace period ended UNAVAILABLE (shutting down)",
                     self._idle.drained, grace_s)
        self._idle.stop()
        self.slab.close()
        if self._monitor is not None:
            self._monitor.join()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._owns_store:
            self.store.close()
        log.info("kvstore daemon on port %d stopped", self.port)

    def wait(self) -> None:
        """Block until the server terminates."""
        self._server.wait_for_termination()


def serve(cfg: StoreConfig, *, store: TieredStore | None = None, host: str | None = None,
          port: int | None = None, metrics_port: int | None = None, health_port: int | None = None,
          workers: int | None = None) -> ServerHandle:
    """Start the daemon described by `cfg`; `host`/`port`/`metrics_port`/`health_port` override the
    config (port 0 = any), `workers` its max_concurrent_rpcs."""
    cfg_host, _, cfg_port = cfg.listen.rpartition(":")
    host = host or cfg_host.strip("[]") or "127.0.0.1"
    port = int(cfg_port) if port is None else port
    metrics_port = cfg.metrics_port if metrics_port is None else metrics_port
    health_port = cfg.health_port if health_port is None else health_port
    token = token_from_env(cfg.auth_token_env)
    credentials = _tls_credentials(cfg) if cfg.tls_cert else None   # checked before anything starts
    owns_store = store is None
    store = TieredStore.from_config(cfg) if store is None else store
    tier_names = [tier.tier_name for tier in cfg.tiers]
    max_calls = cfg.max_concurrent_rpcs if workers is None else workers
    limits = Limits.from_config(cfg)

    interceptors: list[grpc.ServerInterceptor] = [metrics.RpcMetricsInterceptor()]
    if token is not None:
        interceptors.append(TokenAuthInterceptor(token))
    interceptors.append(CallLimitsInterceptor(limits, max_calls, SERVICE_NAME))
    # A Get sends chunks of at most CHUNK_BYTES. gRPC holds each received message whole before the
    # handler sees it, for every call admitted (no cap counts those bytes): at most one chunk.
    max_send = cfg.max_message_bytes + (64 << 10)
    max_receive = limits.receive_bytes(CHUNK_BYTES)
    # maximum_concurrent_rpcs equal to the pool: a call that finds no thread is refused, never queued.
    threads = max_calls + HEALTH_THREADS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvstore-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=threads,
        options=[("grpc.max_receive_message_length", max_receive),
                 ("grpc.max_send_message_length", max_send),
                 ("grpc.so_reuseport", 0),
                 ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
                 ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
                 ("grpc.keepalive_permit_without_calls", 1),
                 ("grpc.http2.max_pings_without_data", 0),
                 ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS)],
    )
    # Each slab session holds one RPC thread (its AttachSlab stream): keep half the calls for others.
    slab = SlabSessions(store, min(cfg.shm_max_sessions, max_calls // 2))
    idle = IdleWatchdog(cfg.stream_idle_timeout_s)
    inflight = InflightBytes(cfg.inflight_put_bytes, metrics.INFLIGHT_PUT_BYTES)
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store, limits, tier_names, slab, idle, inflight,
                                                          cfg.inflight_put_wait_s), server)
    health_servicer = HealthServicer(max_watches=HEALTH_THREADS // 2)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    address = _address(host, port)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    health_server, bound_health = None, None
    try:
        if bound == 0:
            raise OSError(f"kvstore: cannot listen on {address} (port in use or bad host)")
        if health_port is not None:
            health_server, bound_health = start_health_server(health_servicer, _address(host, health_port),
                                                              credentials)
    except OSError:
        idle.stop()
        slab.close()
        if owns_store:
            store.close()
        raise
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    handle = ServerHandle(port=bound, host=host, store=store, slab=slab, _server=server, _health=health_servicer,
                          _idle=idle, _owns_store=owns_store, _health_server=health_server,
                          health_port=bound_health)
    if metrics_port is not None:
        handle._metrics_http = metrics.start_metrics_server(metrics_port, host)
    handle._monitor = threading.Thread(target=_watch_tiers, args=(handle,), name="kvstore-health", daemon=True)
    _publish_tier_health(store, health_servicer)
    handle._monitor.start()
    log.info("kvstore daemon listening on %s (%s, tiers %s, token %s)", f"{host}:{bound}",
             "TLS" if cfg.tls_cert else "plaintext", tier_names, "required" if token else "off")
    return handle


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_credentials(cfg: StoreConfig) -> grpc.ServerCredentials:
    """The server's TLS credentials; a pair that is not a PEM certificate and its own key is a config
    error naming the keys (gRPC itself only fails later, with a traceback)."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"tls_cert, tls_key: not a PEM certificate and its private key "
                          f"({getattr(error, 'reason', None) or error})") from None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])


def _publish_tier_health(store: TieredStore, health_servicer: health.HealthServicer) -> None:
    for tier, up in store.health().items():
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        health_servicer.set(tier_service_name(tier), status)


def _watch_tiers(handle: ServerHandle) -> None:
    """Republish per-tier health every HEALTH_POLL_S until the server stops."""
    while not handle._stopping.wait(HEALTH_POLL_S):
        try:
            _publish_tier_health(handle.store, handle._health)
        except Exception:  # a failing health probe must not kill the monitor
            log.exception("tier health probe failed")
