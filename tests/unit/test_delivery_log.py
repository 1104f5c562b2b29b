"""The delivery_attempt line names the host that answered, when a peer did."""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.scheduler import log_delivery
from kotlin_smtp_py.status import DeliveryStatus, Reason


def _attempts(status: DeliveryStatus) -> list[dict[str, Any]]:
    rcpt = Recipient("r@remote.test")
    entry = QueueEntry("txhWd1pkhqpj73VcLB1s", Envelope(sender="s@x.test", recipients=(rcpt,)),
                       (rcpt,))
    seen: list[dict[str, Any]] = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)
    try:
        log_delivery(entry, rcpt, status, attempt=2)
    finally:
        globalLogPublisher.removeObserver(observer)
    return [e for e in seen if e.get("event") == "delivery_attempt"]


def test_remote_mta_is_logged_when_a_peer_answered() -> None:
    (event,) = _attempts(DeliveryStatus.delivered("delivered to mx.remote.test: 250 ok",
                                                  remote_mta="mx.remote.test"))
    assert event["remote_mta"] == "mx.remote.test" and event["attempt"] == 2
    (failed,) = _attempts(DeliveryStatus.transient(Reason.DNS, "no MX", "4.4.3"))
    assert "remote_mta" not in failed and failed["reason"] == Reason.DNS.value
