"""Hunting for crashes and leaks in the management HTTP server and the operator CLI.

Tests marked ``xfail(strict=True)`` document a confirmed bug; the others cover behaviour that
tests/ops/test_management_http.py and tests/cli/test_cli.py do not already pin down.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from helpers import deep_merge, free_port, on_reactor
from prometheus_client.parser import text_string_to_metric_families

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.config import Config
from kotlin_smtp_py.metrics import METRIC_NAMES, Metrics
from kotlin_smtp_py.service import SmtpService
from kotlin_smtp_py.web.health import Readiness
from kotlin_smtp_py.web.site import make_management_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from mtaproc import KOTLIN_SMTP, make_config, proc_env, write_config

ENDPOINTS = ["/actuator", "/actuator/health", "/actuator/health/liveness",
             "/actuator/health/readiness", "/livez", "/readyz", "/actuator/info",
             "/actuator/prometheus", "/metrics", "/actuator/metrics"]
AUTH_SECRET = "Hunt-Auth-S3cret-4e1d"
ROUTE_SECRET = "Hunt-Route-S3cret-77aa"
REDIS_SECRET = "Hunt-Redis-S3cret-c0de"


# -- helpers ----------------------------------------------------------------------------------


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (bounded by the socket timeout)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return out


@pytest.fixture
def site_port(reactor_thread: None) -> Iterator[int]:
    """The management site with default config (everything exposed) on a loopback port."""
    site = make_management_site(Config(), Metrics(["example.com"]), [], Readiness())

    def listen() -> Any:
        from twisted.internet import reactor
        return reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]

    port = on_reactor(listen)
    yield int(port.getHost().port)
    on_reactor(port.stopListening)


@pytest.fixture
def make_service(tmp_path: Path, reactor_thread: None) -> Iterator[Callable[..., SmtpService]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None) -> SmtpService:
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists", "mailboxes/alice"):
            (root / sub).mkdir(parents=True)
        base: dict[str, Any] = {"smtp": {
            "hostname": "mx.test",
            "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
            "routing": {"localDomain": "localhost"},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool")},
            "lifecycle": {"gracefulShutdownTimeoutMs": 1000}},
            "management": {"server": {"port": 0, "bindAddress": "127.0.0.1"}}}
        config = cfg.load_text(yaml.safe_dump(deep_merge(base, overrides or {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


def mgmt_port(svc: SmtpService) -> int:
    return int(svc.management_port.getHost().port)


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([KOTLIN_SMTP, *args], input=stdin, capture_output=True, timeout=60,
                          env=proc_env())


def assert_clean_failure(res: subprocess.CompletedProcess[bytes], code: int) -> None:
    assert b"Traceback" not in res.stderr, res.stderr.decode(errors="replace")
    assert res.returncode == code, (res.returncode, res.stderr.decode(errors="replace"))


# -- HTTP: methods ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_other_methods_answer_405_without_server_version(site_port: int, method: str) -> None:
    for path in ENDPOINTS + ["/nope"]:
        code, headers, body = request(site_port, method, path, body=b"")
        assert code in (404, 405), (method, path, code)
        assert "twisted" not in headers.get("server", "").lower(), (method, path, headers)
        assert b"Traceback" not in body


def test_traversal_ish_paths_and_query_strings(site_port: int) -> None:
    for path in ["/actuator/../metrics", "/actuator/health/../../metrics", "//metrics",
                 "/%2e%2e/metrics", "/actuator/%2e%2e/info", "/metrics%2f", "/metrics;x=1",
                 "/actuator/health/%00", "/%C3%A9%ff",
                 "/actuator/info/../../../../etc/passwd", "/" + "a" * 8000]:
        code, headers, body = request(site_port, "GET", path)
        assert code == 404, path
        assert json.loads(body) == {"status": 404, "error": "Not Found"}
        assert headers["server"] == "kotlin-smtp"
    for path in ENDPOINTS:  # query strings and repeated trailing slashes are ignored
        code, _, body = request(site_port, "GET", path + "///?x=1&y&%zz=%00#frag")
        assert code == 200, path
        assert b"Traceback" not in body


def test_oversized_request_is_refused_and_server_keeps_answering(site_port: int) -> None:
    huge_url = b"GET /metrics?" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    huge_header = (b"GET /actuator/health HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 70000
                   + b"\r\n\r\n")
    many_headers = b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 600 + b"\r\n"
    for data in (huge_url, huge_header, many_headers):
        reply = raw_exchange(site_port, data)
        assert reply == b"" or reply.split(b" ", 2)[1] in (b"400", b"413", b"414", b"431"), \
            reply[:200]
    assert request(site_port, "GET", "/livez")[0] == 200


def test_options_asterisk_and_absolute_form_do_not_crash(site_port: int) -> None:
    reply = raw_exchange(site_port, b"OPTIONS * HTTP/1.0\r\n\r\n")
    assert not reply.startswith(b"HTTP/1.0 5"), reply
    reply = raw_exchange(site_port, b"GET /\xff\xfe HTTP/1.0\r\n\r\n")
    assert reply.split(b" ", 2)[1] in (b"400", b"404"), reply
    assert request(site_port, "GET", "/livez")[0] == 200


# -- HTTP: metrics negotiation ----------------------------------------------------------------


@pytest.mark.parametrize("accept", [
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",  # what Prometheus sends
    "application/openmetrics-text; version=1.0.0",
    "application/json", "*/*", "",
])
def test_metrics_content_type_matches_body_whatever_accept(site_port: int, accept: str) -> None:
    for path in ("/metrics", "/actuator/prometheus"):
        code, headers, body = request(site_port, "GET", path, headers={"Accept": accept})
        assert code == 200
        ctype = headers["content-type"]
        if ctype.startswith("application/openmetrics-text"):
            from prometheus_client.openmetrics.parser import (
                text_string_to_metric_families as om_families,
            )
            names = {f.name for f in om_families(body.decode())}
            assert body.endswith(b"# EOF\n")
        else:
            assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
            assert b"# EOF" not in body
            names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {n.removesuffix("_total") for n in METRIC_NAMES} <= names
        head = request(site_port, "HEAD", path, headers={"Accept": accept})
        assert head[0] == 200 and head[2] == b""
        assert head[1]["content-length"] == str(len(body))


# -- HTTP: a real service ---------------------------------------------------------------------


def test_health_probes_info_never_show_secrets(make_service: Callable[..., SmtpService]
                                               ) -> None:
    dead = free_port()  # nothing listens there: Redis is "down"
    svc = make_service({"smtp": {
        "auth": {"enabled": True, "users": {"alice": AUTH_SECRET}},
        "relay": {"enabled": True, "defaultRoute": {
            "host": "smarthost.test", "port": 587, "username": "relayuser",
            "password": ROUTE_SECRET}},
        "redis": {"url": f"redis://user:{REDIS_SECRET}@127.0.0.1:{dead}/0",
                  "connectTimeoutMs": 200},
        "rateLimit": {"backend": "redis"}}})
    port = mgmt_port(svc)
    seen = b""
    for path in ENDPOINTS:
        code, _, body = request(port, "GET", path)
        seen += body
        if path in ("/actuator/health", "/readyz", "/actuator/health/readiness"):
            assert code == 503, (path, body)
            assert json.loads(body)["components"]["redis"]["status"] == "DOWN"
    for secret in (AUTH_SECRET, ROUTE_SECRET, REDIS_SECRET, "relayuser", "user:"):
        assert secret.encode() not in seen, secret
    info = json.loads(request(port, "GET", "/actuator/info")[2])
    assert set(info) == {"app", "uptime_seconds"}
    assert set(info["app"]) == {"name", "version"}


def test_readiness_down_while_spool_dir_missing_then_back(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service()
    port = mgmt_port(svc)
    queue_dir = Path(svc.config.smtp.spool.dir) / "queue"
    assert request(port, "GET", "/readyz")[0] == 200
    moved = queue_dir.with_name("queue.moved")
    queue_dir.rename(moved)
    try:
        code, _, body = request(port, "GET", "/readyz")
        assert code == 503
        assert json.loads(body)["components"]["spool"]["status"] == "DOWN"
        assert request(port, "GET", "/livez")[0] == 200  # liveness does not follow the spool
    finally:
        moved.rename(queue_dir)
    assert request(port, "GET", "/readyz")[0] == 200


def test_readiness_down_when_spool_queue_is_not_a_directory(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service()
    port = mgmt_port(svc)
    queue_dir = Path(svc.config.smtp.spool.dir) / "queue"
    moved = queue_dir.with_name("queue.moved")
    queue_dir.rename(moved)
    queue_dir.write_bytes(b"")
    try:
        code, _, body = request(port, "GET", "/readyz")
        assert code == 503, body
    finally:
        queue_dir.unlink()
        moved.rename(queue_dir)


# -- CLI: check-config ------------------------------------------------------------------------


def test_check_config_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x00\xff\xfe\x80\x81binary")
    res = run_cli("check-config", str(path))
    assert_clean_failure(res, 2)
    assert b"binary.yaml" in res.stderr


def test_check_config_directory_and_queue_with_missing_config(tmp_path: Path) -> None:
    res = run_cli("check-config", str(tmp_path))
    assert_clean_failure(res, 2)
    assert b"Is a directory" in res.stderr
    res = run_cli("queue", "list", "--config", str(tmp_path / "absent.yaml"))
    assert_clean_failure(res, 2)
    assert b"absent.yaml" in res.stderr


# -- CLI: hash-password -----------------------------------------------------------------------


def test_hash_password_non_utf8_stdin(tmp_path: Path) -> None:
    res = run_cli("hash-password", "--stdin", stdin=b"\xff\xfe\x80secret\n")
    assert_clean_failure(res, 2)
    assert res.stdout == b""


@pytest.mark.parametrize("rounds", ["0", "3", "32", "-1"])
def test_hash_password_rounds_out_of_range_is_usage_error(rounds: str) -> None:
    res = run_cli("hash-password", "--stdin", "--rounds", rounds, stdin=b"pw\n")
    assert_clean_failure(res, 2)


def test_hash_password_long_and_eof_stdin() -> None:
    long_pw = b"p" * 100_000
    res = run_cli("hash-password", "--stdin", "--rounds", "4", stdin=long_pw + b"\n")
    assert res.returncode == 0, res.stderr
    hashed = res.stdout.strip()
    assert bcrypt.checkpw(long_pw[:72], hashed)  # bcrypt's 72-byte limit, no crash
    res = run_cli("hash-password", "--stdin", stdin=b"")
    assert_clean_failure(res, 2)
    assert res.stdout == b""


# -- CLI: queue -------------------------------------------------------------------------------


@pytest.fixture
def file_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.yaml", make_config(tmp_path / "data"))


BAD_IDS = ["../../etc/passwd", "/etc/passwd", "..", "a/b", "x" * 5000, "tx\x7f", " "]


@pytest.mark.parametrize("action", ["show", "delete"])
def test_queue_show_delete_malformed_ids(file_config: Path, action: str) -> None:
    before = Path("/etc/passwd").read_bytes()
    for qid in BAD_IDS:
        res = run_cli("queue", action, qid, "--config", str(file_config))
        assert_clean_failure(res, 1)
        assert res.stdout == b""
    assert Path("/etc/passwd").read_bytes() == before


@pytest.mark.parametrize("qid", ["../../etc/passwd", "x" * 5000])
def test_queue_retry_malformed_id(file_config: Path, qid: str) -> None:
    res = run_cli("queue", "retry", qid, "--config", str(file_config))
    assert_clean_failure(res, 1)
    assert b"no such entry" in res.stderr


@pytest.mark.parametrize("action", ["list", "show", "flush"])
def test_queue_with_redis_down(tmp_path: Path, action: str) -> None:
    dead = free_port()
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "redis": {"url": f"redis://:{REDIS_SECRET}@127.0.0.1:{dead}/0",
                  "connectTimeoutMs": 300},
        "spool": {"type": "redis"}}})
    path = write_config(tmp_path / "redis.yaml", conf)
    args = ["queue", action] + (["tx0"] if action == "show" else []) + ["--config", str(path)]
    res = run_cli(*args)
    assert REDIS_SECRET.encode() not in res.stdout + res.stderr
    assert_clean_failure(res, 75)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_queue_redis_down_never_leaks_password(tmp_path: Path) -> None:
    dead = free_port()
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "redis": {"url": f"redis://:{REDIS_SECRET}@127.0.0.1:{dead}/0",
                  "connectTimeoutMs": 300},
        "spool": {"type": "redis"}}})
    res = run_cli("queue", "list", "--config", str(write_config(tmp_path / "r.yaml", conf)))
    assert res.returncode != 0
    assert REDIS_SECRET.encode() not in res.stdout + res.stderr
