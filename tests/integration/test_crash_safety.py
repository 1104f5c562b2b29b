"""Crash safety: a 250 means durable. SIGKILL the server under load at a random point, restart
it on the same spool, and prove every message that got a 250 is delivered exactly once.

Four client threads send uniquely tokened messages (each to alice and bob) over persistent
smtplib sessions. When a seeded random number of 250s has been seen, the server gets SIGKILL —
mid-DATA, mid-fsync, mid-delivery, wherever it happens to be. Clients record what they saw
(250 or an error). After a restart on the same spool directory the queue must drain, and then:
- every 250'd token is in alice's and bob's Maildir exactly once (new/ + cur/), intact;
- no token, acknowledged or not, is present twice (redelivery after a crash is idempotent).
Set KSMTP_CRASH_SEED to replay a run.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from helpers import wait_until
from mtaproc import MtaPool, maildir_files, spool_entries

THREADS = 4
PER_THREAD = 75  # 300 messages in total
TOKEN = re.compile(rb"X-Crash-Token: (ct-[0-9a-f]{16})")


def _message(token: str) -> bytes:
    filler = f"{token} payload line to make the body a little larger\r\n" * 20
    return (f"From: <load@client.test>\r\nTo: <alice@localhost>, <bob@localhost>\r\n"
            f"Subject: crash test {token}\r\nX-Crash-Token: {token}\r\n\r\n"
            f"{filler}END-OF-{token}\r\n").encode()


class Client(threading.Thread):
    def __init__(self, index: int, port: int, stop: threading.Event,
                 acked: list[str], failed: list[tuple[str, str]], lock: threading.Lock) -> None:
        super().__init__(name=f"crash-client-{index}", daemon=True)
        self.index = index
        self.port = port
        self.stop = stop
        self.acked = acked
        self.failed = failed
        self.lock = lock
        self.rng = random.Random(index)

    def run(self) -> None:
        smtp: smtplib.SMTP | None = None
        for n in range(PER_THREAD):
            if self.stop.is_set():
                return
            token = f"ct-{self.index:02x}{n:04x}{self.rng.getrandbits(40):010x}"
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
                    smtp.ehlo("load.client.test")
                code, reply = smtp.mail("load@client.test")
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
                for rcpt in ("alice@localhost", "bob@localhost"):
                    code, reply = smtp.rcpt(rcpt)
                    if code != 250:
                        raise smtplib.SMTPResponseException(code, reply)
                code, reply = smtp.data(_message(token))
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
                with self.lock:
                    self.acked.append(token)
            except (OSError, smtplib.SMTPException) as exc:
                with self.lock:
                    self.failed.append((token, type(exc).__name__))
                # The server is gone (or refused): this client stops, as a real one would queue.
                return
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass


def _scan(mailboxes: Path, user: str) -> tuple[Counter[str], list[str]]:
    counts: Counter[str] = Counter()
    broken: list[str] = []
    for path in maildir_files(mailboxes, user):
        data = path.read_bytes()
        found = TOKEN.findall(data)
        if len(found) != 1:
            broken.append(f"{path.name}: {len(found)} tokens")
            continue
        token = found[0].decode()
        counts[token] += 1
        if not data.endswith(f"END-OF-{token}\r\n".encode()):
            broken.append(f"{path.name}: truncated")
    return counts, broken


def test_sigkill_under_load_every_250_delivered_exactly_once(mtas: MtaPool) -> None:
    seed = int(os.environ.get("KSMTP_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
    rng = random.Random(seed)
    total = THREADS * PER_THREAD
    kill_after = rng.randint(total // 8, total * 3 // 4)  # 250s seen before the kill
    kill_jitter = rng.uniform(0.0, 0.05)
    print(f"crash seed={seed} kill_after={kill_after} acks jitter={kill_jitter:.3f}s "
          f"(replay with KSMTP_CRASH_SEED={seed})")

    mta, conf = mtas.new({"smtp": {"spool": {"workerConcurrency": 4},
                                   "limits": {"maxRecipients": 10}}})
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    spool_dir = Path(conf["smtp"]["spool"]["dir"])

    acked: list[str] = []
    failed: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    clients = [Client(i, mta.port, stop, acked, failed, lock) for i in range(THREADS)]
    started = time.monotonic()
    for c in clients:
        c.start()
    try:
        wait_until(lambda: len(acked) >= kill_after or not any(c.is_alive() for c in clients),
                   timeout=60, interval=0.002, message=f"{kill_after} accepted messages")
        time.sleep(kill_jitter)  # a random point, not synchronisation
        rc = mta.kill()
        killed_at = time.monotonic() - started
        stop.set()
        for c in clients:
            c.join(20)
            assert not c.is_alive(), f"{c.name} hung after the kill"
    finally:
        stop.set()
    assert rc == -9, f"server had already exited with {rc}:\n{mta.log()}"
    with lock:
        acked_set = set(acked)
        n_acked, n_failed = len(acked), len(failed)
    assert len(acked_set) == n_acked
    queued_at_kill = len(spool_entries(spool_dir))
    delivered_at_kill = len(maildir_files(mailboxes, "alice"))
    print(f"killed after {killed_at:.2f}s: clients saw {n_acked} x 250 and {n_failed} errors "
          f"({Counter(kind for _, kind in failed)}); {total - n_acked - n_failed} never sent; "
          f"at the kill {queued_at_kill} spool entries, {delivered_at_kill} in alice's Maildir")
    assert n_acked >= min(kill_after, total) and n_acked < total, "the kill was not under load"

    mta.start()
    wait_until(lambda: spool_entries(spool_dir) == [], timeout=45, interval=0.1,
               message="the restarted server to drain the spool")

    missing: dict[str, list[str]] = {}
    dupes: dict[str, list[str]] = {}
    for user in ("alice", "bob"):
        counts, broken = _scan(mailboxes, user)
        assert not broken, (user, broken[:10])
        missing[user] = sorted(acked_set - set(counts))
        dupes[user] = sorted(t for t, n in counts.items() if n > 1)
        extra = set(counts) - acked_set
        print(f"{user}: {sum(counts.values())} files, {len(counts)} distinct tokens, "
              f"{len(extra)} delivered without a 250 (committed before the kill, reply lost)")
        assert extra <= {t for t, _ in failed}, "delivered a message nobody sent"
    assert not any(missing.values()), f"acknowledged but lost (seed {seed}): {missing}"
    assert not any(dupes.values()), f"delivered twice (seed {seed}): {dupes}"
    corrupt = list((spool_dir / "corrupt").iterdir()) if (spool_dir / "corrupt").is_dir() else []
    assert corrupt == [], f"entries moved to corrupt/ after the crash: {corrupt}"
