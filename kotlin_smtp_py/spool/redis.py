"""Redis spool: one queue shared by several nodes, stored under ``smtp.spool.redis.keyPrefix``.

Keys (``P`` = key prefix, ``ID`` = queue id)::

    P:msg:ID      raw message bytes (binary-safe, exact round trip)
    P:meta:ID     QueueEntry JSON (QueueEntry.to_json_bytes)
    P:due         sorted set: ID -> due time (epoch seconds)
    P:lock:ID     lease: random token, SET NX PX lockTtl
    P:stage:ID    message being received (APPEND per chunk, expires if the writer dies)
    P:corrupt:ID:{meta,msg}  entries that could not be read, moved aside for an operator

Invariants:
- An entry exists exactly when ``P:meta:ID`` exists; it is then in ``P:due``. The commit script
  renames the fully staged message, writes the metadata and adds the due time in one atomic Lua
  call; the Deferred fires (and the client gets 250) only after that call answered, and, with
  ``minReplicas`` > 0, after ``WAIT`` saw that many replicas acknowledge it (otherwise the entry
  is rolled back unless already leased, and the commit fails). Durability across a Redis restart
  needs ``appendonly yes`` + ``appendfsync always`` on the server, or ``minReplicas``.
- Nothing is staged in process memory beyond one chunk (:data:`CHUNK_BYTES`) plus APPENDs the
  socket has not sent yet; the staged length is checked against the bytes written before commit.
- A node acts on an entry only while it holds the lease. Every change made under a lease
  (complete, reschedule, release, renew) is a Lua compare-and-act on the token, so a node whose
  lease expired can never delete or update the entry another node has taken over
  (:class:`LeaseLost`). Leases are renewed every ``lockTtl/3`` while held; a dead node's lease
  lapses after ``lockTtl`` and the entry becomes due again (claim moves its due time to the lease
  expiry, so ``due()`` does not keep returning entries that are being delivered).
- ``complete`` after a delivery is retried while Redis is unreachable, for as long as this node's
  lease is known to be valid (last successful claim/renewal + ``lockTtl``): the message has
  been handed over, and giving up would let another node deliver it again once the lease lapses.
  After the lease may have lapsed it gives up (RedisUnavailable); the entry is then redelivered.
- ``claim`` copies the raw message to a private temp file in ``tempDir``; the file is removed when
  the claim ends (complete, reschedule, release), whatever the outcome.
- Every Redis call has a deadline (see :mod:`kotlin_smtp_py.redisconn`) and waits within it for a
  reconnect; while Redis stays down commits fail with RedisUnavailable (the protocol answers
  451 4.3.0), claims fail, and work resumes when it returns.
- Who retries: the scheduler (it reschedules with the next attempt time); nothing here retries.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from kotlin_smtp_py.config import Config
from kotlin_smtp_py.envelope import Envelope, is_queue_id, new_queue_id
from kotlin_smtp_py.interfaces import ISpool, ISpoolWriter
from kotlin_smtp_py.redisconn import LuaScript, RedisClient, RedisUnavailable
from kotlin_smtp_py.spool.file import ORPHAN_AGE_SECONDS
from kotlin_smtp_py.spool.record import Claim, QueueEntry, QueueSummary

CLAIM_COPY_PREFIX = "redis-spool-"  # + <queue id>-<token>.eml in smtp.storage.tempDir
log = Logger()

CHUNK_BYTES = 256 * 1024
STAGING_TTL_MS = 3600 * 1000
LIST_BATCH = 200
PENDING_REFRESH_SECONDS = 1.0
COMPLETE_RETRY_SECONDS = 0.5


class MessageTooLarge(Exception):
    """The message exceeds ``maxRawBytes``: answer ``552 5.3.4``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message size {size} exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class LeaseLost(Exception):
    """This node no longer holds the lease on the entry; another node may be delivering it."""


class ReplicationError(Exception):
    """``WAIT`` saw fewer replicas than ``minReplicas`` acknowledge the commit."""


class StagingError(Exception):
    """The staged message in Redis does not match what was written (lost or expired chunk)."""


_APPEND = LuaScript("append", """
local n = redis.call('APPEND', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
""")

# KEYS stage msg meta due; ARGV length meta score id
_COMMIT = LuaScript("commit", """
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
local n = tonumber(ARGV[1])
if n > 0 then
  if redis.call('STRLEN', KEYS[1]) ~= n then return -1 end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '')
end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
return redis.call('ZCARD', KEYS[4])
""")

# KEYS lock meta due msg corrupt_msg; ARGV token ttl_ms lease_score id
#   -> nil (gone) | 0 (leased) | -1 (due without metadata: quarantined) | meta
# Metadata missing while the id is still due means it was evicted (a maxmemory policy other
# than noeviction) or deleted by hand: the id left the due set only by a claim that never
# came, and the body stayed for ever, unlisted. Its body is kept under corrupt:, loudly.
_CLAIM = LuaScript("claim", """
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('ZREM', KEYS[3], ARGV[4]) == 0 then return false end
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[5]) end
  return -1
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return redis.call('GET', KEYS[2])
""")

# KEYS lock due; ARGV token ttl_ms lease_score id
_RENEW = LuaScript("renew", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return 1
""")

# KEYS lock msg meta due; ARGV token id
_COMPLETE = LuaScript("complete", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
return redis.call('ZCARD', KEYS[4])
""")

# KEYS lock meta due; ARGV token meta score id
_RESCHEDULE = LuaScript("reschedule", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('DEL', KEYS[1])
return redis.call('ZCARD', KEYS[3])
""")

# KEYS lock due; ARGV token score id
_RELEASE = LuaScript("release", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
return 1
""")

# KEYS lock msg meta due; ARGV id  -> -1 (leased) | 0 (gone) | zcard+1 (deleted)
_DELETE = LuaScript("delete", """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
if n == 0 then return 0 end
return redis.call('ZCARD', KEYS[4]) + 1
""")

# KEYS lock meta due; ARGV old_meta new_meta score id
_RETRY = LuaScript("retry", """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
""")

# KEYS meta1 msg1 meta2 msg2 ...  -> {meta1, len1, meta2, len2, ...}; a key of a foreign type
# gives false / -1 for its entry instead of failing the whole listing (pcall)
_LIST = LuaScript("list", """
local out = {}
for i = 1, #KEYS, 2 do
  local meta = redis.pcall('GET', KEYS[i])
  if type(meta) == 'table' and meta.err then meta = false end
  local len = redis.pcall('STRLEN', KEYS[i + 1])
  if type(len) == 'table' and len.err then len = -1 end
  out[#out + 1] = meta
  out[#out + 1] = len
end
return out
""")

# KEYS lock msg meta due corrupt_msg corrupt_meta; ARGV token id
_QUARANTINE = LuaScript("quarantine", """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[5]) end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[6]) end
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
""")


def _score(t: float) -> str:
    return f"{t:.6f}"


def _d(coro: Coroutine[Any, Any, Any]) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coro)


@dataclass
class _Held:
    queue_id: str
    path: str
    next_attempt: float
    expires: float = 0.0  # the lease is valid at least until then (clock seconds)
    lost: bool = False


# What parsing a damaged meta record can raise (1e999 in an int field, deeply nested JSON...)
_UNREADABLE = (ValueError, KeyError, TypeError, OverflowError, RecursionError)


def _queue_ids(members: Any) -> list[str]:
    """Members of the due set that are queue ids; anything else (written by hand or by another
    program under our prefix) is logged and skipped rather than stopping every pass."""
    out: list[str] = []
    for member in members or []:
        text = member.decode("ascii", "replace") if isinstance(member, bytes) else str(member)
        if is_queue_id(text):
            out.append(text)
        elif text not in _warned_members:  # once per process, not on every pass
            _warned_members.add(text)
            log.warn("ignoring a member of the due set that is not a queue id: {member!r}",
                     member=text[:80])
    return out


_warned_members: set[str] = set()


@implementer(ISpoolWriter)
class RedisSpoolWriter:
    """Streams one message into ``P:stage:ID`` with APPEND; commit makes it an entry."""

    def __init__(self, spool: RedisSpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.max_message_bytes = spool.max_message_bytes
        self._spool = spool
        self._stage = spool.key("stage", queue_id)
        self._buf = bytearray()
        self._size = 0
        self._sent = 0
        self._inflight: list[defer.Deferred[Any]] = []
        self._error: Exception | None = None
        self._done = False
        self.too_big = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("writer already finished")
        self._size += len(data)
        if self.too_big or self._error is not None:
            return
        if self._size > self.max_message_bytes:
            self.too_big = True
            self._buf = bytearray()
            self._discard_stage()
            return
        self._buf += data
        if len(self._buf) >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        chunk, self._buf = bytes(self._buf), bytearray()
        self._sent += len(chunk)
        expected = self._sent
        d = self._spool.client.eval(_APPEND, [self._stage], [chunk, STAGING_TTL_MS])

        def check(length: Any) -> None:
            if length != expected and self._error is None:
                self._error = StagingError(f"staged length {length}, expected {expected}")

        def failed(failure: Any) -> None:
            if self._error is None:
                self._error = failure.value

        d.addCallbacks(check, failed)
        self._inflight.append(d)
        d.addBoth(lambda _: self._inflight.remove(d))

    def _discard_stage(self) -> None:
        pending = list(self._inflight)

        def delete(_: object) -> defer.Deferred[Any]:
            return self._spool.client.execute("DEL", self._stage)

        d = defer.DeferredList(pending).addCallback(delete)
        d.addErrback(lambda f: log.debug("staging cleanup failed: {error}",
                                         error=f.getErrorMessage()))

    def commit(self, envelope: Envelope) -> defer.Deferred[QueueEntry]:
        if self._done:
            return defer.fail(RuntimeError("writer already finished"))
        self._done = True
        return _d(self._commit(envelope))

    async def _commit(self, envelope: Envelope) -> QueueEntry:
        if self.too_big:
            raise MessageTooLarge(self._size, self.max_message_bytes)
        self._flush()
        await defer.DeferredList(list(self._inflight))
        if self._error is not None:
            self._discard_stage()
            if isinstance(self._error, RedisUnavailable):
                raise self._error
            raise StagingError(f"staging {self.queue_id} failed: {self._error}")
        try:
            return await self._spool.commit_staged(self.queue_id, envelope, self._sent)
        except BaseException:
            self._discard_stage()
            raise

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._sent:
            self._discard_stage()


@implementer(ISpool)
class RedisSpool:
    """The Redis spool backend. Build with :meth:`from_config` (the service) or directly (tests)."""

    def __init__(self, client: RedisClient, key_prefix: str, temp_dir: str,
                 lock_ttl_seconds: float = 900.0, max_raw_bytes: int = 26214400,
                 min_replicas: int = 0, replica_wait_ms: int | None = None,
                 clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        if lock_ttl_seconds <= 0:
            raise ValueError("lock_ttl_seconds must be positive")
        self.client = client
        self.prefix = key_prefix
        self.temp_dir = os.path.abspath(temp_dir)
        os.makedirs(self.temp_dir, exist_ok=True)
        self._remove_stale_copies()
        self.lock_ttl = float(lock_ttl_seconds)
        self.max_message_bytes = max_raw_bytes
        self.min_replicas = min_replicas
        self.replica_wait_ms = replica_wait_ms if replica_wait_ms is not None else max(
            1, int(client.command_timeout * 500))
        self.clock = clock
        self._held: dict[str, _Held] = {}
        self._renewer: LoopingCall | None = None
        self._pending = 0
        self._pending_at = float("-inf")
        self._pending_refreshing = False

    @classmethod
    def from_config(cls, client: RedisClient, config: Config,
                    clock: IReactorTime | None = None) -> RedisSpool:
        r = config.smtp.spool.redis
        return cls(client, r.keyPrefix, config.smtp.storage.tempDir,
                   lock_ttl_seconds=r.lockTtlSeconds, max_raw_bytes=r.maxRawBytes,
                   min_replicas=r.minReplicas, clock=clock)

    def key(self, kind: str, queue_id: str = "") -> str:
        return f"{self.prefix}:{kind}:{queue_id}" if queue_id else f"{self.prefix}:{kind}"

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _set_pending(self, count: Any) -> None:
        if isinstance(count, int) and count >= 0:
            self._pending = count
            self._pending_at = self._now()

    # -- receiving -----------------------------------------------------------------------------

    def open_writer(self) -> RedisSpoolWriter:
        return RedisSpoolWriter(self, new_queue_id())

    def enqueue(self, envelope: Envelope, message: bytes) -> defer.Deferred[QueueEntry]:
        writer = self.open_writer()
        writer.write(message)
        return writer.commit(envelope)

    async def commit_staged(self, queue_id: str, envelope: Envelope, length: int) -> QueueEntry:
        """Turn ``P:stage:ID`` (``length`` bytes) into a queue entry; used by the writer."""
        now = self._now()
        entry = QueueEntry(queue_id=queue_id, envelope=envelope, pending=envelope.recipients,
                           next_attempt=now, created=now)
        conn = await self.client.connection_soon() if self.min_replicas > 0 else None
        result = await self.client.eval(
            _COMMIT, [self.key("stage", queue_id), self.key("msg", queue_id),
                      self.key("meta", queue_id), self.key("due")],
            [length, entry.to_json_bytes(), _score(now), queue_id], conn=conn)
        if result == -1:
            raise StagingError(f"staged message for {queue_id} is incomplete or expired")
        if result == -2:
            raise StagingError(f"queue id {queue_id} already exists")
        self._set_pending(result)
        if self.min_replicas > 0:
            await self._wait_replicas(queue_id, conn)
        log.debug("queued {queue_id} ({size} bytes)", queue_id=queue_id, size=length)
        return entry

    async def _wait_replicas(self, queue_id: str, conn: Any) -> None:
        timeout = self.client.command_timeout + self.replica_wait_ms / 1000.0
        acked = await self.client.execute("WAIT", self.min_replicas, self.replica_wait_ms,
                                          conn=conn, timeout=timeout)
        if isinstance(acked, int) and acked >= self.min_replicas:
            return
        log.warn("commit of {queue_id} reached {acked} replicas, {required} required; "
                 "rolling back", queue_id=queue_id, acked=acked, required=self.min_replicas)
        try:
            await self._delete(queue_id)
        except Exception as exc:
            log.warn("rollback of {queue_id} failed: {error}", queue_id=queue_id, error=exc)
        raise ReplicationError(f"{acked} of {self.min_replicas} replicas acknowledged")

    # -- scheduling ----------------------------------------------------------------------------

    def due(self, now: float, limit: int) -> defer.Deferred[list[str]]:
        async def run() -> list[str]:
            ids = await self.client.execute("ZRANGEBYSCORE", self.key("due"), "-inf",
                                            _score(now), "LIMIT", 0, max(limit, 0))
            return _queue_ids(ids)

        return _d(run())

    def claim(self, queue_id: str) -> defer.Deferred[Claim | None]:
        return _d(self._claim(queue_id))

    async def _claim(self, queue_id: str) -> Claim | None:
        if not is_queue_id(queue_id):
            return None
        token = secrets.token_hex(16)
        now = self._now()
        meta = await self.client.eval(
            _CLAIM, [self.key("lock", queue_id), self.key("meta", queue_id), self.key("due"),
                     self.key("msg", queue_id), self.key("corrupt", queue_id + ":msg")],
            [token, self._ttl_ms(), _score(now + self.lock_ttl), queue_id])
        if meta == -1:
            log.error("queue entry {queue_id} lost its metadata in Redis (evicted? use "
                      "maxmemory-policy noeviction); its message is kept as "
                      "{prefix}:corrupt:{queue_id}:msg", queue_id=queue_id, prefix=self.prefix,
                      event="spool_entry_corrupt")
            return None
        if not isinstance(meta, bytes):
            return None
        try:
            entry = QueueEntry.from_json_bytes(meta)
            message = await self.client.execute("GET", self.key("msg", queue_id))
            if entry.queue_id != queue_id or not isinstance(message, bytes):
                raise ValueError("metadata does not match or message is missing")
        except _UNREADABLE as exc:
            await self._quarantine(queue_id, token, str(exc))
            return None
        except BaseException:
            await self._release_quietly(queue_id, token, now)
            raise
        try:
            path = self._write_temp(queue_id, token, message)
        except OSError:
            await self._release_quietly(queue_id, token, entry.next_attempt)
            raise
        self._held[token] = _Held(queue_id, path, entry.next_attempt, now + self.lock_ttl)
        self._ensure_renewal()
        return Claim(entry, token, path)

    def _ttl_ms(self) -> int:
        return max(1, int(self.lock_ttl * 1000))

    def _remove_stale_copies(self) -> None:
        """Start-up: the local copies of claimed messages a killed process left behind (only
        its end of the claim removes one). Only those past ORPHAN_AGE_SECONDS: the copies of
        other live processes sharing the directory are younger (a claim ends long before)."""
        cutoff = time.time() - ORPHAN_AGE_SECONDS
        try:
            with os.scandir(self.temp_dir) as it:
                stale = [e.path for e in it if e.name.startswith(CLAIM_COPY_PREFIX)
                         and e.name.endswith(".eml") and e.stat().st_mtime < cutoff]
        except OSError:
            return
        for path in stale:
            _unlink_quietly(path)
        if stale:
            log.info("removed {n} stale claimed-message copies from {dir}", n=len(stale),
                     dir=self.temp_dir, event="spool_orphans_removed")

    def _write_temp(self, queue_id: str, token: str, message: bytes) -> str:
        path = os.path.join(self.temp_dir, f"{CLAIM_COPY_PREFIX}{queue_id}-{token[:8]}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(message)
        except BaseException:
            _unlink_quietly(path)
            raise
        return path

    async def _quarantine(self, queue_id: str, token: str, why: str) -> None:
        log.error("queue entry {queue_id} is unreadable ({reason}); moved to {prefix}:corrupt",
                  queue_id=queue_id, reason=why, prefix=self.prefix, event="spool_entry_corrupt")
        await self.client.eval(
            _QUARANTINE, [self.key("lock", queue_id), self.key("msg", queue_id),
                          self.key("meta", queue_id), self.key("due"),
                          self.key("corrupt", queue_id + ":msg"),
                          self.key("corrupt", queue_id + ":meta")], [token, queue_id])

    async def _release_quietly(self, queue_id: str, token: str, due_at: float) -> None:
        try:
            await self.client.eval(_RELEASE, [self.key("lock", queue_id), self.key("due")],
                                   [token, _score(due_at), queue_id])
        except Exception as exc:
            log.warn("could not release {queue_id}: {error}; the lease expires by itself",
                     queue_id=queue_id, error=exc)

    def _end(self, claim: Claim) -> _Held | None:
        held = self._held.pop(claim.token, None)
        if held is not None:
            _unlink_quietly(held.path)
        if not self._held and self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        return held

    def complete(self, claim: Claim) -> defer.Deferred[None]:
        async def run() -> None:
            qid = claim.entry.queue_id
            try:
                result = await self._complete_while_leased(claim)
            finally:
                self._end(claim)
            if result == -1:
                raise LeaseLost(f"lease on {qid} was lost; not deleting")
            self._set_pending(result)

        return _d(run())

    async def _complete_while_leased(self, claim: Claim) -> Any:
        """The complete script, retried through a Redis outage while the lease is valid."""
        from twisted.internet import task

        qid = claim.entry.queue_id
        keys = [self.key("lock", qid), self.key("msg", qid), self.key("meta", qid),
                self.key("due")]
        retried = False
        while True:
            try:
                result = await self.client.eval(_COMPLETE, keys, [claim.token, qid])
            except RedisUnavailable as exc:
                held = self._held.get(claim.token)
                if held is None or held.lost or \
                        self._now() + COMPLETE_RETRY_SECONDS >= held.expires:
                    raise
                if not retried:
                    log.warn("could not mark {queue_id} delivered ({error}); retrying while "
                             "its lease lasts", queue_id=qid, error=exc)
                retried = True
                await task.deferLater(self.clock, COMPLETE_RETRY_SECONDS)
                continue
            if result == -1 and retried:
                # an earlier attempt may have run before its reply was lost: gone is done
                if await self.client.execute("EXISTS", self.key("meta", qid)) == 0:
                    log.info("{queue_id} was already completed", queue_id=qid)
                    return None
            return result

    def reschedule(self, claim: Claim, entry: QueueEntry) -> defer.Deferred[None]:
        async def run() -> None:
            qid = claim.entry.queue_id
            if entry.queue_id != qid:
                self._end(claim)
                raise ValueError(f"entry {entry.queue_id} does not belong to claim on {qid}")
            try:
                result = await self.client.eval(
                    _RESCHEDULE, [self.key("lock", qid), self.key("meta", qid), self.key("due")],
                    [claim.token, entry.to_json_bytes(), _score(entry.next_attempt), qid])
            finally:
                self._end(claim)
            if result == -1:
                raise LeaseLost(f"lease on {qid} was lost; not updating")
            self._set_pending(result)

        return _d(run())

    def release(self, claim: Claim) -> defer.Deferred[None]:
        async def run() -> None:
            qid = claim.entry.queue_id
            try:
                result = await self.client.eval(
                    _RELEASE, [self.key("lock", qid), self.key("due")],
                    [claim.token, _score(claim.entry.next_attempt), qid])
            finally:
                self._end(claim)
            if result != 1:
                log.info("lease on {queue_id} had already expired at release", queue_id=qid)

        return _d(run())

    def release_all(self) -> defer.Deferred[Any]:
        """Give back every lease this spool holds (shutdown); entries stay queued."""
        ds = []
        for token, held in list(self._held.items()):
            entry = QueueEntry(held.queue_id, Envelope("", ()), (),
                               next_attempt=held.next_attempt)
            ds.append(self.release(Claim(entry, token, held.path)))
        return defer.DeferredList(ds)

    def close(self) -> None:
        """Stop lease renewal (leases then lapse after lockTtl). Temp files are removed."""
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        for held in self._held.values():
            _unlink_quietly(held.path)
        self._held.clear()

    # -- lease renewal -------------------------------------------------------------------------

    def _ensure_renewal(self) -> None:
        if self._renewer is not None and self._renewer.running:
            return
        self._renewer = LoopingCall(lambda: _d(self._renew_all()))
        self._renewer.clock = self.clock
        self._renewer.start(self.lock_ttl / 3.0, now=False).addErrback(
            lambda f: log.failure("lease renewal loop stopped", f))

    async def _renew_all(self) -> None:
        """One renewal tick; never raises (a LoopingCall that raises stops for good)."""
        now = self._now()
        for token, held in list(self._held.items()):
            if held.lost:
                continue
            try:
                ok = await self.client.eval(
                    _RENEW, [self.key("lock", held.queue_id), self.key("due")],
                    [token, self._ttl_ms(), _score(now + self.lock_ttl), held.queue_id])
            except Exception as exc:
                log.warn("could not renew lease on {queue_id}: {error}",
                         queue_id=held.queue_id, error=exc)
                continue
            if ok == 1:
                held.expires = now + self.lock_ttl
            else:
                held.lost = True
                log.warn("lease on {queue_id} was lost; another node may deliver it",
                         queue_id=held.queue_id)

    def lease_lost(self, claim: Claim) -> bool:
        """True when renewal found the lease taken over (the delivery should stop early)."""
        held = self._held.get(claim.token)
        return held is None or held.lost

    # -- inspection and operator actions -------------------------------------------------------

    def pending_count(self) -> int:
        """The cached ZCARD (updated by every commit/complete/delete); a stale cache starts a
        refresh in the background. Safe to call from any thread (metrics scrapes)."""
        if self._now() - self._pending_at >= PENDING_REFRESH_SECONDS \
                and not self._pending_refreshing:
            self._pending_refreshing = True
            if isInIOThread():  # type: ignore[no-untyped-call]
                self._refresh_pending()
            else:
                from twisted.internet import reactor
                reactor.callFromThread(self._refresh_pending)  # type: ignore[attr-defined]
        return self._pending

    def _refresh_pending(self) -> None:
        def done(result: Any) -> None:
            self._pending_refreshing = False
            if isinstance(result, int):
                self._set_pending(result)

        # maybeDeferred: a synchronous raise (no connection yet) must not leave the refresh
        # flag set forever, or the cached count would never be refreshed again.
        defer.maybeDeferred(self.client.execute, "ZCARD", self.key("due")).addBoth(done)

    def list_entries(self) -> defer.Deferred[list[QueueSummary]]:
        async def run() -> list[QueueSummary]:
            ids = _queue_ids(await self.client.execute("ZRANGE", self.key("due"), 0, -1))
            out: list[QueueSummary] = []
            for start in range(0, len(ids), LIST_BATCH):
                batch = ids[start:start + LIST_BATCH]
                keys = [k for qid in batch for k in (self.key("meta", qid), self.key("msg", qid))]
                reply = await self.client.eval(_LIST, keys, [])
                for i, qid in enumerate(batch):
                    summary = self._summary(qid, reply[2 * i], reply[2 * i + 1])
                    if summary is not None:
                        out.append(summary)
            return out

        return _d(run())

    @staticmethod
    def _summary(qid: str, meta: Any, length: Any) -> QueueSummary | None:
        if not isinstance(meta, bytes):
            return None
        try:
            entry = QueueEntry.from_json_bytes(meta)
        except _UNREADABLE:
            log.warn("queue entry {queue_id} has unreadable metadata", queue_id=qid)
            return None
        env = entry.envelope
        return QueueSummary(qid, env.sender, tuple(r.address for r in entry.pending),
                            env.size or int(length or 0), entry.attempts, entry.next_attempt,
                            entry.created, entry.last_error)

    def get(self, queue_id: str) -> defer.Deferred[QueueEntry | None]:
        async def run() -> QueueEntry | None:
            if not is_queue_id(queue_id):
                return None
            meta = await self.client.execute("GET", self.key("meta", queue_id))
            if not isinstance(meta, bytes):
                return None
            try:
                return QueueEntry.from_json_bytes(meta)
            except _UNREADABLE:
                log.warn("queue entry {queue_id} has unreadable metadata", queue_id=queue_id)
                return None

        return _d(run())

    def read_message(self, queue_id: str) -> defer.Deferred[bytes | None]:
        async def run() -> bytes | None:
            if not is_queue_id(queue_id):
                return None
            message = await self.client.execute("GET", self.key("msg", queue_id))
            return message if isinstance(message, bytes) else None

        return _d(run())

    async def _delete(self, queue_id: str) -> bool:
        result = await self.client.eval(
            _DELETE, [self.key("lock", queue_id), self.key("msg", queue_id),
                      self.key("meta", queue_id), self.key("due")], [queue_id])
        if isinstance(result, int) and result > 0:
            self._set_pending(result - 1)
            return True
        return False

    def delete(self, queue_id: str) -> defer.Deferred[bool]:
        """Remove an entry; False when it does not exist or is being delivered (leased)."""
        if not is_queue_id(queue_id):
            return defer.succeed(False)
        return _d(self._delete(queue_id))

    def flush_slot(self, cooldown_ms: int) -> defer.Deferred[bool]:
        """Take the cluster-wide ``queue flush`` slot: False while an earlier flush's
        cooldown (``triggerCooldownMillis``) runs, on any node or host."""
        d = self.client.execute("SET", self.key("flush-cooldown"), "1", "PX",
                                max(int(cooldown_ms), 1), "NX")
        return d.addCallback(lambda reply: reply is not None)

    def retry_now(self, queue_id: str | None) -> defer.Deferred[int]:
        """Make one entry (or all) due now; leased entries are skipped (they are in flight)."""
        async def run() -> int:
            if queue_id is not None:
                if not is_queue_id(queue_id):
                    return 0
                ids = [queue_id]
            else:
                ids = _queue_ids(await self.client.execute("ZRANGE", self.key("due"), 0, -1))
            now = self._now()
            count = 0
            for start in range(0, len(ids), LIST_BATCH):
                results = await defer.gatherResults(
                    [_d(self._retry_one(qid, now)) for qid in ids[start:start + LIST_BATCH]])
                count += sum(results)
            return count

        return _d(run())

    async def _retry_one(self, queue_id: str, now: float) -> int:
        meta = await self.client.execute("GET", self.key("meta", queue_id))
        if not isinstance(meta, bytes):
            return 0
        try:
            entry = QueueEntry.from_json_bytes(meta)
        except _UNREADABLE:
            return 0
        new = entry.evolve(next_attempt=now).to_json_bytes()
        result = await self.client.eval(
            _RETRY, [self.key("lock", queue_id), self.key("meta", queue_id), self.key("due")],
            [meta, new, _score(now), queue_id])
        return 1 if result == 1 else 0

    def healthy(self) -> defer.Deferred[tuple[bool, str]]:
        return _d(self.client.ping())


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
