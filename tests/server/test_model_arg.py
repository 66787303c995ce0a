"""A Hub id (or any model that is not a local path) is one line naming it and what is accepted, exit 2,
before anything loads; for `tierkv generate` and `tierkv serve`, positional or --model."""

import subprocess

import pytest

from engine.cli import main
from engine.server.args import parse_serve_args
from tests.server.test_serve_process import tierkv_command

HUB_ID = "Qwen/Qwen3-0.6B"
NOT_LOCAL = ("model 'Qwen/Qwen3-0.6B' is not a local directory or .gguf file, and tierkv does not download from "
             "the Hugging Face Hub: pass a local HF model directory (config.json and weights) or a .gguf file, or "
             "leave the model out for the embedded SmolLM2-135M-Instruct")


@pytest.mark.parametrize("argv", [
    ["generate", "--model", HUB_ID, "--prompt", "hi"],
    ["generate", HUB_ID, "--prompt", "hi"],
    ["serve", HUB_ID],
    ["serve", "--model", HUB_ID, "--port", "1"],
])
def test_a_hub_id_is_one_line_and_exit_2(capsys, argv):
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f"tierkv {argv[0]}: error: {NOT_LOCAL}\n"


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"]])
def test_a_model_given_twice_differently_is_refused(capsys, tiny_model_dir, command):
    assert main([*command, tiny_model_dir, "--model", HUB_ID]) == 2
    assert capsys.readouterr().err == (f"tierkv {command[0]}: error: the model is given twice, as {tiny_model_dir!r} "
                                       f"and as --model {HUB_ID!r}; give it once\n")


def test_a_file_that_is_not_gguf_names_what_is_expected(capsys, tiny_model_dir):
    config = f"{tiny_model_dir}/config.json"
    assert main(["serve", "--model", config]) == 2
    assert capsys.readouterr().err == (f"tierkv serve: error: model {config!r}: a file must be a .gguf; "
                                       "otherwise pass the HF model directory\n")


def test_the_real_command_prints_no_traceback():
    proc = subprocess.run([*tierkv_command(), "generate", "--model", HUB_ID, "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"tierkv generate: error: {NOT_LOCAL}\n"


def test_model_as_a_flag_reaches_the_engine_config(tiny_model_dir, tmp_path):
    assert parse_serve_args(["--model", tiny_model_dir]).engine.model == tiny_model_dir
    assert parse_serve_args([tiny_model_dir, "--model", tiny_model_dir]).engine.model == tiny_model_dir
    config = tmp_path / "serve.yaml"
    config.write_text("model: /models/from-file\n")
    assert parse_serve_args(["--config", str(config), "--model", tiny_model_dir]).engine.model == tiny_model_dir
