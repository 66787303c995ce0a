"""The `kvstore` command: `serve` (the daemon), `bench` (throughput and latency), `gen-proto`."""

from __future__ import annotations

import argparse
import contextlib
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
    from kvstore.server import serve

    cfg = _load_config(args.config)
    handle = serve(cfg, host=args.host, port=args.port, metrics_port=args.metrics_port)
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
  kvstore bench --url grpc://127.0.0.1:50051 --shm"""


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
