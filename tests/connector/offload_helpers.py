"""Helpers for the connector tests: prompts, configs, engine processes, daemons, a gated store."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from kvstore.checksum import SealedBlock
from kvstore.config import parse_store_config
from kvstore.keys import chain_hash
from kvstore.server import serve
from kvstore.store import TieredStore

REPO = Path(__file__).resolve().parents[2]
ENGINE_PROC = Path(__file__).with_name("engine_proc.py")
BLOCK = 256                  # tokens per offloaded block
PREFIX_LEN = 9 * BLOCK       # 2304 tokens: the shared prefix, whole blocks
MAX_TOKENS = 8


def tokens(seed: int, n: int) -> list[int]:
    """`n` reproducible byte-token ids (the tiny models' vocabulary is bytes + 3 specials)."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


PREFIX = tokens(1, PREFIX_LEN)


def kv_config(role: str = "kv_both", **extra) -> dict:
    """A `--kv-transfer-config` object with 256-token blocks; `extra` goes into kv_connector_extra_config.

    The load-or-recompute model is off unless asked for: these tests count exactly what is loaded,
    and on two shared cores a tiny model's prefill and moto's S3 run at similar, noisy rates."""
    return {"kv_connector": "OffloadingConnector", "kv_role": role,
            "kv_connector_extra_config": {"block_size": BLOCK, "load_cost_model": False, **extra}}


def make_llm(model: str, cfg: dict | None, **kwargs) -> LLM:
    return LLM(model, dtype="float32", max_model_len=4096, kv_transfer_config=cfg, **kwargs)


def generate(llm: LLM, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def run_engine_process(model: str, cfg: dict, prompts: list[list[int]], *, num_gpu_blocks: int | None = None,
                       timeout: float = 120.0) -> list[dict]:
    """Serve `prompts` in a fresh engine process (tests/connector/engine_proc.py); its per-prompt results."""
    spec = {"model": model, "kv_transfer_config": cfg, "prompts": prompts, "num_gpu_blocks": num_gpu_blocks,
            "max_tokens": MAX_TOKENS}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(ENGINE_PROC)], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["saves_flushed"], "the engine process could not flush its saves"
    return report["results"]


@contextlib.contextmanager
def daemon_process(config: dict | None = None, tmp_path: Path | None = None, port: int = 0):
    """`kvstore serve` as a real process (on `port`, 0 = a free one); yields (url, process). Stopped
    with SIGTERM, so it removes its slab segment from /dev/shm."""
    args = [sys.executable, "-m", "kvstore.cli", "--log-level", "WARNING", "serve", "--port", str(port), "--grace", "0"]
    if config is not None:
        path = Path(tmp_path) / "kvstore.json"
        path.write_text(json.dumps(config))
        args += ["--config", str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        if "serving on" not in line:
            raise AssertionError(f"kvstore serve did not start: {line}{proc.stderr.read()}")
        yield f"grpc://127.0.0.1:{line.rsplit(':', 1)[1].strip()}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def daemon_in_process(tiers: list[dict], store: TieredStore | None = None):
    """A kvstore gRPC server in this process on a free port; yields (url, handle)."""
    cfg = parse_store_config({"listen": "127.0.0.1:0", "tiers": tiers})
    handle = serve(cfg, store=store, workers=8)
    try:
        yield f"grpc://127.0.0.1:{handle.port}", handle
    finally:
        handle.stop(grace_s=0)


class GatedStore(TieredStore):
    """A real TieredStore whose reads wait at a gate (`get` reads through `get_sealed`): lets a test
    break a tier (or kill the daemon) while a load is in flight, at a moment it chooses."""

    def __init__(self, tiers: list[dict]) -> None:
        super().__init__(tiers)
        self.entered = threading.Event()
        self.release = threading.Event()

    def get_sealed(self, namespace: str, keys: list[bytes]) -> list[SealedBlock | None]:
        self.entered.set()
        self.release.wait(timeout=30)
        return super().get_sealed(namespace, keys)


def block_keys(llm: LLM, prompt: list[int]) -> list[bytes]:
    """The store keys of the prompt's full 256-token blocks: the chained hash of each block's last
    16-token page, seeded by the engine's model namespace (kvstore/keys.py)."""
    core = llm.engine.core
    page = core.config.block_size
    parent, page_keys = core.namespace.digest(), []
    for start in range(0, len(prompt) - page + 1, page):
        parent = chain_hash(parent, prompt[start:start + page])
        page_keys.append(parent)
    return page_keys[BLOCK // page - 1::BLOCK // page]


def blocks_held(llm: LLM) -> dict[str, int]:
    """tier name -> blocks its connector's store holds in the engine's namespace."""
    connector = llm.engine.core.connector
    usage = connector.store.stats().get(connector.namespace, {})
    return {tier: held.blocks for tier, held in usage.items() if held.blocks}


def stored_prefix_blocks(llm: LLM, prompt: list[int]) -> int:
    """How many leading blocks of `prompt` the engine's store reports (one Lookup)."""
    connector = llm.engine.core.connector
    return connector.store.lookup(connector.namespace, block_keys(llm, prompt)).num_hits
