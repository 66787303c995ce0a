"""`kvstore bench` in-process prints each Redis / S3 tier's get rate beside its bare client's."""

import json

import redis

from fixtures_services import obj_tier, s3_client
from kvstore.cli import main


def test_bench_prints_raw_client_rates_and_ratios(tmp_path, capsys, redis_url, s3_bucket):
    endpoint, bucket = s3_bucket
    config = tmp_path / "bench.json"
    config.write_text(json.dumps({"tiers": [
        {"type": "memory", "bytes": "16MiB"},
        {"type": "redis", "url": redis_url, "key_prefix": "rawbench:", "batch_connections": 2},
        obj_tier(endpoint, bucket, max_inflight=4)]}))
    out = tmp_path / "bench-out.json"
    assert main(["bench", "--config", str(config), "--block-sizes", "64KiB,1MiB", "--blocks", "6", "--batch", "3",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| raw get GB/s | get/raw |" in table.splitlines()[0]
    rows = {(cells[1], cells[2]): cells for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    saved = {(r["tier"], r["block_bytes"] >> 10): r for r in json.loads(out.read_text())}
    assert rows[("memory", "64 KiB")][-2:] == ["-", "-"]
    assert saved[("memory", 64)]["raw_get_gbps"] is None
    for tier in ("redis", "obj"):
        for block, kib in (("64 KiB", 64), ("1 MiB", 1024)):
            cells, result = rows[(tier, block)], saved[(tier, kib)]
            assert cells[10] == "0" and result["raw_get_gbps"] > 0
            assert cells[11:] == [f"{result['raw_get_gbps']:.3f}", f"{result['get_gbps'] / result['raw_get_gbps']:.2f}"]
    # The bare clients removed what they wrote, as the store did.
    assert redis.Redis.from_url(redis_url).keys("rawbench:*") == []
    assert s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", []) == []
