"""The observer adapters drive the same series as the Metrics verbs."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from kotlin_smtp_py.metrics import Metrics, MetricsSessionEvents, MetricsSpoolEvents
from kotlin_smtp_py.status import DeliveryStatus, Reason


def values(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_session_and_spool_adapters() -> None:
    m = Metrics(["big.test"])
    sessions, spool = MetricsSessionEvents(m), MetricsSpoolEvents(m)
    sessions.session_started(object())
    sessions.message_accepted(object(), object())
    sessions.message_rejected(object(), object())
    assert values(m)[("smtp_connections_active", ())] == 1
    sessions.session_ended(object())
    entry = object()
    spool.delivery_result(entry, SimpleNamespace(address="u@BIG.test"),
                          DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no such user"))
    spool.retry_scheduled(entry, 60.0)
    spool.entry_finished(entry, "dropped", 10.0)
    v = values(m)
    assert v[("smtp_connections_active", ())] == 0
    for name in ("smtp_sessions_started_total", "smtp_sessions_ended_total",
                 "smtp_messages_accepted_total", "smtp_messages_rejected_total",
                 "smtp_spool_queued_total", "smtp_spool_retry_scheduled_total",
                 "smtp_spool_dropped_total"):
        assert v[(name, ())] == 1, name
    assert v[("smtp_spool_delivery_failure_total",
              (("domain", "big.test"), ("kind", "permanent"), ("reason", "recipient")))] == 1
