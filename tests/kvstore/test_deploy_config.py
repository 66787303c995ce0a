"""The daemon config shipped in deploy/ is what `kvstore serve --config deploy/kvstore.yaml` loads:
it parses, needs no secret to start on loopback, and names a bucket S3 accepts."""

from __future__ import annotations

import re
from pathlib import Path

from kvstore.config import load_store_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kvstore.yaml"


def test_the_shipped_daemon_config_starts_without_a_token_on_loopback():
    cfg = load_store_config(str(DEPLOY))
    assert [t.tier_name for t in cfg.tiers] == ["memory", "redis", "obj"]
    assert cfg.auth_token_env is None
    bucket = cfg.tiers[2].bucket
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket), bucket
