"""DueIndex against the obvious model (a dict scanned and sorted), under random operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kotlin_smtp_py.spool.dueindex import DueIndex

IDS = [f"Q{i}" for i in range(12)]
ops = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(IDS), st.integers(0, 20)),
    st.tuples(st.just("discard"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("due"), st.integers(0, 25), st.integers(1, 6)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops, st.sets(st.sampled_from(IDS), max_size=4))
def test_matches_a_sorted_scan(operations: list[tuple[str, object, int]],
                               held: set[str]) -> None:
    index = DueIndex()
    model: dict[str, float] = {}
    for op, a, b in operations:
        if op == "set":
            index.set(str(a), float(b))
            model[str(a)] = float(b)
        elif op == "discard":
            index.discard(str(a))
            model.pop(str(a), None)
        else:
            now, limit = float(a), b  # type: ignore[arg-type]
            got = index.due(now, limit, held)
            ready = sorted((t, q) for q, t in model.items() if t <= now and q not in held)
            expected_times = [t for t, _ in ready[:limit]]
            # Ties may come in any order; the due times and the membership must match.
            assert [model[q] for q in got] == expected_times
            assert len(set(got)) == len(got)
            assert set(got) <= {q for _, q in ready}
        assert len(index) == len(model)
        assert index.snapshot() == model


def test_stale_items_do_not_pile_up() -> None:
    index = DueIndex()
    for i in range(20000):
        index.set("Q1", float(i))  # rescheduled over and over
    assert len(index._mine) + len(index._theirs) <= 2 * len(index) + 1024
    assert index.due(1e9, 10) == ["Q1"]


def test_shared_spools_offer_their_own_share_first_then_the_rest() -> None:
    ids = [f"Q{i:03d}" for i in range(40)]
    a = DueIndex({q: float(i) for i, q in enumerate(ids)}, share=0, shares=2)
    b = DueIndex({q: float(i) for i, q in enumerate(ids)}, share=1, shares=2)
    first_a, first_b = a.due(100.0, 10), b.due(100.0, 10)
    assert not set(first_a) & set(first_b)  # two processes start on disjoint entries
    # Everything is still reachable from either side (a dead peer's share is not stranded).
    assert set(a.due(100.0, 40)) == set(ids) == set(b.due(100.0, 40))
    # An entry this process committed is its own whatever its hash says.
    theirs = first_b[-1]  # in b's share, so a offers it only after its own
    a.set(theirs, -1.0, own=True)
    assert a.due(100.0, 1) == [theirs]
