"""Server-sent events exactly as OpenAI frames them: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json

from pydantic import BaseModel
from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | dict) -> str:
    """One SSE event carrying a JSON object."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that proxies must not buffer."""

    media_type = "text/event-stream"

    def __init__(self, content, status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
