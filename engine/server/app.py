"""The FastAPI app: OpenAI routes, health, version, metrics, API-key check, errors in OpenAI's shape.

Request bodies are capped (`RequestBodyLimit`) and parsed off the event loop: a 100 MB body once grew
the server to 24 GB, and parsing or tokenizing megabytes on the loop stalled every request, /health
included.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.async_engine import AsyncEngine, EngineDeadError
from engine.server.chat import chat, start_chat, stream_chat
from engine.server.completions import complete, start_completion, stream_completion
from engine.server.errors import APIError, bad_request, from_validation_error, invalid_api_key, unknown_model
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from engine.server.request_id import RequestIdHeader, request_id_of
from engine.server.sse import EventStreamResponse
from engine.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from kvstore.version import package_version

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def build_app(engine: AsyncEngine, model_names: tuple[str, ...], model_root: str,
              api_key: str | None = None, *, max_request_body_bytes: int) -> FastAPI:
    """An app serving `engine` under `model_names` (the first is the one reported in responses)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="tierkv", version=package_version(), lifespan=lifespan)
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_body_bytes)
    # Added last, so outermost: even a 413 from RequestBodyLimit carries the request's id.
    app.add_middleware(RequestIdHeader)
    app.state.engine = engine  # for embedding code and tests: the engine this app serves
    served = model_names[0]

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise invalid_api_key()

    def check_model(model: str | None) -> None:
        if model is not None and model not in model_names:
            raise unknown_model(model)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, err: EngineDeadError) -> JSONResponse:
        return JSONResponse(APIError(str(err), HTTPStatus.SERVICE_UNAVAILABLE).body(), status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(str(err.detail), err.status_code).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(f"Internal server error: {type(err).__name__}", 500).body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            raise APIError(f"The engine is not running: {engine.error!r}", HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(status_code=200)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        check_api_key(request)
        return ModelList(data=[ModelCard(id=name, root=model_root, max_model_len=engine.max_model_len)
                               for name in model_names])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_api_key(request)
        req = await parse_body(request, CompletionRequest)
        check_model(req.model)
        request_id, stream = await start_completion(req, engine, request_id_of(request))
        if req.stream:
            return EventStreamResponse(stream_completion(req, engine, served, request_id, stream))
        body = await until_disconnected(request, complete(req, engine, served, request_id, stream), stream)
        return _json_or_gone(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_api_key(request)
        req = await parse_body(request, ChatCompletionRequest)
        check_model(req.model)
        request_id, stream = await start_chat(req, engine, request_id_of(request))
        if req.stream:
            return EventStreamResponse(stream_chat(req, engine, served, request_id, stream))
        body = await until_disconnected(request, chat(req, engine, served, request_id, stream), stream)
        return _json_or_gone(body)

    # vLLM's tokenizer routes: outside /v1, so, as in vLLM, they need no API key.
    @app.post("/tokenize")
    async def tokenize_prompt(request: Request) -> Response:
        req = (await parse_body(request, TokenizeRequest)).root
        check_model(req.model)
        # Off the loop: a template and tokenizer on a long conversation take seconds.
        body = await asyncio.to_thread(tokenize, req, engine.tokenizer, engine.max_model_len)
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))

    @app.post("/detokenize")
    async def detokenize_tokens(request: Request) -> Response:
        req = await parse_body(request, DetokenizeRequest)
        check_model(req.model)
        body = await asyncio.to_thread(detokenize, req, engine.tokenizer)
        return JSONResponse(body.model_dump(mode="json"))

    return app


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`; malformed JSON or a bad field is a 400, never FastAPI's 422."""
    raw = await request.body()
    # A body of megabytes takes a good part of a second to parse and validate: not on the loop.
    return await asyncio.to_thread(_parse_json, raw, model)


def _parse_json(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise bad_request("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits
        raise bad_request(f"The request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise from_validation_error(err) from None


async def until_disconnected(request: Request, work: Awaitable[T], stream) -> T | None:
    """Run `work`; None if the client disconnected first, which aborts the request.

    A non-streaming response sends nothing until the end, so only the connection tells us the
    client went away; without this the request would run to completion for no one.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        return work_task.result() if work_task.done() else None
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
            stream.close()


def _json_or_gone(body: BaseModel | None) -> Response:
    # 499 (nginx's "client closed request"): no one is left to read it, but the access log shows why.
    return JSONResponse(body.model_dump(mode="json")) if body is not None else Response(status_code=499)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class RequestBodyLimit:
    """Answer 413 to a request whose body is larger than `max_bytes`, without reading it all.

    A declared Content-Length is refused before any of the body is read; a chunked body is counted
    as it arrives and refused as soon as it passes the limit. A plain ASGI middleware, so that it
    sees the body chunk by chunk rather than after Starlette has gathered it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                         "(--max-request-body-bytes).", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        # The rest of the body is never read: the connection cannot carry another request.
        response = JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised from `RequestBodyLimit`'s receive once the body passes the limit."""
