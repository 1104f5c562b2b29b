"""Fixtures for the multi-node suite: a private Redis per test, the token sink, node pools."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import start_redis
from mn_support import RedisServer, TokenSink
from mtaproc import MtaPool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running multi-process test (still part of "
                                       "make test)")


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only (no persistence)."""
    server = start_redis(appendonly=False)
    yield server
    server.cleanup()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only with ``appendonly yes`` + ``appendfsync always``."""
    server = start_redis(appendonly=True)
    yield server
    server.cleanup()


@pytest.fixture
def sink() -> Iterator[TokenSink]:
    s = TokenSink()
    yield s
    s.close()


@pytest.fixture
def nodes_pool(tmp_path: Path) -> Iterator[MtaPool]:
    with MtaPool(tmp_path) as pool:
        yield pool
