"""SMTP AUTH credential checking against ``smtp.auth.users`` (bcrypt hashes or plaintext).

bcrypt runs in a thread (it costs ~100-250 ms of CPU); unknown users are checked against a dummy
hash of the same cost, and plaintext values are compared with ``hmac.compare_digest`` after a
bcrypt round as well, so the answer time does not reveal whether a user exists.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

import bcrypt
from twisted.internet import defer, threads
from zope.interface import implementer

from kotlin_smtp_py.config import is_bcrypt_hash
from kotlin_smtp_py.interfaces import IAuthChecker

_DUMMY_HASH = bcrypt.hashpw(b"kotlin-smtp-py dummy password", bcrypt.gensalt(rounds=10))


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=rounds)).decode("ascii")


def _check_sync(stored: str | None, password: bytes, allow_plaintext: bool) -> bool:
    if stored is not None and is_bcrypt_hash(stored):
        return bool(bcrypt.checkpw(password, stored.encode("ascii")))
    bcrypt.checkpw(password, _DUMMY_HASH)  # equal cost for unknown and plaintext users
    if stored is None or not allow_plaintext:
        return False
    return hmac.compare_digest(stored.encode("utf-8"), password)


@implementer(IAuthChecker)
class UserTableChecker:
    """Checks credentials against a name → password-or-bcrypt table (replaceable on reload)."""

    def __init__(self, users: Mapping[str, str], allow_plaintext: bool,
                 run_in_thread: Callable[..., defer.Deferred[Any]] | None = None) -> None:
        self.users = dict(users)
        self.allow_plaintext = allow_plaintext
        self._thread = run_in_thread or threads.deferToThread

    def has_user(self, username: str) -> bool:
        return username in self.users or username.lower() in self.users

    def check(self, username: str, password: bytes) -> defer.Deferred[bool]:
        stored = self.users.get(username)
        return self._thread(_check_sync, stored, password, self.allow_plaintext)
