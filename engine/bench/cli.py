"""`tierkv bench <name>`: each benchmark module registers its own arguments and runner."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "throughput": "engine.bench.throughput",
    "latency": "engine.bench.latency",
    "offload": "engine.bench.offload",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tierkv bench", description="Measure tierkv; print a table.")
    sub = parser.add_subparsers(dest="bench", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
        modules[name] = module
    args = parser.parse_args(argv)
    return modules[args.bench].run(args)
