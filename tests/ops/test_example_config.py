"""packaging/config.example.yaml uses only schema keys with well-typed values."""

from __future__ import annotations

from pathlib import Path

import yaml

from kotlin_smtp_py import config as cfg

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config.example.yaml"


def test_example_config_matches_the_schema() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    problems: list[str] = []
    built = cfg._build(cfg.Config, cfg._resolve_placeholders(raw, "", problems, {}), "",
                       problems)
    assert problems == []
    assert built.smtp.relay.requireAuthForRelay and built.smtp.relay.failOnOpenRelay
    assert [lst.port for lst in built.smtp.listeners] == [25, 587, 465]
    assert cfg.is_bcrypt_hash(built.smtp.auth.users["alice"])
