"""Hunting bugs in the SMTP listeners and the management HTTP server as deployed.

Listeners (``smtp.listeners[]``: bind addresses, serviceName, implicitTls, idleTimeoutSeconds,
the single listener of ``smtp.port`` when the list is empty), start-up failures (duplicate
listeners, ports in use, addresses that cannot be bound) and the management server
(``management.server``, exposure, probes, HEAD, slow clients, parallel scrapes, SIGTERM,
``smtp.workers: 2``).

Eight cases found bugs (three causes, all fixed since): a listener or management port that
cannot be bound ended start-up with a traceback, overlapping listeners and a management port
equal to an SMTP port passed validation. The rest pins down behaviour that
tests/ops/test_management_http.py, test_ops_hunt.py, test_metrics_hunt.py and
tests/integration/ do not already cover.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, deep_merge, free_port, on_reactor, wait_until
from prometheus_client.parser import text_string_to_metric_families

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.service import SmtpService

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from mtaproc import (
    KOTLIN_SMTP,
    TWISTD,
    MtaPool,
    make_config,
    proc_env,
    write_config,
)

PROM_TYPE = "text/plain; version=0.0.4"


# -- helpers ----------------------------------------------------------------------------------


def http_req(port: int, method: str, path: str, host: str = "127.0.0.1",
             timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def http_json(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, Any]:
    code, _, body = http_req(port, "GET", path, host)
    return code, json.loads(body)


def banner(host: str, port: int, timeout: float = 5.0, tls: ssl.SSLContext | None = None
           ) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(timeout)
        raw.connect((host, port))
        s: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return data


def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def scrape(port: int) -> dict[str, float]:
    code, headers, body = http_req(port, "GET", "/actuator/prometheus")
    assert code == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def run_twistd(conf: dict[str, Any], root: Path, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
    path = write_config(root / "config.yaml", conf)
    return subprocess.run([TWISTD, "-n", "--pidfile=", "smtp", "--config", str(path)],
                          cwd=root, env=proc_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def base_yaml(root: Path) -> dict[str, Any]:
    for sub in ("spool", "temp", "lists", "mailboxes/alice"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {"smtp": {
        "hostname": "mx.test",
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
        "routing": {"localDomain": "localhost"},
        "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                    "listsDir": str(root / "lists")},
        "spool": {"type": "file", "dir": str(root / "spool")},
        "lifecycle": {"gracefulShutdownTimeoutMs": 1000}},
        "management": {"server": {"port": 0, "bindAddress": "127.0.0.1"}}}


def with_listeners(conf: dict[str, Any], listeners: list[dict[str, Any]]) -> dict[str, Any]:
    out = deep_merge(conf, {})
    out["smtp"]["listeners"] = listeners  # replaced, not merged
    return out


@pytest.fixture
def make_service(tmp_path: Path, certs: CertSet, reactor_thread: None
                 ) -> Iterator[Callable[..., SmtpService]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None,
             listeners: list[dict[str, Any]] | None = None, tls: bool = False) -> SmtpService:
        root = tmp_path / f"srv{len(started)}"
        conf = deep_merge(base_yaml(root), overrides or {})
        if listeners is not None:
            conf = with_listeners(conf, listeners)
        if tls:
            conf["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(certs.cert),
                                   "privateKeyFile": str(certs.key)}
        config = cfg.load_text(yaml.safe_dump(conf))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


def mport(svc: SmtpService) -> int:
    return int(svc.management_port.getHost().port)


def problems_of(conf: dict[str, Any]) -> list[str]:
    try:
        cfg.load_text(yaml.safe_dump(conf))
    except cfg.ConfigError as exc:
        return str(exc).splitlines()
    return []


# -- listeners: bind addresses, banners ------------------------------------------------------


def test_listener_on_double_colon_accepts_ipv4_and_ipv6_clients(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service(listeners=[{"port": 0, "bindAddress": "::", "serviceName": "Dual"}])
    port = svc.smtp_port()
    assert banner("127.0.0.1", port).startswith(b"220 mx.test Dual")
    assert banner("::1", port).startswith(b"220 mx.test Dual")
    code, body = http_json(mport(svc), "/actuator/health")
    assert code == 200 and body["components"]["listeners"]["details"]["ports"] == [port]


@pytest.mark.parametrize(("bind", "connect"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                               ("0.0.0.0", "127.0.0.1"),
                                               ("localhost", "127.0.0.1")])
def test_listener_bind_address_variants(make_service: Callable[..., SmtpService], bind: str,
                                        connect: str) -> None:
    svc = make_service(listeners=[{"port": 0, "bindAddress": bind, "serviceName": "Hunt"}])
    assert banner(connect, svc.smtp_port()).startswith(b"220 mx.test Hunt")
    if bind in ("127.0.0.1", "localhost"):  # not reachable on another loopback address
        assert refused(svc.smtp_port(), "::1")


def test_empty_listeners_uses_smtp_port_hostname_and_service_name(
        make_service: Callable[..., SmtpService]) -> None:
    port = free_port()
    svc = make_service({"smtp": {"port": port, "hostname": "relay.example",
                                 "serviceName": "Postfix-compatible"}}, listeners=[])
    assert svc.smtp_port() == port
    assert banner("127.0.0.1", port).startswith(b"220 relay.example Postfix-compatible")


def test_each_listener_keeps_its_own_settings(make_service: Callable[..., SmtpService],
                                               certs: CertSet) -> None:
    svc = make_service(tls=True, listeners=[
        {"port": 0, "bindAddress": "127.0.0.1", "serviceName": "Plain", "enableStartTls": False},
        {"port": 0, "bindAddress": "127.0.0.1", "serviceName": "Submission"},
        {"port": 0, "bindAddress": "127.0.0.1", "serviceName": "Smtps", "implicitTls": True}])
    plain, sub, smtps = (svc.smtp_port(i) for i in range(3))
    assert len({plain, sub, smtps}) == 3

    def ehlo(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 mx.test")
            s.sendall(b"EHLO client.test\r\n")
            lines = b""
            while not (line := f.readline()).startswith(b"250 "):
                assert line, "connection closed during EHLO"
                lines += line
            return lines + line

    assert b"STARTTLS" not in ehlo(plain)
    assert b"STARTTLS" in ehlo(sub)
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    assert banner("127.0.0.1", smtps, tls=ctx).startswith(b"220 mx.test Smtps")


def test_idle_timeout_zero_is_off_while_other_listener_times_out(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service(listeners=[
        {"port": 0, "bindAddress": "127.0.0.1", "idleTimeoutSeconds": 0},
        {"port": 0, "bindAddress": "127.0.0.1", "idleTimeoutSeconds": 1}])
    off = socket.create_connection(("127.0.0.1", svc.smtp_port(0)), timeout=10)
    short = socket.create_connection(("127.0.0.1", svc.smtp_port(1)), timeout=10)
    try:
        off_f, short_f = off.makefile("rb"), short.makefile("rb")
        assert off_f.readline().startswith(b"220")
        assert short_f.readline().startswith(b"220")
        # opened before the 1 s one: by the time that one times out, this one idled longer
        assert short_f.readline().startswith(b"421 4.4.2")
        off.sendall(b"NOOP\r\n")
        assert off_f.readline().startswith(b"250")
    finally:
        off.close()
        short.close()


# -- start-up failures -------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "0.0.0.0")])
def test_duplicate_listeners_are_a_config_error_naming_the_key(tmp_path: Path, first: str,
                                                               second: str) -> None:
    port = free_port()
    conf = with_listeners(base_yaml(tmp_path), [{"port": port, "bindAddress": first},
                                                {"port": port, "bindAddress": second}])
    problems = problems_of(conf)
    assert any("smtp.listeners[1]" in p for p in problems), problems


def test_same_port_on_distinct_specific_addresses_is_allowed(
        make_service: Callable[..., SmtpService]) -> None:
    """127.0.0.1:P and 127.0.0.2:P do not collide: a duplicate check must not refuse it."""
    port = free_port()
    svc = make_service(listeners=[{"port": port, "bindAddress": "127.0.0.1"},
                                  {"port": port, "bindAddress": "127.0.0.2"}])
    assert banner("127.0.0.1", port).startswith(b"220")
    assert banner("127.0.0.2", port).startswith(b"220")
    assert svc.smtp_port(0) == svc.smtp_port(1) == port


def test_management_port_equal_to_smtp_port_is_a_config_error(tmp_path: Path) -> None:
    port = free_port()
    conf = deep_merge(with_listeners(base_yaml(tmp_path), [{"port": port}]),
                      {"management": {"server": {"port": port}}})
    problems = problems_of(conf)
    assert any("management.server.port" in p for p in problems), problems


def test_check_config_and_twistd_refuse_implicit_tls_without_ssl(tmp_path: Path) -> None:
    conf = with_listeners(base_yaml(tmp_path), [{"port": free_port(), "implicitTls": True}])
    path = write_config(tmp_path / "c.yaml", conf)
    check = subprocess.run([KOTLIN_SMTP, "check-config", str(path)], capture_output=True,
                           text=True, timeout=60, env=proc_env())
    assert check.returncode != 0
    assert "smtp.listeners[0].implicitTls" in check.stdout + check.stderr
    res = run_twistd(conf, tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out
    assert "smtp.listeners[0].implicitTls" in out


def _occupied(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen(1)
    return s, int(s.getsockname()[1])


@pytest.mark.parametrize("where", ["smtp", "management", "unassignable", "unresolvable"])
def test_unbindable_listener_is_one_clean_line_and_nonzero_exit(tmp_path: Path,
                                                                where: str) -> None:
    holder, busy = _occupied()
    try:
        conf = make_config(tmp_path)
        key = "smtp.listeners[0]"
        if where == "smtp":
            conf["smtp"]["listeners"][0]["port"] = busy
        elif where == "management":
            conf["management"]["server"]["port"] = busy
            key = "management.server"
        elif where == "unassignable":
            conf["smtp"]["listeners"][0]["bindAddress"] = "192.0.2.55"  # TEST-NET-1
        else:
            conf["smtp"]["listeners"][0]["bindAddress"] = "no-such-host.invalid"
        res = run_twistd(conf, tmp_path)
    finally:
        holder.close()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out[-2000:]
    assert key in out, out[-2000:]


# -- management HTTP ---------------------------------------------------------------------------


PROBES = {
    "/actuator/health": "application/json",
    "/actuator/health/liveness": "application/json",
    "/actuator/health/readiness": "application/json",
    "/livez": "application/json",
    "/readyz": "application/json",
    "/actuator/info": "application/json",
    "/actuator/prometheus": PROM_TYPE,
    "/metrics": PROM_TYPE,
}


def test_runbook_paths_get_head_query_and_trailing_slash(
        make_service: Callable[..., SmtpService]) -> None:
    port = mport(make_service())
    for path, ctype in PROBES.items():
        code, headers, body = http_req(port, "GET", path)
        assert code == 200, (path, body)
        assert headers["content-type"].startswith(ctype), (path, headers)
        assert int(headers["content-length"]) == len(body)
        if ctype == "application/json":
            doc = json.loads(body)
            assert doc.get("status") == "UP" or "app" in doc, (path, doc)
        else:
            assert b"smtp_connections_active" in body
        for variant in (path + "/", path + "?probe=k8s&x=1", path + "/?"):
            assert http_req(port, "GET", variant)[0] == 200, variant
        hcode, hheaders, hbody = http_req(port, "HEAD", path + "?x=1")
        assert (hcode, hbody) == (200, b""), path
        assert hheaders["content-type"] == headers["content-type"]
    code, body = http_json(port, "/actuator/health/liveness")
    assert body["status"] == "UP"
    code, body = http_json(port, "/actuator/info")
    assert body["app"]["version"] and "uptime_seconds" in body
    code, body = http_json(port, "/actuator/health")
    assert {"listeners", "spool", "diskSpace"} <= set(body["components"])


@pytest.mark.parametrize(("include", "served"), [
    ("health", {p for p in PROBES if "health" in p or p in ("/livez", "/readyz")}),
    ("prometheus", {"/actuator/prometheus"}),
    (" Info , METRICS ", {"/actuator/info", "/metrics"}),
    ("*", set(PROBES)),
])
def test_exposure_from_yaml_string(make_service: Callable[..., SmtpService], include: str,
                                   served: set[str]) -> None:
    svc = make_service({"management": {"endpoints.web.exposure.include": include}})
    port = mport(svc)
    for path in PROBES:
        code, headers, _ = http_req(port, "GET", path)
        assert code == (200 if path in served else 404), (include, path, code)
        assert code == 200 or headers["content-type"] == "application/json"
        assert http_req(port, "HEAD", path)[0] == code, (include, path)
    code, body = http_json(port, "/actuator")
    assert set(body["_links"]) >= served
    assert not (set(body["_links"]) & (set(PROBES) - served))


def test_probes_switches_through_spring_style_keys(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service({"management": {"endpoint": {"health": {"probes": {
        "enabled": True, "add-additional-paths": False}}}}})
    port = mport(svc)
    assert http_req(port, "GET", "/actuator/health/readiness")[0] == 200
    assert http_req(port, "GET", "/livez")[0] == 404
    assert http_req(port, "GET", "/readyz")[0] == 404
    svc = make_service({"management": {"endpoint.health.probes.enabled": False}})
    port = mport(svc)
    assert http_req(port, "GET", "/actuator/health")[0] == 200
    for path in ("/actuator/health/liveness", "/actuator/health/readiness", "/livez"):
        assert http_req(port, "GET", path)[0] == 404, path


def test_management_on_double_colon_answers_ipv4_and_ipv6(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service({"management": {"server": {"bindAddress": "::"}}})
    port = mport(svc)
    assert http_req(port, "GET", "/readyz", host="127.0.0.1")[0] == 200
    assert http_req(port, "GET", "/readyz", host="::1")[0] == 200


def test_management_disabled_serves_nothing(make_service: Callable[..., SmtpService]) -> None:
    port = free_port()
    svc = make_service({"management": {"enabled": False, "server": {"port": port}}})
    assert svc.management_port is None
    assert refused(port)
    assert banner("127.0.0.1", svc.smtp_port()).startswith(b"220")


def test_stalled_http_clients_block_neither_management_nor_smtp(
        make_service: Callable[..., SmtpService]) -> None:
    svc = make_service()
    port = mport(svc)
    stalled: list[socket.socket] = []
    try:
        for data in (b"", b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n",
                     b"POST /actuator/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                     b"\r\nabc"):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if data:
                s.sendall(data)
            stalled.append(s)
        # a client that asks for the metrics page many times and never reads the answers
        greedy = socket.create_connection(("127.0.0.1", port), timeout=5)
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.append(greedy)
        greedy.sendall(b"GET /actuator/prometheus HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        started = time.monotonic()
        for _ in range(5):
            assert http_req(port, "GET", "/readyz", timeout=5)[0] == 200
            assert banner("127.0.0.1", svc.smtp_port()).startswith(b"220")
        assert time.monotonic() - started < 10
    finally:
        for s in stalled:
            s.close()
    assert http_req(port, "GET", "/livez")[0] == 200


def test_many_parallel_scrapes_all_answer(make_service: Callable[..., SmtpService]) -> None:
    port = mport(make_service())
    results: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        path = ("/actuator/prometheus", "/metrics", "/readyz", "/actuator/health")[i % 4]
        try:
            code, headers, body = http_req(port, "GET", path, timeout=20)
            if "version=0.0.4" in headers["content-type"]:
                list(text_string_to_metric_families(body.decode()))  # parses
            with lock:
                results.append((path, code, headers["content-type"]))
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(results) == 80 and all(code == 200 for _, code, _ in results), results


# -- real twistd: SIGTERM and workers -----------------------------------------------------------


def test_sigterm_readiness_down_liveness_up_listener_closed_then_exit_zero(tmp_path: Path
                                                                          ) -> None:
    with MtaPool(tmp_path) as pool:
        proc, conf = pool.new({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 8000}}})
        mgmt = int(conf["management"]["server"]["port"])
        assert http_req(mgmt, "GET", "/actuator/health/readiness")[0] == 200
        s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"354")
        # a management client that never finishes its request must not hold the shutdown
        stalled = socket.create_connection(("127.0.0.1", mgmt), timeout=5)
        stalled.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        proc.signal(signal.SIGTERM)
        wait_until(lambda: refused(proc.port), timeout=10, message="SMTP listener closed")
        code, body = http_json(mgmt, "/actuator/health/readiness")
        assert code == 503 and body["status"] == "DOWN", body
        assert body["components"]["readinessState"]["status"] == "DOWN"
        assert http_req(mgmt, "GET", "/readyz")[0] == 503
        assert http_req(mgmt, "HEAD", "/readyz")[0] == 503
        assert http_json(mgmt, "/actuator/health/liveness") == (200, {
            "status": "UP", "components": {"livenessState": {"status": "UP"}}})
        assert http_req(mgmt, "GET", "/actuator/prometheus")[0] == 200  # still scraped
        s.sendall(b"Subject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"250")
        s.close()
        assert proc.proc is not None
        assert proc.proc.wait(20) == 0
        assert refused(mgmt)
        stalled.close()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _listening_inodes(port: int) -> set[str]:
    from helpers import TCP_LISTEN, tcp_socket_inodes
    return tcp_socket_inodes(port, TCP_LISTEN)


def test_two_workers_one_management_port_and_summed_metrics(tmp_path: Path) -> None:
    from helpers import process_socket_inodes

    with MtaPool(tmp_path) as pool:
        proc, conf = pool.new({"smtp": {"workers": 2}})
        mgmt = int(conf["management"]["server"]["port"])
        workers = wait_until(lambda: _children(proc.pid), timeout=30, message="a worker")
        assert len(workers) == 1
        # the worker serves SMTP too before we count (it binds the same port: SO_REUSEPORT)
        wait_until(lambda: len(_listening_inodes(proc.port)) == 2, timeout=30,
                   message="both processes listening")
        mgmt_socks = _listening_inodes(mgmt)
        assert len(mgmt_socks) == 1
        assert mgmt_socks <= process_socket_inodes(proc.pid)
        assert not (mgmt_socks & process_socket_inodes(workers[0]))
        before = scrape(mgmt).get("smtp_sessions_started_total", 0.0)
        sessions = 16
        for _ in range(sessions):
            assert banner("127.0.0.1", proc.port).startswith(b"220")
        wait_until(lambda: scrape(mgmt).get("smtp_sessions_started_total", 0.0)
                   == before + sessions, timeout=20, message="sessions summed over workers")
        held = [socket.create_connection(("127.0.0.1", proc.port), timeout=10)
                for _ in range(6)]
        try:
            for s in held:
                assert s.recv(512).startswith(b"220")
            wait_until(lambda: scrape(mgmt).get("smtp_connections_active") == len(held),
                       timeout=20, message="active connections summed over workers")
        finally:
            for s in held:
                s.close()
        wait_until(lambda: scrape(mgmt).get("smtp_connections_active") == 0, timeout=20,
                   message="active connections back to 0")
        rc, _ = proc.terminate(timeout=30)
        assert rc == 0
