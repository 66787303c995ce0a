"""Tier and daemon config: accepted shapes, and errors that name the key without echoing secrets."""

import json

import pytest

from kvstore.config import ConfigError, load_store_config, parse_bytes, parse_store_config, parse_tiers


def test_issue_example_parses(tmp_path):
    path = tmp_path / "kvstore.yaml"
    path.write_text(
        "listen: 127.0.0.1:50051\n"
        "metrics_port: 9400\n"
        "auth_token_env: KVSTORE_TOKEN\n"
        "tiers:\n"
        "  - {type: memory, bytes: 8GiB}\n"
        '  - {type: redis, url: "redis://localhost:6379/0", ttl_s: 86400}\n'
        '  - {type: obj, bucket: kvs, endpoint_override: "localhost:9000", scheme: http,'
        " access_key: AKIDSECRET, secret_key: SKSECRET, region: us-east-1}\n"
    )
    cfg = load_store_config(path)
    assert [t.tier_name for t in cfg.tiers] == ["memory", "redis", "obj"]
    assert cfg.tiers[0].bytes == 8 * 2**30
    assert cfg.tiers[2].endpoint_url == "http://localhost:9000"
    assert cfg.metrics_port == 9400 and cfg.promote_on_hit is True
    assert "SECRET" not in repr(cfg) and "SECRET" not in str(cfg.model_dump())


def test_json_and_s3_alias(tmp_path):
    path = tmp_path / "kvstore.json"
    path.write_text(json.dumps({"tiers": [{"type": "s3", "bucket": "bkt", "name": "cold"}], "max_message_bytes": "16MiB"}))
    cfg = load_store_config(path)
    assert cfg.tiers[0].type == "obj" and cfg.tiers[0].tier_name == "cold"
    assert cfg.max_message_bytes == 16 * 2**20


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([{"type": "memory", "bytez": 1}], "tiers.0.memory.bytez: Extra inputs are not permitted"),
        ([{"type": "redis", "url": "http://h:1"}], "tiers.0.redis.url: expected a redis://, rediss:// or unix:// URL"),
        ([{"type": "memory", "bytes": "8XB"}], "tiers.0.memory.bytes: expected a byte size such as 8GiB"),
        ([{"type": "tape"}], "tiers.0: Input tag 'tape' found using 'type' does not match"),
        ([{"type": "memory"}, {"type": "memory"}], "tier names must be unique; repeated: ['memory']"),
        ([{"type": "obj", "bucket": "bkt", "access_key": "AKIDSECRET"}], "access_key and secret_key must be given together"),
        ([{"type": "redis", "url": "unix:///run/SECRET.sock", "cluster": True}],
         "tiers.0.redis.cluster: a Redis Cluster is reached over redis:// or rediss://"),
        ([{"type": "redis", "url": "redis://:SECRET@h:1/2", "cluster": True}],
         "tiers.0.redis.cluster: a Redis Cluster has only database 0"),
        ([{"type": "redis", "url": "redis://:SECRET@h:1?db=5", "cluster": True}],
         "tiers.0.redis.cluster: a Redis Cluster has only database 0"),
        ([{"type": "redis", "cluster": "sometimes"}], "tiers.0.redis.cluster: Input should be a valid boolean"),
        ([{"type": "redis", "pool_size": 2, "batch_connections": 3}],
         "tiers.0.redis.batch_connections: must be at most pool_size"),
        ([{"type": "redis", "batch_connections": 0}], "tiers.0.redis.batch_connections: Input should be greater than"),
    ],
)
def test_bad_tiers_name_the_key(tiers, message):
    with pytest.raises(ConfigError) as err:
        parse_tiers(tiers)
    assert message in str(err.value)
    assert "SECRET" not in str(err.value)


BUCKET_RULE = ("expected an S3 bucket name: 3-63 characters, lowercase letters, digits, dots and hyphens, "
               "beginning and ending with a letter or digit")


@pytest.mark.parametrize("bucket", ["b", "ab", "x" * 64, "Tierkv", "tierkv_kv", "-tierkv", "tierkv.", ""])
def test_bucket_names_s3_refuses_are_config_errors(bucket):
    with pytest.raises(ConfigError) as err:
        parse_store_config({"tiers": [{"type": "obj", "bucket": bucket}]})
    assert str(err.value) == f"invalid kvstore config: tiers.0.obj.bucket: {BUCKET_RULE}"


@pytest.mark.parametrize("bucket", ["abc", "x" * 63, "tierkv-kv", "kv.cache-01", "0ab"])
def test_bucket_names_s3_accepts(bucket):
    assert parse_store_config({"tiers": [{"type": "obj", "bucket": bucket}]}).tiers[0].bucket == bucket


def test_bad_file_reports_position_not_content(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tiers:\n  - {type: redis, url: 'redis://:hunter2@h:6379/0'\n")
    with pytest.raises(ConfigError) as err:
        load_store_config(path)
    assert "not valid YAML at line" in str(err.value) and "hunter2" not in str(err.value)
    top = tmp_path / "top.yaml"
    top.write_text("listen: 1.2.3.4:5\nlisten_port: 7\n")
    with pytest.raises(ConfigError, match="listen_port: Extra inputs are not permitted"):
        load_store_config(top)


def test_redis_cluster_and_batch_keys():
    (single, cluster) = parse_tiers([{"type": "redis"},
                                     {"type": "redis", "name": "c", "url": "rediss://:pw@node:7000/0", "cluster": True,
                                      "pool_size": 8, "batch_connections": 8}])
    assert (single.cluster, single.batch_connections, single.pool_size) == (False, 4, 16)
    assert (cluster.cluster, cluster.batch_connections) == (True, 8)


def test_redis_url_password_hidden():
    (tier,) = parse_tiers([{"type": "redis", "url": "redis://:hunter2@cache:6380/2"}])
    assert tier.safe_url == "redis://cache:6380/2"
    assert "hunter2" not in repr(tier)


def test_parse_bytes():
    assert [parse_bytes(v) for v in (4096, "4KiB", "1.5GB", "2 MiB")] == [4096, 4096, 1_500_000_000, 2 * 2**20]
    with pytest.raises(ValueError):
        parse_bytes(-1)
