"""The CPU path runs without triton: `pip install torch==2.13.0 -e .` does not install it.

CI installs the [test] extra, which brings triton, so a stray top-level `import triton` would pass
every other test and still break the README's first command on a fresh machine. Here a subprocess
hides triton behind an import hook placed ahead of every other finder, then imports every entry
point and decodes greedily on a tiny model.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.engine.hf_reference import hf_greedy

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib.abc, json, sys


class HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")


sys.meta_path.insert(0, HideTriton())

import engine.cli, engine.bench.cli, engine.server.app, kvstore.cli, kvstore.server
from engine import LLM, SamplingParams

llm = LLM(sys.argv[1], dtype="float32")
prompt = json.loads(sys.argv[2])
greedy = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                      use_tqdm=False)
seeded = llm.generate({"prompt_token_ids": prompt},
                      SamplingParams(temperature=0.8, seed=7, repetition_penalty=1.3, presence_penalty=0.5,
                                     max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps({"greedy": greedy[0].outputs[0].token_ids, "seeded": seeded[0].outputs[0].token_ids,
                  "triton_modules": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))}))
"""


def test_engine_and_servers_run_with_triton_hidden(tiny_model_dirs, hf_models):
    prompt = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny_model_dirs["llama"], json.dumps(prompt)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["greedy"] == hf_greedy(hf_models["llama"], prompt, 12)
    assert len(result["seeded"]) == 12
    assert result["triton_modules"] == []
