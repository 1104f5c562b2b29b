"""QueueEntry.evolve: the same value dataclasses.replace builds, and unknown fields refused."""

from __future__ import annotations

import dataclasses

import pytest

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.record import QueueEntry


def _entry() -> QueueEntry:
    rcpts = (Recipient("a@x.test"), Recipient("b@y.test", notify=("FAILURE",)))
    return QueueEntry("txhWd1pkhqpj73VcLB1s", Envelope(sender="s@z.test", recipients=rcpts),
                      rcpts, attempts=2, last_error="4.4.1 timeout")


@pytest.mark.parametrize("changes", [
    {"attempts": 3, "next_attempt": 123.5},
    {"pending": (), "delivered_directly": (Recipient("a@x.test"),)},
    {"first_delivery": True},
    {},
])
def test_evolve_equals_replace(changes: dict[str, object]) -> None:
    entry = _entry()
    evolved, replaced = entry.evolve(**changes), dataclasses.replace(entry, **changes)
    for f in dataclasses.fields(QueueEntry):  # compare=False fields too
        assert getattr(evolved, f.name) == getattr(replaced, f.name), f.name
    assert evolved == replaced and hash(evolved) == hash(replaced)
    assert entry.attempts == 2 and entry.pending  # the original is untouched


def test_evolve_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError):
        _entry().evolve(attempt=3)
