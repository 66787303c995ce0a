"""docs/policies.md shows the user policy class the tests run, verbatim."""

from __future__ import annotations

import re

from tests.connector.offload_helpers import REPO


def test_worked_example_is_the_tested_policy_class():
    doc = (REPO / "docs" / "policies.md").read_text()
    listings = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    example = next(code for code in listings if "class UserAllowList" in code)
    assert example in (REPO / "tests" / "connector" / "user_policy.py").read_text()
