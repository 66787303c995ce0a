"""Logprobs over HTTP equal the offline API's, in both OpenAI shapes."""

from tests.server.conftest import greedy


def test_completion_logprobs_match_offline(tiny_server, tiny_llm):
    reference = tiny_llm.generate("Hello", greedy(5, logprobs=2), use_tqdm=False)[0].outputs[0]
    with tiny_server.client() as client:
        body = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                                    "logprobs": 2}).json()
    logprobs = body["choices"][0]["logprobs"]
    expected = [entry[token].logprob for token, entry in zip(reference.token_ids, reference.logprobs)]
    assert logprobs["token_logprobs"] == expected
    assert logprobs["tokens"] == [tiny_llm.tokenizer.decode([t]) for t in reference.token_ids]
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(5)]


def test_chat_logprobs_match_offline(tiny_server, tiny_llm):
    messages = [{"role": "user", "content": "Hi"}]
    reference = tiny_llm.chat(messages, greedy(4, logprobs=3), use_tqdm=False)[0].outputs[0]
    with tiny_server.client() as client:
        body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0,
                                                         "logprobs": True, "top_logprobs": 3}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == \
        [entry[token].logprob for token, entry in zip(reference.token_ids, reference.logprobs)]
    for c, token, entry in zip(content, reference.token_ids, reference.logprobs):
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
        assert [t["logprob"] for t in c["top_logprobs"]] == [lp.logprob for lp in ranked]
        assert c["top_logprobs"][0]["logprob"] == c["logprob"]  # greedy: the sampled token is the best one
        assert c["bytes"] == list(c["token"].encode())
