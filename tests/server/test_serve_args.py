"""`tierkv serve` flags and `--config` files: precedence, unknown keys, JSON errors."""

import json

import pytest

from engine.server.args import ConfigError, parse_serve_args


def test_defaults_serve_the_embedded_model_on_port_8000():
    config = parse_serve_args([])
    assert config.engine.model is None
    assert (config.host, config.port, config.api_key, config.shutdown_timeout) == ("0.0.0.0", 8000, None, 10.0)
    # Batch limits and the waiting-queue bound are filled in once the engine knows its device.
    e = config.engine
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.usage_context, config.max_waiting_requests) == (
        None, None, "server", None)


def test_flags_reach_the_engine_config():
    config = parse_serve_args([
        "/models/x", "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
        "--block-size", "32", "--dtype", "float32", "--seed", "7", "--gpu-memory-utilization", "0.5",
        "--kv-cache-dtype", "auto", "--served-model-name", "alpha", "beta", "--api-key", "k",
        "--kv-transfer-config", '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}',
        "--no-enable-prefix-caching", "--max-waiting-requests", "3", "--shutdown-timeout", "2.5"])
    e = config.engine
    assert (e.model, e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens, e.block_size) == ("/models/x", 512, 8, 64, 32)
    assert (e.dtype, e.seed, e.gpu_memory_utilization, e.enable_prefix_caching) == ("float32", 7, 0.5, False)
    assert e.kv_transfer_config == {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}
    assert e.served_model_name == "alpha" and config.served_model_names == ("alpha", "beta")
    assert (config.api_key, config.max_waiting_requests, config.shutdown_timeout) == ("k", 3, 2.5)


def test_long_prefill_token_threshold_as_a_flag_and_a_config_key(tmp_path):
    assert parse_serve_args([]).engine.long_prefill_token_threshold == 0
    assert parse_serve_args(["--long-prefill-token-threshold", "512"]).engine.long_prefill_token_threshold == 512
    path = tmp_path / "serve.yaml"
    path.write_text("long_prefill_token_threshold: 256\n")
    assert parse_serve_args(["--config", str(path)]).engine.long_prefill_token_threshold == 256


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_sets_options_and_flags_override_it(tmp_path, suffix):
    values = {"model": "/models/from-file", "port": 9001, "max_num_seqs": 4, "max-model-len": 256,
              "enable-prefix-caching": False, "served-model-name": ["a", "b"],
              "kv-transfer-config": {"kv_connector": "OffloadingConnector"}}
    path = tmp_path / f"serve.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("model: /models/from-file\nport: 9001\nmax_num_seqs: 4\nmax-model-len: 256\n"
                        "enable-prefix-caching: false\nserved-model-name: [a, b]\n"
                        "kv-transfer-config:\n  kv_connector: OffloadingConnector\n")
    config = parse_serve_args(["--config", str(path), "--port", "9002"])
    assert config.port == 9002
    assert config.engine.model == "/models/from-file"
    assert (config.engine.max_num_seqs, config.engine.max_model_len, config.engine.enable_prefix_caching) == (4, 256, False)
    assert config.served_model_names == ("a", "b")
    assert config.engine.kv_transfer_config == {"kv_connector": "OffloadingConnector"}
    assert parse_serve_args(["/cli/model", "--config", str(path)]).engine.model == "/cli/model"


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("port: 1\nmax-num-seq: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max-num-seq'; known keys: model, .*max-num-seqs"):
        parse_serve_args(["--config", str(path)])


@pytest.mark.parametrize("text, message", [
    ("{bad json", r"argument --kv-transfer-config: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"argument --kv-transfer-config: must be a JSON object, got list"),
])
def test_malformed_kv_transfer_config_is_a_clear_error(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_serve_args(["--kv-transfer-config", text])


@pytest.mark.parametrize("argv, message", [
    (["--port", "http"], r"argument --port: invalid int value: 'http'"),
    (["--port", "70000"], r"port must be in \[0, 65535\], got 70000"),
    (["--max-num-seqs", "0"], r"max_num_seqs must be a positive integer, got 0"),
    (["--block-size", "24"], r"block_size must be a power of two, got 24"),
    (["--long-prefill-token-threshold", "-1"],
     r"long_prefill_token_threshold must be an integer >= 0 \(0 = off\), got -1"),
    (["--shutdown-timeout", "-1"], r"shutdown-timeout must be >= 0 seconds, got -1.0"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_name_what_is_wrong(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_serve_args(argv)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*missing.yaml"):
        parse_serve_args(["--config", str(tmp_path / "missing.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- port\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping of option names to values, got list"):
        parse_serve_args(["--config", str(listed)])
    flag = tmp_path / "flag.yaml"
    flag.write_text("enable-prefix-caching: maybe\n")
    with pytest.raises(ConfigError, match=r"config key 'enable-prefix-caching' must be true or false, got 'maybe'"):
        parse_serve_args(["--config", str(flag)])


def test_cli_reports_bad_arguments_with_exit_status_2(capsys):
    from engine.server.cli import main

    assert main(["--kv-transfer-config", "{"]) == 2
    assert "tierkv serve: error: argument --kv-transfer-config: not valid JSON" in capsys.readouterr().err


def test_disable_log_stats_as_a_flag_and_a_config_key(tmp_path):
    assert parse_serve_args([]).log_stats is True
    assert parse_serve_args(["--disable-log-stats"]).log_stats is False
    config = tmp_path / "serve.yaml"
    config.write_text("disable-log-stats: true\n")
    parsed = parse_serve_args(["--config", str(config)])
    assert parsed.log_stats is False and parsed.engine.model is None
