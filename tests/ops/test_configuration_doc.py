"""docs/CONFIGURATION.md documents exactly the keys of the config schema, once each."""

from __future__ import annotations

import re
from pathlib import Path

from kotlin_smtp_py.config import schema_keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+) \| (.+) \|$")


def documented() -> list[tuple[str, str, str]]:
    return [(m.group(1), m.group(2).strip(), m.group(3).strip())
            for m in map(ROW.match, DOC.read_text().splitlines()) if m]


def test_every_schema_key_is_documented_and_nothing_else() -> None:
    keys = [k for k, _, _ in documented()]
    schema = schema_keys()
    assert sorted(set(schema) - set(keys)) == [], "schema keys missing from docs/CONFIGURATION.md"
    assert sorted(set(keys) - set(schema)) == [], "docs/CONFIGURATION.md lists unknown keys"
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert duplicates == []


def test_every_row_has_a_default_and_a_meaning() -> None:
    for key, default, meaning in documented():
        assert default, key
        assert len(meaning) > 10, key


def test_added_metrics_key_is_documented() -> None:
    assert "management.metrics.trackedDomains" in {k for k, _, _ in documented()}
