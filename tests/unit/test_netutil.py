"""CidrSet: address matching (with its answer cache) for exemptions and allow-lists."""

from __future__ import annotations

from kotlin_smtp_py.netutil import CidrSet


def test_matches_v4_v6_and_mapped_addresses_and_rejects_non_addresses() -> None:
    s = CidrSet(["127.0.0.0/8", "2001:db8::/32"])
    for _ in range(2):  # the second round is answered from the cache: same answers
        assert s.contains("127.0.0.1")
        assert s.contains("::ffff:127.0.0.5")
        assert s.contains("[2001:db8::1]")
        assert not s.contains("10.0.0.1")
        assert not s.contains("not-an-ip")
        assert not s.contains("")


def test_answer_cache_stays_bounded() -> None:
    s = CidrSet(["10.0.0.0/8"])
    for i in range(3 * CidrSet.CACHE_SIZE):
        assert s.contains(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}")
    assert len(s._answers) <= CidrSet.CACHE_SIZE
    assert not s.contains("192.0.2.1") and s.contains("10.1.2.3")
