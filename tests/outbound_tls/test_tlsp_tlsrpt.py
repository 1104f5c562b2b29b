"""TLS-RPT (RFC 8460): one day of mixed outcomes → a gzipped JSON report that validates against
the RFC's schema, mailed (``rua=mailto:``) through our own spool into a local Maildir."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from e2e_support import E2EServer, make_server_factory, message, submit
from outbound_sink import Behaviour, server_tls
from tls_policy_support import MX_HOST, announce, dom, on_reactor

RESULT_TYPES = [
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]

# RFC 8460 §4.3/§4.4 written out as a JSON Schema (the RFC gives the structure in prose + sample).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {
                "start-datetime": {"type": "string", "format": "date-time",
                                   "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"},
                "end-datetime": {"type": "string", "format": "date-time",
                                 "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"}}},
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string", "minLength": 1},
                        "mx-host": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
                "summary": {
                    "type": "object",
                    "required": ["total-successful-session-count",
                                 "total-failure-session-count"],
                    "properties": {
                        "total-successful-session-count": {"type": "integer", "minimum": 0},
                        "total-failure-session-count": {"type": "integer", "minimum": 0}},
                    "additionalProperties": False},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {
                        "result-type": {"enum": RESULT_TYPES},
                        "sending-mta-ip": {"type": "string"},
                        "receiving-mx-hostname": {"type": "string"},
                        "receiving-mx-helo": {"type": "string"},
                        "receiving-ip": {"type": "string"},
                        "failed-session-count": {"type": "integer", "minimum": 1},
                        "additional-information": {"type": "string"},
                        "failure-reason-code": {"type": "string"}},
                    "additionalProperties": False}}},
            "additionalProperties": False}}},
    "additionalProperties": False,
}

DOMAIN = dom("report")


@pytest.fixture
def server(tmp_path: Path, policy_certs, policy_dns, sinks) -> Iterator[Callable[..., E2EServer]]:
    yield from make_server_factory(tmp_path, policy_certs, policy_dns.plain_port, sinks.port)


def test_schema_rejects_a_broken_report() -> None:
    # the schema used below is able to fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"organization-name": "x", "policies": []}, SCHEMA)


def test_daily_report_of_mixed_outcomes_reaches_the_local_mailbox(
        server, sinks, policy_certs, policy_dns, sts_web) -> None:
    sts_web.serve(DOMAIN, "testing")
    announce(policy_dns, DOMAIN, "rep1")
    on_reactor(policy_dns.zone.set_txt, f"_smtp._tls.{DOMAIN}",
               "v=TLSRPTv1; rua=mailto:tlsrpt@localhost")
    good = server_tls(str(policy_certs.cert), str(policy_certs.key))
    sink = sinks.start(behaviour=Behaviour(tls=good))
    # (checkServerIdentity off: testing mode delivers as the hop's own settings allow, and
    # these accept the second session's certificate for another name; the policy records it)
    srv = server({"smtp": {"relay": {
        "outboundTls": {"checkServerIdentity": False},
        "outboundPolicy": {
            "mtaSts": {"enabled": True, "httpsPortOverride": sts_web.port},
            "tlsRpt": {"enabled": True, "reportingOrg": "Example Reporter",
                       "contactInfo": "mailto:tls-admin@localhost",
                       "fromAddress": "postmaster@localhost"}}}}},
        users=("carol", "tlsrpt"))
    start = srv.now()
    rcpt = f"bob@{DOMAIN}"
    submit(srv, policy_certs, "carol@localhost", [rcpt], message("one", to=rcpt))
    srv.pump(lambda: len(sink.transactions) == 1 and not srv.entries(), message="first")
    sink.behaviour.tls = server_tls(str(policy_certs.wrong_cert), str(policy_certs.wrong_key))
    submit(srv, policy_certs, "carol@localhost", [rcpt], message("two", to=rcpt))
    srv.pump(lambda: len(sink.transactions) == 2 and not srv.entries(), message="second")
    assert srv.messages("tlsrpt") == []
    # The day ends: the reporter wakes at the period boundary and queues the report.
    day = int(start // 86400) * 86400
    srv.advance(day + 86400 + 2 - srv.now())
    [raw] = srv.pump(lambda: srv.messages("tlsrpt"), message="the TLS report in the Maildir")

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == DOMAIN
    assert msg["TLS-Report-Submitter"] == "Example Reporter"
    assert msg["TLS-Required"] == "No"
    assert str(msg["Subject"]).startswith(f"Report Domain: {DOMAIN} Submitter: Example Reporter")
    [part] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename().startswith(f"Example Reporter!{DOMAIN}!{day}!{day + 86400}!")
    report = json.loads(gzip.decompress(part.get_payload(decode=True)))
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    assert report["organization-name"] == "Example Reporter"
    assert report["contact-info"] == "mailto:tls-admin@localhost"
    assert report["date-range"]["end-datetime"].endswith("T00:00:00Z")
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["policy"]["policy-domain"] == DOMAIN
    assert "mode: testing" in policy["policy"]["policy-string"]
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 1}
    [failure] = policy["failure-details"]
    assert failure["result-type"] == "certificate-host-mismatch"
    assert failure["receiving-mx-hostname"] == MX_HOST
    assert failure["receiving-ip"] == "127.0.0.1"
    assert failure["sending-mta-ip"] == "127.0.0.1"
    assert failure["failed-session-count"] == 1


def test_report_to_an_https_rua_is_posted_through_our_dns_and_trust_root(
        server, sinks, policy_certs, policy_dns, sts_web) -> None:
    """``rua=https:`` (RFC 8460 §3, §5.4): the gzipped report is POSTed as
    application/tlsrpt+gzip. The host resolves only through our DNS servers and its certificate
    only verifies against ``outboundTls.caFile``: the MTA-STS fetcher's agent is used."""
    domain = dom("rtls-sts")
    sts_web.serve(domain, "testing")
    announce(policy_dns, domain, "rep-https")
    rua = f"https://mta-sts.{domain}:{sts_web.port}/v1/tlsrpt"
    on_reactor(policy_dns.zone.set_txt, f"_smtp._tls.{domain}", f"v=TLSRPTv1; rua={rua}")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    srv = server({"smtp": {"relay": {"outboundPolicy": {
        "mtaSts": {"enabled": True, "httpsPortOverride": sts_web.port},
        "tlsRpt": {"enabled": True, "reportingOrg": "Example Reporter",
                   "contactInfo": "mailto:tls-admin@localhost"}}}}}, users=("carol",))
    start = srv.now()
    rcpt = f"bob@{domain}"
    submit(srv, policy_certs, "carol@localhost", [rcpt], message("one", to=rcpt))
    srv.pump(lambda: len(sink.transactions) == 1 and not srv.entries(), message="delivered")
    sts_web.posts.clear()
    day = int(start // 86400) * 86400
    srv.advance(day + 86400 + 2 - srv.now())
    srv.pump(lambda: sts_web.posts, message="the report POSTed to the https rua")

    [(host, path, ctype, body)] = sts_web.posts
    assert (host, path, ctype) == (f"mta-sts.{domain}", b"/v1/tlsrpt", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    [policy] = report["policies"]
    assert policy["policy"]["policy-domain"] == domain
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 0}
