"""RELIABILITY.md cites tests by name: every cited test must exist, so the page cannot go stale."""

import re

from tests.conftest import REPO


def test_every_test_cited_in_reliability_md_exists():
    text = (REPO / "RELIABILITY.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text) + re.findall(r"`, `::(\w+)`", text)
    assert len(cited) > 30
    current = None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)(?:\[[^\]]*\])?`", text):
        path, name = match.groups()
        current = path or current
        source = (REPO / current).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{current}::{name} is cited but missing"
