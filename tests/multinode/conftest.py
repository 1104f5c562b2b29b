"""Fixtures for the multi-node suite: a private Redis per test, the token sink, node pools."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mn_support import RedisServer, TokenSink
from mtaproc import MtaPool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running multi-process test (still part of "
                                       "make test)")


def _redis(appendonly: bool) -> RedisServer:
    try:
        server = RedisServer(appendonly=appendonly)
        server.start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is required under CI: {exc}")
        pytest.skip(f"redis-server unavailable: {exc}")
    return server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only (no persistence)."""
    server = _redis(appendonly=False)
    yield server
    server.cleanup()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only with ``appendonly yes`` + ``appendfsync always``."""
    server = _redis(appendonly=True)
    yield server
    server.cleanup()


@pytest.fixture
def sink() -> Iterator[TokenSink]:
    s = TokenSink()
    yield s
    s.close()


@pytest.fixture
def nodes_pool(tmp_path: Path) -> Iterator[MtaPool]:
    pool = MtaPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()
