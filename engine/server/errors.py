"""Errors the server answers with, in OpenAI's JSON shape.

Every client mistake becomes an `APIError` with a 4xx status; the app turns it into
`{"error": {"message", "type", "param", "code"}}`. Only a failure of the server itself is a 5xx.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from pydantic import ValidationError


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI error type, offending parameter, code."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        *,
        param: str | None = None,
        code: str | int | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.err_type = err_type or _default_type(self.status)
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == HTTPStatus.UNAUTHORIZED:
        return "authentication_error"
    if status == HTTPStatus.NOT_FOUND:
        return "not_found_error"
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the parameter at fault."""
    return APIError(message, HTTPStatus.BAD_REQUEST, param=param, code=code)


def unknown_model(model: str) -> APIError:
    """An unknown model name: 404 exactly as vLLM answers it (type `NotFoundError`, the status as `code`).

    vLLM's clients and dashboards key on this body, so it keeps vLLM's shape rather than this
    module's usual string codes.
    """
    # Echoed escaped where it is not valid UTF-8 (a lone surrogate): the reply must still encode.
    shown = model.encode("utf-8", "backslashreplace").decode("utf-8")
    return APIError(f"The model `{shown}` does not exist.", HTTPStatus.NOT_FOUND, code=HTTPStatus.NOT_FOUND.value,
                    err_type="NotFoundError")


def invalid_api_key() -> APIError:
    """A missing or wrong `Authorization: Bearer` key."""
    return APIError(
        "Incorrect API key provided. Send it as `Authorization: Bearer <key>`.",
        HTTPStatus.UNAUTHORIZED,
        code="invalid_api_key",
    )


def overloaded(num_waiting: int, retry_after_s: int = 1) -> APIError:
    """The waiting queue is full: 503 with Retry-After so clients back off and retry."""
    return APIError(
        f"The server is overloaded: {num_waiting} requests are already waiting. Retry later.",
        HTTPStatus.SERVICE_UNAVAILABLE,
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def from_validation_error(err: ValidationError) -> APIError:
    """A pydantic validation failure of a request body: a 400 naming the first bad field.

    A field that accepts several types fails once per type; the deepest failure is the most precise.
    """
    errors = err.errors()
    field = errors[0]["loc"][:1]
    first = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
    param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return bad_request(f"Invalid value for '{param}': {message}", param=param)


_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: str | int) -> bool:
    """pydantic puts the tried type (`str`, `list[int]`, `TextPart`) into the location of union errors."""
    return isinstance(part, str) and (part in _TYPE_NAMES or not _FIELD_NAME.fullmatch(part))
