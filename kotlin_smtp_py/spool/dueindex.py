"""The file spool's in-memory due index: queue id -> next attempt time, earliest first.

A dict is the truth; heaps with lazy deletion answer "which entries are due" in O(k log n)
instead of scanning every entry. The scheduler asks after each finished delivery, so with a
backlog of 10,000 entries a full scan per question cost more CPU than the deliveries themselves
(measured on the spool-drain benchmark). Stale heap items (an entry rescheduled or gone) are
skipped when met, and the heaps are rebuilt when stale items outnumber live ones.

Several processes share one spool directory (``smtp.workers``), and each indexes every entry.
If all of them offered the same earliest entries, most claims would collide on the lease. So
entries are split into *mine* (committed by this process, or whose id hashes to this process's
share) and *theirs*: ``due`` offers mine first and takes theirs only to fill the rest, so
nothing waits on a process that is busy or gone.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Container, Iterator, Mapping

from kotlin_smtp_py.spool.scheduler import CLOCK_STEP_HORIZON

_Heap = list[tuple[float, str]]


class DueIndex:
    def __init__(self, initial: Mapping[str, float] | None = None, share: int = 0,
                 shares: int = 1) -> None:
        self.share = share
        self.shares = max(1, shares)
        self._due: dict[str, float] = dict(initial or {})
        self._own: set[str] = set()
        self._mine: _Heap = []
        self._theirs: _Heap = []
        self._last_now: float | None = None
        self._rebuild()

    def replace(self, due: Mapping[str, float]) -> None:
        """Adopt a whole new id -> due map (a scan); entries this process committed and that
        are still there stay its own."""
        self._due = dict(due)
        self._own &= self._due.keys()
        self._rebuild()

    def _is_mine(self, queue_id: str) -> bool:
        return self.shares == 1 or queue_id in self._own or \
            zlib.crc32(queue_id.encode("ascii", "replace")) % self.shares == self.share

    def _rebuild(self) -> None:
        self._mine, self._theirs = [], []
        for qid, t in self._due.items():
            (self._mine if self._is_mine(qid) else self._theirs).append((t, qid))
        heapq.heapify(self._mine)
        heapq.heapify(self._theirs)

    def _clamp(self, now: float) -> None:
        # (the spool stores wall-clock times, envelope mtimes; see CLOCK_STEP_HORIZON)
        late = [qid for qid, t in self._due.items() if t > now + CLOCK_STEP_HORIZON]
        if late:
            for qid in late:
                self._due[qid] = now
            self._rebuild()

    def set(self, queue_id: str, due: float, own: bool = False) -> None:
        """Index (or move) an entry; ``own`` marks one this process committed."""
        if own:
            self._own.add(queue_id)
        if self._due.get(queue_id) == due:
            return
        self._due[queue_id] = due
        heap = self._mine if self._is_mine(queue_id) else self._theirs
        heapq.heappush(heap, (due, queue_id))
        if len(self._mine) + len(self._theirs) > 2 * len(self._due) + 1024:
            self._rebuild()

    def discard(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._own.discard(queue_id)

    def get(self, queue_id: str) -> float | None:
        return self._due.get(queue_id)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._due

    def __len__(self) -> int:
        return len(self._due)

    def __iter__(self) -> Iterator[str]:
        return iter(self._due)

    def snapshot(self) -> dict[str, float]:
        return dict(self._due)

    def due(self, now: float, limit: int, skip: Container[str] = ()) -> list[str]:
        """Up to ``limit`` ids due at ``now`` (mine first, each group earliest first), leaving
        out ``skip`` (entries this process holds)."""
        if self._last_now is not None and now < self._last_now - 60.0:
            self._clamp(now)  # the wall clock was stepped back while we ran
        self._last_now = now
        picked: list[str] = []
        seen: set[str] = set()
        for heap in (self._mine, self._theirs):
            back: _Heap = []
            while heap and len(picked) < limit and heap[0][0] <= now:
                item = heapq.heappop(heap)
                t, qid = item
                if self._due.get(qid) != t or qid in seen:
                    continue  # stale (rescheduled or gone since it was pushed) or a duplicate
                seen.add(qid)
                back.append(item)
                if qid not in skip:
                    picked.append(qid)
            # Nothing is consumed here: a pick is only a suggestion until the entry is claimed.
            for item in back:
                heapq.heappush(heap, item)
        return picked
