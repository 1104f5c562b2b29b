"""redisconn through a real Redis Sentinel: discovery of the master, commands and scripts, and
a failover (the master stops, Sentinel promotes the replica, the client follows it).

Every process here is private: redis-server and ``redis-server --sentinel`` on free loopback
ports in temp dirs, stopped by the fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import RedisServer, free_port, on_reactor, redis_command, wait_until

from kotlin_smtp_py.config import RedisConfig
from kotlin_smtp_py.redisconn import LuaScript, RedisClient, connect

MASTER_NAME = "mymaster"


def raw_command(port: int, *args: Any, timeout: float = 2.0) -> Any:
    """One command on a fresh connection to 127.0.0.1:``port``; the decoded reply."""
    return redis_command(port, *args, timeout=timeout)


def try_command(port: int, *args: Any) -> Any:
    """``raw_command``, or None when the server is not reachable or answers an error."""
    try:
        return raw_command(port, *args)
    except (OSError, RuntimeError, ConnectionError):
        return None


def master_addr(sentinel_port: int) -> tuple[str, int] | None:
    reply = try_command(sentinel_port, "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
    if not reply:
        return None
    return reply[0].decode(), int(reply[1])


def info_field(port: int, section: str, name: str) -> str | None:
    reply = try_command(port, "INFO", section)
    if not isinstance(reply, bytes):
        return None
    for line in reply.decode().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1]
    return None


# -- processes -------------------------------------------------------------------------------

class SentinelServer:
    """A private ``redis-server --sentinel`` monitoring ``127.0.0.1:master_port``."""

    def __init__(self, master_port: int, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (make test installs it)")
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="kotlin-smtp-sentinel-")
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> str:
        path = os.path.join(self.dir, "sentinel.conf")  # rewritten by Sentinel: must be writable
        with open(path, "w") as fh:
            fh.write(f"port {self.port}\n"
                     "bind 127.0.0.1\n"
                     "daemonize no\n"
                     f"dir {self.dir}\n"
                     f"logfile {os.path.join(self.dir, 'log')}\n"
                     f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
                     f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                     f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                     f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        return path

    def start(self) -> None:
        """Start; should another process take the port first, again on a fresh one."""
        for attempt in range(3):
            self.proc = subprocess.Popen([self.exe, self._write_config(), "--sentinel"])
            proc = self.proc

            def settled(p: subprocess.Popen[bytes] = proc) -> bool:
                return p.poll() is not None or self._ours()

            wait_until(settled, timeout=10, message="redis sentinel to answer")
            if proc.poll() is None:
                return
            if attempt < 2:
                self.port = free_port()
        raise RuntimeError(f"redis sentinel did not start (see {self.dir}/log)")

    def _ours(self) -> bool:
        assert self.proc is not None
        return info_field(self.port, "server", "process_id") == str(self.proc.pid)

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "log")) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _require_redis() -> None:
    """Missing Redis fails under CI=true (as ``start_redis``) and skips elsewhere."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required under CI")
        pytest.skip("redis-server unavailable")


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Things to stop at the end of the test, stopped in reverse order."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.cleanup()


def start_master(procs: list[Any]) -> RedisServer:
    _require_redis()
    master = RedisServer()
    procs.append(master)
    master.start()
    return master


def start_sentinel(procs: list[Any], master_port: int) -> SentinelServer:
    sentinel = SentinelServer(master_port)
    procs.append(sentinel)
    sentinel.start()
    wait_until(lambda: master_addr(sentinel.port) == ("127.0.0.1", master_port), timeout=10,
               message="the sentinel to report the master")
    return sentinel


def sentinel_config(sentinel: SentinelServer, command_timeout_ms: int = 5000,
                    connect_timeout_ms: int = 5000) -> RedisConfig:
    # The URL names a port nobody listens on: only Sentinel can lead the client to Redis.
    return RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0",
                       sentinels=[f"127.0.0.1:{sentinel.port}"], masterName=MASTER_NAME,
                       connectTimeoutMs=connect_timeout_ms, commandTimeoutMs=command_timeout_ms)


def sentinel_knows_replica(sentinel_port: int, replica_port: int) -> bool:
    """Whether Sentinel lists 127.0.0.1:``replica_port`` as a healthy replica of the master."""
    for flat in try_command(sentinel_port, "SENTINEL", "replicas", MASTER_NAME) or []:
        state = {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2], strict=True)}
        if (state.get("ip"), state.get("port"), state.get("flags")) == (
                "127.0.0.1", str(replica_port), "slave"):
            return True
    return False


class _Closing:
    """Adapter so a client goes on the ``procs`` list (closed before the servers stop)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    def cleanup(self) -> None:
        on_reactor(self.client.close)


# -- tests -----------------------------------------------------------------------------------

def test_commands_and_scripts_through_sentinel(procs: list[Any], reactor_thread: None) -> None:
    master = start_master(procs)
    sentinel = start_sentinel(procs, master.port)

    client: RedisClient = on_reactor(connect, sentinel_config(sentinel))
    procs.append(_Closing(client))
    assert on_reactor(client.execute, "SET", "sent:k", b"\xff\x00v") == "OK"
    assert on_reactor(client.execute, "GET", "sent:k") == b"\xff\x00v"
    assert raw_command(master.port, "GET", "sent:k") == b"\xff\x00v"  # really on the master

    script = LuaScript("sentinel-test", "return {KEYS[1], redis.call('INCR', KEYS[1]), ARGV[1]}")
    assert on_reactor(client.eval, script, ["sent:n"], [b"\xfe"]) == [b"sent:n", 1, b"\xfe"]
    on_reactor(client.execute, "SCRIPT", "FLUSH")  # EVALSHA -> NOSCRIPT -> EVAL
    assert on_reactor(client.eval, script, ["sent:n"], ["x"]) == [b"sent:n", 2, b"x"]
    assert on_reactor(client.ping)[0] is True


def test_client_follows_a_sentinel_failover(procs: list[Any], reactor_thread: None) -> None:
    master = start_master(procs)
    raw_command(master.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")  # default 5 s
    replica = RedisServer(replica_of=master.port)
    procs.append(replica)
    replica.start()
    wait_until(lambda: info_field(replica.port, "replication", "master_link_status") == "up",
               timeout=15, message="the replica to sync")
    sentinel = start_sentinel(procs, master.port)
    # Sentinel learns of replicas from the master's INFO; it must know this one to promote it.
    wait_until(lambda: sentinel_knows_replica(sentinel.port, replica.port), timeout=15,
               message="the sentinel to discover the replica")

    # Discovery ignores a master Sentinel flags down and waits connectTimeoutMs before the
    # next try: a short one keeps the reconnect close to the failover.
    client: RedisClient = on_reactor(connect, sentinel_config(sentinel, command_timeout_ms=20000,
                                                              connect_timeout_ms=2000))
    procs.append(_Closing(client))
    assert on_reactor(client.execute, "SET", "sent:before", "1") == "OK"
    wait_until(lambda: try_command(replica.port, "GET", "sent:before") == b"1", timeout=10,
               message="the write to reach the replica")

    master.stop()
    wait_until(lambda: not client.connected, timeout=10, message="the client to see the master go")
    # Issued while no master is up: it waits for Sentinel to promote the replica (down after
    # 1 s, quorum 1) and for the client to reconnect there, within its 20 s deadline.
    assert on_reactor(client.execute, "SET", "sent:after", "2", timeout=40) == "OK"
    assert master_addr(sentinel.port) == ("127.0.0.1", replica.port), sentinel.log()
    assert info_field(replica.port, "replication", "role") == "master"
    assert raw_command(replica.port, "GET", "sent:after") == b"2"
    assert on_reactor(client.execute, "GET", "sent:before") == b"1"
