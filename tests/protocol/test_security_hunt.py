"""Security hunt on the inbound session: open-relay paths, AUTH state and limits, STARTTLS
injection, implicit TLS, VRFY/EXPN leaks (real server on loopback).

The relay server below enables relay with ``requireAuthForRelay`` and a client allowlist that
does not contain loopback, so the test client is an *unauthenticated outsider*. Tests marked
``xfail(strict=True)`` demonstrate confirmed bugs (the reason names the cause).
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any

import pytest
from protocol_support import Client, Server

from kotlin_smtp_py.envelope import Recipient, parse_path
from kotlin_smtp_py.inbound.auth import hash_password

OUTSIDER_RELAY: dict[str, Any] = {
    "enabled": True, "requireAuthForRelay": True, "allowedClientCidrs": ["10.0.0.0/8"],
    # Never reached (nothing remote is ever queued here), but keeps DNS out of the picture.
    "defaultRoute": {"host": "127.0.0.1", "port": 9},
}


def _relay_server(make_server: Any, **smtp: Any) -> Server:
    users = {"carol": hash_password("s3cret", rounds=4)}
    return make_server({"smtp": {
        "relay": OUTSIDER_RELAY,
        "auth": {"users": users, "failureDelayMs": 0},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}],
        **smtp}})


def greet(c: Client, name: str = "client.test") -> list[str]:
    assert c.reply()[0] == 220
    code, lines = c.cmd(f"EHLO {name}")
    assert code == 250
    return lines


def _plain(user: str, password: str, authz: str = "") -> str:
    return "AUTH PLAIN " + base64.b64encode(f"{authz}\x00{user}\x00{password}".encode()).decode()


def _route(srv: Server, path: str, utf8: bool) -> str:
    addr = parse_path(path, utf8=utf8)
    assert addr is not None
    return srv.service.router.route(Recipient(str(addr)))[0]


# == open relay ===================================================================================


RELAY_TRICKS = [
    "<user@remote.test>",
    "<USER@REMOTE.TEST>",
    "<user%remote.test@localhost>",
    "<alice%remote.test@LOCALHOST>",
    "<alice+x%remote.test@localhost>",
    "<remote.test!user@localhost>",
    "<alice+remote.test!user@localhost>",
    '<"user@remote.test"@localhost>',
    '<"alice+user@remote.test"@localhost>',
    '<"user%remote.test"@localhost>',
    "<@localhost:user@remote.test>",
    "<@localhost,@example.test:user@remote.test>",
    "<@remote.test:user@remote2.test>",
    "<user@remote.test@localhost>",
    "<user@localhost.>",
    "<user@LOCALHOST.>",
    "<user@remote.test.>",
    "<user@localhost.remote.test>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<postmaster@remote.test>",
    "<POSTMASTER@remote.test>",
    "<postmaster@[127.0.0.1]>",
    "<user@remote.test >",
    "<user@remote.test\t>",
]

RELAY_TRICKS_UTF8 = [
    "<user@r\u00e9mote.test>",
    "<user@\uff52\uff45\uff4d\uff4f\uff54\uff45.test>",  # fullwidth: maps to remote.test
    "<user@remote\u3002test>",  # ideographic full stop
    "<user@remote.test\u3002>",
    "<alice@\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54>",  # fullwidth localhost
    "<alice@localhost\u3002>",
    "<\u00fcser%remote.test@localhost>",
    '<"\u00fcser@remote.test"@localhost>',
]


@pytest.mark.parametrize("utf8,path", [(False, p) for p in RELAY_TRICKS]
                         + [(True, p) for p in RELAY_TRICKS_UTF8])
def test_unauthenticated_outsider_never_gets_a_remote_recipient_accepted(
        make_server: Any, utf8: bool, path: str) -> None:
    """Every recipient form is either refused, or accepted *and* routed to local delivery."""
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<alice@localhost>" + (" SMTPUTF8" if utf8 else ""))[0] == 250
    code, lines = c.cmd(f"RCPT TO:{path}")
    if code == 250:
        assert _route(srv, path, utf8) == "local", (path, lines)
    else:
        assert code in (501, 550, 553), (path, code, lines)
    # Control: the same session may not relay the plain way either, but authenticated may.
    assert c.cmd("RCPT TO:<x@remote.test>")[0] == 550
    c.close()


def test_relay_control_authenticated_may_relay_outsider_may_not(make_server: Any) -> None:
    """The relay configuration above really is closed to outsiders and open after AUTH
    (otherwise every refusal in the battery would prove nothing)."""
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    code, lines = c.cmd("RCPT TO:<user@remote.test>")
    assert (code, lines[0][:5]) == (550, "5.7.1")
    assert c.cmd("RSET")[0] == 250
    assert c.cmd(_plain("carol", "s3cret"))[0] == 235
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<user@remote.test>")[0] == 250
    # Authenticated or not, address tricks never relay.
    assert c.cmd("RCPT TO:<user%remote2.test@localhost>")[0] == 550
    assert c.cmd("RCPT TO:<user@[192.0.2.1]>")[0] == 550
    assert c.cmd("RSET")[0] == 250
    c.close()


def test_failed_or_foreign_authzid_auth_does_not_open_relay(make_server: Any) -> None:
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "s3cret", authz="admin"))[0] == 535
    assert c.cmd(_plain("carol", "wrong"))[0] == 535
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<user@remote.test>")[0] == 550
    c.close()


# == STARTTLS =====================================================================================


def test_auth_does_not_survive_starttls(make_server: Any, certs: Any) -> None:
    """RFC 3207 §4.2: after STARTTLS the server discards all knowledge from the client,
    including a plaintext AUTH; relay permission must go with it."""
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "s3cret"))[0] == 235
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 503  # EHLO forgotten too
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<user@remote.test>")[0] == 550
    assert c.cmd("RSET")[0] == 250
    assert c.cmd(_plain("carol", "s3cret"))[0] == 235  # not "503 already authenticated"
    c.close()


def test_auth_pipelined_behind_starttls_is_discarded(make_server: Any, certs: Any) -> None:
    """CVE-2011-0411 with AUTH and RSET as the injected commands: none of them is acted on."""
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    c.send(b"STARTTLS\r\n" + _plain("carol", "s3cret").encode() + b"\r\nRSET\r\n"
           b"EHLO injected.test\r\n")
    assert c.reply()[0] == 220
    assert c.buf == b"", "nothing may follow the 220 in plaintext"
    c.starttls(certs.ca_cert)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 503  # the injected EHLO was dropped
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<user@remote.test>")[0] == 550  # the injected AUTH was dropped
    c.close()


def test_starttls_injection_split_across_writes_breaks_the_handshake(make_server: Any,
                                                                     certs: Any) -> None:
    """Plaintext sent after STARTTLS but in its own write (before the handshake) can only
    reach the TLS layer, where it is garbage: no command is executed, no plaintext reply."""
    srv = _relay_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"EHLO injected.test\r\nMAIL FROM:<a@remote.test>\r\n")
    assert c.closed()
    assert b"250" not in c.buf
    c.close()


# == implicit TLS / plaintext AUTH ================================================================


def test_implicit_tls_listener_never_speaks_plaintext(make_server: Any) -> None:
    srv = make_server({"smtp": {
        "auth": {"users": {"carol": hash_password("s3cret", rounds=4)}},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True,
                       "allowPlaintextAuth": False}]}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    data = b""
    try:
        s.sendall(b"EHLO client.test\r\n" + _plain("carol", "s3cret").encode() + b"\r\n")
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        s.close()
    assert b"220" not in data and b"250" not in data and b"235" not in data, data[:200]


def test_plaintext_auth_refused_for_every_mechanism_form(make_server: Any) -> None:
    """allowPlaintextAuth=false (default): no mechanism or initial-response form gets to the
    credential check before TLS, and AUTH is not advertised."""
    srv = make_server({"smtp": {"relay": OUTSIDER_RELAY,
                                "auth": {"users": {"carol": "s3cret"}, "failureDelayMs": 0}}})
    c = Client(srv.port)
    lines = greet(c)
    assert not any(ln.startswith("AUTH") for ln in lines)
    login_user = base64.b64encode(b"carol").decode()
    for line in [_plain("carol", "s3cret"), "AUTH PLAIN", "AUTH LOGIN",
                 f"AUTH LOGIN {login_user}", "auth plain", "AUTH CRAM-MD5"]:
        code, _ = c.cmd(line)
        assert code == 538, line
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<user@remote.test>")[0] == 550
    c.close()


def test_requiretls_refused_on_plaintext_but_offered_after_starttls(make_server: Any,
                                                                    certs: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    lines = greet(c)
    assert "REQUIRETLS" not in lines
    code, reply = c.cmd("MAIL FROM:<a@remote.test> REQUIRETLS")
    assert (code, reply[0][:6]) == (530, "5.7.10")
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    code, lines = c.cmd("EHLO client.test")
    assert "REQUIRETLS" in lines
    assert c.cmd("MAIL FROM:<a@remote.test> REQUIRETLS")[0] == 250
    c.close()


# == AUTH limits ==================================================================================


def test_auth_lockout_ignores_user_name_case_and_padding(make_server: Any) -> None:
    users = {"carol": hash_password("s3cret", rounds=4)}
    srv = make_server({"smtp": {
        "auth": {"users": users, "failureDelayMs": 0, "rateLimitMaxFailures": 3},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("carol", "x1"))[0] == 535
    assert c.cmd(_plain("CAROL", "x2"))[0] == 535
    assert c.cmd(_plain("Carol ", "x3"))[0] == 454  # the third failure locks "carol"
    c.close()
    again = Client(srv.port)  # reconnecting does not help (per IP and per user)
    greet(again)
    assert again.cmd(_plain("carol", "s3cret"))[0] == 454
    again.close()


def test_parallel_auth_attempts_cannot_exceed_the_failure_limit(make_server: Any) -> None:
    users = {"carol": hash_password("s3cret", rounds=12)}  # a check takes ~0.2 s
    srv = make_server({"smtp": {
        "auth": {"users": users, "failureDelayMs": 0, "rateLimitMaxFailures": 3},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    clients = [Client(srv.port) for _ in range(8)]
    for c in clients:
        greet(c)
    for i, c in enumerate(clients):
        c.send(_plain("carol", f"guess-{i}").encode() + b"\r\n")
    codes = [c.reply()[0] for c in clients]
    for c in clients:
        c.close()
    # With the limit enforced, at most 3 guesses are tested (2 answered 535, the third locks
    # with 454); every later attempt is refused unchecked (454).
    assert codes.count(535) <= 2, codes


# == local domains ================================================================================


@pytest.mark.parametrize("path,utf8", [("<alice@b\u00fccher.test>", True),
                                       ("<alice@xn--bcher-kva.test>", False)])
def test_idn_local_domain_configured_as_u_label_is_local(make_server: Any, path: str,
                                                         utf8: bool) -> None:
    srv = make_server({"smtp": {"routing": {"localDomain": "localhost",
                                            "localDomains": ["b\u00fccher.test"]}}})
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>" + (" SMTPUTF8" if utf8 else ""))[0] == 250
    code, lines = c.cmd(f"RCPT TO:{path}")
    c.close()
    assert code == 250, lines


@pytest.mark.parametrize("dot", ["\u3002", "\uff0e"], ids=["ideographic", "fullwidth"])
def test_idn_trailing_dot_recipient_is_refused_or_delivered(make_server: Any, dot: str) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test> SMTPUTF8")[0] == 250
    code, _ = c.cmd(f"RCPT TO:<alice@localhost{dot}>")
    if code != 250:
        assert code == 501
        return
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: lost?\r\n\r\nhello\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    srv.wait_messages("alice", 1, timeout=5)


# == VRFY / EXPN ==================================================================================


def test_vrfy_expn_disabled_do_not_distinguish_users(make_server: Any) -> None:
    users = {"carol": hash_password("pw", rounds=4)}
    srv = make_server({"smtp": {
        "auth": {"users": users, "failureDelayMs": 0},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    (srv.root / "lists" / "team").write_text("alice@localhost\nbob@remote.test\n")
    c = Client(srv.port)
    greet(c)
    answers = {(verb, arg): c.cmd(f"{verb} {arg}") for verb in ("VRFY", "EXPN")
               for arg in ("alice", "<alice@localhost>", "nobody", "team", "postmaster")}
    assert {code for code, _ in answers.values()} == {502}
    assert len({tuple(lines) for _, lines in answers.values()}) == 2  # one text per verb
    assert c.cmd(_plain("carol", "pw"))[0] == 235
    code, lines = c.cmd("EXPN team")  # not even for an authenticated client
    assert code == 502 and not any("remote.test" in ln for ln in lines)
    c.close()


def test_implicit_tls_session_gets_requiretls_and_auth(make_server: Any, certs: Any) -> None:
    """Implicit TLS counts as TLS for AUTH (no 538) and REQUIRETLS."""
    srv = make_server({"smtp": {
        "auth": {"users": {"carol": hash_password("s3cret", rounds=4)}, "failureDelayMs": 0},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True}]}})
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    c = Client(srv.port)
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    lines = greet(c)
    assert "REQUIRETLS" in lines and "AUTH PLAIN LOGIN" in lines
    assert c.cmd(_plain("carol", "s3cret"))[0] == 235
    assert c.cmd("MAIL FROM:<carol@localhost> REQUIRETLS")[0] == 250
    c.close()
