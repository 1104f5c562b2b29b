"""``kotlin-smtp queue list|show|delete|retry|flush`` against the Redis spool of a running node.

The node relays to a sink that first answers 451, so three messages sit deferred in Redis with a
retry time minutes away. The CLI (a subprocess with the node's config) lists them, shows one,
deletes one (never delivered), and ``retry``/``flush`` make the others due at once: the running
node delivers each one right after, while an entry nobody retried stays put.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

from mn_support import (
    RedisServer,
    TokenSink,
    new_token,
    queue_size,
    send_batch,
    start_nodes,
    wait_until,
)
from mtaproc import KOTLIN_SMTP, MtaPool, proc_env

ENTRY_LINE = re.compile(r"^([0-9A-Za-z]{8,40})\s+\d+\s.*<(.*)>\s+attempts=(\d+) next=(.*)$")


def queue_cli(config: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KOTLIN_SMTP, "queue", *args, "--config", config],
                          capture_output=True, text=True, timeout=60, env=proc_env(),
                          stdin=subprocess.DEVNULL)


def listed(config: str, everything: bool = False) -> dict[str, int]:
    """queue id -> attempts, from ``queue list``: our messages only (not the delay DSNs the
    node queues for their sender), or ``everything``."""
    out = queue_cli(config, "list")
    assert out.returncode == 0, out.stderr
    entries = {m.group(1): (m.group(2), int(m.group(3))) for line in out.stdout.splitlines()
               if (m := ENTRY_LINE.match(line))}
    n = len(entries)
    assert f"-- {n} entr{'y' if n == 1 else 'ies'} in queue" in out.stdout, out.stdout
    return {qid: attempts for qid, (sender, attempts) in entries.items()
            if everything or sender == "sender@client.test"}


def test_queue_commands_on_the_redis_spool(private_redis: RedisServer, sink: TokenSink,
                                           nodes_pool: MtaPool) -> None:
    prefix = f"mn:{uuid.uuid4().hex[:12]}"
    sink.refuse_all = True
    # retryDelaySeconds 3600 → the next attempt is at least 480 s away (600 s cap, -20 % jitter)
    (node,) = start_nodes(nodes_pool, ["q"], private_redis, prefix, sink.port, retry_delay=3600)
    config = str(node.proc.config_path)
    tokens = [new_token(f"q{i}") for i in range(3)]
    assert [r.code for r in send_batch(node, tokens)] == [250, 250, 250]

    wait_until(lambda: (e := listed(config)) and len(e) == 3 and set(e.values()) == {1},
               timeout=60, interval=0.3, message="three deferred entries (attempts=1) listed")
    assert sorted(a.token for a in sink.all_attempts()
                  if a.outcome == "451" and a.sender) == sorted(tokens)
    ids = sorted(listed(config))

    # show: the metadata JSON, then the raw message exactly as queued
    by_token: dict[str, str] = {}
    for qid in ids:
        out = queue_cli(config, "show", qid)
        assert out.returncode == 0, out.stderr
        meta_text, _, raw = out.stdout.partition("\n\n")
        meta = json.loads(meta_text)
        assert qid in meta_text and meta["envelope"]["sender"] == "sender@client.test", meta
        (token,) = re.findall(r"^X-Token: (\S+)$", raw, re.M)
        assert f"body of {token}" in raw
        by_token[token] = qid
    assert set(by_token) == set(tokens)
    deleted, retried, flushed = tokens

    # delete: gone from the queue and never delivered
    out = queue_cli(config, "delete", by_token[deleted])
    assert (out.returncode, out.stdout.strip()) == (0, f"{by_token[deleted]}: deleted"), out
    assert set(listed(config)) == {by_token[retried], by_token[flushed]}
    out = queue_cli(config, "show", by_token[deleted])
    assert out.returncode == 1 and "no such queue entry" in out.stderr
    assert queue_cli(config, "delete", by_token[deleted]).returncode == 1
    assert queue_cli(config, "retry", "nosuchentry0000").returncode == 1

    sink.refuse_all = False
    # retry <id>: that entry is due now and the running node delivers it; the other stays
    out = queue_cli(config, "retry", by_token[retried])
    assert out.returncode == 0 and "1 entry scheduled" in out.stdout, out
    wait_until(lambda: sink.delivered_tokens()[retried] == 1, timeout=30, interval=0.1,
               message="retried entry delivered")
    wait_until(lambda: set(listed(config)) == {by_token[flushed]}, timeout=15, interval=0.3,
               message="only the untouched entry left")
    assert sink.delivered_tokens()[flushed] == 0

    # flush: everything due now
    waiting = len(listed(config, everything=True))  # ours + the delay DSNs
    assert waiting >= 2
    flushed_at = time.monotonic()
    out = queue_cli(config, "flush")
    assert out.returncode == 0 and f"{waiting} entries scheduled" in out.stdout, out
    wait_until(lambda: sink.delivered_tokens()[flushed] == 1, timeout=30, interval=0.1,
               message="flushed entry delivered")
    assert time.monotonic() - flushed_at < 30
    wait_until(lambda: listed(config) == {}, timeout=15, interval=0.3,
               message="none of our messages left")
    delivered = sink.delivered_tokens()
    assert delivered[deleted] == 0 and delivered[retried] == 1 and delivered[flushed] == 1
    # the flush also released the delay notices (DSNs to the sender) deferred by the sink's 451s
    wait_until(lambda: listed(config, everything=True) == {}, timeout=30, interval=0.3,
               message="empty queue")
    assert queue_size(private_redis, prefix) == 0
    assert {t for t in sink.delivered_tokens() if t.startswith("dsn:")} <= {
        f"dsn:{t}" for t in tokens}
    assert node.proc.running()
