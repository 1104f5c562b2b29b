"""Bug hunt: do the Prometheus metrics and the health endpoints tell operators the truth?

Every test runs a real :class:`SmtpService` on loopback (SMTP and management HTTP on port 0),
drives real SMTP traffic (and, for deliveries, a scripted receiving peer from
``tests/outbound/outbound_sink.py`` reached through ``smtp.relay.defaultRoute``), then scrapes
``/actuator/prometheus`` and compares with what happened. The contract is the runbook in
``/work/shared/seed`` (its alert expressions use the names verbatim), SPEC §5 and
docs/OPERATIONS.md. Tests marked ``xfail(strict=True)`` document a confirmed bug.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CertSet,
    RedisServer,
    deep_merge,
    on_reactor,
    smtp_reply,
    smtp_session,
    start_redis,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.config import Config
from kotlin_smtp_py.inbound.auth import hash_password
from kotlin_smtp_py.metrics import QUEUE_AGE_BUCKETS, RETRY_DELAY_BUCKETS
from kotlin_smtp_py.service import SmtpService

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "outbound"))
from outbound_sink import Behaviour, SinkFactory

REPO = Path(__file__).resolve().parents[2]
SEED = Path("/work/shared/seed")
ALERTS = REPO / "packaging" / "prometheus-smtp-alerts.yml"
DASHBOARD = REPO / "packaging" / "grafana-dashboard.json"

# SPEC §5: name -> (type as the 0.0.4 TYPE line says it, label names)
CONTRACT: dict[str, tuple[str, frozenset[str]]] = {
    "smtp_connections_active": ("gauge", frozenset()),
    "smtp_sessions_started_total": ("counter", frozenset()),
    "smtp_sessions_ended_total": ("counter", frozenset()),
    "smtp_messages_accepted_total": ("counter", frozenset()),
    "smtp_messages_rejected_total": ("counter", frozenset()),
    "smtp_spool_pending": ("gauge", frozenset()),
    "smtp_spool_queued_total": ("counter", frozenset()),
    "smtp_spool_completed_total": ("counter", frozenset()),
    "smtp_spool_dropped_total": ("counter", frozenset()),
    "smtp_spool_retry_scheduled_total": ("counter", frozenset()),
    "smtp_spool_retry_delay_seconds": ("histogram", frozenset()),
    "smtp_spool_queue_age_seconds": ("histogram", frozenset({"outcome"})),
    "smtp_spool_delivery_recipients_total": ("counter", frozenset({"result"})),
    "smtp_spool_delivery_failure_total": ("counter", frozenset({"domain", "kind", "reason"})),
}
LABEL_VALUES: dict[str, frozenset[str]] = {
    "outcome": frozenset({"completed", "dropped", "other"}),
    "result": frozenset({"delivered", "transient_failure", "permanent_failure"}),
    "kind": frozenset({"transient", "permanent"}),
    "reason": frozenset({"dns", "connect", "tls", "auth", "policy", "recipient", "message",
                         "protocol", "timeout", "other"}),
}
# Labels Prometheus attaches to every scraped series (target labels), used by the alert rules.
TARGET_LABELS = frozenset({"job", "instance", "environment"})
PROMQL_WORDS = frozenset({
    "sum", "by", "without", "rate", "increase", "deriv", "histogram_quantile", "clamp_min",
    "and", "or", "unless", "offset", "avg", "max", "min", "count", "label_values", "up",
    "humanizePercentage", "bool", "on", "ignoring", "group_left", "group_right", "irate",
    "delta", "abs", "topk", "bottomk", "quantile_over_time", "avg_over_time"})

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
USERS = ("alice", "bob", "carol")


# -- scraping ---------------------------------------------------------------------------------


@dataclass
class Scrape:
    text: str
    types: dict[str, str]  # family name as in the TYPE line -> type
    samples: Samples

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {lbl: v for (n, lbl), v in self.samples.items() if n == name}

    def names(self) -> set[str]:
        return {n for n, _ in self.samples} | set(self.types)


def http_get(port: int, path: str, method: str = "GET",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def parse_scrape(text: str) -> Scrape:
    types = {m.group(1): m.group(2)
             for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(text, types, samples)


# -- the server under test --------------------------------------------------------------------


@dataclass
class Srv:
    service: SmtpService
    root: Path

    @property
    def port(self) -> int:
        return self.service.smtp_port(0)

    @property
    def mport(self) -> int:
        return int(self.service.management_port.getHost().port)

    def scrape(self, path: str = "/actuator/prometheus") -> Scrape:
        code, _, body = http_get(self.mport, path)
        assert code == 200, (path, code, body[:200])
        return parse_scrape(body.decode())

    def health(self, path: str) -> tuple[int, Any]:
        code, _, body = http_get(self.mport, path)
        return code, json.loads(body)

    def spool_entries(self) -> int:
        return len(list((self.root / "spool" / "queue").glob("*.json")))

    def mailbox(self, user: str) -> list[Path]:
        new = self.root / "mailboxes" / user / "Maildir" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_scrape(self, pred: Callable[[Scrape], bool], what: str,
                    timeout: float = 20.0) -> Scrape:
        def check() -> Scrape | None:
            m = self.scrape()
            return m if pred(m) else None
        return wait_until(check, timeout=timeout, message=what)  # type: ignore[no-any-return]

    def pause(self, paused: bool) -> None:
        def flip() -> None:
            self.service.scheduler.paused = paused
            if not paused:
                self.service.scheduler.trigger()
        on_reactor(flip)


@pytest.fixture
def make_service(tmp_path: Path, reactor_thread: None) -> Iterator[Callable[..., Srv]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None) -> Srv:
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists", *(f"mailboxes/{u}" for u in USERS)):
            (root / sub).mkdir(parents=True)
        base: dict[str, Any] = {"smtp": {
            "hostname": "mx.test",
            "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
            "routing": {"localDomain": "localhost"},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool")},
            "limits": {"maxMessageSizeBytes": 100_000},
            "lifecycle": {"gracefulShutdownTimeoutMs": 1000}},
            "management": {"server": {"port": 0, "bindAddress": "127.0.0.1"}}}
        config = cfg.load_text(yaml.safe_dump(deep_merge(base, overrides or {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        if svc.redis is not None:
            redis = svc.redis
            wait_until(lambda: redis.connected, timeout=30, message="the server's Redis")
        return Srv(svc, root)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


@pytest.fixture
def sink(reactor_thread: None) -> Iterator[tuple[SinkFactory, int]]:
    """A scripted receiving SMTP peer on 127.0.0.1 (replies per recipient via Behaviour.rcpt)."""
    factory = SinkFactory(Behaviour())

    def listen() -> Any:
        from twisted.internet import reactor
        return reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    port = on_reactor(listen)
    yield factory, int(port.getHost().port)
    on_reactor(port.stopListening)


def relay_to(port: int, **spool: Any) -> dict[str, Any]:
    """Relay every remote recipient to the sink; local senders get their DSNs locally."""
    return {"smtp": {
        "spool": {"retryDelaySeconds": 60, **spool},
        "dns": {"servers": ["127.0.0.1:9"], "timeoutMs": 500},
        "relay": {"enabled": True, "requireAuthForRelay": False,
                  "allowedClientCidrs": ["127.0.0.0/8"],
                  "defaultRoute": {"host": "127.0.0.1", "port": port,
                                   "startTlsEnabled": False},
                  "connectionCache": {"enabled": False},
                  "outboundTls": {"connectTimeoutMs": 2000, "readTimeoutMs": 2000}}}}


def send(port: int, sender: str, rcpts: list[str], body: bytes = b"Subject: t\r\n\r\nhi\r\n"
         ) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail(sender, rcpts, body)


def bye(s: socket.socket, f: Any) -> None:
    """Close a raw session: the socket *and* its makefile (which holds the descriptor)."""
    f.close()
    s.close()


def session_done(before: Scrape, n: int) -> Callable[[Scrape], bool]:
    """Counters are read after the client has gone: wait for its session's end."""
    return lambda m: (m.get("smtp_sessions_ended_total")
                      - before.get("smtp_sessions_ended_total")) >= n


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


COUNTERS = ("smtp_messages_accepted_total", "smtp_messages_rejected_total",
            "smtp_spool_queued_total", "smtp_spool_completed_total", "smtp_spool_dropped_total",
            "smtp_spool_retry_scheduled_total")


def assert_unchanged(after: Scrape, before: Scrape, *names: str) -> None:
    for name in names:
        assert delta(after, before, name) == 0, name


# == exposition format ========================================================================


def test_scrape_content_type_get_and_head_on_both_paths(make_service: Callable[..., Srv]
                                                        ) -> None:
    srv = make_service()
    send(srv.port, "alice@localhost", ["bob@localhost"])
    bodies = []
    for path in ("/actuator/prometheus", "/metrics"):
        code, headers, body = http_get(srv.mport, path)
        assert code == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        hcode, hheaders, hbody = http_get(srv.mport, path, method="HEAD")
        assert (hcode, hbody) == (200, b"")
        assert hheaders["content-type"] == headers["content-type"]
        assert body.endswith(b"\n") and b"# EOF" not in body  # 0.0.4, not OpenMetrics
        bodies.append(parse_scrape(body.decode()))
    # both paths serve the same registry
    assert set(bodies[0].samples) == set(bodies[1].samples)
    names = json.loads(http_get(srv.mport, "/actuator/metrics")[2])["names"]
    assert set(names) == set(CONTRACT)


def test_every_contract_metric_has_documented_type_labels_and_help(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    srv = make_service(relay_to(port, maxRetries=0))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["gone@remote.test"])
    m = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_dropped_total") >= 1, "a bounce")
    for name, (kind, labels) in CONTRACT.items():
        assert m.types.get(name) == kind, (name, m.types.get(name))
        assert re.search(rf"^# HELP {name} \S", m.text, re.MULTILINE), name
        sample_names = {name} if kind != "histogram" else {
            name + "_bucket", name + "_sum", name + "_count"}
        seen = [(n, lbl) for (n, lbl) in m.samples if n in sample_names]
        assert seen, f"{name} has no samples"
        for n, lbl in seen:
            got = {k for k, _ in lbl} - ({"le"} if n.endswith("_bucket") else set())
            assert got == labels, (n, lbl)
            for k, v in lbl:
                if k in LABEL_VALUES:
                    assert v in LABEL_VALUES[k], (n, k, v)
    # exactly the contract: nothing else in the exposition (no *_created, no process_*)
    assert set(m.types) == set(CONTRACT)
    assert "_created" not in m.text


def test_histogram_buckets_are_sane_and_cover_the_alert_thresholds(
        make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    send(srv.port, "alice@localhost", ["bob@localhost"])
    m = srv.wait_scrape(lambda m: m.get("smtp_spool_queue_age_seconds_count",
                                        outcome="completed") >= 1, "one completion")
    for name, label_sets in (("smtp_spool_retry_delay_seconds", [{}]),
                             ("smtp_spool_queue_age_seconds",
                              [{"outcome": o} for o in sorted(LABEL_VALUES["outcome"])])):
        for labels in label_sets:
            buckets = sorted(
                ((float(dict(lbl)["le"]), v) for lbl, v in m.series(name + "_bucket").items()
                 if {k: v for k, v in lbl if k != "le"} == labels), key=lambda b: b[0])
            bounds = [b for b, _ in buckets]
            assert bounds[-1] == float("inf"), (name, labels)
            assert len(bounds) >= 8, (name, bounds)
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), (name, labels, counts)  # cumulative
            assert counts[-1] == m.get(name + "_count", **labels)
    # The alert thresholds and SLOs sit on bucket boundaries, so histogram_quantile does not
    # interpolate across a wide bucket; the largest jittered retry delay (600 s + 20 %) fits.
    for threshold in (180.0, 300.0, 480.0, 600.0):
        assert threshold in RETRY_DELAY_BUCKETS
    assert max(RETRY_DELAY_BUCKETS) >= 720.0
    assert 300.0 in QUEUE_AGE_BUCKETS  # queue drain SLO: P95 <= 300 s
    age = m.series("smtp_spool_queue_age_seconds_bucket")
    assert {float(dict(lbl)["le"]) for lbl in age} == {*QUEUE_AGE_BUCKETS, float("inf")}


# == the runbook's alert expressions ==========================================================


def _config_key(path: str) -> bool:
    """Whether a dotted path names a config key (the runbook mixes them with metric names)."""
    node: Any = Config()
    for part in path.split("."):
        if not is_dataclass(node):
            return False
        names = {f.name for f in fields(node)}
        if part.replace("-", "_") not in names:
            return False
        node = getattr(node, part.replace("-", "_"))
        if node is None or isinstance(node, list):
            return True
    return True


def runbook_metric_refs() -> list[tuple[str, str]]:
    """(metric name as exported, the runbook text it came from) for every metric the runbook
    names: Micrometer dotted names (``smtp.spool.pending``) and PromQL names."""
    text = "\n".join(p.read_text() for p in sorted(SEED.iterdir()) if p.is_file())
    refs: list[tuple[str, str]] = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for dotted in re.findall(r"(?<![\w./-])smtp(?:\.[a-zA-Z-]+)+", span):
            if not _config_key(dotted):
                refs.append((dotted.replace(".", "_"), span))
        for name in re.findall(r"\bsmtp_[a-z0-9_]+", span):
            refs.append((name, span))
    return refs


def promql_refs(expr: str) -> list[tuple[str, dict[str, str], set[str]]]:
    """(metric, {label: value} of its = matchers, label names in matchers and by()/without())."""
    out = []
    grouping = set()
    for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouping |= {x.strip() for x in g.split(",") if x.strip()}
    for m in re.finditer(r"\b(smtp_[a-z0-9_]+)\s*(\{([^}]*)\})?", expr):
        eq: dict[str, str] = {}
        names = set(grouping)
        for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(3) or ""):
            names.add(lm.group(1))
            if lm.group(2) == "=":
                eq[lm.group(1)] = lm.group(3)
        out.append((m.group(1), eq, names))
    return out


@pytest.fixture
def busy_scrape(make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> Scrape:
    """A scrape after traffic that touches every family: a delivery, a rejection, a retry,
    a permanent failure (bounce), a give-up after the retry, and the DSNs' local delivery."""
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    factory.behaviour.rcpt["later@remote.test"] = b"451 4.2.1 try later"
    srv = make_service(relay_to(port, maxRetries=1, retryDelaySeconds=1))
    send(srv.port, "alice@localhost", ["ok@remote.test", "gone@remote.test",
                                       "later@remote.test", "bob@localhost"])
    s, f = smtp_session(srv.port)
    s.sendall(b"MAIL FROM:<alice@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n")
    for _ in range(3):
        smtp_reply(f)
    s.sendall(b"bare\nLF\r\n.\r\n")
    assert smtp_reply(f).startswith(b"550")
    bye(s, f)
    return srv.wait_scrape(
        # ok@ delivered in the first run, later@ given up in the second: outcome "other".
        lambda m: m.get("smtp_spool_queue_age_seconds_count", outcome="other") >= 1
        and m.get("smtp_spool_pending") == 0
        and m.get("smtp_spool_retry_scheduled_total") >= 1, "the retry to be given up",
        timeout=30)


def test_runbook_names_only_exported_metrics(busy_scrape: Scrape) -> None:
    refs = runbook_metric_refs()
    names = {n for n, _ in refs}
    # the runbook's alert candidates, thresholds and playbooks (sanity check of the parser)
    assert {"smtp_spool_pending", "smtp_spool_dropped_total", "smtp_spool_retry_scheduled_total",
            "smtp_spool_retry_delay_seconds", "smtp_spool_retry_delay_seconds_bucket",
            "smtp_spool_queue_age_seconds", "smtp_spool_delivery_failure_total"} <= names
    exported = busy_scrape.names()
    missing = sorted({f"{n} (from `{span}`)" for n, span in refs if n not in exported})
    assert not missing, missing


def test_runbook_promql_label_matchers_match_exported_labels(busy_scrape: Scrape) -> None:
    text = "\n".join(p.read_text() for p in sorted(SEED.iterdir()) if p.is_file())
    exprs = [s for s in re.findall(r"`([^`\n]+)`", text) if "smtp" in s]
    # Micrometer spellings with a selector: smtp.spool.delivery.failure.total{kind="permanent"}
    exprs = [re.sub(r"smtp(\.[a-z]+)+", lambda m: m.group(0).replace(".", "_"), e)
             for e in exprs]
    checked = 0
    for expr in exprs:
        for metric, eq, label_names in promql_refs(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if base not in CONTRACT:
                continue
            allowed = CONTRACT[base][1] | TARGET_LABELS | (
                {"le"} if metric.endswith("_bucket") else set())
            assert label_names <= allowed, (expr, label_names - allowed)
            for label, value in eq.items():
                if label in TARGET_LABELS:
                    continue
                seen = {dict(lbl).get(label) for lbl in busy_scrape.series(metric)}
                assert value in seen, (expr, label, value, seen)
                checked += 1
    assert checked >= 2  # kind="permanent" at least twice in the runbook
    # "by `reason`" / "outcome=dropped": those label names exist on the named metrics
    assert any("reason" in dict(lbl) for lbl in
               busy_scrape.series("smtp_spool_delivery_failure_total"))
    assert busy_scrape.series("smtp_spool_queue_age_seconds_count").keys() >= {
        frozenset({("outcome", "dropped")})}


def _alert_and_dashboard_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    out = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    yield v
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
    out += [("dashboard", e) for e in walk(json.loads(DASHBOARD.read_text()))]
    return out


def test_packaged_alert_rules_and_dashboard_use_only_exported_metrics_and_labels(
        busy_scrape: Scrape) -> None:
    exprs = _alert_and_dashboard_exprs()
    assert len(exprs) >= 15
    exported = busy_scrape.names()
    problems = []
    for where, expr in exprs:
        idents = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[({\[]", expr))
        for ident in idents - PROMQL_WORDS - {"smtp"}:
            if not ident.startswith("smtp_"):
                problems.append(f"{where}: unknown identifier {ident}")
        for metric, eq, label_names in promql_refs(expr):
            if metric not in exported:
                problems.append(f"{where}: {metric} is not exported")
                continue
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if base not in CONTRACT:
                continue
            allowed = CONTRACT[base][1] | TARGET_LABELS | (
                {"le"} if metric.endswith("_bucket") else set())
            if not label_names <= allowed:
                problems.append(f"{where}: {metric} has no label {label_names - allowed}")
            for label, value in eq.items():
                if label not in TARGET_LABELS and value not in LABEL_VALUES.get(label, {value}):
                    problems.append(f"{where}: {label}={value!r} never exported")
    assert not problems, problems


# == inbound counters =========================================================================


@pytest.mark.parametrize("direct", [True, False], ids=["direct-local", "queued"])
def test_one_message_with_three_recipients(make_service: Callable[..., Srv],
                                           direct: bool) -> None:
    srv = make_service({"smtp": {"spool": {"directLocalDelivery": direct}}})
    before = srv.scrape()
    send(srv.port, "someone@remote.test", ["alice@localhost", "bob@localhost",
                                           "carol@localhost"])
    wait_until(lambda: all(srv.mailbox(u) for u in USERS), message="three copies")
    after = srv.wait_scrape(
        lambda m: session_done(before, 1)(m) and
        delta(m, before, "smtp_spool_completed_total") >= 1, "session end and completion")
    assert delta(after, before, "smtp_sessions_started_total") == 1
    assert delta(after, before, "smtp_sessions_ended_total") == 1
    assert delta(after, before, "smtp_messages_accepted_total") == 1
    assert delta(after, before, "smtp_spool_queued_total") == 1
    assert delta(after, before, "smtp_spool_completed_total") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total", result="delivered") == 3
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="completed") == 1
    assert_unchanged(after, before, "smtp_messages_rejected_total", "smtp_spool_dropped_total",
                     "smtp_spool_retry_scheduled_total")
    assert after.get("smtp_connections_active") == 0
    assert after.get("smtp_spool_pending") == 0 == srv.spool_entries()
    assert not after.series("smtp_spool_delivery_failure_total")


def test_rejected_rcpt_is_not_a_rejected_message(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    before = srv.scrape()
    s, f = smtp_session(srv.port)
    s.sendall(b"MAIL FROM:<x@remote.test>\r\n")
    assert smtp_reply(f).startswith(b"250")
    s.sendall(b"RCPT TO:<nobody@localhost>\r\n")
    assert smtp_reply(f).startswith(b"550")
    s.sendall(b"RCPT TO:<alice@localhost>\r\n")
    assert smtp_reply(f).startswith(b"250")
    s.sendall(b"DATA\r\n")
    assert smtp_reply(f).startswith(b"354")
    s.sendall(b"Subject: r\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert smtp_reply(f).startswith(b"250")
    bye(s, f)
    after = srv.wait_scrape(lambda m: session_done(before, 1)(m) and
                            delta(m, before, "smtp_spool_completed_total") >= 1, "completion")
    assert delta(after, before, "smtp_messages_accepted_total") == 1
    assert delta(after, before, "smtp_messages_rejected_total") == 0
    assert delta(after, before, "smtp_spool_delivery_recipients_total", result="delivered") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="permanent_failure") == 0


def test_552_after_data_counts_one_rejected_message(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    before = srv.scrape()
    s, f = smtp_session(srv.port)
    s.sendall(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
    for expect in (b"250", b"250", b"354"):
        assert smtp_reply(f).startswith(expect)
    s.sendall(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 150 + b".\r\n")
    assert smtp_reply(f).startswith(b"552")
    s.sendall(b"QUIT\r\n")
    smtp_reply(f)
    bye(s, f)
    after = srv.wait_scrape(session_done(before, 1), "session end")
    assert delta(after, before, "smtp_messages_rejected_total") == 1
    assert_unchanged(after, before, "smtp_messages_accepted_total", "smtp_spool_queued_total")
    assert after.get("smtp_spool_pending") == 0 == srv.spool_entries()
    assert after.get("smtp_connections_active") == 0


def test_552_bdat_chunk_counts_one_rejected_message(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    before = srv.scrape()
    s, f = smtp_session(srv.port)
    s.sendall(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@localhost>\r\n")
    for _ in range(2):
        assert smtp_reply(f).startswith(b"250")
    chunk = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 110
    s.sendall(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert smtp_reply(f).startswith(b"552")
    s.sendall(b"RSET\r\n")
    assert smtp_reply(f).startswith(b"250")
    s.sendall(b"QUIT\r\n")
    smtp_reply(f)
    bye(s, f)
    after = srv.wait_scrape(session_done(before, 1), "session end")
    assert delta(after, before, "smtp_messages_accepted_total") == 0
    assert delta(after, before, "smtp_messages_rejected_total") == 1


def test_auth_failures_balance_sessions_and_move_no_message_counter(
        make_service: Callable[..., Srv]) -> None:
    srv = make_service({"smtp": {
        "auth": {"enabled": True, "users": {"alice": hash_password("right", rounds=4)},
                 "failureDelayMs": 0, "rateLimitMaxFailures": 3},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    before = srv.scrape()
    for i in range(4):
        s, f = smtp_session(srv.port)
        token = base64.b64encode(f"\x00alice\x00wrong-{i}".encode()).decode()
        s.sendall(f"AUTH PLAIN {token}\r\n".encode())
        assert smtp_reply(f)[:1] in (b"4", b"5")
        bye(s, f)
    after = srv.wait_scrape(session_done(before, 4), "four sessions to end")
    assert delta(after, before, "smtp_sessions_started_total") == 4
    assert delta(after, before, "smtp_sessions_ended_total") == 4
    assert after.get("smtp_connections_active") == 0
    assert_unchanged(after, before, *COUNTERS)
    assert "alice" not in after.text and "wrong" not in after.text


def test_starttls_session_counts_once(make_service: Callable[..., Srv], certs: CertSet) -> None:
    srv = make_service({"smtp": {"ssl": {"enabled": True, "certChainFile": str(certs.cert),
                                         "privateKeyFile": str(certs.key)}}})
    before = srv.scrape()
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=20) as s:
        s.starttls(context=ctx)
        during = srv.scrape()
        assert during.get("smtp_connections_active") == 1
        s.sendmail("x@remote.test", ["alice@localhost"], b"Subject: tls\r\n\r\nx\r\n")
    after = srv.wait_scrape(session_done(before, 1), "session end")
    assert delta(after, before, "smtp_sessions_started_total") == 1
    assert delta(after, before, "smtp_messages_accepted_total") == 1
    assert after.get("smtp_connections_active") == 0


def test_failed_implicit_tls_handshake_leaves_no_phantom_connection(
        make_service: Callable[..., Srv], certs: CertSet) -> None:
    srv = make_service({"smtp": {
        "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                "privateKeyFile": str(certs.key)},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True}]}})
    before = srv.scrape()
    for _ in range(3):  # plaintext SMTP to a TLS port: the handshake fails
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"EHLO plain.test\r\n" * 20)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    after = srv.wait_scrape(session_done(before, 3), "three sessions to end")
    assert delta(after, before, "smtp_sessions_started_total") == 3
    assert after.get("smtp_connections_active") == 0
    assert_unchanged(after, before, *COUNTERS)


def test_connections_active_follows_open_and_limit_refused_connections(
        make_service: Callable[..., Srv]) -> None:
    srv = make_service({"smtp": {"rateLimit": {"maxConnectionsPerIp": 2, "exemptCidrs": []}}})
    before = srv.scrape()
    held = [smtp_session(srv.port) for _ in range(2)]
    m = srv.wait_scrape(lambda m: m.get("smtp_connections_active") == 2, "two open")
    refused = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        f = s.makefile("rb")
        assert smtp_reply(f).startswith(b"421")
        refused.append((s, f))
    m = srv.wait_scrape(session_done(before, 3), "refused sessions to end")
    assert m.get("smtp_connections_active") == 2  # the refused ones are not "open"
    for s, f in held + refused:
        bye(s, f)
    after = srv.wait_scrape(session_done(before, 5), "every session to end")
    assert after.get("smtp_connections_active") == 0
    assert delta(after, before, "smtp_sessions_started_total") == \
        delta(after, before, "smtp_sessions_ended_total") == 5
    # the slot of a refused connection was not leaked: a new session is admitted
    s, f = smtp_session(srv.port)
    bye(s, f)


# == label cardinality ========================================================================


def test_garbage_commands_and_names_create_no_series(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    before = srv.scrape()
    sent = 0
    sessions = 0
    while sent < 1000 and sessions < 250:  # 5 commands of each kind per session: under the
        # 20-error limit, so every line is really processed
        sessions += 1
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            f = s.makefile("rb")
            assert smtp_reply(f).startswith(b"220")
            lines = []
            for i in range(sent, min(sent + 5, 1000)):
                lines.append(f"X{i:04d}ZZ garbage-{i}.invalid\r\n".encode())
                lines.append(f"EHLO host-{i}.garbage-{i}.invalid\r\n".encode())
                lines.append(f"MAIL FROM:<u{i}@sender-{i}.invalid>\r\n".encode())
                lines.append(f"RCPT TO:<u{i}@domain-{i}.invalid>\r\n".encode())
                lines.append(b"RSET\r\n")
            s.sendall(b"".join(lines) + b"QUIT\r\n")
            try:
                while f.readline():
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
            f.close()
            sent = min(sent + 5, 1000)
    assert sent == 1000
    after = srv.wait_scrape(session_done(before, sessions), "sessions to end")
    assert set(after.samples) == set(before.samples)  # same series: nothing new to label
    assert "invalid" not in after.text


def test_failure_domain_label_is_bounded_to_tracked_domains(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.data_reply = b"554 5.7.1 content refused"
    overrides = deep_merge(relay_to(port, maxRetries=0),
                           {"management": {"metrics": {"trackedDomains": ["Tracked.Test"]}}})
    srv = make_service(overrides)
    before = srv.scrape()
    batches = [[f"r{i}@dom-{b}-{i}.example" for i in range(100)] for b in range(10)]
    batches[0][:2] = ["one@tracked.test", "two@TRACKED.TEST"]
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        for rcpts in batches:  # null sender: no DSNs, only failures
            s.sendmail("<>", rcpts, b"Subject: spam\r\n\r\nx\r\n")
    after = srv.wait_scrape(
        lambda m: delta(m, before, "smtp_spool_delivery_recipients_total",
                        result="permanent_failure") >= 1000 and m.get("smtp_spool_pending") == 0,
        "1000 permanent failures", timeout=60)
    failures = after.series("smtp_spool_delivery_failure_total")
    by_domain: dict[str, float] = {}
    for lbl, v in failures.items():
        d = dict(lbl)
        assert d["kind"] in LABEL_VALUES["kind"] and d["reason"] in LABEL_VALUES["reason"]
        by_domain[d["domain"]] = by_domain.get(d["domain"], 0) + v
    assert by_domain == {"tracked.test": 2, "other": 998}
    assert len(failures) <= 2 * len(LABEL_VALUES["kind"]) * len(LABEL_VALUES["reason"])
    assert "dom-" not in after.text
    assert delta(after, before, "smtp_spool_dropped_total") == 10


# == delivery outcomes ========================================================================


def test_relay_success(make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    srv = make_service(relay_to(port))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["a@remote.test", "b@remote.test"])
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_completed_total") >= 1,
                            "completion")
    assert len(factory.transactions) == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total", result="delivered") == 2
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="completed") == 1
    assert delta(after, before, "smtp_spool_queued_total") == 1
    assert_unchanged(after, before, "smtp_spool_dropped_total",
                     "smtp_spool_retry_scheduled_total")
    assert after.get("smtp_spool_pending") == 0 == srv.spool_entries()


def test_transient_failure_schedules_one_retry_and_keeps_the_entry_pending(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["later@remote.test"] = b"451 4.2.1 mailbox busy"
    srv = make_service(relay_to(port, maxRetries=5, retryDelaySeconds=60,
                                delayWarningSeconds=0))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["later@remote.test"])
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_retry_scheduled_total") >= 1,
                            "a retry")
    assert delta(after, before, "smtp_spool_retry_scheduled_total") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="transient_failure") == 1
    assert after.get("smtp_spool_delivery_failure_total", domain="other", kind="transient",
                     reason="recipient") == 1
    assert delta(after, before, "smtp_spool_retry_delay_seconds_count") == 1
    observed = delta(after, before, "smtp_spool_retry_delay_seconds_sum")
    assert 48.0 <= observed <= 72.0  # 60 s ± 20 % jitter
    assert delta(after, before, "smtp_spool_retry_delay_seconds_bucket", le="30.0") == 0
    assert delta(after, before, "smtp_spool_retry_delay_seconds_bucket", le="120.0") == 1
    # The message is neither completed nor dropped; its delay notice (NOTIFY defaults to
    # FAILURE,DELAY; delayWarningSeconds 0: at the first deferral) is delivered to alice and
    # completes.
    notices = wait_until(lambda: srv.mailbox("alice"), message="the delay notice")
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_completed_total") >= 1,
                            "the notice completed")
    assert len(notices) == 1 and b"Action: delayed" in notices[0].read_bytes()
    assert delta(after, before, "smtp_spool_completed_total") == 1
    assert_unchanged(after, before, "smtp_spool_dropped_total")
    assert after.get("smtp_spool_pending") == 1 == srv.spool_entries()


def test_permanent_failure_bounces_and_counts_the_dsn(make_service: Callable[..., Srv],
                                                      sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    srv = make_service(relay_to(port))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["gone@remote.test"])
    wait_until(lambda: srv.mailbox("alice"), message="the DSN in alice's mailbox")
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_dropped_total") >= 1 and
                            m.get("smtp_spool_pending") == 0, "the bounce")
    assert delta(after, before, "smtp_spool_dropped_total") == 1
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="dropped") == 1
    assert after.get("smtp_spool_delivery_failure_total", domain="other", kind="permanent",
                     reason="recipient") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="permanent_failure") == 1
    assert delta(after, before, "smtp_spool_queued_total") == 2  # the message and its DSN
    assert_unchanged(after, before, "smtp_spool_retry_scheduled_total")
    assert after.get("smtp_spool_pending") == 0 == srv.spool_entries()


def test_local_dsn_delivery_is_counted_like_any_delivery(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    srv = make_service(relay_to(port))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["gone@remote.test"])
    wait_until(lambda: srv.mailbox("alice"), message="the DSN in alice's mailbox")
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_dropped_total") >= 1 and
                            m.get("smtp_spool_pending") == 0, "the bounce")
    # two entries queued (message, DSN): one dropped, one delivered to alice
    assert delta(after, before, "smtp_spool_queued_total") == 2
    assert delta(after, before, "smtp_spool_delivery_recipients_total", result="delivered") == 1
    assert delta(after, before, "smtp_spool_completed_total") == 1
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="completed") == 1


def test_retries_exhausted_count_as_permanent_and_dropped(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["later@remote.test"] = b"421 4.4.2 go away"
    srv = make_service(relay_to(port, maxRetries=1, retryDelaySeconds=1))
    before = srv.scrape()
    send(srv.port, "alice@localhost", ["later@remote.test"])
    after = srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_dropped_total") >= 1,
                            "the give-up", timeout=30)
    assert delta(after, before, "smtp_spool_retry_scheduled_total") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="transient_failure") == 1
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="permanent_failure") == 1
    kinds = {dict(lbl)["kind"]: v for lbl, v in
             after.series("smtp_spool_delivery_failure_total").items()}
    assert kinds == {"transient": 1, "permanent": 1}
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="dropped") == 1
    # the age is measured from queueing, so it includes the retry delay (1 s - 20 %)
    age = delta(after, before, "smtp_spool_queue_age_seconds_sum", outcome="dropped")
    assert 0.8 <= age < 30.0, age
    assert delta(after, before, "smtp_spool_queue_age_seconds_bucket", outcome="dropped",
                 le="1.0") == 0 or age <= 1.0


def test_mixed_outcome_across_runs_is_not_reported_as_completed(
        make_service: Callable[..., Srv], sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    factory.behaviour.rcpt["later@remote.test"] = b"451 4.2.1 busy"
    srv = make_service(relay_to(port, maxRetries=5, retryDelaySeconds=1))
    before = srv.scrape()
    # null sender: no DSN, so the only entry is the message itself
    send(srv.port, "<>", ["gone@remote.test", "later@remote.test"])
    srv.wait_scrape(lambda m: delta(m, before, "smtp_spool_retry_scheduled_total") >= 1,
                    "the first run")
    on_reactor(lambda: factory.behaviour.rcpt.pop("later@remote.test"))
    after = srv.wait_scrape(
        lambda m: m.get("smtp_spool_pending") == 0 and delta(
            m, before, "smtp_spool_delivery_recipients_total", result="delivered") >= 1,
        "the retry", timeout=30)
    assert delta(after, before, "smtp_spool_delivery_recipients_total",
                 result="permanent_failure") == 1
    # one recipient bounced, one delivered: a mixed result, neither completed nor dropped
    assert delta(after, before, "smtp_spool_completed_total") == 0
    assert delta(after, before, "smtp_spool_queue_age_seconds_count", outcome="other") == 1


# == queue depth ==============================================================================


def test_pending_gauge_equals_spool_entries_after_enqueue_and_after_delivery(
        make_service: Callable[..., Srv]) -> None:
    srv = make_service({"smtp": {"spool": {"directLocalDelivery": False}}})
    srv.pause(True)
    for i in range(4):
        send(srv.port, "x@remote.test", ["alice@localhost", "bob@localhost"],
             f"Subject: {i}\r\n\r\nx\r\n".encode())
    m = srv.scrape()
    assert m.get("smtp_spool_pending") == 4 == srv.spool_entries()
    code, body = srv.health("/actuator/health")
    assert code == 200 and body["components"]["spool"]["details"]["pending"] == 4
    srv.pause(False)
    m = srv.wait_scrape(lambda m: m.get("smtp_spool_completed_total") >= 4, "delivery")
    assert m.get("smtp_spool_pending") == 0 == srv.spool_entries()
    assert m.get("smtp_spool_queue_age_seconds_count", outcome="completed") == 4


def test_redis_spool_pending_gauge_and_readiness_follow_redis(
        make_service: Callable[..., Srv]) -> None:
    redis: RedisServer = start_redis()
    try:
        srv = make_service({"smtp": {
            "redis": {"url": redis.url, "connectTimeoutMs": 500},
            "spool": {"type": "redis", "redis": {"keyPrefix": "hunt:metrics"}}}})
        srv.pause(True)
        for i in range(3):
            send(srv.port, "x@remote.test", ["alice@localhost"], f"Subject: {i}\r\n\r\n.\r\n"
                 .encode())
        srv.wait_scrape(lambda m: m.get("smtp_spool_pending") == 3, "pending 3")
        code, body = srv.health("/actuator/health")
        assert code == 200, body
        assert {"listeners", "spool", "redis"} <= set(body["components"])
        assert body["components"]["spool"]["details"]["backend"] == "redis"
        assert body["components"]["redis"]["status"] == "UP"
        srv.pause(False)
        srv.wait_scrape(lambda m: m.get("smtp_spool_pending") == 0 and
                        m.get("smtp_spool_completed_total") >= 3, "drained")
        redis.stop()
        code, body = wait_until(lambda: (r := srv.health("/readyz"))[0] == 503 and r,
                                message="readiness DOWN without Redis")
        assert body["status"] == "DOWN"
        assert body["components"]["redis"]["status"] == "DOWN"
        assert srv.health("/actuator/health/liveness")[0] == 200
        port = redis.port
        redis.start()  # same port (a new one only if it was taken meanwhile)
        if redis.port != port:
            pytest.skip("redis-server had to move to another port")
        wait_until(lambda: srv.health("/readyz")[0] == 200, timeout=30,
                   message="readiness back once Redis is")
    finally:
        redis.cleanup()


# == health ===================================================================================


def test_health_documents_shape(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    code, body = srv.health("/actuator/health")
    assert code == 200
    assert set(body) == {"status", "components"} and body["status"] == "UP"
    assert {"listeners", "spool"} <= set(body["components"])
    for name, comp in body["components"].items():
        assert comp["status"] in ("UP", "DOWN"), name
        assert set(comp) <= {"status", "details"}, name
    assert body["components"]["listeners"]["details"]["ports"] == [srv.port]
    assert body["components"]["spool"]["details"]["backend"] == "file"
    for path in ("/actuator/health/readiness", "/readyz"):
        code, body = srv.health(path)
        assert (code, body["status"]) == (200, "UP")
        assert body["components"]["readinessState"] == {"status": "UP"}
    for path in ("/actuator/health/liveness", "/livez"):
        assert srv.health(path) == (200, {"status": "UP",
                                          "components": {"livenessState": {"status": "UP"}}})


def _immutable(path: Path, on: bool) -> bool:
    res = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True,
                         timeout=10)
    return res.returncode == 0


def test_readiness_down_while_spool_tmp_is_unwritable(make_service: Callable[..., Srv]) -> None:
    srv = make_service()
    tmp = srv.root / "spool" / "tmp"
    if not _immutable(tmp, True):
        pytest.skip("chattr +i is not available here (needed to make a directory unwritable "
                    "for root)")
    try:
        code, body = srv.health("/readyz")
        assert code == 503, body
        assert body["components"]["spool"]["status"] == "DOWN"
        assert "cannot create" in body["components"]["spool"]["details"]["reason"]
        assert srv.health("/actuator/health")[0] == 503
        assert srv.health("/livez")[0] == 200
    finally:
        _immutable(tmp, False)
    assert srv.health("/readyz")[0] == 200


def test_readiness_down_while_spool_queue_is_unwritable(make_service: Callable[..., Srv]
                                                        ) -> None:
    srv = make_service({"smtp": {"spool": {"directLocalDelivery": False}}})
    queue = srv.root / "spool" / "queue"
    if not _immutable(queue, True):
        pytest.skip("chattr +i is not available here")
    try:
        before = srv.scrape()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(srv.port, "x@remote.test", ["alice@localhost"])
        assert refused.value.smtp_code == 451  # the server cannot queue anything
        after = srv.wait_scrape(session_done(before, 1), "session end")
        assert delta(after, before, "smtp_messages_rejected_total") == 1
        code, body = srv.health("/readyz")
        assert code == 503, body
    finally:
        _immutable(queue, False)


def test_readiness_down_during_graceful_shutdown(make_service: Callable[..., Srv]) -> None:
    srv = make_service({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 8000}}})
    assert srv.health("/readyz")[0] == 200
    s, f = smtp_session(srv.port)  # a transaction in progress keeps the drain going
    s.sendall(b"MAIL FROM:<x@remote.test>\r\n")
    assert smtp_reply(f).startswith(b"250")
    stopping: list[Any] = []

    def stop() -> None:  # not waited for: the drain runs while the probes are read
        stopping.append(srv.service.stopService())
    on_reactor(stop)
    try:
        code, body = wait_until(lambda: (r := srv.health("/readyz"))[0] == 503 and r,
                                message="readiness DOWN at shutdown")
        assert body["components"]["readinessState"]["status"] == "DOWN"
        code, body = srv.health("/actuator/health")
        assert code == 503 and body["components"]["listeners"]["status"] == "DOWN"
        assert srv.health("/livez")[0] == 200
        assert srv.scrape().get("smtp_connections_active") == 1
    finally:
        s.sendall(b"QUIT\r\n")
        bye(s, f)


def test_dashboard_pending_total_is_the_real_backlog_with_two_redis_nodes(
        make_service: Callable[..., Srv]) -> None:
    """With the Redis spool every node reports the shared queue: the dashboard's total must
    not add the nodes' figures up (it did: 2 queued messages read 4 with two nodes)."""
    stats = [e for where, e in _alert_and_dashboard_exprs()
             if where == "dashboard" and "smtp_spool_pending" in e]
    assert stats and not any(e.startswith("sum(smtp_spool_pending") for e in stats)
    assert any(e.startswith("max(smtp_spool_pending") for e in stats)
    redis: RedisServer = start_redis()
    try:
        shared = {"smtp": {"redis": {"url": redis.url, "connectTimeoutMs": 500},
                           "spool": {"type": "redis", "redis": {"keyPrefix": "hunt:two"}}}}
        nodes = [make_service(shared), make_service(shared)]
        for node in nodes:
            node.pause(True)
        for i in range(2):
            send(nodes[0].port, "x@remote.test", ["alice@localhost"],
                 f"Subject: {i}\r\n\r\n.\r\n".encode())
        views = [node.wait_scrape(lambda m: m.get("smtp_spool_pending") == 2,
                                  "each node sees the shared queue") for node in nodes]
        # What the dashboard's max() shows is the real backlog; a sum would show 4.
        assert max(v.get("smtp_spool_pending") for v in views) == 2
    finally:
        redis.cleanup()
