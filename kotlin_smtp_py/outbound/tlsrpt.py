"""SMTP TLS Reporting (RFC 8460): record outbound TLS outcomes and send aggregate reports.

``TlsRptRecorder.record`` counts, per reporting period (``tlsRpt.intervalSeconds``, UTC-aligned;
one day by default), per recipient (policy) domain and per applied policy, the successful
sessions and the failures by RFC 8460 result type, sending IP, receiving MX and IP. The counts are
kept in ``<stateDir>/state.json`` (default ``<spool dir>/tls-rpt``), written atomically on a
short debounce and on ``flush``, so a restart loses at most a few seconds of observations.

``TlsRptReporter`` wakes at each period boundary, and for every finished period and domain looks
up ``_smtp._tls.<domain>`` (exactly one ``v=TLSRPTv1`` record with ``rua=``); it builds the JSON
report (§4.4), gzips it and

* for ``mailto:`` URIs queues a ``multipart/report; report-type="tlsrpt"`` message (§5.3) from
  ``tlsRpt.fromAddress`` through our own spool (``submit``) — with ``TLS-Required: No`` (RFC 8689
  §4) so that the report gets through even when TLS to the domain is broken, and NOTIFY=NEVER;
* for ``https:`` URIs POSTs it as ``application/tlsrpt+gzip`` (§5.4).

A period is reported once: after an attempt its counts are dropped (reports are best effort,
RFC 8460 §3).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.outbound.dnssec import SecureDns, txt_strings

log = Logger()

RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
SAVE_DELAY = 5.0


@dataclass(frozen=True)
class ReportPolicy:
    """The policy a session was held to (RFC 8460 §4.4 ``policy``)."""

    policy_type: str  # "sts" | "tlsa" | "no-policy-found"
    policy_domain: str
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()

    def key(self) -> str:
        return json.dumps([self.policy_type, self.policy_domain, list(self.policy_strings),
                           list(self.mx_hosts)])

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy-type": self.policy_type,
                               "policy-domain": self.policy_domain}
        if self.policy_strings:
            out["policy-string"] = list(self.policy_strings)
        if self.mx_hosts:
            out["mx-host"] = list(self.mx_hosts)
        return out


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


class TlsRptRecorder:
    """Per-period, per-domain TLS outcome counts, persisted in ``state_dir``."""

    def __init__(self, state_dir: str, clock: Any, interval: int = 86400) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.interval = max(60, int(interval))
        self._save_call: IDelayedCall | None = None
        # periods[start][domain][policy_key] = {"policy": {...}, "success": n, "failures": {...}}
        self.periods: dict[str, dict[str, dict[str, Any]]] = {}
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            self._load()

    @property
    def _path(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    def _load(self) -> None:
        try:
            with open(self._path, encoding="utf-8") as fh:  # small local file
                data = json.load(fh)
            self.periods = dict(data.get("periods", {}))
        except (OSError, ValueError):
            self.periods = {}

    def period_start(self, ts: float) -> int:
        return int(ts // self.interval) * self.interval

    def record(self, policy: ReportPolicy, result_type: str | None, *, mx_host: str = "",
               receiving_ip: str = "", sending_ip: str = "", detail: str = "") -> None:
        now = float(self.clock.seconds())
        period = self.periods.setdefault(str(self.period_start(now)), {})
        group = period.setdefault(policy.policy_domain, {}).setdefault(
            policy.key(), {"policy": policy.as_json(), "success": 0, "failures": {}})
        if result_type is None:
            group["success"] += 1
        else:
            fkey = json.dumps([result_type, sending_ip, mx_host, receiving_ip])
            entry = group["failures"].setdefault(fkey, {
                "result-type": result_type, "sending-mta-ip": sending_ip,
                "receiving-mx-hostname": mx_host, "receiving-ip": receiving_ip,
                "failed-session-count": 0, "additional-information": detail[:200]})
            entry["failed-session-count"] += 1
        self._schedule_save()

    def _schedule_save(self) -> None:
        if not self.state_dir or (self._save_call is not None and self._save_call.active()):
            return
        self._save_call = self.clock.callLater(SAVE_DELAY, self.flush)

    def flush(self) -> None:
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None
        if not self.state_dir:
            return
        tmp = f"{self._path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:  # small local write
                json.dump({"periods": self.periods}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warn("cannot save TLS-RPT state: {error}", error=str(exc))

    def finished(self, now: float) -> list[int]:
        current = self.period_start(now)
        return sorted(int(p) for p in self.periods if int(p) < current)

    def take(self, start: int) -> dict[str, dict[str, Any]]:
        out = self.periods.pop(str(start), {})
        self._schedule_save()
        return out


def build_report(domain: str, groups: dict[str, Any], start: int, end: int, org: str,
                 contact: str, report_id: str) -> dict[str, Any]:
    """The RFC 8460 §4.4 JSON object for one domain and period."""
    policies = []
    for group in groups.values():
        failures = []
        for f in group["failures"].values():
            item = {k: v for k, v in f.items() if v != ""}
            failures.append(item)
        entry: dict[str, Any] = {
            "policy": group["policy"],
            "summary": {"total-successful-session-count": int(group["success"]),
                        "total-failure-session-count": sum(int(f["failed-session-count"])
                                                           for f in failures)}}
        if failures:
            entry["failure-details"] = failures
        policies.append(entry)
    return {"organization-name": org,
            "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
            "contact-info": contact, "report-id": report_id, "policies": policies}


def parse_rua(records: list[str]) -> list[str]:
    """The ``rua`` URIs of the single ``v=TLSRPTv1`` record (RFC 8460 §3), else []."""
    ours = [r for r in records if r.strip().startswith("v=TLSRPTv1")]
    if len(ours) != 1:
        return []
    for part in ours[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == "rua":
            return [u.strip() for u in value.split(",")
                    if u.strip().lower().startswith(("mailto:", "https:"))]
    return []


def report_message(report_gz: bytes, domain: str, org: str, from_addr: str, to_addr: str,
                   report_id: str, start: int, end: int, hostname: str, now: float) -> bytes:
    """The RFC 8460 §5.3 e-mail carrying one gzipped report."""
    boundary = f"=_tlsrpt_{os.urandom(12).hex()}"
    filename = f"{org}!{domain}!{start}!{end}!{report_id.split('@')[0]}.json.gz"
    encoded = base64.encodebytes(report_gz).decode("ascii").replace("\n", "\r\n")
    head = [
        f"From: <{from_addr}>",
        f"To: <{to_addr}>",
        f"Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>",
        f"Date: {email.utils.formatdate(now, localtime=False)}",
        f"Message-ID: <{report_id.split('@')[0]}.{os.urandom(4).hex()}@{hostname}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {org}",
        "TLS-Required: No",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt";\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
        f"This is an aggregate TLS report (RFC 8460) from {org} for {domain},",
        f"{_iso(start)} to {_iso(end)}.",
        "",
        f"--{boundary}",
        "Content-Type: application/tlsrpt+gzip",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment;\r\n\tfilename="{filename}"',
        "",
        encoded.rstrip("\r\n"),
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(head).encode("utf-8")


Submit = Callable[[Envelope, bytes], "defer.Deferred[Any]"]


class TlsRptReporter:
    """Sends the reports of finished periods (see the module docstring)."""

    def __init__(self, recorder: TlsRptRecorder, dns: SecureDns, submit: Submit, clock: Any,
                 hostname: str, org: str = "", contact: str = "", from_address: str = "",
                 reactor: Any = None, agent: Callable[[], Any] | None = None) -> None:
        """``agent``: makes the HTTP agent for ``https:`` URIs (the MTA-STS fetcher's: our DNS
        servers and trust root); None: Twisted's default (system resolver and CAs)."""
        self.agent = agent
        self.recorder = recorder
        self.dns = dns
        self.submit = submit
        self.clock = clock
        self.reactor = reactor
        self.hostname = hostname
        self.org = org or hostname
        self.from_address = from_address or f"postmaster@{hostname}"
        self.contact = contact or self.from_address
        self._call: IDelayedCall | None = None
        self.sent: list[tuple[str, str, str]] = []  # (domain, uri, report-id), for observability

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.recorder.flush()

    def _schedule(self) -> None:
        now = float(self.clock.seconds())
        nxt = self.recorder.period_start(now) + self.recorder.interval + 1  # just after the edge
        self._call = self.clock.callLater(max(0.0, nxt - now), self._tick)

    def _tick(self) -> None:
        d = defer.Deferred.fromCoroutine(self.run())
        d.addErrback(lambda f: log.failure("TLS-RPT reporting failed", f))
        self._schedule()

    async def run(self) -> int:
        """Report every finished period; returns the number of reports handed off."""
        now = float(self.clock.seconds())
        count = 0
        for start in self.recorder.finished(now):
            end = start + self.recorder.interval
            for domain, groups in self.recorder.take(start).items():
                count += await self._report_domain(domain, groups, start, end, now)
        self.recorder.flush()
        return count

    async def _report_domain(self, domain: str, groups: dict[str, Any], start: int, end: int,
                             now: float) -> int:
        answer = await self.dns.query(f"_smtp._tls.{domain}", 16)
        uris = parse_rua(txt_strings(answer)) if answer.ok else []
        if not uris:
            return 0
        day = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y%m%d")
        report_id = f"{day}.{domain}.{os.urandom(6).hex()}@{self.hostname}"
        report = build_report(domain, groups, start, end, self.org, self.contact, report_id)
        data = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
        sent = 0
        for uri in uris:
            try:
                if uri.lower().startswith("mailto:"):
                    to = uri[7:].split("?")[0]
                    body = report_message(data, domain, self.org, self.from_address, to,
                                          report_id, start, end, self.hostname, now)
                    env = Envelope(sender=self.from_address,
                                   recipients=(Recipient(to, notify=("NEVER",)),),
                                   size=len(body), helo=self.hostname, received_at=now)
                    await self.submit(env, body)
                else:
                    await self._post(uri, data)
            except Exception as exc:
                log.warn("TLS-RPT report for {domain} to {uri} failed: {error}", domain=domain,
                         uri=uri, error=repr(exc)[:300])
                continue
            log.info("TLS-RPT report {report_id} for {domain} sent to {uri}",
                     report_id=report_id, domain=domain, uri=uri)
            self.sent.append((domain, uri, report_id))
            sent += 1
        return sent

    async def _post(self, uri: str, data: bytes) -> None:
        import io

        from twisted.web.client import Agent, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        agent = self.agent() if self.agent is not None \
            else Agent(reactor)  # type: ignore[no-untyped-call]
        d = agent.request(b"POST", uri.encode("ascii"),
                          Headers({b"content-type": [b"application/tlsrpt+gzip"]}),
                          FileBodyProducer(io.BytesIO(data)))  # type: ignore[no-untyped-call]
        d.addTimeout(60, reactor)
        response = await d
        await readBody(response)
        if not 200 <= response.code < 300:
            raise RuntimeError(f"HTTP {response.code}")
