"""Which TLS rules each connection of one delivery attempt runs under (RFC 8461/7672/8689/8460).

``OutboundTlsPolicies.plan(hop, targets, requiretls=, relaxed=)`` turns the MX targets of a
next hop into ``PlannedTarget``s (target, effective ``TlsPolicy``, ``TlsRequirements`` or None,
the TLS-RPT policy it is reported under) or one ``DeliveryStatus`` when no target may be used.
Precedence per MX host:

1. DANE (``dane.mode=rfc7672``): MX RRset and TLSA RRset DNSSEC-authenticated → DANE
   requirements (a failing DANE check is never overridden by MTA-STS, RFC 8461 §2).
2. MTA-STS ``enforce``: hosts not matching a policy ``mx`` pattern are not used (all excluded →
   transient ``policy`` 4.7.5); matching hosts need STARTTLS and a PKIX certificate for the MX
   name. ``testing``: delivered as usual; mismatches and certificate failures are recorded only.
3. ``dane.mode=basic``: any TLSA answer → STARTTLS required (ordinary ``outboundTls`` checks).
4. REQUIRETLS without 1/2: the MX RRset must be DNSSEC-authenticated, then PKIX + MX name;
   otherwise 5.7.30 (§5.1). MTA-STS ``testing`` counts as ``enforce`` under REQUIRETLS.

``relaxed`` (``TLS-Required: No`` without REQUIRETLS) skips 1–3. Smart-host routes never use
MTA-STS/DANE (they are not MX delivery); under REQUIRETLS they need PKIX for the route host.
Policies override ``trustAll``/``trustHosts``: their checks use ``caFile`` or the system store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.logger import Logger

from kotlin_smtp_py.config import SmtpConfig
from kotlin_smtp_py.outbound.client import SessionOutcome, Target
from kotlin_smtp_py.outbound.dane import DaneResolver, TlsaLookup
from kotlin_smtp_py.outbound.dnssec import SecureDns
from kotlin_smtp_py.outbound.mtasts import MtaStsResolver, PolicyCache, PolicyFetcher
from kotlin_smtp_py.outbound.mx import MxResolver
from kotlin_smtp_py.outbound.router import NextHop
from kotlin_smtp_py.outbound.tlscheck import TlsRequirements
from kotlin_smtp_py.outbound.tlspolicy import TlsPolicy, trust_root
from kotlin_smtp_py.outbound.tlsrpt import ReportPolicy, TlsRptRecorder
from kotlin_smtp_py.status import DeliveryStatus, Reason

log = Logger()


@dataclass(frozen=True)
class PlannedTarget:
    target: Target
    tls: TlsPolicy
    requirements: TlsRequirements | None = None
    report: ReportPolicy | None = None
    pre_failure: str | None = None  # a policy failure known before connecting (testing mode)
    pre_detail: str = ""


class OutboundTlsPolicies:
    def __init__(self, secure_dns: SecureDns, ca_file: str = "",
                 mtasts: MtaStsResolver | None = None, dane: DaneResolver | None = None,
                 dane_mode: str = "rfc7672", recorder: TlsRptRecorder | None = None,
                 https: PolicyFetcher | None = None) -> None:
        self.secure_dns = secure_dns
        self.https = https  # HTTPS through our DNS and trust root (MTA-STS, TLS-RPT POSTs)
        self.ca_file = ca_file
        self.mtasts = mtasts
        self.dane = dane
        self.dane_mode = dane_mode
        self.recorder = recorder
        self._mx_dane = DaneResolver(secure_dns)

    @classmethod
    def from_config(cls, smtp: SmtpConfig, reactor: Any, clock: Any,
                    mx: MxResolver) -> OutboundTlsPolicies:
        pol = smtp.relay.outboundPolicy
        tls = smtp.relay.outboundTls
        secure = SecureDns(list(smtp.dns.servers), reactor, smtp.dns.timeoutMs / 1000.0)
        fetcher = None
        if pol.mtaSts.enabled or pol.tlsRpt.enabled:  # policy fetches, https: report POSTs

            async def lookup(host: str) -> tuple[str, ...]:
                return (await mx.addresses(host))[0]

            fetcher = PolicyFetcher(reactor, lookup, trust_root(tls.caFile),
                                    pol.mtaSts.connectTimeoutMs / 1000.0,
                                    pol.mtaSts.readTimeoutMs / 1000.0,
                                    pol.mtaSts.httpsPortOverride or 443)
        mtasts = None
        if pol.mtaSts.enabled:
            cache_dir = pol.mtaSts.policyCacheDir or os.path.join(smtp.spool.dir, "mta-sts")
            assert fetcher is not None
            mtasts = MtaStsResolver(secure, fetcher, PolicyCache(cache_dir), clock)
        dane = DaneResolver(secure) if pol.dane.enabled else None
        recorder = None
        if pol.tlsRpt.enabled:
            state = pol.tlsRpt.stateDir or os.path.join(smtp.spool.dir, "tls-rpt")
            recorder = TlsRptRecorder(state, clock, pol.tlsRpt.intervalSeconds)
        return cls(secure, tls.caFile, mtasts, dane, pol.dane.mode, recorder, https=fetcher)

    @property
    def domain_policies(self) -> bool:
        """True when recipient-domain policies (MTA-STS or DANE) may apply."""
        return self.mtasts is not None or self.dane is not None

    async def plan(self, hop: NextHop, targets: Sequence[Target], *, requiretls: bool,
                   relaxed: bool) -> list[PlannedTarget] | DeliveryStatus:
        if hop.host is not None:
            return self._smart_host(hop, targets, requiretls)
        domain = hop.domain
        no_policy = ReportPolicy("no-policy-found", domain)
        if relaxed and not requiretls:
            log.info("TLS-Required: No — ignoring MTA-STS/DANE of {domain}", domain=domain)
            return [PlannedTarget(t, hop.tls, None, no_policy) for t in targets]
        sts = None
        if self.mtasts is not None:
            found = await self.mtasts.policy_for(domain)
            if found.policy is not None and found.policy.mode != "none":
                sts = found.policy
            if found.problem is not None and self.recorder is not None:
                report = (ReportPolicy("sts", domain, tuple(sts.policy_strings()), sts.mx)
                          if sts is not None else no_policy)
                self.recorder.record(report, found.problem, detail=found.detail)
        rfc7672 = self.dane is not None and self.dane_mode == "rfc7672"
        mx_secure = False
        if rfc7672 or requiretls:
            mx_secure = await self._mx_dane.mx_secure(domain)
        tlsa: dict[tuple[str, int], TlsaLookup] = {}
        if self.dane is not None and (mx_secure or self.dane_mode == "basic"):
            for t in targets:
                if (t.name, t.port) not in tlsa:
                    tlsa[(t.name, t.port)] = await self.dane.tlsa(t.name, t.port)
        planned: list[PlannedTarget] = []
        excluded = ""
        for t in targets:
            item = self._plan_one(t, hop, domain, sts, mx_secure, tlsa.get((t.name, t.port)),
                                  requiretls, rfc7672)
            if isinstance(item, str):
                excluded = excluded or item
                continue
            planned.append(item)
        if planned:
            return planned
        if requiretls:
            return DeliveryStatus.permanent_failure(
                Reason.TLS, f"REQUIRETLS: {excluded}", "5.7.30", 550,
                diagnostic=f"x-tls; REQUIRETLS: {excluded}"[:300])
        if sts is not None and "MTA-STS" in excluded:
            return DeliveryStatus.transient(Reason.POLICY, excluded, "4.7.5", 451,
                                            diagnostic=f"x-policy; {excluded}"[:300])
        return DeliveryStatus.transient(Reason.TLS, excluded or "no usable MX host", "4.7.5",
                                        451, diagnostic=f"x-tls; {excluded}"[:300])

    def _plan_one(self, t: Target, hop: NextHop, domain: str, sts: Any, mx_secure: bool,
                  lk: TlsaLookup | None, requiretls: bool,
                  rfc7672: bool) -> PlannedTarget | str:
        ca = self.ca_file
        if rfc7672 and mx_secure and lk is not None:
            if lk.failed:
                log.warn("DANE: TLSA lookup {name} failed on a signed MX RRset; skipping {host}",
                         name=lk.name, host=t.name)
                return f"DANE: TLSA lookup for {t.name} failed"
            if lk.secure and lk.records:
                # Only PKIX-TA/PKIX-EE records (unusable for SMTP, RFC 7672 §3.1.3): TLS
                # without authentication, except that REQUIRETLS needs an authenticated peer
                # (RFC 8689 §5.1), then by PKIX.
                pkix = (t.name,) if requiretls and not lk.usable else ()
                req = TlsRequirements(require_tls=True, dane=lk.usable, requiretls=requiretls,
                                      pkix_names=pkix, ca_file=ca, policy_type="tlsa",
                                      policy_domain=domain)
                report = ReportPolicy("tlsa", domain, tuple(r.text() for r in lk.records),
                                      (t.name,))
                return PlannedTarget(t, hop.tls, req, report)
        if sts is not None:
            report = ReportPolicy("sts", domain, tuple(sts.policy_strings()), sts.mx)
            matches = sts.matches(t.name)
            if sts.mode == "enforce" or requiretls:
                if not matches:
                    log.info("MTA-STS: {host} is not an MX of {domain} per its policy",
                             host=t.name, domain=domain)
                    if self.recorder is not None:
                        self.recorder.record(report, "validation-failure", mx_host=t.name,
                                             receiving_ip=t.address,
                                             detail="MX host does not match the policy")
                    return f"no MX host of {domain} matches its MTA-STS policy"
                req = TlsRequirements(require_tls=True, pkix_names=(t.name,),
                                      requiretls=requiretls, ca_file=ca, policy_type="sts",
                                      policy_domain=domain)
                return PlannedTarget(t, hop.tls, req, report)
            req = TlsRequirements(require_tls=False, enforce=False, pkix_names=(t.name,),
                                  ca_file=ca, policy_type="sts", policy_domain=domain)
            return PlannedTarget(t, hop.tls, req, report,
                                 None if matches else "validation-failure",
                                 "" if matches else "MX host does not match the policy")
        tls = hop.tls
        if self.dane is not None and self.dane_mode == "basic" and lk is not None and lk.records:
            tls = replace(tls, start_tls_required=True, start_tls_enabled=True)
        if requiretls:
            if not mx_secure:
                return ("the MX records are not DNSSEC-validated and there is no MTA-STS "
                        f"policy for {domain}")
            req = TlsRequirements(require_tls=True, pkix_names=(t.name,), requiretls=True,
                                  ca_file=ca, policy_domain=domain)
            return PlannedTarget(t, tls, req, ReportPolicy("no-policy-found", domain))
        return PlannedTarget(t, tls, None, ReportPolicy("no-policy-found", domain))

    def _smart_host(self, hop: NextHop, targets: Sequence[Target],
                    requiretls: bool) -> list[PlannedTarget]:
        if not requiretls:
            return [PlannedTarget(t, hop.tls) for t in targets]
        assert hop.host is not None
        req = TlsRequirements(require_tls=True, pkix_names=(hop.host,), requiretls=True,
                              ca_file=self.ca_file, policy_domain=hop.domain)
        return [PlannedTarget(t, hop.tls, req) for t in targets]

    def observe(self, planned: PlannedTarget, outcome: SessionOutcome) -> None:
        """Count one session for TLS-RPT (connection failures are not TLS sessions)."""
        if self.recorder is None or planned.report is None or not outcome.connected:
            return
        result = planned.pre_failure or outcome.tls_result
        if result is None and not outcome.tls_active:
            return  # STARTTLS switched off locally: nothing to report
        self.recorder.record(planned.report, result, mx_host=planned.target.name,
                             receiving_ip=planned.target.address,
                             sending_ip=outcome.local_address,
                             detail=planned.pre_detail or outcome.tls_detail)
