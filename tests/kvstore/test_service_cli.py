"""The `kvstore` command: `serve` as a real subprocess (answers, stops on SIGTERM), `bench`, config errors."""

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from fixtures_services import free_port, obj_tier
from kvstore.cli import main
from kvstore.client import KVStoreClient
from kvstore.config import load_store_config
from service_daemon import NS, key, payload, running_daemon


def _kvstore_command() -> list[str]:
    script = shutil.which("kvstore")
    return [script] if script else [sys.executable, "-m", "kvstore.cli"]


def test_serve_subprocess_answers_and_stops_on_sigterm(tmp_path):
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "kvstore.yaml"
    # The flags override the file's listen address.
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:1", "tiers": [{"type": "memory", "bytes": "32MiB"}]}))
    process = subprocess.Popen(
        _kvstore_command() + ["serve", "--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == f"kvstore serving on 127.0.0.1:{port}"
        with KVStoreClient(f"grpc://127.0.0.1:{port}") as client:
            assert client.put(NS, [(key(1), payload(1, 3 << 20))]) == 1
            assert client.get(NS, [key(1), key(2)]) == [payload(1, 3 << 20), None]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert 'kvstore_rpcs_total{code="OK",method="Put"} 1.0' in response.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert f"kvstore daemon on port {port} stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"tiers": [{"type": "memory", "bytez": 5}]}))
    result = subprocess.run(_kvstore_command() + ["serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "tiers.0.memory.bytez" in result.stderr


def test_bench_in_process_each_tier(tmp_path, capsys, redis_url):
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"tiers": [{"type": "memory", "bytes": "16MiB"},
                                                {"type": "redis", "url": redis_url, "key_prefix": "bench:"}]}))
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", str(config), "--block-sizes", "4KiB,1MiB", "--blocks", "4",
                 "--batch", "2", "--baseline", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["tier"], r["block_bytes"], r["bad_blocks"]) for r in rows] == [
        ("in-process", "memory", 4096, 0), ("in-process", "memory", 1 << 20, 0),
        ("in-process", "redis", 4096, 0), ("in-process", "redis", 1 << 20, 0),
        ("raw-grpc", "-", 4096, 0), ("raw-grpc", "-", 1 << 20, 0)]
    assert all(r["put_gbps"] > 0 and r["get_p99_ms"] >= r["get_p50_ms"] > 0 for r in rows)
    assert "| in-process | redis | 1 MiB | 4 x 2 |" in capsys.readouterr().out


def test_bench_against_a_daemon(tmp_path, capsys, s3_bucket):
    endpoint, bucket = s3_bucket
    tiers = [{"type": "memory", "bytes": "16MiB"}, obj_tier(endpoint, bucket)]
    with running_daemon(tiers, promote_on_hit=False) as (_, url):
        out = tmp_path / "bench.json"
        assert main(["bench", "--url", url, "--block-sizes", "256KiB", "--blocks", "3", "--batch", "1",
                     "--json", str(out)]) == 0
        with KVStoreClient(url) as client:
            assert client.stats() == {}  # the bench removed its blocks
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["tier"], r["blocks"], r["bad_blocks"]) for r in rows] == [
        ("daemon", "memory", 3, 0), ("daemon", "obj", 3, 0)]
    assert "| daemon | obj | 256 KiB | 3 x 1 |" in capsys.readouterr().out


def test_example_deploy_config_is_valid():
    """It starts as the README says: on loopback, with no token to set first, and a bucket S3 accepts."""
    cfg = load_store_config(Path(__file__).resolve().parents[2] / "deploy" / "kvstore.yaml")
    assert ([t.tier_name for t in cfg.tiers], cfg.listen, cfg.auth_token_env) == (
        ["memory", "redis", "obj"], "127.0.0.1:50051", None)
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", cfg.tiers[2].bucket)
