"""The management HTTP server over real loopback HTTP: health, probes, exposure, info, metrics."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import on_reactor
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task

from kotlin_smtp_py import __version__
from kotlin_smtp_py.config import (
    Config,
    EndpointConfig,
    EndpointsConfig,
    ExposureConfig,
    HealthEndpointConfig,
    ManagementConfig,
    ProbesConfig,
    WebEndpointsConfig,
)
from kotlin_smtp_py.interfaces import IHealthIndicator
from kotlin_smtp_py.metrics import METRIC_NAMES, Metrics
from kotlin_smtp_py.status import DeliveryStatus, Reason
from kotlin_smtp_py.web.health import DiskSpaceIndicator, FunctionIndicator, Readiness
from kotlin_smtp_py.web.site import make_management_site


def make_config(include: list[str] | None = None, probes: bool = True,
                additional: bool = True) -> Config:
    exposure = ExposureConfig() if include is None else ExposureConfig(include=include)
    return Config(management=ManagementConfig(
        endpoints=EndpointsConfig(web=WebEndpointsConfig(exposure=exposure)),
        endpoint=EndpointConfig(health=HealthEndpointConfig(
            probes=ProbesConfig(enabled=probes, add_additional_paths=additional)))))


@dataclass
class Served:
    base: str
    metrics: Metrics
    readiness: Readiness
    port: Any = None
    flags: dict[str, bool] = field(default_factory=dict)

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def json(self, path: str) -> tuple[int, Any]:
        code, _, body = self.get(path)
        return code, json.loads(body)


@pytest.fixture
def serve(reactor_thread: None) -> Iterator[Callable[..., Served]]:
    ports: list[Any] = []

    def start(config: Config | None = None, indicators: list[IHealthIndicator] | None = None,
              readiness: Readiness | None = None, metrics: Metrics | None = None,
              clock: Any = None, indicator_timeout: float = 2.0) -> Served:
        metrics = metrics or Metrics(["example.com"])
        readiness = readiness or Readiness()
        site = make_management_site(config or make_config(), metrics, indicators or [],
                                    readiness, clock=clock, indicator_timeout=indicator_timeout)

        def listen() -> Any:
            from twisted.internet import reactor
            return reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        port = on_reactor(listen)
        ports.append(port)
        return Served(f"http://127.0.0.1:{port.getHost().port}", metrics, readiness, port)

    yield start
    for port in ports:
        on_reactor(port.stopListening)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_scrape_change_scrape(serve: Callable[..., Served]) -> None:
    srv = serve()
    pending = [0]
    srv.metrics.pending_fn = lambda: pending[0]
    code, headers, body = srv.get("/actuator/prometheus")
    assert code == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    before = samples(body)

    def traffic() -> None:
        m = srv.metrics
        m.connection_opened()
        m.connection_opened()
        m.connection_closed()
        m.session_started()
        m.message_accepted()
        m.message_rejected()
        m.spool_queued()
        m.retry_scheduled(120.0)
        m.entry_finished("completed", 30.0)
        m.entry_finished("dropped", 5000.0)
        m.delivery_result("example.com", DeliveryStatus.delivered())
        m.delivery_result("Example.COM.", DeliveryStatus.permanent_failure(Reason.DNS, "nxdomain"))
        m.delivery_result("random.test", DeliveryStatus.transient(Reason.CONNECT, "refused"))
        m.session_ended()
    on_reactor(traffic)
    pending[0] = 7
    code, _, body = srv.get("/metrics")
    assert code == 200
    after = samples(body)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("smtp_connections_active") == 1
    for name in ("smtp_sessions_started_total", "smtp_sessions_ended_total",
                 "smtp_messages_accepted_total", "smtp_messages_rejected_total",
                 "smtp_spool_queued_total", "smtp_spool_completed_total",
                 "smtp_spool_dropped_total", "smtp_spool_retry_scheduled_total"):
        assert delta(name) == 1, name
    assert after[("smtp_spool_pending", ())] == 7
    assert delta("smtp_spool_retry_delay_seconds_sum") == 120
    assert delta("smtp_spool_retry_delay_seconds_bucket", le="180.0") == 1
    assert delta("smtp_spool_retry_delay_seconds_bucket", le="60.0") == 0
    assert delta("smtp_spool_queue_age_seconds_count", outcome="completed") == 1
    assert delta("smtp_spool_queue_age_seconds_sum", outcome="dropped") == 5000
    assert delta("smtp_spool_queue_age_seconds_count", outcome="other") == 0
    assert delta("smtp_spool_delivery_recipients_total", result="delivered") == 1
    assert delta("smtp_spool_delivery_recipients_total", result="permanent_failure") == 1
    assert delta("smtp_spool_delivery_recipients_total", result="transient_failure") == 1
    assert delta("smtp_spool_delivery_failure_total", domain="example.com", kind="permanent",
                 reason="dns") == 1
    assert delta("smtp_spool_delivery_failure_total", domain="other", kind="transient",
                 reason="connect") == 1
    assert not any(n == "smtp_spool_delivery_failure_total" and ("domain", "random.test") in lbl
                   for n, lbl in after)


def test_exposition_has_exactly_the_contract_names_and_types(serve: Callable[..., Served]
                                                             ) -> None:
    srv = serve()
    on_reactor(lambda: srv.metrics.delivery_result(
        "x.test", DeliveryStatus.transient(Reason.TLS, "handshake")))
    _, _, body = srv.get("/metrics")
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    # the parser strips _total from counter family names
    exposed = {name + "_total" if kind == "counter" else name for name, kind in families.items()}
    assert exposed == set(METRIC_NAMES)
    assert families["smtp_connections_active"] == "gauge"
    assert families["smtp_spool_pending"] == "gauge"
    assert families["smtp_spool_retry_delay_seconds"] == "histogram"
    assert families["smtp_spool_queue_age_seconds"] == "histogram"
    assert families["smtp_spool_delivery_failure"] == "counter"
    assert b"_created" not in body


def test_pending_callback_failure_does_not_break_scrape(serve: Callable[..., Served]) -> None:
    srv = serve()

    def boom() -> int:
        raise OSError("spool gone")
    srv.metrics.pending_fn = boom
    code, _, body = srv.get("/metrics")
    assert code == 200
    value = samples(body)[("smtp_spool_pending", ())]
    assert value != value  # NaN


def test_readiness_flips_with_shutdown_flag_and_comes_back(serve: Callable[..., Served]) -> None:
    srv = serve()
    for path in ("/actuator/health/readiness", "/readyz"):
        code, body = srv.json(path)
        assert (code, body["status"]) == (200, "UP")
    srv.readiness.shutting_down = True
    for path in ("/actuator/health/readiness", "/readyz"):
        code, body = srv.json(path)
        assert (code, body["status"]) == (503, "DOWN")
        assert body["components"]["readinessState"]["status"] == "DOWN"
    # liveness is unaffected by shutdown
    assert srv.json("/actuator/health/liveness") == (
        200, {"status": "UP", "components": {"livenessState": {"status": "UP"}}})
    assert srv.get("/livez")[0] == 200
    srv.readiness.shutting_down = False
    assert srv.json("/readyz")[0] == 200


def test_readiness_follows_relevant_indicator(serve: Callable[..., Served]) -> None:
    reachable = [True]
    spool = FunctionIndicator("spool", lambda: (reachable[0], {"backend": "redis"}))
    srv = serve(readiness=Readiness([spool]))
    assert srv.json("/readyz")[0] == 200
    reachable[0] = False
    code, body = srv.json("/readyz")
    assert code == 503
    assert body["components"]["spool"] == {"status": "DOWN", "details": {"backend": "redis"}}
    # the readiness indicator is also a component of the overall health
    code, body = srv.json("/actuator/health")
    assert (code, body["status"], body["components"]["spool"]["status"]) == (503, "DOWN", "DOWN")
    reachable[0] = True
    assert srv.json("/readyz")[0] == 200
    assert srv.json("/actuator/health")[0] == 200


def test_hung_indicator_reads_down_within_timeout(serve: Callable[..., Served]) -> None:
    cancelled: list[bool] = []

    def hang() -> defer.Deferred[tuple[bool, dict[str, Any]]]:
        return defer.Deferred(lambda d: cancelled.append(True))
    ok = FunctionIndicator("listeners", lambda: (True, {"ports": [2525]}))
    srv = serve(indicators=[ok, FunctionIndicator("redis", hang)], indicator_timeout=0.3)
    t0 = time.monotonic()
    code, body = srv.json("/actuator/health")
    assert time.monotonic() - t0 < 5
    assert code == 503 and body["status"] == "DOWN"
    assert body["components"]["redis"]["status"] == "DOWN"
    assert "0.3s" in body["components"]["redis"]["details"]["error"]
    assert body["components"]["listeners"] == {"status": "UP", "details": {"ports": [2525]}}
    assert cancelled == [True]


def test_failing_indicator_reads_down(serve: Callable[..., Served]) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("secret detail")
    srv = serve(indicators=[FunctionIndicator("spool", broken)])
    code, body = srv.json("/actuator/health")
    assert code == 503
    assert body["components"]["spool"] == {"status": "DOWN",
                                           "details": {"error": "RuntimeError"}}


def test_disk_space_indicator(serve: Callable[..., Served], tmp_path: Any) -> None:
    fine = DiskSpaceIndicator([str(tmp_path)], threshold_bytes=0, name="diskSpace")
    srv = serve(indicators=[fine])
    code, body = srv.json("/actuator/health")
    assert code == 200
    entry = body["components"]["diskSpace"]["details"]["paths"][str(tmp_path)]
    assert entry["free"] > 0 and entry["status"] == "UP"

    full = DiskSpaceIndicator([str(tmp_path)], threshold_bytes=1 << 62, name="diskSpace")
    missing = DiskSpaceIndicator([str(tmp_path / "nope")], threshold_bytes=0, name="spoolDisk")
    srv2 = serve(readiness=Readiness([full, missing]))
    code, body = srv2.json("/readyz")
    assert code == 503
    assert body["components"]["diskSpace"]["status"] == "DOWN"
    assert body["components"]["spoolDisk"]["status"] == "DOWN"
    assert "error" in body["components"]["spoolDisk"]["details"]["paths"][str(tmp_path / "nope")]


def test_exposure_include_is_respected(serve: Callable[..., Served]) -> None:
    srv = serve(config=make_config(include=["health"]))
    for path in ("/actuator/health", "/actuator/health/liveness", "/actuator/health/readiness",
                 "/livez", "/readyz", "/actuator"):
        assert srv.get(path)[0] == 200, path
    for path in ("/metrics", "/actuator/prometheus", "/actuator/info", "/actuator/metrics"):
        assert srv.get(path)[0] == 404, path

    srv = serve(config=make_config(include=["prometheus", "info"]))
    assert srv.get("/actuator/prometheus")[0] == 200
    assert srv.get("/actuator/info")[0] == 200
    for path in ("/metrics", "/actuator/health", "/livez", "/readyz",
                 "/actuator/health/readiness"):
        assert srv.get(path)[0] == 404, path

    srv = serve(config=make_config(include=["*"]))
    for path in ("/metrics", "/actuator/prometheus", "/actuator/info", "/actuator/health"):
        assert srv.get(path)[0] == 200, path


def test_probe_switches(serve: Callable[..., Served]) -> None:
    srv = serve(config=make_config(additional=False))
    assert srv.get("/actuator/health/readiness")[0] == 200
    assert srv.get("/livez")[0] == 404
    assert srv.get("/readyz")[0] == 404
    srv = serve(config=make_config(probes=False))
    assert srv.get("/actuator/health")[0] == 200
    for path in ("/actuator/health/readiness", "/actuator/health/liveness", "/readyz"):
        assert srv.get(path)[0] == 404, path


def test_info_reports_version_and_uptime(serve: Callable[..., Served]) -> None:
    clock = task.Clock()
    clock.advance(1000)
    srv = serve(clock=clock)
    on_reactor(clock.advance, 42)
    code, body = srv.json("/actuator/info")
    assert code == 200
    assert body["app"]["version"] == __version__
    assert body["uptime_seconds"] == 42


def test_unknown_paths_and_methods(serve: Callable[..., Served]) -> None:
    srv = serve()
    assert srv.get("/nope")[0] == 404
    assert srv.get("/actuator/health/other")[0] == 404
    assert srv.get("/actuator/health", method="POST")[0] == 405
    code, headers, body = srv.get("/actuator/health", method="HEAD")
    assert code == 200 and body == b""
    assert "Twisted" not in headers.get("Server", "")
    assert srv.get("/actuator/health/")[0] == 200
