"""SMTP AUTH credential checking against ``smtp.auth.users`` (bcrypt hashes or plaintext).

bcrypt runs in a thread (it costs ~100-250 ms of CPU); unknown users are checked against a dummy
hash of the same cost as the table's own hashes (the highest cost found there), and plaintext
values are compared with ``hmac.compare_digest`` after such a bcrypt round as well, so the
answer time does not reveal whether a user exists. The dummy hash is made on first use, not at
import (~70 ms per process at cost 10, paid by every worker and CLI command before).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Mapping
from typing import Any

import bcrypt
from twisted.internet import defer, threads
from zope.interface import implementer

from kotlin_smtp_py.config import is_bcrypt_hash
from kotlin_smtp_py.interfaces import IAuthChecker

DEFAULT_DUMMY_COST = 10  # for a table without bcrypt hashes (plaintext users only)


@functools.lru_cache(maxsize=8)
def _dummy_hash(cost: int) -> bytes:
    return bcrypt.hashpw(b"kotlin-smtp-py dummy password", bcrypt.gensalt(rounds=cost))


def dummy_cost(users: Mapping[str, str]) -> int:
    """The bcrypt cost that a check of an unknown (or plaintext) user must pay."""
    costs = [int(h[4:6]) for h in users.values() if is_bcrypt_hash(h)]
    return max(costs, default=DEFAULT_DUMMY_COST)


BCRYPT_MAX_BYTES = 72


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(password.encode("utf-8")[:BCRYPT_MAX_BYTES],
                         bcrypt.gensalt(rounds=rounds)).decode("ascii")


def _check_sync(stored: str | None, password: bytes, allow_plaintext: bool,
                cost: int = DEFAULT_DUMMY_COST) -> bool:
    # bcrypt reads 72 bytes at most; bcrypt >= 5 raises on more (an internal error, 451,
    # instead of an answer). Truncate as bcrypt < 5, htpasswd and hashes made by them always
    # did; the plaintext comparison below still sees the whole password.
    hashed = password[:BCRYPT_MAX_BYTES]
    if stored is not None and is_bcrypt_hash(stored):
        return bool(bcrypt.checkpw(hashed, stored.encode("ascii")))
    bcrypt.checkpw(hashed, _dummy_hash(cost))  # equal cost for unknown and plaintext users
    if stored is None or not allow_plaintext:
        return False
    return hmac.compare_digest(stored.encode("utf-8"), password)


@implementer(IAuthChecker)
class UserTableChecker:
    """Checks credentials against a name → password-or-bcrypt table (replaceable on reload)."""

    def __init__(self, users: Mapping[str, str], allow_plaintext: bool,
                 run_in_thread: Callable[..., defer.Deferred[Any]] | None = None) -> None:
        self.replace(users, allow_plaintext)
        self._thread = run_in_thread or threads.deferToThread

    def replace(self, users: Mapping[str, str], allow_plaintext: bool) -> None:
        """New users (a reload). The dummy hash's cost follows the new table: after a reload
        to costlier hashes, unknown users were answered much faster than known ones, which
        told a guesser which names exist."""
        self.users = dict(users)
        self.allow_plaintext = allow_plaintext
        self._dummy_cost = dummy_cost(self.users)

    def has_user(self, username: str) -> bool:
        return username in self.users or username.lower() in self.users

    def check(self, username: str, password: bytes) -> defer.Deferred[bool]:
        stored = self.users.get(username)
        return self._thread(_check_sync, stored, password, self.allow_plaintext,
                            self._dummy_cost)
