"""One engine process for the connector tests: serves prompts one after another, prints JSON.

stdin: {"model": dir, "kv_transfer_config": {...}, "num_gpu_blocks": N, "max_tokens": M, "prompts": [[ids]]}
stdout (last line): {"results": [{"token_ids": [...], "computed_tokens": n, "metrics": {...}}], "saves_flushed": bool}

`computed_tokens` is what `EngineCore.stats().computed_tokens` grew by while serving that prompt
(prompt tokens run through the model plus decode steps); `metrics` is the connector's counters
after it. Saves are flushed before the next prompt and before exit, so another process that
starts afterwards finds them.
"""

from __future__ import annotations

import json
import sys

from engine.llm import LLM
from engine.sampling.params import SamplingParams


def main() -> int:
    spec = json.load(sys.stdin)
    llm = LLM(spec["model"], dtype="float32", max_model_len=spec.get("max_model_len", 4096),
              num_gpu_blocks=spec.get("num_gpu_blocks"), kv_transfer_config=spec["kv_transfer_config"])
    core = llm.engine.core
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0)
    results = []
    flushed = True
    for prompt in spec["prompts"]:
        before = core.stats().computed_tokens
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        flushed &= core.connector.flush(30.0)
        results.append({"token_ids": list(out.outputs[0].token_ids),
                        "computed_tokens": core.stats().computed_tokens - before,
                        "metrics": core.connector.metrics.snapshot()})
    core.close()
    print(json.dumps({"results": results, "saves_flushed": flushed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
