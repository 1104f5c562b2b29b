"""CLI fixtures: the subprocess server helpers live in tests/integration/mtaproc.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from mtaproc import MtaPool


@pytest.fixture
def mtas(tmp_path: Path) -> Iterator[MtaPool]:
    with MtaPool(tmp_path) as pool:
        yield pool
