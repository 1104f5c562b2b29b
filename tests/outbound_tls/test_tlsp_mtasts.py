"""MTA-STS (RFC 8461) against a loopback DNS zone and a local HTTPS policy server."""

from __future__ import annotations

from pathlib import Path

from outbound_sink import Behaviour, server_tls
from outbound_support import make_entry
from tls_policy_support import (
    MX_HOST,
    OTHER_MX,
    announce,
    dom,
    make_relay,
    policy_config,
    relay_attempt,
)

from kotlin_smtp_py.status import Reason

MSG = b"Subject: sts\r\n\r\nhello\r\n"


def _config(policy_dns, sinks, certs, tmp_path, sts_web, tls=None, **extra):
    policy = {"mtaSts": {"enabled": True}, **extra}
    return policy_config(policy_dns.plain_port, sinks.port, certs, tmp_path / "spool", policy,
                         web_port=sts_web.port, tls=tls)


def test_enforce_matching_mx_valid_cert_is_delivered(policy_dns, sinks, policy_certs, sts_web,
                                                     tmp_path: Path) -> None:
    domain = dom("enforce")
    sts_web.serve(domain, "enforce")
    announce(policy_dns, domain, "e1")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    relay = make_relay(_config(policy_dns, sinks, policy_certs, tmp_path, sts_web))
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.ok, status
    assert [s.tls for s in sink.sessions] == [True]
    assert len(sink.transactions) == 1
    # the policy is cached on disk in the spool dir
    assert (tmp_path / "spool" / "mta-sts" / f"{domain}.json").is_file()


def test_enforce_with_certificate_for_another_name_is_deferred(policy_dns, sinks, policy_certs,
                                                               sts_web, tmp_path: Path) -> None:
    domain = dom("enforce")
    sts_web.serve(domain, "enforce")
    announce(policy_dns, domain, "e1")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.wrong_cert), str(policy_certs.wrong_key))))
    # trustAll would accept anything without MTA-STS; the enforce policy overrides it.
    config = policy_config(policy_dns.plain_port, sinks.port, policy_certs, tmp_path / "spool",
                           {"mtaSts": {"enabled": True}}, web_port=sts_web.port,
                           tls={"trustAll": True})
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    [(_, status)] = relay_attempt(make_relay(config), entry, path)
    assert status.temporary and status.reason is Reason.TLS, status
    assert "certificate-host-mismatch" in (status.diagnostic or "") \
        or "does not name" in status.text, status
    assert sink.transactions == []


def test_enforce_mx_not_in_policy_is_deferred_without_connecting(policy_dns, sinks,
                                                                policy_certs, sts_web,
                                                                tmp_path: Path) -> None:
    domain = dom("enforce")
    sts_web.serve(domain, "enforce", mx=(OTHER_MX,))
    announce(policy_dns, domain, "e2")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    relay = make_relay(_config(policy_dns, sinks, policy_certs, tmp_path, sts_web))
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.temporary and status.reason is Reason.POLICY, status
    assert sink.sessions == []


def test_testing_mode_delivers_and_records_the_failure(policy_dns, sinks, policy_certs, sts_web,
                                                       tmp_path: Path) -> None:
    domain = dom("testing")
    sts_web.serve(domain, "testing")
    announce(policy_dns, domain, "t1")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.wrong_cert), str(policy_certs.wrong_key))))
    # Testing mode delivers "as usual": here the hop's own settings accept a certificate for
    # another name (checkServerIdentity off); the policy failure is only recorded.
    config = _config(policy_dns, sinks, policy_certs, tmp_path, sts_web,
                     tls={"checkServerIdentity": False}, tlsRpt={"enabled": True})
    relay = make_relay(config)
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.ok, status
    assert [s.tls for s in sink.sessions] == [True]
    recorder = relay.policies.recorder
    [period] = recorder.periods.values()
    [group] = period[domain].values()
    assert group["policy"]["policy-type"] == "sts"
    assert group["policy"]["mx-host"] == [MX_HOST]
    [failure] = group["failures"].values()
    assert failure["result-type"] == "certificate-host-mismatch"
    assert failure["receiving-mx-hostname"] == MX_HOST
    assert failure["failed-session-count"] == 1


def test_policy_id_change_triggers_a_refetch(policy_dns, sinks, policy_certs, sts_web,
                                             tmp_path: Path) -> None:
    domain = dom("rotate")
    sts_web.serve(domain, "enforce")
    announce(policy_dns, domain, "r1")
    sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    relay = make_relay(_config(policy_dns, sinks, policy_certs, tmp_path, sts_web))
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    before = sts_web.fetches.count(domain)
    assert relay_attempt(relay, entry, path)[0][1].ok
    assert relay_attempt(relay, entry, path)[0][1].ok
    assert sts_web.fetches.count(domain) == before + 1, "same id: the cached policy is used"
    # New id and a policy that no longer lists our MX: refetched and applied at once.
    sts_web.serve(domain, "enforce", mx=(OTHER_MX,))
    announce(policy_dns, domain, "r2")
    [(_, status)] = relay_attempt(relay, entry, path)
    assert sts_web.fetches.count(domain) == before + 2
    assert status.temporary and status.reason is Reason.POLICY, status


def test_cached_enforce_survives_fetch_failure_and_restart(policy_dns, sinks, policy_certs,
                                                           sts_web, tmp_path: Path) -> None:
    domain = dom("cached")
    sts_web.serve(domain, "enforce")
    announce(policy_dns, domain, "c1")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    config = _config(policy_dns, sinks, policy_certs, tmp_path, sts_web)
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    assert relay_attempt(make_relay(config), entry, path)[0][1].ok
    # The peer stops offering STARTTLS, a new id is announced and the policy host fails.
    sink.behaviour.tls = None
    announce(policy_dns, domain, "c2")
    sts_web.failing.add(domain)
    try:
        fetched = sts_web.fetches.count(domain)
        # "Restart": a new RelayDelivery with an empty memory, same spool dir.
        [(_, status)] = relay_attempt(make_relay(config), entry, path)
        assert sts_web.fetches.count(domain) == fetched + 1, "the new id was fetched"
        assert status.temporary and status.reason is Reason.TLS, status
        assert len(sink.transactions) == 1, "never sent in plaintext"
        # Control: without the persisted cache the same situation delivers in plaintext.
        fresh = _config(policy_dns, sinks, policy_certs, tmp_path / "other", sts_web)
        [(_, plain)] = relay_attempt(make_relay(fresh), entry, path)
        assert plain.ok, plain
        assert len(sink.transactions) == 2 and sink.sessions[-1].tls is False
    finally:
        sts_web.failing.discard(domain)


def test_a_policy_in_use_is_refreshed_before_it_expires(policy_dns, sinks, policy_certs,
                                                        sts_web, tmp_path: Path) -> None:
    """Mail to the domain keeps its policy warm: past half its max_age a delivery applies the
    cached policy and fetches it again in the background; a failed refresh keeps it."""
    from helpers import wait_until
    from twisted.internet.task import Clock

    domain = dom("warm")
    sts_web.serve(domain, "enforce", max_age=1000)
    announce(policy_dns, domain, "w1")
    sinks.start(behaviour=Behaviour(tls=server_tls(str(policy_certs.cert),
                                                   str(policy_certs.key))))
    clock = Clock()  # policy-cache time only; the network runs on the real reactor
    clock.advance(1_000_000)
    relay = make_relay(_config(policy_dns, sinks, policy_certs, tmp_path, sts_web), clock=clock)
    cache_file = tmp_path / "spool" / "mta-sts" / f"{domain}.json"

    def fetched_at() -> float:
        import json
        return float(json.loads(cache_file.read_text())["fetched_at"])

    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    first = sts_web.fetches.count(domain)
    assert relay_attempt(relay, entry, path)[0][1].ok
    assert sts_web.fetches.count(domain) == first + 1 and fetched_at() == 1_000_000
    clock.advance(499)  # younger than half its max_age: no fetch
    assert relay_attempt(relay, entry, path)[0][1].ok
    assert sts_web.fetches.count(domain) == first + 1
    clock.advance(2)  # now past half: delivered with the cached policy, refreshed meanwhile
    assert relay_attempt(relay, entry, path)[0][1].ok
    wait_until(lambda: fetched_at() == 1_000_501, message="the background refresh")
    assert sts_web.fetches.count(domain) == first + 2
    # A failing policy host: the refresh fails, the cached policy stays (and is applied).
    sts_web.failing.add(domain)
    try:
        clock.advance(600)
        assert relay_attempt(relay, entry, path)[0][1].ok
        wait_until(lambda: sts_web.fetches.count(domain) == first + 3,
                   message="the failing refresh")
        assert relay_attempt(relay, entry, path)[0][1].ok  # still the cached policy
        assert fetched_at() == 1_000_501
    finally:
        sts_web.failing.discard(domain)
