"""The `kvstore` command: `serve` (the daemon), `bench` (throughput and latency), `soak` (the daemon
under many good and abusive clients), `gen-proto`."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
from dataclasses import asdict

from kvstore.config import ConfigError, StoreConfig, load_store_config, parse_bytes
from kvstore.version import package_version

log = logging.getLogger("kvstore")

# botocore's DEBUG output prints signed request headers (the S3 access key id) and urllib3 prints
# URLs: the daemon keeps them at WARNING whatever --log-level says, so credentials never reach logs.
_CREDENTIAL_LEAKING_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "redis")


def configure_logging(level: str) -> None:
    """Root logging at `level`, with third-party loggers that can print credentials held at WARNING."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _CREDENTIAL_LEAKING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _load_config(path: str | None) -> StoreConfig:
    return load_store_config(path) if path else StoreConfig()


def cmd_serve(args: argparse.Namespace) -> int:
    from kvstore.allocator import limit_malloc_arenas

    limit_malloc_arenas()   # before gRPC starts its threads
    from kvstore.server import serve

    cfg = _load_config(args.config)
    handle = serve(cfg, host=args.host, port=args.port, metrics_port=args.metrics_port,
                   health_port=args.health_port)
    # What start-up allocated lives as long as the daemon: frozen, it is out of the collector's
    # sight, and a full collection (which stalls every thread) walks only what calls allocated.
    gc.collect()
    gc.freeze()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"kvstore serving on {handle.host}:{handle.port}", flush=True)
    stop.wait()
    log.info("signal received, draining calls and stopping")
    handle.stop(grace_s=args.grace)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvstore import bench

    block_sizes = [parse_bytes(size) for size in args.block_sizes.split(",")]
    if args.url:
        from kvstore.auth import token_from_env
        from kvstore.client import KVStoreClient

        cfg = _load_config(args.config)
        options = {"token": token_from_env(cfg.auth_token_env),
                   "root_certificates": cfg.tls_cert.read_bytes() if cfg.tls_cert else None}
        with contextlib.ExitStack() as stack:
            clients = {"daemon": stack.enter_context(KVStoreClient(args.url, **options))}
            if args.shm:
                from kvstore.slab_client import SlabClient, SlabRefused

                try:
                    slab = stack.enter_context(SlabClient(args.url, **options))
                except SlabRefused as refused:
                    raise ValueError(f"--shm: the daemon's slab cannot be used ({refused})") from None
                clients["daemon-slab"] = bench.SlabByValue(slab, clients["daemon"])
            results = bench.bench_daemon(clients, block_sizes, args.blocks, args.batch)
    else:
        if args.shm:
            raise ValueError("--shm measures the slab of a daemon on this host: give --url")
        results = bench.bench_in_process(_load_config(args.config), block_sizes, args.blocks, args.batch)
    if args.baseline:
        results += bench.bench_grpc_baseline(block_sizes, args.blocks, args.batch)
    print(bench.format_table(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=1)
    return 1 if any(r.bad_blocks for r in results) else 0


def cmd_soak(args: argparse.Namespace) -> int:
    from kvstore import soak

    cfg = soak.SoakConfig(
        url=args.url, clients=args.clients, duration_s=args.duration_s, block_bytes=parse_bytes(args.block_bytes),
        batch=args.batch, window=args.window, memory_bytes=parse_bytes(args.memory_bytes),
        max_message_bytes=parse_bytes(args.max_message_bytes), stream_idle_timeout_s=args.stream_idle_timeout_s,
        stalled_fraction=args.stalled_fraction, oversized_fraction=args.oversized_fraction,
        disconnecting_fraction=args.disconnecting_fraction, health_interval_s=args.health_interval_s,
        health_deadline_s=args.health_deadline_s, health_slow_ms=args.health_slow_ms, metrics_url=args.metrics_url,
        health_url=args.health_url, daemon_pid=args.daemon_pid, clients_nice=args.clients_nice,
        rss_allowance_bytes=None if args.rss_allowance is None else parse_bytes(args.rss_allowance))
    report = soak.run_soak(cfg)
    print(soak.format_table(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(report), out, indent=1)
    return 1 if report.failures else 0


def cmd_gen_proto(args: argparse.Namespace) -> int:
    from kvstore.proto import generate

    try:
        out_dir = generate()
    except ModuleNotFoundError as error:
        if error.name != "grpc_tools":
            raise
        # The version that generated the checked-in code regenerates it byte for byte, so a diff
        # shows only the .proto change.
        from kvstore.proto.kvstore_pb2_grpc import GRPC_GENERATED_VERSION

        print(f"kvstore gen-proto needs grpcio-tools, a build-time tool tierkv does not install: "
              f"pip install grpcio-tools=={GRPC_GENERATED_VERSION}", file=sys.stderr)
        return 2
    print(f"generated {out_dir}")
    return 0


EPILOG = """`kvstore <command> --help` lists a command's flags. Examples:
  kvstore serve                                  # memory tier only, 127.0.0.1:50051
  kvstore serve --config deploy/kvstore.yaml     # tiers and listen address from the file
  kvstore bench --baseline                       # in-process store, plus raw gRPC on loopback
  kvstore bench --url grpc://127.0.0.1:50051 --shm
  kvstore soak --duration-s 300 --json soak.json  # 64 clients, good and abusive, against a daemon it starts"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="tierkv's multi-tier KV-cache store: a gRPC daemon keeping KV-cache blocks in CPU memory,\n"
                    "Redis and S3.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(title="commands", dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC daemon (memory-only on 127.0.0.1:50051 without --config)")
    serve.add_argument("--config", help="YAML or JSON config file (see deploy/kvstore.yaml)")
    serve.add_argument("--host", help="listen address (overrides the file's listen)")
    serve.add_argument("--port", type=int, help="listen port (overrides the file's listen; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (overrides metrics_port)")
    serve.add_argument("--health-port", type=int,
                       help="port of the server that answers only health checks (overrides health_port)")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds running calls get to finish on SIGTERM")
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="put/get GB/s and p50/p99 latency per tier and block size")
    bench.add_argument("--url", help="grpc://host:port of a running daemon (default: an in-process store)")
    bench.add_argument("--config", help="tiers for the in-process store; with --url, its token and TLS settings")
    bench.add_argument("--block-sizes", default="256KiB,1MiB,2MiB,4MiB,8MiB", help="comma-separated sizes")
    bench.add_argument("--blocks", type=int, default=32, help="blocks per tier and size")
    bench.add_argument("--batch", type=int, default=4, help="blocks per put/get call")
    bench.add_argument("--baseline", action="store_true",
                       help="also measure raw gRPC streaming of the same bytes on loopback (the daemon's ceiling)")
    bench.add_argument("--shm", action="store_true",
                       help="with --url: also measure the daemon's same-host slab (mode daemon-slab, the block size "
                            "equal to its slot_bytes) beside the gRPC payload path (mode daemon), same run")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(run=cmd_bench)

    soak = sub.add_parser("soak", help="many good, stalled, oversized and disconnecting clients against a daemon; "
                                       "exit 1 on a wrong byte, a lost block or a slow health check")
    soak.add_argument("--url", help="grpc://host:port of a running daemon (default: start one, with a memory tier "
                                    "of --memory-bytes)")
    soak.add_argument("--clients", type=int, default=64, help="concurrent clients, one thread each")
    soak.add_argument("--duration-s", type=float, default=300.0, help="how long the clients run")
    soak.add_argument("--block-bytes", default="1MiB", help="size of the good clients' blocks")
    soak.add_argument("--batch", type=int, default=2, help="blocks per Put of a good client")
    soak.add_argument("--window", type=int, default=4, help="acknowledged blocks a good client keeps stored at most")
    soak.add_argument("--memory-bytes", default="256MiB", help="the started daemon's memory tier (its RSS budget)")
    soak.add_argument("--max-message-bytes", default="8MiB",
                      help="the daemon's max_message_bytes (set in the started daemon; with --url, give its value)")
    soak.add_argument("--stream-idle-timeout-s", type=float, default=30.0,
                      help="the started daemon's stream_idle_timeout_s (when stalled streams are cut; "
                           "with --url, give its value)")
    soak.add_argument("--stalled-fraction", type=float, default=0.10, help="share of stalled clients")
    soak.add_argument("--oversized-fraction", type=float, default=0.10, help="share of oversized clients")
    soak.add_argument("--disconnecting-fraction", type=float, default=0.05,
                      help="share of clients that disconnect mid-stream (good clients are the rest)")
    soak.add_argument("--health-interval-s", type=float, default=0.1, help="seconds between health checks")
    soak.add_argument("--health-deadline-s", type=float, default=1.0, help="deadline of one health check")
    soak.add_argument("--health-slow-ms", type=float, default=100.0, help="a health check slower than this fails")
    soak.add_argument("--metrics-url", help="with --url: the daemon's http://host:port/metrics (evictions)")
    soak.add_argument("--health-url", help="with --url: grpc://host:port of the daemon's health_port (default: "
                                           "--url)")
    soak.add_argument("--daemon-pid", type=int, help="with --url: the daemon's pid on this host (its RSS)")
    soak.add_argument("--clients-nice", type=int, default=0,
                      help="run the clients at this niceness (0-19), below the daemon and the health monitor, "
                           "when they share the machine's cores")
    soak.add_argument("--rss-allowance", help="fail when the daemon's RSS passes 1.5 x --memory-bytes + this")
    soak.add_argument("--json", help="also write the report to this JSON file")
    soak.set_defaults(run=cmd_soak)

    gen = sub.add_parser("gen-proto", help="regenerate kvstore/proto/ from protos/kvstore.proto")
    gen.set_defaults(run=cmd_gen_proto)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if getattr(args, "blocks", 1) < 1 or getattr(args, "batch", 1) < 1:
        print("kvstore: --blocks and --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ConfigError, ValueError, OSError) as error:
        print(f"kvstore: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
