"""Every `tierkv` and `kvstore` command shown in README.md and docs/ is accepted by the command's
own parser: a renamed or removed flag fails here, not in a reader's terminal. (What the commands
then do is tested where they are: the README's first command in .ci/run, the benches in tests/bench
and tests/connector, the daemon in tests/kvstore.)"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from engine.bench.cli import BENCHMARKS
from engine.cli import generate_parser
from engine.server.args import build_parser as serve_parser
from kvstore.cli import build_parser as kvstore_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[\w-]*\n(.*?)^```", re.M | re.S)
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)='(.*?)'", re.M | re.S)
SHELL_VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each tierkv/kvstore command in a fenced block (continuations joined; each
    part of `&&`, `;` and `|` chains; leading VAR=value and a trailing `&` dropped; $VAR replaced by
    the value a `VAR='...'` line of the same block gives it). Lines of output (`tierkv serve: error:
    ...`) are not commands."""
    found = []
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            variables = dict(SHELL_ASSIGNMENT.findall(block))
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;|\|", line):
                    try:
                        words = shlex.split(part, comments=True)
                    except ValueError:
                        continue
                    words = [SHELL_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), w) for w in words]
                    while words and ENV_ASSIGNMENT.match(words[0]):
                        words.pop(0)
                    if words and words[-1] == "&":
                        words.pop()
                    if len(words) > 1 and words[0] in ("tierkv", "kvstore") and not words[1].endswith(":"):
                        found.append((f"{path.relative_to(ROOT)}: {part.strip()}", words))
    return found


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


COMMANDS = shown_commands()


def test_the_docs_show_commands_of_every_program():
    shown = {(words[0], words[1]) for _, words in COMMANDS}
    assert {("tierkv", "generate"), ("tierkv", "serve"), ("tierkv", "bench"), ("kvstore", "serve")} <= shown


@pytest.mark.parametrize("where, words", COMMANDS, ids=[where[:90] for where, _ in COMMANDS])
def test_shown_command_parses(where, words):
    try:
        parse(words)
    except SystemExit as e:
        if e.code not in (0, None):   # --help and --version exit 0
            raise AssertionError(f"{where}: the command's parser refused it (exit {e.code})") from None
