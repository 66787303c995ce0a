"""Stop conditions: max_tokens, stop token ids, stop strings, EOS, and abort."""

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy


def test_stop_token_ids_and_strings(tiny_model_dirs, hf_models):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    full = hf_greedy(hf_models["llama"], prompt, 20)
    stop_tok = full[5]
    first = full.index(stop_tok)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok

    text = llm.tokenizer.decode(full)
    words = text.split()
    stop_str = words[len(words) // 2] if len(words) > 2 else text[len(text) // 2:len(text) // 2 + 2]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=20, stop=[stop_str], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert stop_str not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert text.startswith(out.text)


def test_abort_frees_blocks(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["qwen3"], dtype="float32")
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": list(range(1, 50))},
                             SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.core.stats().kv_cache_usage > 0
    engine.abort_request([rid])
    assert not engine.has_unfinished_requests()
    assert engine.core.stats().kv_cache_usage == 0.0
