"""The daemon's metrics port: per-tier counters at 0 from start, held blocks/bytes current after a
Put or Delete without any Stats call, and prometheus_client's process_*/python_* collectors."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.kvstore.service_daemon import NS, daemon_and_client, key, payload

COUNTERS = ("kvstore_tier_hits_total", "kvstore_tier_misses_total", "kvstore_tier_bytes_in_total",
            "kvstore_tier_bytes_out_total", "kvstore_tier_evictions_total", "kvstore_tier_demotions_total",
            "kvstore_tier_promotions_total", "kvstore_tier_corrupt_total")


def scrape(port: int) -> dict[tuple[str, str | None], float]:
    """(sample name, its tier label or None) -> value, from the daemon's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, s.labels.get("tier")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_fresh_daemon_then_put_and_delete_without_stats():
    tiers = [{"type": "memory", "name": "mport-mem", "bytes": "16MiB"},
             {"type": "memory", "name": "mport-low", "bytes": "16MiB"}]
    with daemon_and_client(tiers, metrics_port=0) as (handle, client):
        fresh = scrape(handle.metrics_port)
        for tier in ("mport-mem", "mport-low"):
            for name in COUNTERS:
                assert fresh[(name, tier)] == 0, (name, tier)
            assert fresh[("kvstore_tier_up", tier)] == 1
        assert fresh[("process_cpu_seconds_total", None)] > 0
        assert ("python_gc_collections_total", None) in fresh

        assert client.put(NS, [(key(i), payload(i, 4096)) for i in range(3)]) == 3
        after_put = scrape(handle.metrics_port)
        assert after_put[("kvstore_tier_blocks", "mport-mem")] == 3
        assert after_put[("kvstore_tier_bytes", "mport-mem")] == 3 * 4096
        assert after_put[("kvstore_tier_bytes_in_total", "mport-mem")] == 3 * 4096

        assert client.delete(NS, [key(0)]) == 1
        after_delete = scrape(handle.metrics_port)
        assert after_delete[("kvstore_tier_blocks", "mport-mem")] == 2
        assert after_delete[("kvstore_tier_bytes", "mport-mem")] == 2 * 4096
