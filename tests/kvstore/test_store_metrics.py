"""Per-tier Prometheus series move with the traffic that causes them."""

from prometheus_client import REGISTRY

from kvstore.store import TieredStore

NS = "abc123"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_tier_metrics_count_traffic(redis_url):
    tiers = [{"type": "memory", "name": "m-metrics", "bytes": 3000},
             {"type": "redis", "name": "r-metrics", "url": redis_url, "key_prefix": "metrics:"}]
    with TieredStore(tiers) as store:
        store.put(NS, [(bytes([i]) * 16, bytes([i]) * 1000) for i in range(4)])
        assert sample("kvstore_tier_bytes_in_total", tier="m-metrics") == 4000
        assert sample("kvstore_tier_evictions_total", tier="m-metrics") == 1
        assert sample("kvstore_tier_demotions_total", tier="r-metrics") == 1
        assert sample("kvstore_tier_bytes_in_total", tier="r-metrics") == 1000
        assert (sample("kvstore_tier_blocks", tier="m-metrics"), sample("kvstore_tier_bytes", tier="m-metrics")) == (3, 3000)

        assert store.get(NS, [bytes([i]) * 16 for i in (0, 3, 9)]) == [b"\x00" * 1000, b"\x03" * 1000, None]
        assert sample("kvstore_tier_hits_total", tier="m-metrics") == 1
        assert sample("kvstore_tier_misses_total", tier="m-metrics") == 2
        assert sample("kvstore_tier_hits_total", tier="r-metrics") == 1
        assert sample("kvstore_tier_misses_total", tier="r-metrics") == 1
        assert sample("kvstore_tier_bytes_out_total", tier="r-metrics") == 1000
        assert sample("kvstore_tier_op_seconds_count", tier="r-metrics", op="get") == 1
        assert sample("kvstore_tier_up", tier="r-metrics") == 1
        assert sample("kvstore_tier_errors_total", tier="r-metrics", op="get") == 0
