"""`tierkv` command line: generate, serve, bench.

Each command parses its own arguments (serve's are vLLM's), so the first word picks the command and
the rest goes to it untouched; the top-level parser only answers ``--help`` and ``--version`` and
rejects unknown commands. It imports nothing heavy: ``tierkv --help`` must not load torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.bench.cli import BENCHMARKS
from kvstore.version import package_version


def generate_parser() -> argparse.ArgumentParser:
    """The `tierkv generate` command line."""
    p = argparse.ArgumentParser(prog="tierkv generate", description="Answer one prompt and print the text.")
    p.add_argument("model", nargs="?", default=None, help="HF model directory or GGUF file (default: embedded SmolLM2)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                   help="the model, as a flag (as vLLM takes it)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the prompt as raw text instead of a user chat message")
    return p


def _generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    from engine.server.args import ConfigError
    from engine.server.model_arg import check_model_arg, pick_model

    try:
        model = pick_model(args.model, args.model_flag)
        check_model_arg(model)
    except ConfigError as err:
        print(f"tierkv generate: error: {err}", file=sys.stderr)
        return 2

    from engine import LLM, SamplingParams

    try:
        llm = LLM(model=model, dtype=args.dtype)
    except (ValueError, OSError) as err:
        print(f"tierkv generate: cannot load the model: {err}", file=sys.stderr)
        return 1
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    if args.no_chat_template or not llm.tokenizer.chat_template:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def _serve(argv: list[str]) -> int:
    from engine.server.cli import main as serve_main

    return serve_main(argv)


def _bench(argv: list[str]) -> int:
    from engine.bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS = {
    "generate": (_generate, "answer one prompt and print the text (default model: the embedded SmolLM2-135M-Instruct)"),
    "serve": (_serve, "OpenAI-compatible HTTP server on 0.0.0.0:8000 (/v1/completions, /v1/chat/completions, "
                      "/metrics)"),
    "bench": (_bench, "measure and print a table; `tierkv bench <name>`:"),
}

DESCRIPTION = """tierkv: an LLM inference engine (paged KV cache, prefix caching, continuous batching,
KV-cache offload to the kvstore daemon).

commands:
{commands}"""

EPILOG = """`tierkv <command> --help` lists a command's flags. Examples:
  tierkv generate --prompt "What is the capital of France?"
  tierkv serve /path/to/hf-dir-or.gguf --port 8000
  tierkv bench throughput --help"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command list for ``--help``, ``--version``, unknown commands refused."""
    lines = [f"  {name:<10}{help_line}" for name, (_, help_line) in COMMANDS.items()]
    width = max(map(len, BENCHMARKS))
    lines += [f"    {name:<{width}}  {help_line}" for name, (_, help_line) in BENCHMARKS.items()]
    parser = argparse.ArgumentParser(
        prog="tierkv", usage="%(prog)s [-h] [--version] {" + ",".join(COMMANDS) + "} ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION.format(commands="\n".join(lines)), epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("command", nargs="?", choices=COMMANDS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return COMMANDS[argv[0]][0](argv[1:])
    parser = build_parser()
    parser.parse_args(argv)  # exits: 0 after --help or --version, 2 on an unknown command or flag
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
