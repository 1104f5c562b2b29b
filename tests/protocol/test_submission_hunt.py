"""Submission and relay authorisation hunt: who may send what through which listener.

Real servers on loopback (``make_server``), raw-socket and smtplib clients, real TLS with the
test CA. Covers what the other protocol suites do not: ``smtp.auth.required`` and
``requireAuthForMail`` per listener (which commands stay usable before AUTH), AUTH forms and
pipelining, the ``AUTH=`` MAIL parameter (RFC 4954 §5), the relay allow-lists (sender-domain
matching, "both must match", the client as seen through a trusted PROXY header), relay
disabled, and whose ``sent/`` folder gets the archive copy.

Four cases found bugs (all fixed since): unknown users answered faster than known ones after
a users reload to costlier hashes, a login from a foreign domain archived into a local
namesake's sent folder, allowedSenderDomains given as U-labels matched nobody, a malformed
AUTH= xtext accepted.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import deep_merge, on_reactor, wait_until
from protocol_support import Client, Server

from kotlin_smtp_py.inbound.auth import hash_password

USERS = {"carol": hash_password("carol-pass", rounds=4), "dave": "dave-pass"}
# Never reached: nothing remote is ever sent DATA here; keeps DNS out of the picture.
NOWHERE = {"host": "127.0.0.1", "port": 9}
LOOPBACK = {"port": 0, "bindAddress": "127.0.0.1"}
PLAINTEXT_AUTH = {**LOOPBACK, "allowPlaintextAuth": True}
PROXIED = {**LOOPBACK, "proxyProtocol": True}


def _server(make_server: Any, *, relay: dict[str, Any] | None = None,
            listeners: list[dict[str, Any]] | None = None, auth: dict[str, Any] | None = None,
            users: dict[str, str] | None = None, **smtp: Any) -> Server:
    conf: dict[str, Any] = {
        "auth": {"users": USERS if users is None else users, "failureDelayMs": 0,
                 **(auth or {})},
        "listeners": listeners or [PLAINTEXT_AUTH],
        **smtp}
    if relay is not None:
        conf["relay"] = {"enabled": True, "defaultRoute": NOWHERE, **relay}
    return make_server({"smtp": conf})


def _plain(user: str, password: str, authz: str = "") -> str:
    return "AUTH PLAIN " + base64.b64encode(f"{authz}\x00{user}\x00{password}".encode()).decode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def greet(c: Client, name: str = "client.test") -> list[str]:
    assert c.reply()[0] == 220
    code, lines = c.cmd(f"EHLO {name}")
    assert code == 250, lines
    return lines


def proxied(srv: Server, client_ip: str, index: int = 0) -> Client:
    """A session through the trusted balancer (loopback) on behalf of ``client_ip``."""
    c = Client(srv.port_of(index))
    family = "TCP6" if ":" in client_ip else "TCP4"
    dst = "2001:db8::1" if family == "TCP6" else "192.0.2.1"
    c.send(f"PROXY {family} {client_ip} {dst} 40000 25\r\n".encode())
    return c


def relay_verdict(c: Client, sender: str, rcpt: str = "<user@remote.test>",
                  params: str = "") -> int:
    """The RCPT code for ``rcpt`` in a transaction from ``sender`` (the transaction is reset)."""
    code, lines = c.cmd(f"MAIL FROM:{sender}{params}".encode())
    assert code == 250, (sender, code, lines)
    got, lines = c.cmd(f"RCPT TO:{rcpt}")
    if got == 550:
        assert lines[0].startswith("5.7.1"), lines
    assert c.cmd("RSET")[0] == 250
    return got


def deliver(c: Client, sender: str, rcpts: list[str], body: bytes) -> None:
    assert c.cmd(f"MAIL FROM:{sender}")[0] == 250
    for r in rcpts:
        code, lines = c.cmd(f"RCPT TO:{r}")
        assert code == 250, (r, lines)
    assert c.cmd("DATA")[0] == 354
    c.send(body + b"\r\n.\r\n")
    code, lines = c.reply()
    assert code == 250, lines


def sent_dir(srv: Server, owner: str) -> Path:
    return srv.root / "mailboxes" / owner / "sent" / "new"


def sent_copies(srv: Server, owner: str) -> list[bytes]:
    d = sent_dir(srv, owner)
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def settled(srv: Server) -> None:
    """Every queued entry (archive copies are made by the scheduler) has been processed."""
    wait_until(lambda: srv.spool_entries() == [], timeout=15, message="spool drained")


def no_tracebacks(failures: list[dict[str, Any]]) -> None:
    assert failures == [], [f.get("log_format") for f in failures]


def tls_client(srv: Server, certs: Any, index: int = 0) -> Client:
    c = Client(srv.port_of(index))
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    return c


# == smtp.auth.required / listeners[].requireAuthForMail ==========================================


def test_auth_required_gates_mail_but_leaves_session_commands_usable(make_server: Any,
                                                                     certs: Any) -> None:
    """``smtp.auth.required``: 530 5.7.0 at MAIL (even for a local recipient), while EHLO,
    NOOP, RSET, HELP, STARTTLS, AUTH and QUIT work before authentication; transaction verbs
    without a transaction stay 503; after STARTTLS the requirement still holds."""
    srv = _server(make_server, auth={"required": True}, listeners=[LOOPBACK])
    c = Client(srv.port)
    lines = greet(c)
    assert "STARTTLS" in lines and not any(ln.startswith("AUTH") for ln in lines)
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("HELP")[0] == 214
    code, lines = c.cmd("MAIL FROM:<alice@localhost>")
    assert (code, lines[0][:5]) == (530, "5.7.0"), lines
    assert c.cmd("MAIL FROM:<>")[0] == 530  # bounces too: nothing is exempt
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 538  # plaintext: not offered
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 530
    assert c.cmd(_plain("carol", "wrong"))[0] == 535
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 530  # a failed AUTH changes nothing
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    deliver(c, "<carol@localhost>", ["<alice@localhost>"], b"Subject: submitted\r\n\r\nx")
    assert c.cmd("QUIT")[0] == 221
    (msg,) = srv.wait_messages("alice", 1)
    assert b"with ESMTPSA" in msg


def test_submission_listener_requires_auth_while_mx_listener_takes_local_mail(
        make_server: Any, certs: Any) -> None:
    """Port-25 style listener: local mail without AUTH, relay refused. Submission listener
    (requireAuthForMail): nothing before AUTH, relay after it."""
    srv = _server(make_server, relay={"requireAuthForRelay": True}, listeners=[
        LOOPBACK, {**LOOPBACK, "requireAuthForMail": True, "serviceName": "Submission"}])
    mx = Client(srv.port_of(0))
    greet(mx)
    assert relay_verdict(mx, "<someone@remote.test>") == 550
    deliver(mx, "<someone@remote.test>", ["<alice@localhost>", "<bob@LOCALHOST>"],
            b"Subject: inbound\r\n\r\nx")
    srv.wait_messages("alice", 1)
    srv.wait_messages("bob", 1)
    mx.close()

    sub = Client(srv.port_of(1))
    code, lines = sub.reply()
    assert code == 220 and "Submission" in lines[0]
    assert sub.cmd("EHLO client.test")[0] == 250
    code, lines = sub.cmd("MAIL FROM:<carol@localhost>")
    assert (code, lines[0][:5]) == (530, "5.7.0")
    assert sub.cmd("STARTTLS")[0] == 220
    sub.starttls(certs.ca_cert)
    assert sub.cmd("EHLO client.test")[0] == 250
    assert sub.cmd("MAIL FROM:<carol@localhost>")[0] == 530
    assert sub.cmd(_plain("carol", "carol-pass"))[0] == 235
    assert relay_verdict(sub, "<carol@localhost>") == 250
    sub.close()


def test_implicit_tls_submission_with_smtplib_plain_and_login(make_server: Any,
                                                               certs: Any) -> None:
    """Port-465 style: implicit TLS + requireAuthForMail; smtplib's PLAIN (initial response)
    and LOGIN (challenge form) both work; unauthenticated MAIL is refused with 530."""
    srv = _server(make_server, relay={"requireAuthForRelay": True}, listeners=[
        {**LOOPBACK, "implicitTls": True, "requireAuthForMail": True}])
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with smtplib.SMTP_SSL("127.0.0.1", srv.port, context=ctx,
                          local_hostname="client.test") as s:
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"].upper()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("carol@localhost", ["alice@localhost"], b"Subject: x\r\n\r\ny\r\n")
        assert refused.value.smtp_code == 530
        s.login("carol", "carol-pass")
        s.sendmail("carol@localhost", ["alice@localhost"], b"Subject: plain\r\n\r\ny\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", srv.port, context=ctx,
                          local_hostname="client.test") as s:
        s.ehlo()
        s.user, s.password = "dave", "dave-pass"
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235
        s.sendmail("dave@localhost", ["alice@localhost"], b"Subject: login\r\n\r\ny\r\n")
    msgs = srv.wait_messages("alice", 2)
    assert all(b"with ESMTPSA" in m for m in msgs)


def test_auth_disabled_globally_or_per_listener_is_502_and_not_advertised(
        make_server: Any, certs: Any) -> None:
    srv = _server(make_server, listeners=[{**LOOPBACK, "enableAuth": False}, LOOPBACK])
    off = tls_client(srv, certs, 0)
    code, lines = off.cmd("EHLO client.test")
    assert code == 250 and not any(ln.startswith("AUTH") for ln in lines)
    assert off.cmd(_plain("carol", "carol-pass"))[0] == 502
    assert off.cmd("AUTH LOGIN")[0] == 502
    on = tls_client(srv, certs, 1)
    code, lines = on.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in lines
    assert on.cmd(_plain("carol", "carol-pass"))[0] == 235

    srv2 = _server(make_server, auth={"enabled": False}, listeners=[LOOPBACK])
    c = tls_client(srv2, certs)
    code, lines = c.cmd("EHLO client.test")
    assert not any(ln.startswith("AUTH") for ln in lines)
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 502


# == AUTH forms ===================================================================================


def test_auth_forms_and_odd_payloads(make_server: Any, failures: list[Any]) -> None:
    """Forms not covered elsewhere: PLAIN as a challenge, authzid equal to the user, LOGIN with
    an initial response, NUL and non-UTF-8 bytes in a LOGIN password, base64 with inner
    whitespace, a 12 000-character response (RFC 4954 §4: up to 12288 octets must be taken);
    every refusal leaves the session in command mode and unauthenticated."""
    srv = _server(make_server, auth={"rateLimitEnabled": False})
    c = Client(srv.port)
    greet(c)
    creds = _b64(b"\x00carol\x00carol-pass")
    # base64 split by whitespace is not base64 (RFC 4954 §4: 501), command mode afterwards
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd(creds[:8] + " " + creds[8:])[0] == 501
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd(creds + "=")[0] == 501  # over-padded
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250  # not taken as a response
    assert c.cmd("RSET")[0] == 250
    # LOGIN: NUL and non-UTF-8 bytes in the password are a wrong password, not an error
    for password in (b"carol\x00pass", b"\xff\xfe\x00", b"carol-pass\x00"):
        assert c.cmd("AUTH LOGIN " + _b64(b"carol"))[0] == 334
        assert c.cmd(_b64(password))[0] == 535, password
    # a long (wrong) password in one response line: answered, not "line too long"
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(_b64(b"carol"))[0] == 334
    code, lines = c.cmd(_b64(b"x" * 9000))  # 12 000 base64 characters
    assert code == 535, lines
    # authzid equal to the authentication identity is the same as none (RFC 4616 §2)
    assert c.cmd(_plain("carol", "carol-pass", authz="carol"))[0] == 235
    assert c.cmd("AUTH PLAIN")[0] == 503  # already authenticated
    no_tracebacks(failures)


def test_pipelined_commands_after_auth_are_judged_by_its_outcome(make_server: Any) -> None:
    """A client pipelining MAIL/RCPT behind AUTH: with a wrong password the relay RCPT is
    refused, with the right one accepted — never judged before the check has answered."""
    srv = _server(make_server, relay={"requireAuthForRelay": True})
    for password, rcpt_code in (("wrong", 550), ("carol-pass", 250)):
        c = Client(srv.port)
        greet(c)
        c.send((_plain("carol", password) + "\r\nMAIL FROM:<carol@localhost>\r\n"
                "RCPT TO:<user@remote.test>\r\nRSET\r\n").encode())
        assert c.replies(4) == [235 if rcpt_code == 250 else 535, 250, rcpt_code, 250]
        c.close()


# == the AUTH= MAIL parameter (RFC 4954 §5) =======================================================


def test_mail_auth_parameter_from_unauthenticated_client_is_not_trusted(make_server: Any,
                                                                         certs: Any) -> None:
    """``AUTH=carol@localhost`` from a client that did not authenticate is accepted and
    ignored: no relay, no "authenticated" trace, no sent-archive copy for carol."""
    srv = _server(make_server, relay={"requireAuthForRelay": True,
                                      "allowedClientCidrs": ["10.0.0.0/8"]})
    c = Client(srv.port)
    greet(c)
    assert relay_verdict(c, "<carol@localhost>", params=" AUTH=carol@localhost") == 550
    assert relay_verdict(c, "<carol@localhost>", params=" AUTH=<>") == 550
    assert c.cmd("MAIL FROM:<carol@localhost> AUTH=carol@localhost")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: claims auth\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    head = msg.split(b"\r\n\r\n", 1)[0]
    assert b"(authenticated)" not in head and b"ESMTPA" not in head and b"ESMTPSA" not in head
    settled(srv)
    assert sent_copies(srv, "carol") == []
    # After a real AUTH the parameter (any value) does not take the relay right away either.
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    assert relay_verdict(c, "<carol@localhost>", params=" AUTH=<>") == 250
    assert relay_verdict(c, "<carol@localhost>", params=" AUTH=dave@localhost") == 250
    c.close()


def test_mail_auth_parameter_with_malformed_xtext_is_refused(make_server: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    assert c.cmd("MAIL FROM:<carol@localhost> AUTH=carol@localhost")[0] == 250  # well formed
    assert c.cmd("RSET")[0] == 250
    for value in ("a+zz", "carol+", "a+2g@localhost"):
        code, lines = c.cmd(f"MAIL FROM:<carol@localhost> AUTH={value}")
        assert code == 501, (value, code, lines)
        assert c.cmd("RSET")[0] == 250


# == relay policy: sender-domain allow-list =======================================================


def test_allowed_sender_domain_matches_exactly_and_case_insensitively(make_server: Any) -> None:
    """``allowedSenderDomains: [Example.COM.]`` (no client allow-list): the sender's domain
    must *be* example.com, in any case. Look-alikes, subdomains, a null sender, address
    literals, quoted local parts and source routes naming the domain do not count."""
    srv = _server(make_server, relay={"requireAuthForRelay": True,
                                      "allowedSenderDomains": ["Example.COM."]})
    c = Client(srv.port)
    greet(c)
    cases = {
        "<user@example.com>": 250,
        "<USER@EXAMPLE.COM>": 250,
        "<user@Example.Com>": 250,
        "<@evil.test:user@example.com>": 250,  # the route is dropped; the mailbox counts
        "<user@sub.example.com>": 550,
        "<user@evil-example.com>": 550,
        "<user@xexample.com>": 550,
        "<user@example.com.evil.test>": 550,
        "<user@example.co>": 550,
        "<>": 550,
        "<user@[192.0.2.1]>": 550,
        '<"user@example.com"@evil.test>': 550,
        "<user%example.com@evil.test>": 550,
        "<@example.com:user@evil.test>": 550,
    }
    got = {sender: relay_verdict(c, sender) for sender in cases}
    assert got == cases
    # Only remote recipients are judged: local mail never needs the allow-list.
    assert relay_verdict(c, "<user@evil.test>", rcpt="<alice@localhost>") == 250
    c.close()


def test_allowed_sender_domain_given_as_u_label_matches_its_senders(make_server: Any) -> None:
    srv = _server(make_server, relay={"requireAuthForRelay": True,
                                      "allowedSenderDomains": ["B\u00fccher.test"]})
    c = Client(srv.port)
    greet(c)
    assert relay_verdict(c, "<user@xn--bcher-kva.test>") == 250
    assert relay_verdict(c, "<user@b\u00fccher.test>", params=" SMTPUTF8") == 250
    c.close()


def test_allowed_sender_domain_given_as_a_label_matches_u_label_senders(
        make_server: Any) -> None:
    srv = _server(make_server, relay={"requireAuthForRelay": True,
                                      "allowedSenderDomains": ["xn--bcher-kva.test"]})
    c = Client(srv.port)
    greet(c)
    assert relay_verdict(c, "<user@xn--bcher-kva.test>") == 250
    assert relay_verdict(c, "<user@B\u00dcCHER.test>", params=" SMTPUTF8") == 250
    assert relay_verdict(c, "<user@bucher.test>") == 550
    c.close()


# == relay policy: client allow-list, both lists, the client behind a trusted PROXY ===============


@pytest.mark.parametrize("require_auth", [True, False])
def test_both_allow_lists_must_match_for_the_real_client(make_server: Any,
                                                        require_auth: bool) -> None:
    """``allowedClientCidrs`` + ``allowedSenderDomains``: both must match (with or without
    requireAuthForRelay: lists set means not an open relay). The client is the one the
    trusted balancer names, not the balancer."""
    srv = _server(make_server, listeners=[PROXIED], relay={
        "requireAuthForRelay": require_auth, "allowedClientCidrs": ["10.0.0.0/8"],
        "allowedSenderDomains": ["example.com"]})
    cases = [("10.1.2.3", "<a@example.com>", 250),
             ("10.1.2.3", "<a@other.test>", 550),
             ("10.1.2.3", "<>", 550),
             ("203.0.113.7", "<a@example.com>", 550),
             ("203.0.113.7", "<a@other.test>", 550),
             ("::ffff:10.1.2.3", "<a@example.com>", 250),  # IPv4-mapped: the IPv4 client
             ("2001:db8::7", "<a@example.com>", 550)]
    got = []
    for ip, sender, _ in cases:
        c = proxied(srv, ip)
        greet(c)
        got.append((ip, sender, relay_verdict(c, sender)))
        c.close()
    assert got == cases


def test_client_allow_list_sees_the_proxied_client_not_the_balancer(make_server: Any) -> None:
    """The balancer (loopback) is itself in allowedClientCidrs: a direct session from it may
    relay, a session it forwards for an outside client may not."""
    srv = _server(make_server, listeners=[PROXIED, LOOPBACK], relay={
        "requireAuthForRelay": True, "allowedClientCidrs": ["127.0.0.1/32", "10.0.0.0/8"]})
    direct = Client(srv.port_of(1))
    greet(direct)
    assert relay_verdict(direct, "<a@other.test>") == 250
    direct.close()
    outside = proxied(srv, "203.0.113.7")
    lines = greet(outside)
    assert "[203.0.113.7]" in lines[0]
    assert relay_verdict(outside, "<a@other.test>") == 550
    outside.close()
    inside = proxied(srv, "10.200.0.1")
    greet(inside)
    assert relay_verdict(inside, "<a@other.test>") == 250
    inside.close()


def test_proxy_header_on_a_plain_listener_does_not_change_the_client(make_server: Any) -> None:
    """A PROXY line sent to a listener without proxyProtocol is an unknown command, and the
    relay decision stays with the real (loopback) address."""
    srv = _server(make_server, listeners=[LOOPBACK], relay={
        "requireAuthForRelay": True, "allowedClientCidrs": ["10.0.0.0/8"]})
    c = Client(srv.port)
    assert c.reply()[0] == 220
    assert c.cmd("PROXY TCP4 10.1.2.3 192.0.2.1 40000 25")[0] == 500
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "[127.0.0.1]" in lines[0]
    assert relay_verdict(c, "<a@other.test>") == 550
    c.close()


def test_relay_requires_relay_enabled_even_when_authenticated(make_server: Any) -> None:
    """relay.enabled=false (default): remote recipients are refused for everyone; a route
    for a domain does not make it relayable either."""
    srv = _server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    assert relay_verdict(c, "<carol@localhost>") == 550
    assert relay_verdict(c, "<carol@localhost>", rcpt="<alice@localhost>") == 250
    c.close()
    routed = _server(make_server, relay={"requireAuthForRelay": True, "routes": [
        {"domain": "partner.test", "host": "127.0.0.1", "port": 9}]})
    c = Client(routed.port)
    greet(c)
    assert relay_verdict(c, "<a@other.test>", rcpt="<user@partner.test>") == 550
    assert relay_verdict(c, "<a@other.test>", rcpt="<user@PARTNER.test>") == 550
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    assert relay_verdict(c, "<carol@localhost>", rcpt="<user@partner.test>") == 250
    c.close()


def test_open_relay_by_configuration_and_local_mail_without_auth(make_server: Any) -> None:
    """requireAuthForRelay=false without allow-lists is the (documented, warned-about) open
    relay; with requireAuthForRelay=true an outsider still delivers local mail, in any case of
    the local domain, without AUTH."""
    open_srv = _server(make_server, relay={"requireAuthForRelay": False})
    c = Client(open_srv.port)
    greet(c)
    assert relay_verdict(c, "<a@other.test>") == 250
    assert relay_verdict(c, "<>") == 250
    c.close()
    closed = _server(make_server, relay={"requireAuthForRelay": True})
    c = Client(closed.port)
    greet(c)
    assert relay_verdict(c, "<a@other.test>") == 550
    deliver(c, "<a@other.test>", ["<alice@LocalHost>", "<bob@example.TEST>"],
            b"Subject: inbound\r\n\r\nx")
    closed.wait_messages("alice", 1)
    closed.wait_messages("bob", 1)
    c.close()


# == sender identity and the sent archive =========================================================


def test_authenticated_user_may_send_as_another_address_archive_goes_to_the_login(
        make_server: Any) -> None:
    """No sender-login-mismatch check is documented (Postfix's is opt-in): carol may use
    alice's address. The sent copy belongs to who logged in, never to the claimed sender."""
    srv = _server(make_server, relay={"requireAuthForRelay": True})
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "carol-pass"))[0] == 235
    deliver(c, "<alice@localhost>", ["<bob@localhost>"], b"Subject: as alice\r\n\r\nx")
    c.close()
    srv.wait_messages("bob", 1)
    settled(srv)
    (copy,) = wait_until(lambda: sent_copies(srv, "carol"), message="carol's sent copy")
    assert b"Subject: as alice" in copy
    assert sent_copies(srv, "alice") == []


@pytest.mark.parametrize("mode,trusted_copy,auth_copy", [
    ("TRUSTED_SUBMISSION", True, True),
    ("AUTHENTICATED_ONLY", False, True),
    ("DISABLED", False, False),
])
def test_sent_archive_owner_per_mode_with_the_client_seen_through_proxy(
        make_server: Any, mode: str, trusted_copy: bool, auth_copy: bool) -> None:
    """Unauthenticated senders from the trusted network (as named by the balancer) get a copy
    under TRUSTED_SUBMISSION only; outsiders never; an authenticated login per mode."""
    srv = _server(make_server, listeners=[{**PROXIED, "allowPlaintextAuth": True}],
                  relay={"requireAuthForRelay": True, "allowedClientCidrs": ["10.0.0.0/8"]},
                  sentArchive={"mode": mode})
    outsider = proxied(srv, "203.0.113.7")
    greet(outsider)
    deliver(outsider, "<bob@localhost>", ["<alice@localhost>"], b"Subject: outsider\r\n\r\nx")
    outsider.close()
    trusted = proxied(srv, "10.1.2.3")
    greet(trusted)
    deliver(trusted, "<Bob+tag@localhost>", ["<alice@localhost>"], b"Subject: trusted\r\n\r\nx")
    trusted.close()
    authed = proxied(srv, "198.51.100.4")
    greet(authed)
    assert authed.cmd(_plain("carol", "carol-pass"))[0] == 235
    deliver(authed, "<carol@localhost>", ["<alice@localhost>"], b"Subject: authed\r\n\r\nx")
    authed.close()
    srv.wait_messages("alice", 3)
    settled(srv)
    bob = sent_copies(srv, "bob")
    assert [b"Subject: trusted" in m for m in bob] == ([True] if trusted_copy else [])
    carol = sent_copies(srv, "carol")
    assert [b"Subject: authed" in m for m in carol] == ([True] if auth_copy else [])


def test_login_from_a_foreign_domain_never_archives_into_a_local_namesake(
        make_server: Any) -> None:
    srv = _server(make_server, users={"alice@partner.test": "partner-pass",
                                      "bob@example.test": "bob-pass"},
                  relay={"requireAuthForRelay": True})
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("bob@example.test", "bob-pass"))[0] == 235  # a local-domain login
    deliver(c, "<bob@example.test>", ["<alice@localhost>"], b"Subject: local login\r\n\r\nx")
    c.close()
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("alice@partner.test", "partner-pass"))[0] == 235
    deliver(c, "<alice@partner.test>", ["<bob@localhost>"], b"Subject: partner\r\n\r\nx")
    c.close()
    srv.wait_messages("alice", 1)
    srv.wait_messages("bob", 1)
    settled(srv)
    (copy,) = sent_copies(srv, "bob")  # bob@example.test is the local bob: his copy
    assert b"Subject: local login" in copy
    assert sent_copies(srv, "alice") == []


# == the users table after a reload (SIGHUP) ======================================================


def _timed(c: Client, line: str) -> tuple[int, float]:
    started = time.monotonic()
    code = c.cmd(line)[0]
    return code, time.monotonic() - started


def test_unknown_users_cost_as_much_as_known_ones_after_a_users_reload(
        make_server: Any, tmp_path: Path) -> None:
    overrides: dict[str, Any] = {"smtp": {
        "auth": {"users": {"carol": hash_password("carol-pass", rounds=4)},
                 "failureDelayMs": 0, "rateLimitEnabled": False},
        "listeners": [PLAINTEXT_AUTH]}}
    srv = make_server(overrides)
    root = srv.root
    full = deep_merge({"smtp": {
        "hostname": "mx.test",
        "routing": {"localDomain": "localhost", "localDomains": ["example.test"]},
        "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                    "listsDir": str(root / "lists")},
        "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
        "limits": {"maxMessageSizeBytes": 1_000_000},
        "lifecycle": {"gracefulShutdownTimeoutMs": 2000}},
        "management": {"server": {"port": 0}}}, overrides)
    full["smtp"]["auth"]["users"] = {"erin": hash_password("erin-pass", rounds=11)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full))
    srv.service.config_path = str(path)
    assert on_reactor(srv.service.reload) is True
    c = Client(srv.port)
    greet(c)
    assert _timed(c, _plain("erin", "erin-pass"))[0] == 235  # the new table is live
    c.close()
    c = Client(srv.port)
    greet(c)
    known = [_timed(c, _plain("erin", "wrong")) for _ in range(2)]
    unknown = [_timed(c, _plain("nobody", "wrong")) for _ in range(2)]
    assert [code for code, _ in known + unknown] == [535] * 4
    fastest_known = min(t for _, t in known)
    slowest_unknown = max(t for _, t in unknown)
    assert slowest_unknown >= fastest_known / 3, (known, unknown)
    c.close()
