"""SIGKILL a node while it holds leases: the others deliver its entries after the lease TTL.

The sink holds the victim's deliveries after reading their final dot (no reply), so the victim
fills its ``workerConcurrency`` with leased entries whose messages the sink has but has not
accepted: it never handed one over, so a second delivery of one of its tokens would be a real
duplicate, not the unavoidable SMTP one. The other nodes deliver freely and keep polling the
queue; the holds outlast the TTL, so the victim's leases must be renewed for them not to take
those entries over while the victim is alive.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

from helpers import redis_command
from mn_support import (
    LoadStats,
    RedisServer,
    TokenSink,
    lock_keys,
    new_token,
    queue_size,
    run_client,
    start_nodes,
    wait_until,
)
from mtaproc import MtaPool

LOCK_TTL = 4  # seconds; renewed every TTL/3 while a delivery runs
CONCURRENCY = 4
MESSAGES = 48


def _taken_over(sink: TokenSink, tokens: set[str]) -> list[str]:
    """Tokens of ``tokens`` that some delivery attempt besides the held one has touched."""
    return [t for t in tokens if len(sink.attempts_for(t)) > 1]


def test_sigkilled_node_leases_expire_and_others_deliver_exactly_once(
        private_redis: RedisServer, sink: TokenSink, nodes_pool: MtaPool) -> None:
    prefix = f"mn:{uuid.uuid4().hex[:12]}"
    nodes = start_nodes(nodes_pool, ["a", "b", "c"], private_redis, prefix, sink.port,
                        lock_ttl=LOCK_TTL, concurrency=CONCURRENCY)
    victim, survivors = nodes[0], nodes[1:]
    sink.hold_only = {victim.ehlo}
    sink.release.clear()  # hold the victim's deliveries after their final dot
    tokens = [new_token(f"k{i}") for i in range(MESSAGES)]
    stats = LoadStats()
    clients = [threading.Thread(target=run_client, args=(nodes[k], tokens[k::3], stats),
                                daemon=True) for k in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    assert Counter(r.code for r in stats.snapshot()) == Counter({250: MESSAGES})

    # the victim is busy with CONCURRENCY held deliveries (each one a lease in Redis)
    wait_until(lambda: len(sink.held()) == CONCURRENCY, timeout=60, interval=0.05,
               message=f"{CONCURRENCY} held deliveries on the victim")
    victim_tokens = {a.token for a in sink.held()}
    assert {a.node for a in sink.held()} == {victim.ehlo}
    # the others deliver everything else meanwhile, and then keep polling the queue
    others = set(tokens) - victim_tokens
    wait_until(lambda: set(sink.delivered_tokens()) >= others, timeout=90, interval=0.1,
               message="the other nodes delivered the rest")
    # Hold longer than the TTL: without renewal the victim's leases would lapse and a polling
    # node would start a second delivery of the same token.
    window_end = time.monotonic() + 1.5 * LOCK_TTL
    taken = wait_until(lambda: _taken_over(sink, victim_tokens) or time.monotonic() > window_end,
                       timeout=3 * LOCK_TTL, interval=0.05, message="lease observation window")
    assert taken is True, f"leased entries taken over from a live node: {taken}"
    assert len(lock_keys(private_redis, prefix)) == CONCURRENCY
    assert queue_size(private_redis, prefix) == CONCURRENCY

    # the victim's leases are valid right now for at least min_ttl more seconds
    checked = time.monotonic()
    min_ttl = min(int(redis_command(private_redis.port, "PTTL", k)) for k in
                  lock_keys(private_redis, prefix)) / 1000.0
    assert min_ttl > 0
    sink.dead.add(victim.ehlo)  # its held sessions end unanswered: it never delivered them
    assert victim.proc.kill() == -9
    killed = time.monotonic()
    sink.release.set()

    def all_delivered() -> bool:
        return set(sink.delivered_tokens()) >= set(tokens)

    wait_until(all_delivered, timeout=120, interval=0.1,
               message=f"every token delivered (have {len(sink.delivered_tokens())})")
    delivered = sink.delivered_tokens()
    assert set(delivered) == set(tokens)
    assert all(n == 1 for n in delivered.values()), \
        [t for t, n in delivered.items() if n != 1]
    for token in victim_tokens:
        attempts = sink.attempts_for(token)
        assert [a.outcome for a in attempts if a.node == victim.ehlo] == ["dropped"]
        (redelivery,) = [a for a in attempts if a.outcome == "250"]
        assert redelivery.node in {n.ehlo for n in survivors}
        # not before the victim's lease ran out (it was valid at `checked` for min_ttl more)
        assert redelivery.received >= checked + min_ttl - 0.05, (
            f"{token} redelivered {redelivery.received - killed:.2f}s after the kill; the "
            f"lease was valid until at least {checked + min_ttl - killed:.2f}s after it")
    assert not [a for a in sink.all_attempts() if a.outcome == "250" and a.node == victim.ehlo]
    assert all(a.sender == "sender@client.test" for a in sink.all_attempts())
    wait_until(lambda: queue_size(private_redis, prefix) == 0
               and not lock_keys(private_redis, prefix), timeout=30,
               message="empty queue, no leases")
    for node in survivors:
        assert node.proc.running(), node.proc.log()[-3000:]
    assert not sink.errors
    redelivered_after = [a.received - killed for t in victim_tokens
                         for a in sink.attempts_for(t) if a.outcome == "250"]
    print(f"\nvictim held {len(victim_tokens)} leases; redelivered "
          f"{min(redelivered_after):.2f}-{max(redelivered_after):.2f}s after SIGKILL "
          f"(TTL {LOCK_TTL}s)")
