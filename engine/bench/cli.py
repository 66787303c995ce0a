"""`tierkv bench <name>`: each benchmark module registers its own arguments and runner."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help). Only the chosen module is imported: each pulls in the engine
# (and torch), and one benchmark's import problem must not keep the others from running.
BENCHMARKS = {
    "throughput": ("engine.bench.throughput", "Offline throughput: prompts through the engine, tokens/s"),
    "latency": ("engine.bench.latency", "Per-request latency: time to first token and inter-token latency"),
    "offload": ("engine.bench.offload", "Offload: TTFT cold vs a prefix hit from each tier, save/load GB/s vs "
                                        "the plain copies; decode ITL with saving on vs off, a load in flight"),
    "serve": ("engine.bench.serve", "Online serving against an OpenAI-compatible URL: TTFT, ITL, E2E, "
                                    "throughput, prefix hit rates (as vllm bench serve)"),
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tierkv bench", description="Measure tierkv; print a table.")
    sub = parser.add_subparsers(dest="bench", required=True)
    subparsers = {name: sub.add_parser(name, help=help_line) for name, (_, help_line) in BENCHMARKS.items()}
    chosen, _ = parser.parse_known_args(argv[:1])
    module = importlib.import_module(BENCHMARKS[chosen.bench][0])
    module.add_arguments(subparsers[chosen.bench])
    args = parser.parse_args(argv)
    return module.run(args)
