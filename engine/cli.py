"""`tierkv` command line: generate, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tierkv generate", description="Answer one prompt and print the text.")
    p.add_argument("model", nargs="?", default=None, help="HF model directory or GGUF file (default: embedded SmolLM2)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the prompt as raw text instead of a user chat message")
    args = p.parse_args(argv)

    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"generate": _generate, "serve": _serve, "bench": _bench}
    if not argv or argv[0] not in commands:
        print(f"usage: tierkv {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
