"""`tierkv serve`: load the model, start the engine thread, serve HTTP until SIGTERM.

If the engine dies the process stops serving, as vLLM's does, and exits with status 1: a server that
can only answer 503 helps no one, while a supervisor (systemd, Kubernetes) restarts one that exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import uvicorn
from fastapi import FastAPI

from engine.server.args import ConfigError, ServeConfig, parse_serve_args
from engine.server.model_arg import check_model_arg

logger = logging.getLogger(__name__)


def build_server(config: ServeConfig) -> FastAPI:
    """Load the model (the slow part: before the port opens) and build the app that serves it."""
    from engine.core.engine_core import EngineCore
    from engine.models.loader import load_tokenizer

    core = EngineCore(config.engine)
    return serve_core(core, load_tokenizer(core.model_config), config)


def serve_core(core, tokenizer, config: ServeConfig) -> FastAPI:
    """The app serving an already loaded `EngineCore`; its engine thread starts with the app."""
    from engine.server.app import build_app
    from engine.server.async_engine import AsyncEngine
    from engine.server.metrics import ServerMetrics

    names = config.served_model_names or (core.model_config.name,)
    max_waiting = config.max_waiting_requests or 4 * core.config.max_num_seqs
    engine = AsyncEngine(core, tokenizer, ServerMetrics(names[0]), max_waiting, log_stats=config.log_stats)
    return build_app(engine, names, core.model_config.path, config.api_key,
                     max_request_body_bytes=config.max_request_body_bytes)


def uvicorn_config(app: FastAPI, config: ServeConfig) -> uvicorn.Config:
    """uvicorn settings: graceful shutdown lets in-flight requests finish for `shutdown_timeout` s."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=config.shutdown_timeout, lifespan="on")


def _check_port_free(host: str, port: int) -> None:
    """Bind and release the address before the weights load, so a port in use fails in a second."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))


def main(argv: list[str]) -> int:
    """Entry point of `tierkv serve ...`; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        config = parse_serve_args(argv)
        check_model_arg(config.engine.model)
    except ConfigError as err:
        print(f"tierkv serve: error: {err}", file=sys.stderr)
        return 2
    try:
        _check_port_free(config.host, config.port)
    except OSError as err:
        print(f"tierkv serve: error: cannot listen on {config.host}:{config.port} ({err.strerror}); "
              "choose another --port", file=sys.stderr)
        return 2
    try:
        app = build_server(config)
    except (ValueError, OSError) as err:
        print(f"tierkv serve: cannot start the engine: {err}", file=sys.stderr)
        return 1
    server = uvicorn.Server(uvicorn_config(app, config))
    engine = app.state.engine

    def stop_serving(err: BaseException) -> None:
        logger.error("the engine died (%r): shutting down so that a supervisor restarts the server", err)
        server.should_exit = True

    engine.on_dead = stop_serving
    # uvicorn handles SIGINT/SIGTERM itself (stop accepting, drain, shut down) and then re-raises the
    # signal to whatever handler was there before; a no-op one makes a graceful stop exit with 0.
    previous = {sig: signal.signal(sig, _shutdown_done) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started and engine.error is None else 1


def _shutdown_done(signum: int, frame) -> None:
    logger.info("shut down after %s", signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
