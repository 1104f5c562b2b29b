"""Hunt: outbound routing, smart-host AUTH, per-destination limits, cache keys and mail loops,
over real loopback peers (the .test DNS zone of outbound_support, scripted SMTP sinks)."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, deep_merge, on_reactor, wait_until
from outbound_sink import Behaviour, SinkFactory, SinkProtocol
from outbound_support import Sinks, deliver, make_entry

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.config import ConnectionCacheConfig, RelayConfig, RouteConfig
from kotlin_smtp_py.outbound.relay import RelayDelivery
from kotlin_smtp_py.outbound.router import OutboundRouter
from kotlin_smtp_py.status import FailureKind, Reason

BODY = b"From: a@origin.test\r\nSubject: t\r\n\r\nhello\r\n"
SECRET = "s3cr3t-Pa55word"


def listen(sinks: Sinks, factory: SinkFactory, interface: str = "127.0.0.1") -> SinkFactory:
    from twisted.internet import reactor

    factory.noisy = False
    sinks._listeners.append(on_reactor(reactor.listenTCP, sinks.port, factory,
                                       interface=interface))
    sinks.factories[interface] = factory
    return factory


def auths(factory: SinkFactory) -> list[str]:
    return [c for s in factory.sessions for c in s.commands if c.upper().startswith("AUTH")]


# -- route matching ---------------------------------------------------------------------------


def test_exact_route_does_not_capture_subdomains_and_wildcard_prefixes_are_literal() -> None:
    # Documented precedence is exact domain > "*" > defaultRoute > MX: no suffix matching.
    router = OutboundRouter(RelayConfig(routes=[
        RouteConfig(domain="example.com", host="exact.host"),
        RouteConfig(domain="*.wild.example", host="never.host"),
        RouteConfig(domain="*", host="star.host")]))
    assert router.next_hop("Example.COM.").host == "exact.host"
    assert router.next_hop("sub.example.com").host == "star.host"
    assert router.next_hop("a.wild.example").host == "star.host"
    assert router.route_key("sub.example.com") != router.route_key("example.com")


def test_idn_route_matches_both_label_forms() -> None:
    router = OutboundRouter(RelayConfig(routes=[
        RouteConfig(domain="bücher.example", host="idn.host"),
        RouteConfig(domain="xn--caf-dma.example", host="cafe.host"),
        RouteConfig(domain="*", host="star.host")]))
    assert router.next_hop("xn--bcher-kva.example").host == "idn.host"
    assert router.next_hop("café.example").host == "cafe.host"


def test_route_level_start_tls_required_overrides_a_lax_default(sinks: Sinks, make_config: Any,
                                                                tmp_path: Path) -> None:
    sink = sinks.start()  # no STARTTLS offered
    cfg_ = make_config(relay={"routes": [RouteConfig(
        domain="tls.example", host="mx.test", port=sinks.port, startTlsRequired=True)]})
    entry, path = make_entry(tmp_path, ["a@tls.example"], BODY)
    status = deliver(cfg_, entry, path)[0][1]
    assert (status.kind, status.reason, status.enhanced) == (
        FailureKind.TRANSIENT, Reason.TLS, "4.7.4")
    assert sink.transactions == []
    assert not any(c.startswith(("MAIL", "AUTH")) for s in sink.sessions for c in s.commands)


# -- smart host given as an IP address, trustHosts per route ---------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "[127.0.0.1]"])
def test_ip_smart_host_is_verified_against_the_ip_san(sinks: Sinks, make_config: Any,
                                                     tls_context: Any, tmp_path: Path,
                                                     host: str) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context, offer_auth=True))
    cfg_ = make_config(relay={"routes": [RouteConfig(
        domain="*", host=host, port=sinks.port, username="u", password=SECRET,
        startTlsRequired=True, checkServerIdentity=True)]})
    entry, path = make_entry(tmp_path, ["a@anywhere.example"], BODY)
    status = deliver(cfg_, entry, path)[0][1]
    assert status.ok, status
    assert sink.sessions[0].tls and len(auths(sink)) == 1


def test_route_trust_hosts_replaces_the_global_list(sinks: Sinks, make_config: Any,
                                                    tls_context: Any, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context))
    entry, path = make_entry(tmp_path, ["a@r.example"], BODY)

    def via(trust: list[str]) -> Any:
        return make_config(tls={"caFile": "", "trustHosts": ["mx.test"]}, relay={"routes": [
            RouteConfig(domain="r.example", host="mx.test", port=sinks.port,
                        trustHosts=trust)]})

    # The route's own list wins; the global "mx.test" entry no longer applies.
    assert deliver(via(["other.test"]), entry, path)[0][1].reason is Reason.TLS
    assert deliver(via(["MX.test."]), entry, path)[0][1].ok
    assert len(sink.transactions) == 1


# -- AUTH at a smart host -----------------------------------------------------------------------


class RefusingAuth(SinkProtocol):
    def command(self, line: str) -> None:
        if line.upper().startswith("AUTH"):
            self.session.commands.append(line)
            self.send(self.factory.auth_reply)  # type: ignore[attr-defined]
            return
        super().command(line)


class RefusingAuthFactory(SinkFactory):
    def __init__(self, behaviour: Behaviour, auth_reply: bytes) -> None:
        super().__init__(behaviour)
        self.auth_reply = auth_reply

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        proto = RefusingAuth(self)
        self.protocols.append(proto)
        return proto


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def assert_secret_not_logged(events: list[dict[str, Any]]) -> None:
    from twisted.logger import formatEvent

    token = base64.b64encode(f"\0u\0{SECRET}".encode()).decode()
    b64pw = base64.b64encode(SECRET.encode()).decode()
    for event in events:
        text = formatEvent(event) + repr(event)
        for needle in (SECRET, token, b64pw):
            assert needle not in text, event


@pytest.mark.parametrize("reply", [b"535 5.7.8 authentication credentials invalid",
                                   b"454 4.7.0 temporary authentication failure"])
def test_auth_refusal_is_deferred_once_and_never_logs_the_password(
        sinks: Sinks, make_config: Any, tls_context: Any, tmp_path: Path,
        log_events: list[dict[str, Any]], reply: bytes) -> None:
    sink = listen(sinks, RefusingAuthFactory(Behaviour(tls=tls_context, offer_auth=True), reply))
    cfg_ = make_config(relay={"routes": [RouteConfig(
        domain="*", host="mx.test", port=sinks.port, username="u", password=SECRET)]})
    entry, path = make_entry(tmp_path, ["a@anywhere.example", "b@anywhere.example"], BODY)
    results = deliver(cfg_, entry, path)
    for _, status in results:
        assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.AUTH), status
        assert status.enhanced.startswith("4.")
    # One session, one AUTH, nothing after it: no tight retry loop, no MAIL without auth.
    assert len(sink.sessions) == 1 and len(auths(sink)) == 1
    assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)
    assert_secret_not_logged(log_events)


def test_successful_auth_login_never_logs_the_password(sinks: Sinks, make_config: Any,
                                                       tls_context: Any, tmp_path: Path,
                                                       log_events: list[dict[str, Any]]) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context, offer_auth=True))
    cfg_ = make_config(relay={"routes": [RouteConfig(
        domain="*", host="mx.test", port=sinks.port, username="u", password=SECRET)]})
    entry, path = make_entry(tmp_path, ["a@anywhere.example"], BODY)
    assert deliver(cfg_, entry, path)[0][1].ok  # debug logging is on in tests
    assert len(auths(sink)) == 1
    assert_secret_not_logged(log_events)


# -- connection cache and grouping never mix credentials ----------------------------------------


def test_cached_session_of_route_a_is_never_reused_for_route_b(sinks: Sinks, make_config: Any,
                                                               tls_context: Any,
                                                               tmp_path: Path) -> None:
    from twisted.internet import reactor

    sink = sinks.start(behaviour=Behaviour(tls=tls_context, offer_auth=True))
    routes = [RouteConfig(domain="a.example", host="mx.test", port=sinks.port,
                          username="alice", password="pa"),
              RouteConfig(domain="b.example", host="mx.test", port=sinks.port,
                          username="bob", password="pb")]
    cfg_ = make_config(relay={"routes": routes, "connectionCache": ConnectionCacheConfig(
        enabled=True, idleSeconds=30, maxUses=100)})
    relay = on_reactor(RelayDelivery, cfg_, reactor)
    try:
        for rcpt in ("x@a.example", "y@b.example", "z@a.example"):
            entry, path = make_entry(tmp_path, [rcpt], BODY)
            assert on_reactor(relay.deliver, entry, path, list(entry.pending))[0][1].ok
    finally:
        on_reactor(relay.close_idle)
    # a → session 1, b → session 2 (its own AUTH), a again → session 1 reused.
    assert len(sink.sessions) == 2
    assert [len(auths(SinkFactoryView(s))) for s in sink.sessions] == [1, 1]
    assert [len(s.transactions) for s in sink.sessions] == [2, 1]


class SinkFactoryView:
    def __init__(self, session: Any) -> None:
        self.sessions = [session]


def test_routes_differing_only_in_password_are_not_grouped(sinks: Sinks, make_config: Any,
                                                           tls_context: Any,
                                                           tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context, offer_auth=True))
    routes = [RouteConfig(domain="a.example", host="mx.test", port=sinks.port,
                          username="shared", password="pass-a"),
              RouteConfig(domain="b.example", host="mx.test", port=sinks.port,
                          username="shared", password="pass-b")]
    entry, path = make_entry(tmp_path, ["x@a.example", "y@b.example"], BODY)
    assert all(s.ok for _, s in deliver(make_config(relay={"routes": routes}), entry, path))
    tokens = {base64.b64decode(c.split()[2]).split(b"\0")[2] for c in auths(sink)}
    assert tokens == {b"pass-a", b"pass-b"}


# -- maxConnectionsPerDestination -----------------------------------------------------------------


class GatedSink(SinkProtocol):
    """Holds its greeting until ``want`` sessions are open at once (or ``hold`` seconds passed),
    so sessions that may overlap do overlap; records the largest number open at once."""

    def connectionMade(self) -> None:
        from twisted.internet import reactor

        f: Any = self.factory
        f.open += 1
        f.peak = max(f.peak, f.open)
        self.factory.sessions.append(self.session)
        f.held.append(self)
        if f.open >= f.want:
            f.release()
        else:
            self._timer = reactor.callLater(f.hold, f.release_one, self)

    def greet(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        if self.transport is not None:
            self.send(self.behaviour.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        f: Any = self.factory
        f.open -= 1
        if self in f.held:
            f.held.remove(self)


class GatedFactory(SinkFactory):
    def __init__(self, want: int, hold: float = 1.0) -> None:
        super().__init__(Behaviour())
        self.want, self.hold = want, hold
        self.open = self.peak = 0
        self.held: list[GatedSink] = []

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        proto = GatedSink(self)
        self.protocols.append(proto)
        return proto

    def release(self) -> None:
        held, self.held = self.held, []
        for p in held:
            p.greet()

    def release_one(self, proto: GatedSink) -> None:
        if proto in self.held:
            self.held.remove(proto)
            proto.greet()


def deliver_many(cfg_: Any, tmp_path: Path, rcpts: list[str]) -> list[Any]:
    from twisted.internet import defer, reactor

    entries = []
    for i, rcpt in enumerate(rcpts):
        d = tmp_path / f"m{i}"
        d.mkdir()
        entries.append(make_entry(d, [rcpt], BODY))

    async def go() -> Any:
        relay = RelayDelivery(cfg_, reactor)
        return await defer.gatherResults(
            [relay.deliver(e, p, list(e.pending)) for e, p in entries])

    return on_reactor(go)  # type: ignore[no-any-return]


def test_concurrent_messages_to_one_smart_host_respect_the_limit(sinks: Sinks, make_config: Any,
                                                                 tmp_path: Path) -> None:
    sink: Any = listen(sinks, GatedFactory(want=3))
    cfg_ = make_config(tls={"readTimeoutMs": 5000}, relay={
        "maxConnectionsPerDestination": 2,
        "routes": [RouteConfig(domain="*", host="mx.test", port=sinks.port)]})
    results = deliver_many(cfg_, tmp_path, [f"r{i}@x{i}.example" for i in range(4)])
    assert all(r[0][1].ok for r in results), results
    assert len(sink.transactions) == 4
    assert sink.peak == 2


# -- mail loops: hop count (RFC 5321 §6.3) ---------------------------------------------------------


@pytest.fixture
def inbound_server(tmp_path: Path, certs: CertSet, reactor_thread: None) -> Iterator[Any]:
    from kotlin_smtp_py.service import SmtpService

    root = tmp_path / "srv"
    for sub in ("spool", "temp", "lists", "mailboxes/alice"):
        (root / sub).mkdir(parents=True)
    conf = deep_merge({"smtp": {
        "hostname": "mx.test",
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
        "routing": {"localDomain": "localhost"},
        "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                    "listsDir": str(root / "lists")},
        "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
        "lifecycle": {"gracefulShutdownTimeoutMs": 2000}},
        "management": {"server": {"port": 0}}}, {})
    svc = on_reactor(SmtpService, cfg.load_text(yaml.safe_dump(conf)))
    on_reactor(svc.startService)
    new = root / "mailboxes" / "alice" / "Maildir" / "new"
    yield svc, (lambda: sorted(new.iterdir()) if new.is_dir() else [])
    on_reactor(svc.stopService, timeout=30)


def test_message_with_100_received_headers_is_not_delivered(inbound_server: Any) -> None:
    svc, maildir = inbound_server
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Mon, 1 Jan 2024 00:00:00 "
                    b"+0000\r\n" % (i, i + 1) for i in range(100))
    message = hops + b"From: a@remote.test\r\nSubject: loop\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", svc.smtp_port(0), timeout=10) as s:
        s.ehlo("client.test")
        try:
            assert s.sendmail("a@remote.test", ["alice@localhost"], message) == {}
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code >= 500 and b"5.4.6" in exc.smtp_error
            return
    # Accepted: it must then be bounced, never filed. A delivery shows up within a second.
    with pytest.raises(AssertionError):
        wait_until(maildir, timeout=5, message="delivery of the looping message")
