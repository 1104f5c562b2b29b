"""Multi-node helpers: a token-counting receiving SMTP sink, node configs, load clients, RESP.

The sink is a plain threaded socket server (no Twisted), so it keeps answering whatever the
nodes under test do. Every message the nodes relay carries an ``X-Token:`` header; the sink
counts a token as *delivered* only after its ``250`` to the final dot was written. Deliveries
can be *held* (the sink has read the whole message but does not answer) and a held session of a
node named in :attr:`TokenSink.dead` is dropped without an answer when released, so a message
held by a node that is then SIGKILLed can never count as delivered by that node.
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent.parent
for _p in (TESTS_DIR, TESTS_DIR / "integration"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from helpers import RedisServer, free_port, redis_command, wait_until  # noqa: E402
from mtaproc import MtaPool, MtaProcess, make_config  # noqa: E402

TOKEN_RE = re.compile(rb"^X-Token: ([A-Za-z0-9_.-]+)\r?$", re.M)
SINK_IO_TIMEOUT = 120.0  # a sink session never waits longer than this for anything
HOLD_LIMIT = 90.0  # a held delivery is answered 451 after this long (the test failed anyway)


@dataclass
class Attempt:
    """One message the sink read completely (a delivery attempt)."""

    token: str
    node: str  # the EHLO name of the delivering node
    sender: str
    rcpts: list[str]
    received: float  # monotonic time the final dot arrived
    outcome: str = "held"  # held | 250 | 451 | dropped


class TokenSink:
    """Receiving SMTP server on 127.0.0.1 that counts messages by their X-Token header."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(256)
        self._sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.delivered: Counter[str] = Counter()
        self.release = threading.Event()  # set: answer at once; clear: hold after the dot
        self.release.set()
        self.hold_only: set[str] | None = None  # hold only these nodes' deliveries (None: all)
        self.dead: set[str] = set()  # nodes whose held deliveries are dropped unanswered
        self.temp_fail_first: bool = False  # answer 451 to the first attempt of each token
        self.refuse_all: bool = False  # answer 451 to every message
        self.sessions = 0
        self.trace: list[tuple[float, str]] | None = None  # (time, line) when debugging
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="sink-accept",
                                          daemon=True)
        self._acceptor.start()

    # -- inspection --------------------------------------------------------------------------

    def delivered_tokens(self) -> Counter[str]:
        with self.lock:
            return Counter(self.delivered)

    def held(self) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.outcome == "held"]

    def attempts_for(self, token: str) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.token == token]

    def all_attempts(self) -> list[Attempt]:
        with self.lock:
            return list(self.attempts)

    # -- server ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.sessions += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="sink-session")
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(SINK_IO_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies to pipelined cmds
        reader = conn.makefile("rb")
        node = "?"
        sender = ""
        rcpts: list[str] = []

        def send(line: bytes) -> None:
            conn.sendall(line + b"\r\n")

        try:
            send(b"220 sink.test ESMTP")
            while not self._stop.is_set():
                raw = reader.readline(4096)
                if not raw:
                    return
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                if self.trace is not None:
                    self.trace.append((time.time(), line))
                verb = line.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    node = line.split(" ", 1)[1].strip() if " " in line else "?"
                    send(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 50000000"
                         if verb == "EHLO" else b"250 sink.test")
                elif verb == "MAIL":
                    sender = line[line.find("<") + 1:line.find(">")]
                    rcpts = []
                    send(b"250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpts.append(line[line.find("<") + 1:line.find(">")])
                    send(b"250 2.1.5 ok")
                elif verb == "DATA":
                    send(b"354 go ahead")
                    body = self._read_body(reader)
                    if body is None:
                        return
                    if not self._finish(conn, node, sender, rcpts, body):
                        return
                elif verb == "RSET" or verb == "NOOP":
                    send(b"250 2.0.0 ok")
                elif verb == "QUIT":
                    send(b"221 2.0.0 bye")
                    return
                else:
                    send(b"502 5.5.2 not implemented")
        except OSError:
            return
        except Exception as exc:  # a broken sink must fail the test, not hide
            with self.lock:
                self.errors.append(repr(exc))
        finally:
            try:
                reader.close()
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _read_body(reader: Any) -> bytes | None:
        lines: list[bytes] = []
        while True:
            raw = reader.readline(1 << 20)
            if not raw:
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(raw[1:] if raw.startswith(b".") else raw)

    def _finish(self, conn: socket.socket, node: str, sender: str, rcpts: list[str],
                body: bytes) -> bool:
        m = TOKEN_RE.search(body)
        token = m.group(1).decode("ascii") if m else f"<no token {uuid.uuid4().hex[:8]}>"
        if not sender:  # a DSN quotes the original's headers: count it apart from the original
            token = f"dsn:{token}"
        attempt = Attempt(token, node, sender, list(rcpts), time.monotonic())
        if self.trace is not None:
            self.trace.append((time.time(), f"<final dot of {token}>"))
        with self.lock:
            first = not any(a.token == token for a in self.attempts)
            self.attempts.append(attempt)
        if self.refuse_all or (self.temp_fail_first and first):
            with self.lock:
                attempt.outcome = "451"
            conn.sendall(b"451 4.3.0 try again (sink)\r\n")
            return True
        held = self.hold_only is None or node in self.hold_only
        if held and not self.release.wait(HOLD_LIMIT):
            with self.lock:
                attempt.outcome = "451"
            conn.sendall(b"451 4.3.0 held too long (sink)\r\n")
            return True
        with self.lock:
            if node in self.dead:
                attempt.outcome = "dropped"
                return False
        conn.sendall(b"250 2.0.0 accepted by sink\r\n")
        with self.lock:
            attempt.outcome = "250"
            self.delivered[token] += 1
        return True

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        try:
            self._sock.close()
        except OSError:
            pass
        self._acceptor.join(5)
        for t in list(self._threads):
            t.join(2)


# -- nodes -----------------------------------------------------------------------------------


def _supports_workers() -> bool:
    from kotlin_smtp_py.config import SmtpConfig

    return any(f.name == "workers" for f in dataclasses.fields(SmtpConfig))


def node_overrides(name: str, redis: RedisServer, prefix: str, sink_port: int, *,
                   lock_ttl: int = 900, concurrency: int = 8,
                   retry_delay: int = 1, log_level: str = "info") -> dict[str, Any]:
    smtp: dict[str, Any] = {
        "hostname": f"node-{name}.test",
        # commandTimeoutMs stays at its default (5 s): on a box loaded by other suites a 2 s
        # deadline can expire while the reply sits unread, and the client then gets a 451.
        "redis": {"url": redis.url, "connectTimeoutMs": 2000},
        "spool": {"type": "redis", "workerConcurrency": concurrency,
                  "retryDelaySeconds": retry_delay, "maxRetries": 50,
                  # delay notices at the first deferral: these tests count on those DSNs
                  "delayWarningSeconds": 0,
                  "redis": {"keyPrefix": prefix, "lockTtlSeconds": lock_ttl}},
        "relay": {"enabled": True, "requireAuthForRelay": False,
                  "allowedClientCidrs": ["127.0.0.0/8"],
                  "defaultRoute": {"host": "127.0.0.1", "port": sink_port,
                                   "startTlsEnabled": False},
                  "outboundTls": {"readTimeoutMs": 120000, "connectTimeoutMs": 5000}},
    }
    if _supports_workers():
        smtp["workers"] = 1  # one process per node: SIGKILL takes the whole node down
    return {"smtp": smtp, "logging": {"format": "text", "level": log_level}}


@dataclass
class Node:
    name: str
    proc: MtaProcess
    conf: dict[str, Any]

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def management_port(self) -> int:
        return int(self.conf["management"]["server"]["port"])

    @property
    def ehlo(self) -> str:
        return str(self.conf["smtp"]["hostname"])


def start_nodes(pool: MtaPool, names: list[str], redis: RedisServer, prefix: str,
                sink_port: int, **kwargs: Any) -> list[Node]:
    """Start every node without waiting, then wait for all banners (parallel start-up)."""
    nodes = []
    for name in names:
        root = pool.root()
        conf = make_config(root, overrides=node_overrides(name, redis, prefix, sink_port,
                                                          **kwargs))
        nodes.append(Node(name, pool.from_config(conf, root, start=False), conf))
    for node in nodes:
        node.proc.start(wait=False)
    for node in nodes:
        node.proc.wait_ready(timeout=60)
    return nodes


def readiness(node: Node, timeout: float = 5.0) -> int:
    """HTTP status of GET /actuator/health/readiness (0 when nothing answers)."""
    url = f"http://127.0.0.1:{node.management_port}/actuator/health/readiness"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


# -- messages and clients --------------------------------------------------------------------

SENDER = "sender@client.test"
RCPT = "rcpt@relay.test"


def new_token(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


def message(token: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {token}\r\nX-Token: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nbody of {token}\r\n").encode("ascii")


@dataclass
class Reply:
    token: str
    node: str
    code: int  # 0 = connection trouble before a reply to the final dot
    sent_dot: float  # monotonic time the final dot was handed to the socket
    answered: float


@dataclass
class LoadStats:
    replies: list[Reply] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, r: Reply) -> None:
        with self.lock:
            self.replies.append(r)

    def snapshot(self) -> list[Reply]:
        with self.lock:
            return list(self.replies)

    def count(self, pred: Any) -> int:
        with self.lock:
            return sum(1 for r in self.replies if pred(r))


def send_one(conn: smtplib.SMTP, node: str, token: str) -> Reply:
    """One transaction on an open connection; the reply to the final dot is recorded."""
    code, _ = conn.mail(SENDER)
    if code != 250:
        return Reply(token, node, code, time.monotonic(), time.monotonic())
    code, _ = conn.rcpt(RCPT)
    if code not in (250, 251):
        conn.rset()
        return Reply(token, node, code, time.monotonic(), time.monotonic())
    conn.putcmd("data")
    code, _ = conn.getreply()
    if code != 354:
        return Reply(token, node, code, time.monotonic(), time.monotonic())
    conn.send(message(token) + b".\r\n")
    sent = time.monotonic()
    code, _ = conn.getreply()
    return Reply(token, node, code, sent, time.monotonic())


def run_client(node: Node, tokens: list[str], stats: LoadStats, per_connection: int = 50,
               stop: threading.Event | None = None, errors: list[str] | None = None) -> None:
    """Send ``tokens`` to ``node``, ``per_connection`` transactions per connection."""
    i = 0
    while i < len(tokens) and not (stop is not None and stop.is_set()):
        try:
            with smtplib.SMTP("127.0.0.1", node.port, timeout=60) as conn:
                conn.ehlo("client.test")
                for _ in range(per_connection):
                    if i >= len(tokens) or (stop is not None and stop.is_set()):
                        break
                    stats.add(send_one(conn, node.name, tokens[i]))
                    i += 1
        except (OSError, smtplib.SMTPException) as exc:
            # the transaction in progress (tokens[i]) got no 250; record it and move on
            if i < len(tokens):
                stats.add(Reply(tokens[i], node.name, 0, time.monotonic(), time.monotonic()))
                i += 1
            if errors is not None:
                errors.append(f"{node.name}: {exc!r}")


def send_batch(node: Node, tokens: list[str]) -> list[Reply]:
    stats = LoadStats()
    run_client(node, tokens, stats)
    return stats.snapshot()


# -- Redis inspection (a few RESP commands over a raw socket) ---------------------------------


def queue_size(redis: RedisServer, prefix: str) -> int:
    return int(redis_command(redis.port, "ZCARD", f"{prefix}:due"))


def lock_keys(redis: RedisServer, prefix: str) -> list[bytes]:
    return list(redis_command(redis.port, "KEYS", f"{prefix}:lock:*") or [])


__all__ = ["Attempt", "LoadStats", "Node", "RedisServer", "Reply", "TokenSink", "lock_keys",
           "message", "new_token", "queue_size", "readiness", "run_client",
           "send_batch", "send_one", "start_nodes", "wait_until"]
