"""An unknown or plaintext user's AUTH check pays a bcrypt round of the table's own cost, so
the answer time does not tell them apart from a real user's."""

from __future__ import annotations

from typing import Any

import bcrypt
import pytest
from twisted.internet import defer

from kotlin_smtp_py.inbound import auth
from kotlin_smtp_py.inbound.auth import UserTableChecker, hash_password


def _inline(fn: Any, *args: Any) -> defer.Deferred[Any]:
    return defer.succeed(fn(*args))


def _check(checker: UserTableChecker, user: str, password: bytes) -> bool:
    results: list[bool] = []
    checker.check(user, password).addCallback(results.append)
    (result,) = results
    return result


@pytest.fixture
def hashes_checked(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    seen: list[bytes] = []
    real = bcrypt.checkpw

    def recording(password: bytes, hashed: bytes) -> bool:
        seen.append(hashed)
        return bool(real(password, hashed))

    monkeypatch.setattr(auth.bcrypt, "checkpw", recording)
    return seen


def test_dummy_round_has_the_tables_highest_cost(hashes_checked: list[bytes]) -> None:
    users = {"alice": hash_password("a-pass", rounds=5), "bob": hash_password("b", rounds=6),
             "carol": "plain-pass"}
    checker = UserTableChecker(users, allow_plaintext=True, run_in_thread=_inline)
    assert _check(checker, "alice", b"a-pass") is True
    assert _check(checker, "mallory", b"guess") is False
    assert _check(checker, "carol", b"plain-pass") is True
    assert _check(checker, "carol", b"wrong") is False
    costs = [h[4:6] for h in hashes_checked]
    assert costs == [b"05", b"06", b"06", b"06"]


def test_plaintext_only_table_uses_the_default_cost(hashes_checked: list[bytes]) -> None:
    checker = UserTableChecker({"carol": "plain-pass"}, allow_plaintext=True,
                               run_in_thread=_inline)
    assert _check(checker, "nobody", b"x") is False
    assert [h[4:6] for h in hashes_checked] == [b"%02d" % auth.DEFAULT_DUMMY_COST]
