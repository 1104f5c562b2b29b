"""RelayDelivery end to end over loopback: real DNS, real sockets, a scripted receiving peer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from outbound_sink import Behaviour
from outbound_support import deliver, make_entry
from zope.interface.verify import verifyObject

from kotlin_smtp_py.config import RelayConfig, RouteConfig
from kotlin_smtp_py.envelope import Recipient
from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.outbound.relay import RelayDelivery
from kotlin_smtp_py.outbound.router import OutboundRouter
from kotlin_smtp_py.status import FailureKind, Reason

BODY = b"From: a@origin.test\r\nSubject: t\r\n\r\nhello\r\n"


def kinds(results: list[Any]) -> list[tuple[str, int, str, FailureKind | None]]:
    return [(r.address, s.code, s.enhanced, s.kind) for r, s in results]


def test_relay_delivery_provides_idelivery(make_config) -> None:
    from twisted.internet import reactor
    verifyObject(IDelivery, RelayDelivery(make_config(), reactor))


def test_per_recipient_results_with_pipelining(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt={
        "soft@normal.test": b"451 4.2.1 mailbox busy",
        "hard@normal.test": b"550 5.1.1 no such user"}))
    entry, path = make_entry(tmp_path, ["ok@normal.test", "soft@normal.test",
                                        "hard@normal.test"], BODY)
    results = deliver(make_config(), entry, path)
    assert kinds(results) == [
        ("ok@normal.test", 250, "2.0.0", None),
        ("soft@normal.test", 451, "4.2.1", FailureKind.TRANSIENT),
        ("hard@normal.test", 550, "5.1.1", FailureKind.PERMANENT)]
    hard = results[2][1]
    assert hard.reason is Reason.RECIPIENT
    assert hard.remote_mta == "mx.test"
    assert hard.diagnostic == "smtp; 550 5.1.1 no such user"
    session = sink.sessions[0]
    assert session.commands[0] == "EHLO client.test"
    assert any(b"MAIL FROM" in r and b"RCPT TO" in r for r in session.reads), "not pipelined"
    assert sink.transactions[0].rcpts == ["RCPT TO:<ok@normal.test>"]
    assert session.commands[-1] == "QUIT"


def test_without_pipelining_commands_go_one_by_one(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=["8BITMIME"]))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test"], BODY)
    assert all(s.ok for _, s in deliver(make_config(), entry, path))
    assert not any(b"MAIL FROM" in r and b"RCPT TO" in r for r in sink.sessions[0].reads)


def test_all_recipients_refused_sends_no_data(sinks, make_config, tmp_path: Path) -> None:
    # With PIPELINING, DATA travels with MAIL and RCPT (RFC 2920) and the peer refuses it;
    # no message byte is sent.
    sink = sinks.start(behaviour=Behaviour(rcpt={"a@normal.test": b"550 5.7.1 relay denied"}))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert kinds(deliver(make_config(), entry, path)) == [
        ("a@normal.test", 550, "5.7.1", FailureKind.PERMANENT)]
    assert sink.transactions == []
    assert any(b"RCPT TO" in r and b"DATA" in r for r in sink.sessions[0].reads), \
        "DATA not pipelined"
    # Without PIPELINING, DATA is never sent when no recipient was accepted.
    plain = sinks.start("127.0.0.2", Behaviour(extensions=["8BITMIME"],
                                               rcpt={"a@normal.test": b"550 5.7.1 no"}))
    cfg = make_config(relay={"defaultRoute": RouteConfig(host="127.0.0.2", port=sinks.port)})
    assert kinds(deliver(cfg, entry, path))[0][1] == 550
    assert "DATA" not in plain.sessions[0].commands


def test_a_peer_that_accepts_pipelined_data_without_recipients_gets_an_empty_end(
        sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt={"a@normal.test": b"550 5.1.1 no"},
                                           data_without_rcpt=True))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert kinds(deliver(make_config(), entry, path))[0][1] == 550
    (txn,) = sink.transactions
    assert txn.raw == b"" and txn.rcpts == []  # ended at once: no message byte leaked
    assert sink.sessions[0].commands[-1] == "QUIT"


def test_mail_from_rejection_applies_to_all(sinks, make_config, tmp_path: Path) -> None:
    sinks.start(behaviour=Behaviour(mail_reply=b"452 4.3.1 insufficient storage"))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test"], BODY)
    results = deliver(make_config(), entry, path)
    assert [s.kind for _, s in results] == [FailureKind.TRANSIENT] * 2
    assert results[0][1].enhanced == "4.3.1"


def test_data_final_reply_failure_is_per_accepted_recipient(sinks, make_config,
                                                            tmp_path: Path) -> None:
    sinks.start(behaviour=Behaviour(data_reply=b"554 5.6.0 content rejected"))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    status = deliver(make_config(), entry, path)[0][1]
    assert (status.kind, status.reason, status.enhanced) == (
        FailureKind.PERMANENT, Reason.MESSAGE, "5.6.0")


def test_dsn_size_and_body_parameters_when_advertised(sinks, make_config,
                                                      tmp_path: Path) -> None:
    sink = sinks.start()
    rcpt = Recipient("a@normal.test", ("SUCCESS", "FAILURE"), "rfc822;a+x@normal.test")
    entry, path = make_entry(tmp_path, [rcpt], BODY, ret="HDRS", envid="id=42", body="8BITMIME")
    assert deliver(make_config(), entry, path)[0][1].ok
    txn = sink.transactions[0]
    assert txn.mail == (f"MAIL FROM:<sender@origin.test> SIZE={len(BODY)} BODY=8BITMIME "
                        "RET=HDRS ENVID=id+3D42")
    assert txn.rcpts == ["RCPT TO:<a@normal.test> NOTIFY=SUCCESS,FAILURE "
                         "ORCPT=rfc822;a+2Bx@normal.test"]


def test_no_extension_parameters_when_not_advertised(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=[]))
    rcpt = Recipient("a@normal.test", ("SUCCESS",), "rfc822;a@normal.test")
    entry, path = make_entry(tmp_path, [rcpt], BODY, ret="FULL", envid="x", body="7BIT")
    assert deliver(make_config(), entry, path)[0][1].ok
    txn = sink.transactions[0]
    assert txn.mail == "MAIL FROM:<sender@origin.test>"
    assert txn.rcpts == ["RCPT TO:<a@normal.test>"]


def test_eight_bit_content_to_a_server_without_8bitmime_is_returned_5_6_3(
        sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=["PIPELINING"]))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY, body="8BITMIME")
    (_, status), = deliver(make_config(), entry, path)
    assert status.permanent and status.enhanced == "5.6.3"
    assert sink.transactions == []


def test_helo_fallback_when_ehlo_refused(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(ehlo_reply=b"502 5.5.1 what"))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert "HELO client.test" in sink.sessions[0].commands


def test_smtputf8_missing_fails_only_utf8_recipients_5_6_7(sinks, make_config,
                                                          tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=["PIPELINING", "8BITMIME"]))
    entry, path = make_entry(tmp_path, ["plain@normal.test", "jörg@normal.test"], BODY)
    results = deliver(make_config(), entry, path)
    assert kinds(results) == [("plain@normal.test", 250, "2.0.0", None),
                              ("jörg@normal.test", 553, "5.6.7", FailureKind.PERMANENT)]
    assert sink.transactions[0].rcpts == ["RCPT TO:<plain@normal.test>"]
    assert "SMTPUTF8" not in sink.transactions[0].mail


def test_smtputf8_sender_without_support_fails_everything(sinks, make_config,
                                                         tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=[]))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY, sender="jörg@origin.test")
    assert kinds(deliver(make_config(), entry, path)) == [
        ("a@normal.test", 553, "5.6.7", FailureKind.PERMANENT)]
    assert sink.transactions == []


def test_smtputf8_used_when_offered(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start()
    entry, path = make_entry(tmp_path, ["jörg@normal.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert sink.transactions[0].mail.endswith("SMTPUTF8")


def test_dead_first_mx_falls_back_to_next(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start()  # only on 127.0.0.1; dead.test is 127.0.0.3
    entry, path = make_entry(tmp_path, ["a@deadfirst.test"], BODY)
    status = deliver(make_config(), entry, path)[0][1]
    assert status.ok and status.remote_mta == "mx.test"
    assert len(sink.transactions) == 1


def test_4xx_greeting_tries_next_mx(sinks, make_config, tmp_path: Path) -> None:
    busy = sinks.start("127.0.0.4", Behaviour(greeting=b"421 4.3.2 busy, try later"))
    good = sinks.start("127.0.0.1")
    entry, path = make_entry(tmp_path, ["a@busy.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert len(busy.sessions) == 1 and busy.transactions == []
    assert len(good.transactions) == 1


def test_5xx_greeting_tries_next_mx_once_without_retrying_it(sinks, make_config,
                                                          tmp_path: Path) -> None:
    """twisted.mail's client factory retries at once even on a 554 greeting; ours talks to
    each MX once per attempt (the spool owns retries) and moves on to the next."""
    refusing = sinks.start("127.0.0.4", Behaviour(greeting=b"554 5.7.1 no SMTP service here"))
    good = sinks.start("127.0.0.1")
    entry, path = make_entry(tmp_path, ["a@busy.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert len(refusing.sessions) == 1 and refusing.transactions == []
    assert len(good.transactions) == 1


def test_all_mx_unreachable_is_transient_connect(sinks, make_config, tmp_path: Path) -> None:
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)  # no sink started
    status = deliver(make_config(), entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.CONNECT)


def test_ipv6_then_ipv4_for_implicit_mx(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start("127.0.0.1")  # nothing on [::1]:port, so IPv4 must be tried next
    entry, path = make_entry(tmp_path, ["a@amx.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert len(sink.transactions) == 1


def test_null_mx_fails_permanently_without_connecting(sinks, make_config,
                                                      tmp_path: Path) -> None:
    sink = sinks.start()
    entry, path = make_entry(tmp_path, ["a@nullmx.test", "b@nxdomain-none.test"], BODY)
    results = deliver(make_config(), entry, path)
    assert [(s.kind, s.enhanced, s.reason) for _, s in results] == [
        (FailureKind.PERMANENT, "5.1.10", Reason.DNS), (FailureKind.PERMANENT, "5.1.2",
                                                        Reason.DNS)]
    assert sink.sessions == []


def test_dns_timeout_is_transient(dns_server, sinks, make_config, tmp_path: Path) -> None:
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    cfg = make_config(dns_port=dns_server.silent_port, dns_timeout_ms=300)
    status = deliver(cfg, entry, path)[0][1]
    assert (status.kind, status.reason, status.enhanced) == (
        FailureKind.TRANSIENT, Reason.DNS, "4.4.3")


def test_read_timeout_is_transient(sinks, make_config, tmp_path: Path) -> None:
    sinks.start(behaviour=Behaviour(silent_on={"DATA"}))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    status = deliver(make_config(tls={"readTimeoutMs": 300}), entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TIMEOUT)


# -- STARTTLS


def test_starttls_verified(sinks, make_config, tls_context, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    cfg = make_config(tls={"startTlsRequired": True})
    assert deliver(cfg, entry, path)[0][1].ok
    session = sink.sessions[0]
    assert session.tls and len(session.transactions) == 1
    assert session.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]


def test_starttls_required_but_not_offered(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start()
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    status = deliver(make_config(tls={"startTlsRequired": True}), entry, path)[0][1]
    assert (status.kind, status.reason, status.enhanced) == (
        FailureKind.TRANSIENT, Reason.TLS, "4.7.4")
    assert sink.transactions == [] and not any(c.startswith("MAIL") for c in
                                               sink.sessions[0].commands)


def test_starttls_refused_by_peer_continues_plain_unless_required(
        sinks, make_config, tls_context, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context,
                                           starttls_reply=b"454 4.7.0 TLS not available"))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert deliver(make_config(), entry, path)[0][1].ok
    assert not sink.sessions[0].tls
    status = deliver(make_config(tls={"startTlsRequired": True}), entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TLS)
    assert len(sink.transactions) == 1


def test_wrong_hostname_fails_with_check_server_identity(sinks, make_config, tls_context,
                                                         tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context))  # cert names mx.test, not wrong.test
    entry, path = make_entry(tmp_path, ["a@wrongname.test"], BODY)
    status = deliver(make_config(), entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TLS)
    assert sink.transactions == []
    # Without identity checks the chain still verifies, so the same peer is accepted.
    assert deliver(make_config(tls={"checkServerIdentity": False}), entry, path)[0][1].ok


def test_untrusted_chain_fails_unless_trust_all(sinks, make_config, tls_context,
                                                tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    system_trust = make_config(tls={"caFile": ""})  # the test CA is not in the system store
    assert deliver(system_trust, entry, path)[0][1].reason is Reason.TLS
    assert deliver(make_config(tls={"caFile": "", "trustAll": True}), entry, path)[0][1].ok
    assert deliver(make_config(tls={"caFile": "", "trustHosts": ["mx.test"]}), entry,
                   path)[0][1].ok
    assert len(sink.transactions) == 2


def test_starttls_response_injection_aborts(sinks, make_config, tls_context,
                                            tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context, inject_after_starttls=True))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    status = deliver(make_config(), entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TLS)
    assert "injection" in status.text
    assert sink.transactions == []


# -- smart hosts and AUTH


def smart_host(sinks, make_config, **route: Any):
    relay = {"routes": [RouteConfig(domain="*", host="mx.test", port=sinks.port, **route)]}
    return make_config(relay=relay)


def test_no_auth_in_cleartext(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(offer_auth=True))
    entry, path = make_entry(tmp_path, ["a@anywhere.example"], BODY)
    cfg = smart_host(sinks, make_config, username="u", password="secret")
    status = deliver(cfg, entry, path)[0][1]
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.AUTH)
    assert not any(c.upper().startswith("AUTH") for s in sink.sessions for c in s.commands)
    assert sink.transactions == []


def test_auth_after_starttls_to_smart_host(sinks, make_config, tls_context,
                                           tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(offer_auth=True, tls=tls_context))
    entry, path = make_entry(tmp_path, ["a@anywhere.example"], BODY)
    cfg = smart_host(sinks, make_config, username="u", password="secret")
    assert deliver(cfg, entry, path)[0][1].ok
    commands = sink.sessions[0].commands
    assert commands.index("STARTTLS") < next(i for i, c in enumerate(commands)
                                             if c.startswith("AUTH PLAIN"))
    assert len(sink.transactions) == 1


def test_route_precedence_and_keys() -> None:
    relay = RelayConfig(
        defaultRoute=RouteConfig(host="default.example", port=2525),
        routes=[RouteConfig(domain="*", host="star.example"),
                RouteConfig(domain="exact.example", host="exact-host.example", port=587,
                            startTlsRequired=True)])
    router = OutboundRouter(relay)
    exact = router.next_hop("EXACT.example.")
    assert (exact.host, exact.port, exact.tls.start_tls_required) == (
        "exact-host.example", 587, True)
    assert router.next_hop("other.example").host == "star.example"
    assert router.route_key("a.example") == router.route_key("b.example")
    assert router.route_key("a.example") != router.route_key("exact.example")
    no_star = OutboundRouter(dataclasses.replace(relay, routes=relay.routes[1:]))
    assert no_star.next_hop("other.example").host == "default.example"
    direct = OutboundRouter(RelayConfig())
    assert direct.next_hop("x.example").direct
    assert direct.route_key("x.example") != direct.route_key("y.example")
