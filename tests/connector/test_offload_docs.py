"""The offloading docs stay true to the code: every config key and metric is documented, and the
user policy class in docs/policies.md is the one the tests run, verbatim."""

from __future__ import annotations

import re

from engine.connector.config import KVTransferConfig, OffloadConfig
from engine.connector.metrics import ConnectorMetrics
from tests.connector.offload_helpers import REPO

DOCS = REPO / "docs"


def test_every_config_key_and_metric_is_in_the_offloading_doc():
    doc = (DOCS / "offloading.md").read_text()
    table_keys = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.M))
    assert set(OffloadConfig.model_fields) | set(KVTransferConfig.model_fields) <= table_keys
    metrics = {family.name for family in ConnectorMetrics("m").registry.collect()}
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"`(tierkv:offload_\w+?)(?:\{\w+\})?`", doc)}
    assert metrics == documented


def test_worked_example_is_the_tested_policy_class():
    doc = (DOCS / "policies.md").read_text()
    listings = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    example = next(code for code in listings if "class UserAllowList" in code)
    assert example in (REPO / "tests" / "connector" / "user_policy.py").read_text()
