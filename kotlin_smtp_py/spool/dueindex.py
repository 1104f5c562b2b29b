"""The file spool's in-memory due index: queue id -> next attempt time, earliest first.

A dict is the truth; a heap with lazy deletion answers "which entries are due" in
O(k log n) instead of scanning every entry. The scheduler asks after each finished delivery,
so with a backlog of 10,000 entries a full scan per question cost more CPU than the deliveries
themselves (measured on the spool-drain benchmark). Stale heap items (an entry rescheduled or
gone) are skipped when met and the heap is rebuilt when they outnumber live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterator, Mapping


class DueIndex:
    def __init__(self, initial: Mapping[str, float] | None = None) -> None:
        self._due: dict[str, float] = dict(initial or {})
        self._heap: list[tuple[float, str]] = []
        self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(t, qid) for qid, t in self._due.items()]
        heapq.heapify(self._heap)

    def set(self, queue_id: str, due: float) -> None:
        if self._due.get(queue_id) == due:
            return
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._rebuild()

    def discard(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)

    def get(self, queue_id: str, default: float | None = None) -> float | None:
        return self._due.get(queue_id, default)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._due

    def __len__(self) -> int:
        return len(self._due)

    def __iter__(self) -> Iterator[str]:
        return iter(self._due)

    def snapshot(self) -> dict[str, float]:
        return dict(self._due)

    def due(self, now: float, limit: int, skip: Container[str] = ()) -> list[str]:
        """Up to ``limit`` ids due at ``now``, earliest first, leaving out ``skip`` (leased)."""
        picked: list[tuple[float, str]] = []
        kept: list[tuple[float, str]] = []
        seen: set[str] = set()
        heap = self._heap
        while heap and len(picked) < limit and heap[0][0] <= now:
            item = heapq.heappop(heap)
            t, qid = item
            if self._due.get(qid) != t or qid in seen:
                continue  # stale (rescheduled or gone since it was pushed) or a duplicate
            seen.add(qid)
            (kept if qid in skip else picked).append(item)
        # Nothing is consumed here: a pick is only a suggestion until the entry is claimed.
        for item in picked:
            heapq.heappush(heap, item)
        for item in kept:
            heapq.heappush(heap, item)
        return [qid for _, qid in picked]
