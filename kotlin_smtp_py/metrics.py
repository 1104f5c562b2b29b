"""Prometheus metrics: exactly the SPEC §5 names, types and labels, behind small typed methods.

Job: one :class:`Metrics` object per process owns a private ``CollectorRegistry`` (never the
global one, so tests can build several) and is the only place metric objects exist. The rest of
the code calls verbs (``session_started()``, ``delivery_result(domain, status)``...) and never
touches prometheus_client directly; :meth:`Metrics.render` returns the text exposition format
(0.0.4) served by ``web/health.py``.

Invariants:
- Exposed names are exactly the contract (runbook alerts use them verbatim). prometheus_client
  appends ``_total`` to counters, so counters are declared without it; the ``*_created``
  companion series are filtered out of the exposition so nothing outside the contract appears.
- Label values come from closed sets: ``result`` and ``outcome`` are fixed, ``kind``/``reason``
  come from :class:`~kotlin_smtp_py.status.FailureKind`/:class:`~kotlin_smtp_py.status.Reason`,
  and ``domain`` is one of ``management.metrics.trackedDomains`` or ``other``. Series count is
  therefore bounded whatever the traffic.
- ``smtp_spool_pending`` is computed at scrape time by ``pending_fn`` (set once the spool
  exists); it must be cheap (a counter, not a directory scan). A failing callback yields NaN
  and never breaks the scrape.
- Multi-process mode (``smtp.workers`` > 1): every process passes the same private
  ``multiprocess_dir``; values go to ``prometheus_client`` mmap files there and the parent's
  :meth:`render` aggregates all processes with a ``MultiProcessCollector`` (counters and
  histograms summed, ``smtp_connections_active`` summed over live processes).
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from twisted.logger import Logger

from kotlin_smtp_py.status import DeliveryStatus

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# The exported metric names (as they appear in the exposition, histograms without suffixes).
METRIC_NAMES: tuple[str, ...] = (
    "smtp_connections_active",
    "smtp_sessions_started_total",
    "smtp_sessions_ended_total",
    "smtp_messages_accepted_total",
    "smtp_messages_rejected_total",
    "smtp_spool_pending",
    "smtp_spool_queued_total",
    "smtp_spool_completed_total",
    "smtp_spool_dropped_total",
    "smtp_spool_retry_scheduled_total",
    "smtp_spool_retry_delay_seconds",
    "smtp_spool_queue_age_seconds",
    "smtp_spool_delivery_recipients_total",
    "smtp_spool_delivery_failure_total",
)
HISTOGRAM_NAMES: frozenset[str] = frozenset(
    {"smtp_spool_retry_delay_seconds", "smtp_spool_queue_age_seconds"})

OTHER_DOMAIN = "other"

# Retry delays are 60 s × 2^n capped at 600 s (±20 %); queue age spans seconds to days.
RETRY_DELAY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 480.0, 600.0, 900.0)
QUEUE_AGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                     21600.0, 86400.0, 259200.0, 432000.0)

_log = Logger()


class Outcome(str, enum.Enum):
    """How a queue entry left the queue (label ``outcome`` of smtp_spool_queue_age_seconds)."""

    COMPLETED = "completed"  # every recipient delivered
    DROPPED = "dropped"  # recipients bounced (permanent failure or retries exhausted)
    OTHER = "other"  # mixed results, deleted by an operator, ... (the scheduler decides)


class DeliveryResult(str, enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT_FAILURE = "transient_failure"
    PERMANENT_FAILURE = "permanent_failure"


def result_of(status: DeliveryStatus) -> DeliveryResult:
    if status.ok:
        return DeliveryResult.DELIVERED
    if status.temporary:
        return DeliveryResult.TRANSIENT_FAILURE
    return DeliveryResult.PERMANENT_FAILURE


def _normalise_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


class _WithoutCreated(Collector):
    """Re-exports a registry's metrics without the ``*_created`` samples (not in the contract)."""

    def __init__(self, inner: CollectorRegistry | Any) -> None:
        self._inner = inner  # a registry, or a MultiProcessCollector

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


_pid: list[int] = []


def _process_id() -> int:
    """The pid, known without a getpid(2) per metric update (prometheus_client asks on every
    one, to notice forks: ten system calls per message). A fork refreshes it."""
    if not _pid:
        _pid.append(os.getpid())
        os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
    return _pid[0]


def _enable_multiprocess(directory: str) -> None:
    """Values created from now on live in mmap files under ``directory`` (per process)."""
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # Our own marker, not prometheus_client's ``_multiprocess``: a process started with
    # PROMETHEUS_MULTIPROC_DIR already set (a spawned worker) got a multiprocess class at
    # import, keyed by os.getpid, which still costs a system call per update.
    if not getattr(values.ValueClass, "_cached_pid", False):
        cls: Any = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]
        cls._multiprocess = True
        cls._cached_pid = True
        values.ValueClass = cls


class _PendingCollector(Collector):
    """``smtp_spool_pending``, read from a callback at scrape time."""

    def __init__(self) -> None:
        self.fn: Callable[[], int] | None = None

    def collect(self) -> Iterator[Metric]:
        value = 0.0
        if self.fn is not None:
            try:
                value = float(self.fn())
            except Exception:
                _log.failure("spool pending callback failed", event="metrics.pending_failed")
                value = math.nan
        yield GaugeMetricFamily("smtp_spool_pending", "Queue entries waiting for delivery.",
                                value=value)


class Metrics:
    """The process's metrics. Cheap to call from the reactor thread; never blocks."""

    def __init__(self, tracked_domains: Sequence[str] = (),
                 multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            _enable_multiprocess(multiprocess_dir)
        self.tracked_domains: frozenset[str] = frozenset(
            _normalise_domain(d) for d in tracked_domains if d.strip())
        self._values = CollectorRegistry(auto_describe=True)
        r = self._values
        self._connections_active = Gauge(
            "smtp_connections_active", "Open SMTP connections.", registry=r,
            multiprocess_mode="livesum")
        self._sessions_started = Counter(
            "smtp_sessions_started", "SMTP sessions started.", registry=r)
        self._sessions_ended = Counter(
            "smtp_sessions_ended", "SMTP sessions ended.", registry=r)
        self._messages_accepted = Counter(
            "smtp_messages_accepted", "Messages accepted (250 after DATA/BDAT).", registry=r)
        self._messages_rejected = Counter(
            "smtp_messages_rejected", "Messages refused at end of data.", registry=r)
        self._spool_queued = Counter(
            "smtp_spool_queued", "Entries written to the spool.", registry=r)
        self._spool_completed = Counter(
            "smtp_spool_completed", "Entries that left the queue with outcome completed.",
            registry=r)
        self._spool_dropped = Counter(
            "smtp_spool_dropped", "Entries that left the queue with outcome dropped.",
            registry=r)
        self._retry_scheduled = Counter(
            "smtp_spool_retry_scheduled", "Retries scheduled after transient failures.",
            registry=r)
        self._retry_delay = Histogram(
            "smtp_spool_retry_delay_seconds", "Delay of scheduled retries.",
            buckets=RETRY_DELAY_BUCKETS, registry=r)
        self._queue_age = Histogram(
            "smtp_spool_queue_age_seconds", "Time from queueing to leaving the queue.",
            ["outcome"], buckets=QUEUE_AGE_BUCKETS, registry=r)
        self._recipients = Counter(
            "smtp_spool_delivery_recipients", "Recipient delivery attempts by result.",
            ["result"], registry=r)
        self._failures = Counter(
            "smtp_spool_delivery_failure", "Failed recipient deliveries.",
            ["domain", "kind", "reason"], registry=r)
        # Children made once (and so exported at zero): labels() takes a lock and a dict
        # lookup per call, twice per message.
        self._queue_age_by = {o: self._queue_age.labels(outcome=o.value) for o in Outcome}
        self._recipients_by = {r: self._recipients.labels(result=r.value)
                               for r in DeliveryResult}
        self._pending = _PendingCollector()
        self.registry = self._exposition_registry()

    def _exposition_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            registry.register(_WithoutCreated(
                MultiProcessCollector(None, path=self.multiprocess_dir)))  # type: ignore[no-untyped-call]
        else:
            registry.register(_WithoutCreated(self._values))
        registry.register(self._pending)
        return registry

    # -- scrape ---------------------------------------------------------------------------------

    @property
    def pending_fn(self) -> Callable[[], int] | None:
        return self._pending.fn

    @pending_fn.setter
    def pending_fn(self, fn: Callable[[], int] | None) -> None:
        self._pending.fn = fn

    def render(self) -> bytes:
        """The Prometheus text exposition (content type :data:`CONTENT_TYPE`)."""
        return bytes(generate_latest(self.registry))

    # -- inbound --------------------------------------------------------------------------------

    def connection_opened(self) -> None:
        self._connections_active.inc()

    def connection_closed(self) -> None:
        self._connections_active.dec()

    def session_started(self) -> None:
        self._sessions_started.inc()

    def session_ended(self) -> None:
        self._sessions_ended.inc()

    def message_accepted(self) -> None:
        self._messages_accepted.inc()

    def message_rejected(self) -> None:
        self._messages_rejected.inc()

    # -- spool ----------------------------------------------------------------------------------

    def spool_queued(self) -> None:
        self._spool_queued.inc()

    def retry_scheduled(self, delay_seconds: float) -> None:
        self._retry_scheduled.inc()
        self._retry_delay.observe(max(0.0, delay_seconds))

    def entry_finished(self, outcome: Outcome | str, age_seconds: float) -> None:
        """An entry left the queue: counts completed/dropped and observes its age."""
        outcome = Outcome(outcome)
        if outcome is Outcome.COMPLETED:
            self._spool_completed.inc()
        elif outcome is Outcome.DROPPED:
            self._spool_dropped.inc()
        self._queue_age_by[outcome].observe(max(0.0, age_seconds))

    def delivery_result(self, domain: str, status: DeliveryStatus) -> None:
        """One recipient's attempt: counts the result, and failures by domain/kind/reason."""
        result = result_of(status)
        self._recipients_by[result].inc()
        if result is DeliveryResult.DELIVERED or status.kind is None:
            return
        self._failures.labels(domain=self.domain_label(domain), kind=status.kind.value,
                              reason=status.reason.value).inc()

    def domain_label(self, domain: str) -> str:
        d = _normalise_domain(domain)
        return d if d in self.tracked_domains else OTHER_DOMAIN


# -- adapters to the observers the SMTP factory and the scheduler call ---------------------------
# Duck-typed (no import of inbound/ or spool/): they have the methods of
# ``inbound.factory.SessionEvents`` and ``spool.scheduler.SpoolEvents``.


class MetricsSessionEvents:
    """Pass as one of ``SMTPFactory(events=[...])``: one session is one connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def session_started(self, session: object) -> None:
        self.metrics.connection_opened()
        self.metrics.session_started()

    def session_ended(self, session: object) -> None:
        self.metrics.connection_closed()
        self.metrics.session_ended()

    def message_accepted(self, session: object, entry: object) -> None:
        self.metrics.message_accepted()
        self.metrics.spool_queued()  # the 250 comes after the entry is durable

    def message_rejected(self, session: object, reply: object) -> None:
        self.metrics.message_rejected()


class MetricsSpoolEvents:
    """Pass as ``Scheduler(events=...)``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def delivery_result(self, entry: object, recipient: object, status: DeliveryStatus) -> None:
        address = str(getattr(recipient, "address", ""))
        self.metrics.delivery_result(address.rpartition("@")[2], status)

    def retry_scheduled(self, entry: object, delay: float) -> None:
        self.metrics.retry_scheduled(delay)

    def entry_finished(self, entry: object, outcome: str, age: float) -> None:
        self.metrics.entry_finished(outcome, age)

    def recipients_dropped(self, entry: object, count: int) -> None:
        return None
