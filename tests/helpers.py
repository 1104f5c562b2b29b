"""Shared test machinery: a reactor in a background thread, certificates, free ports, Redis.

Tests talk to servers over real loopback sockets with blocking clients (smtplib, raw sockets)
while Twisted runs in its own thread; ``on_reactor`` runs a function (or coroutine function) in
the reactor thread and waits for its result.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_reactor_thread: threading.Thread | None = None


def start_reactor() -> None:
    global _reactor_thread
    if _reactor_thread is not None:
        return
    from twisted.internet import reactor

    _reactor_thread = threading.Thread(
        target=lambda: reactor.run(installSignalHandlers=False),  # type: ignore[attr-defined]
        name="reactor", daemon=True)
    _reactor_thread.start()
    deadline = time.monotonic() + 10
    while not reactor.running and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)


def on_reactor(fn: Callable[..., Any], *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
    """Run ``fn`` in the reactor thread; coroutine results are awaited via Deferred."""
    import inspect

    from twisted.internet import defer, reactor, threads

    start_reactor()

    def call() -> Any:
        result = fn(*args, **kwargs)
        if inspect.iscoroutine(result):
            return defer.Deferred.fromCoroutine(result)
        return result

    def with_timeout() -> Any:
        d = defer.maybeDeferred(call)
        d.addTimeout(timeout, reactor)
        return d

    return threads.blockingCallFromThread(reactor, with_timeout)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], extra: Any) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (config overrides in tests)."""
    import copy

    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def listen_udp_and_tcp(reactor: Any, udp_protocol: Any, tcp_factory: Any,
                       interface: str = "127.0.0.1", attempts: int = 50) -> tuple[Any, Any]:
    """UDP and TCP listeners on one port number (a DNS server), from the reactor thread.

    The kernel picks the TCP port; the UDP port of that number may be taken by someone else,
    so retry a bounded number of times instead of failing the whole session's fixtures. TCP
    goes first because a factory may be listened with again at once, while a UDP protocol
    whose port was stopped keeps its transport until the reactor's next turn (Twisted asserts
    on reuse: that failed 38 tests' fixtures in one run when the retry was the other way)."""
    from twisted.internet.error import CannotListenError

    for _ in range(attempts):
        tcp = reactor.listenTCP(0, tcp_factory, interface=interface)
        try:
            return reactor.listenUDP(tcp.getHost().port, udp_protocol, interface=interface), tcp
        except CannotListenError:  # raised by bind(2), before the protocol is attached
            tcp.stopListening()
    raise RuntimeError(f"no port free for both UDP and TCP after {attempts} attempts")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # socket states in /proc/net/tcp


def tcp_socket_inodes(port: int, state: str = TCP_ESTABLISHED) -> set[str]:
    """Inodes of the sockets whose local port is ``port`` and whose TCP state is ``state``
    (server-side connections, or with TCP_LISTEN the listening sockets)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                inodes.add(f[9])
    return inodes


def process_socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds (none once it has exited)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for a listener started a little later.

    Taken from *below* the kernel's ephemeral range: a port the kernel picked for us (bind to
    0) can meanwhile become the local port of some outgoing connection, and the later listen
    then fails with EADDRINUSE (seen under load). Ports outside the range can only be taken by
    another explicit bind, which the bind test here rules out at pick time."""
    import random

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = max(1024, min(_ephemeral_range()[0], 65536) - 12000)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, low + 12000)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:  # fall back to the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class CertSet:
    ca_cert: Path
    cert: Path  # chain: leaf + CA
    key: Path
    wrong_cert: Path  # valid chain, but for a different host name
    wrong_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs(directory: Path, hostnames: tuple[str, ...] = ("localhost", "mx.test")) -> CertSet:
    """A private CA and server certificates for ``hostnames`` (+127.0.0.1, ::1), made now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("kotlin-smtp-py test CA"))
          .issuer_name(_name("kotlin-smtp-py test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(names: tuple[str, ...]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                 x509.IPAddress(ipaddress.ip_address("::1"))]
        cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
            serialization.Encoding.PEM)
        kpem = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
        return pem, kpem

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pem, kpem = leaf(hostnames)
    (directory / "server.pem").write_bytes(pem)
    (directory / "server.key").write_bytes(kpem)
    pem, kpem = leaf(("wrong.example",))
    (directory / "wrong.pem").write_bytes(pem)
    (directory / "wrong.key").write_bytes(kpem)
    return CertSet(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                   directory / "wrong.pem", directory / "wrong.key")


class RedisServer:
    """A private ``redis-server`` on a free loopback port (never the shared 6379)."""

    def __init__(self, appendonly: bool = False, replica_of: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found (make test installs it)")
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="kotlin-smtp-redis-")
        self.port = free_port()
        self.appendonly = appendonly
        self.replica_of = replica_of
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on ``self.port``; should another process take that port between the pick and
        the bind (our server then exits), start again on a fresh port (three tries)."""
        for attempt in range(3):
            args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                    self.dir, "--save", "", "--daemonize", "no",
                    "--logfile", os.path.join(self.dir, "log")]
            if self.appendonly:
                args += ["--appendonly", "yes", "--appendfsync", "always"]
            else:
                args += ["--appendonly", "no"]
            if self.replica_of is not None:
                args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
            self.proc = subprocess.Popen(args)
            proc = self.proc
            wait_until(lambda p=proc: p.poll() is not None or self._ours(),
                       timeout=10, message="redis-server to answer")
            if proc.poll() is None:
                return
            if attempt < 2:
                self.port = free_port()
        raise RuntimeError(f"redis-server did not start (see {self.dir}/log)")

    def _ours(self) -> bool:
        """Whether our redis-server answers on the port (not another process's)."""
        assert self.proc is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return f"process_id:{self.proc.pid}\r\n".encode() in data
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(appendonly: bool = False) -> RedisServer:
    """A started private redis-server. Missing Redis fails the test under CI=true (the
    suite must prove the Redis paths there) and skips it elsewhere."""
    import pytest

    try:
        server = RedisServer(appendonly=appendonly)
        server.start()
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is required under CI: {exc}")
        pytest.skip(f"redis-server unavailable: {exc}")
    return server


def redis_command(port: int, *args: Any, timeout: float = 5.0) -> Any:
    """One Redis command on a fresh connection to 127.0.0.1:``port`` (the tests' own view of
    a server, independent of the client under test); the decoded RESP reply."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        with s.makefile("rb") as f:
            return _read_resp(f)


def _read_resp(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        return f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise RuntimeError(f"unexpected RESP line {line!r}")


def smtp_reply(f: Any) -> bytes:
    """The last line of the next (possibly multi-line) SMTP reply on file ``f``."""
    while True:
        line = f.readline()
        assert line, "connection closed"
        if line[3:4] != b"-":
            return bytes(line)


def smtp_session(port: int, timeout: float = 30.0) -> tuple[socket.socket, Any]:
    """A raw SMTP session on 127.0.0.1:``port``, greeted and past EHLO: (socket, file)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    f = s.makefile("rb")
    assert smtp_reply(f).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert smtp_reply(f).startswith(b"250")
    return s, f
