"""Raw HTTP: SSE framing exactly as OpenAI's, usage chunks, and 32 concurrent streams with correct text."""

import asyncio
import json

import httpx

from tests.server.conftest import greedy

CHAT = [{"role": "user", "content": "Tell me a story."}]


def sse_events(raw: str) -> list[str]:
    """The data payloads of a complete event stream, checking every byte of the framing on the way."""
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payloads.append(event[len("data: "):])
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def test_chat_stream_framing_and_usage_chunk(tiny_server, tiny_llm):
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with tiny_server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = response.read().decode()
    chunks = [json.loads(p) for p in sse_events(raw)]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "llama" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    reference = tiny_llm.chat(CHAT, greedy(12), use_tqdm=False)[0]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == reference.outputs[0].text
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == len(reference.prompt_token_ids)
    assert usage["usage"]["completion_tokens"] == 12
    assert usage["usage"]["total_tokens"] == len(reference.prompt_token_ids) + 12


def test_completion_stream_without_usage(tiny_server, tiny_llm):
    body = {"prompt": "Once upon", "max_tokens": 10, "temperature": 0, "stream": True}
    with tiny_server.client() as client:
        raw = client.post("/v1/completions", json=body).text
    chunks = [json.loads(p) for p in sse_events(raw)]
    assert all(c["object"] == "text_completion" and "usage" in c and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    reference = tiny_llm.generate("Once upon", greedy(10), use_tqdm=False)[0].outputs[0].text
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference


def test_stream_stops_at_stop_string_like_the_offline_api(tiny_server, tiny_llm):
    reference = tiny_llm.generate("Once upon", greedy(30), use_tqdm=False)[0].outputs[0].text
    stop = reference[8:10]
    expected = tiny_llm.generate("Once upon", greedy(30, stop=[stop]), use_tqdm=False)[0].outputs[0]
    body = {"prompt": "Once upon", "max_tokens": 30, "temperature": 0, "stream": True, "stop": stop}
    with tiny_server.client() as client:
        chunks = [json.loads(p) for p in sse_events(client.post("/v1/completions", json=body).text)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == stop


def test_32_concurrent_streams_all_complete_with_correct_text(tiny_server, tiny_llm):
    prompts = [f"Request {i}: " + "ab" * (i % 7) for i in range(32)]
    max_tokens = [8 + (i % 5) * 4 for i in range(32)]
    references = [out.outputs[0].text for out in
                  tiny_llm.generate(prompts, [greedy(n) for n in max_tokens], use_tqdm=False)]

    async def stream_one(client: httpx.AsyncClient, prompt: str, n: int) -> str:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            raw = (await response.aread()).decode()
        return "".join(json.loads(p)["choices"][0]["text"] for p in sse_events(raw))

    async def stream_all() -> list[str]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, p, n) for p, n in zip(prompts, max_tokens)))

    assert asyncio.run(stream_all()) == references
