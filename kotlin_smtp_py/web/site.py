"""The management HTTP server: actuator-style health, probes, info and Prometheus metrics.

Job: serve SPEC §5 on ``management.server.port``/``bindAddress`` (never on an SMTP port) with
Twisted Web, entirely on the reactor thread (no WSGI thread pool):

============================================  =============  ==============================
path                                          exposure id    answer
============================================  =============  ==============================
/actuator                                     (any exposed)  links to the exposed endpoints
/actuator/health                              health         every component, 200 UP / 503
/actuator/health/liveness, /livez             health         200 while the reactor answers
/actuator/health/readiness, /readyz           health         Readiness: 200 UP / 503 DOWN
/actuator/info                                info           version, uptime
/actuator/prometheus                          prometheus     text format 0.0.4
/metrics                                      metrics        text format 0.0.4
/actuator/metrics                             metrics        JSON list of metric names
============================================  =============  ==============================

Invariants:
- An endpoint whose exposure id is not in ``management.endpoints.web.exposure.include`` (``*``
  = all) answers 404, exactly like an unknown path. The probe paths belong to ``health`` and
  also need ``endpoint.health.probes.enabled``; ``/livez`` and ``/readyz`` additionally need
  ``add-additional-paths``.
- A probe never hangs: each indicator has ``indicator_timeout`` seconds, then reads DOWN.
- Only GET and HEAD; no tracebacks, no access log lines for probe traffic, no server version.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.application import internet
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import Request as HttpRequest

from kotlin_smtp_py import __version__
from kotlin_smtp_py.config import Config
from kotlin_smtp_py.interfaces import IHealthIndicator
from kotlin_smtp_py.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kotlin_smtp_py.metrics import METRIC_NAMES, Metrics
from kotlin_smtp_py.web.health import (
    DEFAULT_INDICATOR_TIMEOUT,
    DOWN,
    UP,
    Readiness,
    check_all,
)

_log = Logger()

JSON_TYPE = "application/json"
Response = tuple[int, str, bytes]
Handler = Callable[[], Coroutine[Any, Any, Response]]


def _json(code: int, body: dict[str, Any]) -> Response:
    return code, JSON_TYPE, json.dumps(body, sort_keys=False).encode("utf-8")


def _health_response(ok: bool, components: dict[str, Any]) -> Response:
    return _json(200 if ok else 503, {"status": UP if ok else DOWN, "components": components})


def exposed_ids(config: Config) -> frozenset[str]:
    include = {i.strip().lower() for i in config.management.endpoints.web.exposure.include}
    if "*" in include:
        return frozenset({"health", "info", "metrics", "prometheus"})
    return frozenset(include)


class ManagementResource(resource.Resource):
    """A leaf resource dispatching on the exact path (trailing slash ignored)."""

    isLeaf = True

    def __init__(self, routes: dict[bytes, Handler]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.routes = routes

    def render_GET(self, request: server.Request) -> int | bytes:
        req: Any = request  # twisted.web's Request methods are unannotated
        path = req.path.rstrip(b"/") or b"/"
        handler = self.routes.get(path)
        req.setHeader(b"server", b"kotlin-smtp")
        req.setHeader(b"cache-control", b"no-store")
        if handler is None:
            return self._send(req, _json(404, {"status": 404, "error": "Not Found"}))
        finished: list[bool] = []
        req.notifyFinish().addBoth(lambda _: finished.append(True))

        def reply(response: Response) -> None:
            if not finished:
                self._send(req, response)
                req.finish()

        def failed(failure: Failure) -> None:
            _log.failure("management request {path} failed", failure, path=path.decode(),
                         event="management.error")
            reply(_json(500, {"status": 500, "error": "Internal Server Error"}))

        d = defer.Deferred.fromCoroutine(handler())
        d.addCallbacks(reply, failed)
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    def render(self, request: server.Request) -> int | bytes:
        """GET and HEAD as above; any other method a JSON 405 (Twisted's own answer is an
        HTML page naming its version, which the management port must not show)."""
        req: Any = request
        if req.method in (b"GET", b"HEAD"):
            return super().render(request)  # type: ignore[no-untyped-call,no-any-return]
        req.setHeader(b"server", b"kotlin-smtp")
        req.setHeader(b"allow", b"GET, HEAD")
        req.setHeader(b"cache-control", b"no-store")
        return self._send(req, _json(405, {"status": 405, "error": "Method Not Allowed"}))

    @staticmethod
    def _send(request: Any, response: Response) -> bytes:
        code, content_type, body = response
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        return b""


class ManagementSite(server.Site):
    """A quiet Site: no per-request access log (probes every few seconds are noise)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: HttpRequest) -> None:
        return None


class _Endpoints:
    """The handlers, closed over the state they read."""

    def __init__(self, config: Config, metrics: Metrics, indicators: Sequence[IHealthIndicator],
                 readiness: Readiness, clock: IReactorTime, timeout: float) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.clock = clock
        self.timeout = timeout
        self.started = clock.seconds()
        self.indicators = list(indicators) + [
            i for i in readiness.indicators if all(i is not j for j in indicators)]
        self.config = config

    async def health(self) -> Response:
        return _health_response(*await check_all(self.indicators, self.timeout, self.clock))

    async def liveness(self) -> Response:
        return _health_response(True, {"livenessState": {"status": UP}})

    async def readiness_probe(self) -> Response:
        return _health_response(*await self.readiness.check(self.timeout, self.clock))

    async def info(self) -> Response:
        uptime = max(0.0, self.clock.seconds() - self.started)
        return _json(200, {"app": {"name": "kotlin-smtp-py", "version": __version__},
                           "uptime_seconds": round(uptime, 3)})

    async def prometheus(self) -> Response:
        return 200, METRICS_CONTENT_TYPE, self.metrics.render()

    async def metric_names(self) -> Response:
        return _json(200, {"names": list(METRIC_NAMES)})


def build_routes(config: Config, endpoints: _Endpoints) -> dict[bytes, Handler]:
    exposed = exposed_ids(config)
    probes = config.management.endpoint.health.probes
    routes: dict[str, Handler] = {}
    if "health" in exposed:
        routes["/actuator/health"] = endpoints.health
        if probes.enabled:
            routes["/actuator/health/liveness"] = endpoints.liveness
            routes["/actuator/health/readiness"] = endpoints.readiness_probe
            if probes.add_additional_paths:
                routes["/livez"] = endpoints.liveness
                routes["/readyz"] = endpoints.readiness_probe
    if "info" in exposed:
        routes["/actuator/info"] = endpoints.info
    if "prometheus" in exposed:
        routes["/actuator/prometheus"] = endpoints.prometheus
    if "metrics" in exposed:
        routes["/metrics"] = endpoints.prometheus
        routes["/actuator/metrics"] = endpoints.metric_names
    if routes:
        links = {p: {"href": p} for p in sorted(routes)}

        async def index() -> Response:
            return _json(200, {"_links": links})
        routes["/actuator"] = index
    return {p.encode("ascii"): h for p, h in routes.items()}


def make_management_site(config: Config, metrics: Metrics,
                         indicators: Sequence[IHealthIndicator], readiness: Readiness,
                         clock: IReactorTime | None = None,
                         indicator_timeout: float = DEFAULT_INDICATOR_TIMEOUT) -> server.Site:
    """The management ``Site``. ``indicators`` are the /actuator/health components (listeners,
    spool, redis, diskSpace...); ``readiness.indicators`` are also shown there. ``clock``
    defaults to the global reactor (used for indicator timeouts and uptime)."""
    if clock is None:
        from twisted.internet import reactor
        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    endpoints = _Endpoints(config, metrics, indicators, readiness, clock, indicator_timeout)
    site: server.Site = ManagementSite(  # type: ignore[no-untyped-call]
        ManagementResource(build_routes(config, endpoints)))
    return site


def management_service(config: Config, site: server.Site,
                       reactor: IReactorTCP | None = None) -> IService:
    """A service listening on ``management.server.bindAddress:port`` (add it to the parent
    MultiService; it stops listening on stopService)."""
    srv = config.management.server
    service: Any = internet.TCPServer(  # type: ignore[no-untyped-call]
        srv.port, site, interface=srv.bindAddress, reactor=reactor)
    service.setName("management-http")
    return service  # type: ignore[no-any-return]
