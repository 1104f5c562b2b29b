"""Fixtures for suites that run ``twistd smtp`` as a real subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mtaproc import MtaPool


@pytest.fixture
def mtas(tmp_path: Path) -> Iterator[MtaPool]:
    with MtaPool(tmp_path) as pool:
        yield pool
