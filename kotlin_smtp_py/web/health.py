"""Health model: indicators, the readiness state, and aggregation with per-indicator timeouts.

Job: answer "is this process healthy / ready for traffic?" without ever blocking the reactor or
hanging a probe. Each :class:`~kotlin_smtp_py.interfaces.IHealthIndicator` returns
``Deferred[tuple[bool, dict]]``; :func:`check_all` runs them concurrently and turns an exception
or an answer slower than ``timeout`` seconds into a DOWN component (the indicator's Deferred is
cancelled). The HTTP side lives in ``web/site.py``.

Invariants:
- An aggregate is UP only when every component is UP; no components means UP.
- :class:`Readiness` is DOWN while ``shutting_down`` is set (graceful shutdown started) or while
  any readiness-relevant indicator (spool backend reachable, disk space) is DOWN; it comes back
  by itself when they recover, since nothing is cached.
- Liveness depends on nothing external: if the reactor can answer HTTP, the process is alive.
  Restarting a pod because Redis is down would not fix Redis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from kotlin_smtp_py.interfaces import IHealthIndicator, ISpool

UP = "UP"
DOWN = "DOWN"
DEFAULT_INDICATOR_TIMEOUT = 2.0

_log = Logger()

HealthResult = tuple[bool, dict[str, Any]]


def _status(ok: bool) -> str:
    return UP if ok else DOWN


@implementer(IHealthIndicator)
class FunctionIndicator:
    """An indicator from a function returning ``(up, details)`` or a Deferred of it.

    Handy for state the wiring already has, e.g. ``listeners``:
    ``FunctionIndicator("listeners", lambda: (all_listening(), {"ports": ports}))``.
    """

    def __init__(self, name: str, fn: Callable[[], HealthResult | defer.Deferred[HealthResult]]
                 ) -> None:
        self.name = name
        self._fn = fn

    def health(self) -> defer.Deferred[HealthResult]:
        try:
            result = self._fn()
        except Exception:
            return defer.fail()
        if isinstance(result, defer.Deferred):
            return result
        return defer.succeed(result)


@implementer(IHealthIndicator)
class SpoolIndicator:
    """Adapts ``ISpool.healthy()`` (``Deferred[(ok, why)]``) to a health component."""

    def __init__(self, spool: ISpool, backend: str, name: str = "spool") -> None:
        self.name = name
        self._spool = spool
        self._backend = backend

    def health(self) -> defer.Deferred[HealthResult]:
        def shape(result: tuple[bool, str]) -> HealthResult:
            ok, why = result
            details: dict[str, Any] = {"backend": self._backend,
                                       "pending": self._spool.pending_count()}
            corrupt = getattr(self._spool, "corrupt_count", None)
            if corrupt is not None:
                details["corrupt"] = corrupt  # entries moved aside since start (see logs)
            if why:
                details["reason"] = why
            return bool(ok), details
        d: defer.Deferred[tuple[bool, str]] = defer.maybeDeferred(self._spool.healthy)
        return d.addCallback(shape)


@implementer(IHealthIndicator)
class DiskSpaceIndicator:
    """DOWN when any path's file system has less than ``threshold_bytes`` free (or is missing).

    ``statvfs`` is one cheap syscall per path, so it runs on the reactor thread.
    """

    def __init__(self, paths: Iterable[str], threshold_bytes: int = 100 * 1024 * 1024,
                 name: str = "diskSpace") -> None:
        self.name = name
        self.paths = list(dict.fromkeys(paths))
        self.threshold_bytes = threshold_bytes

    def health(self) -> defer.Deferred[HealthResult]:
        ok = True
        details: dict[str, Any] = {"threshold": self.threshold_bytes, "paths": {}}
        for path in self.paths:
            try:
                st = os.statvfs(path)
            except OSError as exc:
                ok = False
                details["paths"][path] = {"error": exc.strerror or type(exc).__name__}
                continue
            free = st.f_bavail * st.f_frsize
            enough = free >= self.threshold_bytes
            ok = ok and enough
            details["paths"][path] = {"free": free, "total": st.f_blocks * st.f_frsize,
                                      "status": _status(enough)}
        return defer.succeed((ok, details))


async def check_one(indicator: IHealthIndicator, timeout: float,
                    clock: IReactorTime) -> dict[str, Any]:
    """One component: ``{"status": UP|DOWN, "details": {...}}``; never raises."""
    try:
        d: defer.Deferred[HealthResult] = defer.maybeDeferred(indicator.health)
        d.addTimeout(timeout, clock)
        ok, details = await d
    except defer.TimeoutError:
        _log.warn("health indicator {indicator} did not answer within {timeout}s",
                  indicator=indicator.name, timeout=timeout, event="health.timeout")
        return {"status": DOWN, "details": {"error": f"no answer within {timeout:g}s"}}
    except Exception as exc:
        _log.failure("health indicator {indicator} failed", indicator=indicator.name,
                     event="health.error")
        return {"status": DOWN, "details": {"error": type(exc).__name__}}
    component: dict[str, Any] = {"status": _status(bool(ok))}
    if details:
        component["details"] = details
    return component


async def check_all(indicators: Sequence[IHealthIndicator], timeout: float,
                    clock: IReactorTime) -> tuple[bool, dict[str, Any]]:
    """Run every indicator concurrently; returns ``(all_up, {name: component})``."""
    pending = [defer.Deferred.fromCoroutine(check_one(i, timeout, clock)) for i in indicators]
    results: list[dict[str, Any]] = []
    for d in pending:
        results.append(await d)
    components = {i.name: r for i, r in zip(indicators, results, strict=True)}
    return all(r["status"] == UP for r in results), components


class Readiness:
    """Whether this instance should receive traffic.

    Set ``shutting_down`` (or call :meth:`shutdown_started`) when a graceful shutdown begins;
    readiness-relevant indicators (spool backend, disk space) are re-checked on every probe.
    """

    def __init__(self, indicators: Sequence[IHealthIndicator] = ()) -> None:
        self.shutting_down = False
        self.indicators: list[IHealthIndicator] = list(indicators)

    def add(self, indicator: IHealthIndicator) -> None:
        self.indicators.append(indicator)

    def shutdown_started(self) -> None:
        self.shutting_down = True

    async def check(self, timeout: float, clock: IReactorTime) -> tuple[bool, dict[str, Any]]:
        ok, components = await check_all(self.indicators, timeout, clock)
        state: dict[str, Any] = {"status": DOWN if self.shutting_down else UP}
        if self.shutting_down:
            state["details"] = {"reason": "shutting down"}
        components = {"readinessState": state, **components}
        return ok and not self.shutting_down, components
