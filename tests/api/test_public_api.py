"""The public API (interfaces, values, config schema, CLI) matches the committed snapshot."""

from __future__ import annotations

from kotlin_smtp_py import apicheck


def test_public_api_matches_snapshot() -> None:
    committed = apicheck.SNAPSHOT.read_text(encoding="utf-8")
    current = apicheck.render()
    assert current == committed, (
        "the public API changed: review the diff of `python -m kotlin_smtp_py.apicheck`, then "
        "run `make api-snapshot` and commit api/public-api.txt with a CHANGELOG entry")


def test_snapshot_lists_each_kind() -> None:
    text = apicheck.render()
    for marker in ("interface kotlin_smtp_py.interfaces.ISpool", "  deliver(",
                   "config smtp.limits.maxRecipients = 100", "cli kotlin-smtp queue",
                   "value kotlin_smtp_py.envelope.Envelope("):
        assert marker in text, marker
