"""Spool fixtures: a backend-neutral ``backend`` fixture (file and Redis) for the contract suite."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import RedisServer, on_reactor

from kotlin_smtp_py.config import RedisConfig


@dataclass
class Backend:
    """Makes spool instances that share one store (like several processes would)."""

    name: str
    make: Callable[[], Any]  # called from the test thread
    instances: list[Any] = field(default_factory=list)

    def new(self) -> Any:
        spool = self.make()
        self.instances.append(spool)
        return spool


def redis_client(server: RedisServer, command_timeout_ms: int = 2000) -> Any:
    from kotlin_smtp_py.redisconn import connect

    return on_reactor(connect, RedisConfig(url=server.url, commandTimeoutMs=command_timeout_ms,
                                           connectTimeoutMs=5000))


@pytest.fixture
def redis_spool_factory(redis_server: RedisServer, tmp_path: Path,
                        reactor_thread: None) -> Iterator[Callable[..., Any]]:
    """``make(**kwargs)`` -> RedisSpool on a fresh client, all sharing one unique key prefix."""
    from kotlin_smtp_py.spool.redis import RedisSpool

    prefix = f"test-{uuid.uuid4().hex[:12]}:spool"
    made: list[tuple[Any, Any]] = []

    def make(**kwargs: Any) -> Any:
        client = redis_client(redis_server, kwargs.pop("command_timeout_ms", 2000))
        kwargs.setdefault("key_prefix", prefix)
        kwargs.setdefault("temp_dir", str(tmp_path / "temp"))
        spool = on_reactor(lambda: RedisSpool(client, **kwargs))
        made.append((spool, client))
        return spool

    yield make
    for spool, client in made:
        on_reactor(spool.close)
        on_reactor(client.close)


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            reactor_thread: None) -> Iterator[Backend]:
    if request.param == "file":
        from kotlin_smtp_py.spool.file import FileSpool

        directory = str(tmp_path / "spool")
        b = Backend("file", lambda: on_reactor(FileSpool, directory))
        yield b
        for spool in b.instances:
            if hasattr(spool, "release_all"):
                on_reactor(spool.release_all)
    else:
        factory = request.getfixturevalue("redis_spool_factory")
        yield Backend("redis", factory)
