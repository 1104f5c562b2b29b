"""Session fixtures: test certificates, a private Redis server, the reactor thread."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import CertSet, RedisServer, make_certs, start_reactor, start_redis


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def reactor_thread() -> None:
    start_reactor()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server. Missing Redis fails under CI=true instead of skipping."""
    server = start_redis()
    yield server
    server.cleanup()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    for sub in ("spool", "mailboxes", "temp", "lists"):
        (tmp_path / sub).mkdir()
    return tmp_path
