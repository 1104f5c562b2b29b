"""Operator commands: ``kotlin-smtp check-config|hash-password|queue ...``.

``queue`` works on the spool the config selects (like ``mailq``/``postqueue``/``postsuper``);
a running server sharing the spool picks up ``flush``/``retry`` requests within a second.
Exit codes: 0 ok, 1 not found / failed, 2 usage or config error (also: a spool directory that
does not exist, Redis refusing the credentials), 75 temporarily unavailable.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import sys
from collections.abc import Sequence
from typing import Any

from kotlin_smtp_py import config as cfg

EX_TEMPFAIL = 75
DEFAULT_CONFIG = os.environ.get("KOTLIN_SMTP_CONFIG", "/etc/kotlin-smtp/config.yaml")


def _load(path: str, create_dirs: cfg.DirMode = True) -> cfg.Config:
    try:
        return cfg.load(path, create_dirs=create_dirs)
    except cfg.ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file, create_dirs="check")  # (creates nothing: the server will)
    print(cfg.dump_effective(config), end="")
    for warning in cfg.warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: configuration OK", file=sys.stderr)
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from kotlin_smtp_py.inbound.auth import hash_password

    if args.stdin:
        raw = sys.stdin.buffer.readline().rstrip(b"\n").rstrip(b"\r")
        try:
            password = raw.decode("utf-8")
        except UnicodeDecodeError:
            print("the password is not UTF-8 text", file=sys.stderr)
            return 2
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print("\nno password given", file=sys.stderr)
            return 2
        if again != password:
            print("passwords do not match", file=sys.stderr)
            return 2
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password, rounds=args.rounds))
    return 0


def _fmt_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


async def _open_spool(config: cfg.Config) -> Any:
    if cfg.spool_backend(config) == "redis":
        from kotlin_smtp_py.redisconn import connect
        from kotlin_smtp_py.spool.redis import RedisSpool

        assert config.smtp.redis is not None
        client = await connect(config.smtp.redis)
        return RedisSpool.from_config(client, config)
    from kotlin_smtp_py.spool.file import FileSpool

    return FileSpool(config.smtp.spool.dir, scan_interval=float("inf"))


async def _queue(args: argparse.Namespace, config: cfg.Config) -> int:
    from txredisapi import ResponseError

    from kotlin_smtp_py.interfaces import BackendUnavailable
    from kotlin_smtp_py.redisconn import RedisAuthRefused

    try:
        spool = await _open_spool(config)
    except RedisAuthRefused as exc:  # no retry fixes that: a config error
        print(f"spool unavailable: {exc} (check smtp.redis.password / the URL's credentials)",
              file=sys.stderr)
        return 2
    except (BackendUnavailable, OSError) as exc:  # Redis down, a damaged spool directory
        print(f"spool unavailable: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        return await _queue_action(args, config, spool)
    except ResponseError as exc:  # a key of a foreign type under our prefix (WRONGTYPE)
        print(f"spool unreadable: Redis answered {exc}; check the keys under "
              f"{config.smtp.spool.redis.keyPrefix}", file=sys.stderr)
        return EX_TEMPFAIL
    except (BackendUnavailable, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `queue list | head`: the reader has enough
            _stdout_gone()
            return 1
        print(f"spool unavailable: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    finally:
        close = getattr(spool, "close", None)
        if close is not None:
            close()
        client = getattr(spool, "client", None)
        if client is not None:
            await client.close()


def _stdout_gone() -> None:
    """stdout's reader went away: point it at /dev/null so that the flush at exit is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _printable(text: str) -> str:
    """Control characters escaped: addresses and remote replies are other people's text,
    and must not move an operator's cursor or forge lines in a terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


async def _queue_action(args: argparse.Namespace, config: cfg.Config, spool: Any) -> int:
    from kotlin_smtp_py.envelope import is_queue_id

    action = args.action
    if action == "list":
        entries = await spool.list_entries()
        for e in entries:
            print(f"{e.queue_id}  {e.size:>9}  {_fmt_time(e.created)}  "
                  f"<{_printable(e.sender)}>  "
                  f"attempts={e.attempts} next={_fmt_time(e.next_attempt)}")
            for rcpt in e.recipients:
                print(f"{'':24}{_printable(rcpt)}")
            if e.last_error:
                print(f"{'':24}({_printable(e.last_error)})")
        print(f"-- {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in queue")
        return 0
    if action == "show":
        entry = await spool.get(args.id)
        if entry is None:
            print(f"{args.id}: no such queue entry", file=sys.stderr)
            return 1
        raw = await spool.read_message(args.id)
        print(entry.to_json_bytes().decode("utf-8"))
        print()
        if raw is not None:
            sys.stdout.flush()
            sys.stdout.buffer.write(raw)
        return 0
    if action == "delete":
        ok = await spool.delete(args.id)
        if not ok:
            print(f"{args.id}: not deleted (no such entry, or it is being delivered)",
                  file=sys.stderr)
            return 1
        print(f"{args.id}: deleted")
        return 0
    if action in ("flush", "retry"):
        qid = args.id if action == "retry" else None
        if qid is not None and not is_queue_id(qid):
            print(f"{qid}: no such entry (not a queue id)", file=sys.stderr)
            return 1
        if hasattr(spool, "request_retry"):
            if qid is None:
                import time

                cooldown = config.smtp.spool.triggerCooldownMillis / 1000.0
                if time.time() - spool.last_flush_request() < cooldown:
                    print("flush unavailable: a flush was requested moments ago (cooldown)",
                          file=sys.stderr)
                    return EX_TEMPFAIL
            n = await spool.retry_now(qid)
            spool.request_retry(qid)
        else:
            if qid is None and not await spool.flush_slot(
                    config.smtp.spool.triggerCooldownMillis):
                print("flush unavailable: a flush was requested moments ago (cooldown)",
                      file=sys.stderr)
                return EX_TEMPFAIL
            n = await spool.retry_now(qid)
        if qid is not None and n == 0:
            print(f"{qid}: no such entry, or it is being delivered", file=sys.stderr)
            return 1
        print(f"{n} entr{'y' if n == 1 else 'ies'} scheduled for immediate delivery")
        return 0
    return 2


def cmd_queue(args: argparse.Namespace) -> int:
    from twisted.internet import defer, task

    # Open an existing spool only: a typo or an unmounted volume must not look like an
    # empty queue (nor leave new directories behind).
    config = _load(args.config, create_dirs=False)
    if args.action in ("show", "delete", "retry") and not args.id:
        print(f"queue {args.action} needs a queue id", file=sys.stderr)
        return 2
    result: list[int] = []

    def main(reactor: Any) -> Any:
        d = defer.Deferred.fromCoroutine(_queue(args, config))
        return d.addCallback(result.append)

    try:
        task.react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    return result[0] if result else 1


def _bcrypt_rounds(text: str) -> int:
    try:
        rounds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 4 <= rounds <= 31:
        raise argparse.ArgumentTypeError(f"bcrypt cost must be 4..31, got {rounds}")
    return rounds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kotlin-smtp", description="kotlin-smtp-py operator tool")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="validate a config file and print it (secrets "
                                            "masked)")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    h = sub.add_parser("hash-password", help="print a bcrypt hash for smtp.auth.users")
    h.add_argument("--stdin", action="store_true", help="read the password from stdin")
    h.add_argument("--rounds", type=_bcrypt_rounds, default=12,
                   help="bcrypt cost, 4..31 (default 12)")
    h.set_defaults(func=cmd_hash_password)
    q = sub.add_parser("queue", help="inspect and manage the spool")
    q.add_argument("action", choices=["list", "show", "delete", "flush", "retry"])
    q.add_argument("id", nargs="?")
    q.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    q.set_defaults(func=cmd_queue)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
