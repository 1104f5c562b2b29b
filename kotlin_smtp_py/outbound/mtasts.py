"""MTA-STS (RFC 8461): discover, fetch, cache and apply recipient domains' policies.

``MtaStsResolver.policy_for(domain)`` returns the policy to apply now (or None) following
RFC 8461 §5.1:

* ``_mta-sts.<domain>`` TXT with exactly one ``v=STSv1; id=...`` record announces a policy.
* When the announced id equals the cached id and the cached policy is unexpired, the cache is
  used without any HTTPS request; otherwise the policy is fetched from
  ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with a verified certificate for
  ``mta-sts.<domain>`` (no redirects, 200 only, ``text/plain``, at most 64 KiB, bounded by
  ``connectTimeoutMs``/``readTimeoutMs``) and the cache is replaced.
* A fetch failure or a missing/broken TXT record never replaces or downgrades an unexpired cached
  policy: the cached policy (enforce included) keeps being applied until ``max_age`` runs out.
* A cached policy still in use is refreshed in the background once it is half its ``max_age``
  old (at most a day), with the same id: mail to the domain keeps it warm instead of letting
  it lapse and depending on one fetch at expiry (a blocked or failing policy host at that
  moment would otherwise turn enforcement off until the next fetch succeeds). The delivery
  that notices does not wait; a failed refresh keeps the cached policy.
* The cache lives in ``mtaSts.policyCacheDir`` (default ``<spool dir>/mta-sts``), one JSON file
  per domain written to a temp name and renamed, so it survives restarts.

Fetch problems are reported to the TLS-RPT recorder as ``sts-policy-fetch-error`` /
``sts-policy-invalid`` / ``sts-webpki-invalid``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from kotlin_smtp_py.outbound.dnssec import SecureDns, txt_strings

log = Logger()

REFRESH_AFTER_MAX = 86400.0  # refresh a policy in use at least daily (and at half its max_age)

MAX_POLICY_BYTES = 64 * 1024
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")


class PolicyError(ValueError):
    """A policy that must not be used (RFC 8461 §3.2)."""


@dataclass(frozen=True)
class StsPolicy:
    """A parsed policy file."""

    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    text: str  # as fetched (for TLS-RPT ``policy-string``)

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def policy_strings(self) -> list[str]:
        return [line for line in self.text.replace("\r\n", "\n").split("\n") if line.strip()]


@dataclass(frozen=True)
class CachedPolicy:
    domain: str
    policy_id: str
    policy: StsPolicy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(frozen=True)
class PolicyLookup:
    """What ``policy_for`` found: the policy to apply (or None) and any problem to report."""

    cached: CachedPolicy | None
    problem: str | None = None  # TLS-RPT result type (sts-policy-fetch-error, ...)
    detail: str = ""

    @property
    def policy(self) -> StsPolicy | None:
        return self.cached.policy if self.cached is not None else None


_TXT_VERSION = re.compile(r"v=STSv1[ \t]*;")
_MAX_AGE = re.compile(r"[0-9]{1,10}")

def parse_txt(records: list[str]) -> str | None:
    """The policy id of the single ``v=STSv1`` record, or None (none, several, or malformed)."""
    # §3.1: records that do not begin with "v=STSv1;" are discarded before counting (a
    # "v=STSv10" or " v=STSv1" beside the real one must not make it "several").
    ours = [r for r in records if _TXT_VERSION.match(r)]
    if len(ours) != 1:
        return None
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str) -> StsPolicy:
    """RFC 8461 §3.2 policy file: ``key: value`` lines; version, mode, max_age, mx*."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"malformed line {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)  # first occurrence wins; unknown keys are ignored
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"invalid mode {mode!r}")
    age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(age):  # 1*10DIGIT, ASCII ("²".isdigit() is True)
        raise PolicyError(f"invalid max_age {age!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return StsPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), text)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact match, or ``*.`` matching exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == host


# ------------------------------------------------------------------------------------------
# The cache


class PolicyCache:
    """In-memory policies backed by one JSON file per domain (atomic replace)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._mem: dict[str, CachedPolicy] = {}
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _path(self, domain: str) -> str:
        safe = re.sub(r"[^a-z0-9.-]", "_", domain.lower())
        return os.path.join(self.directory, f"{safe}.json")

    def get(self, domain: str) -> CachedPolicy | None:
        if domain in self._mem:
            return self._mem[domain]
        if not self.directory:
            return None
        try:
            with open(self._path(domain), encoding="utf-8") as fh:  # small local file
                data = json.load(fh)
            pol = data["policy"]
            cached = CachedPolicy(data["domain"], data["policy_id"],
                                  StsPolicy(pol["mode"], tuple(pol["mx"]), int(pol["max_age"]),
                                            pol["text"]), float(data["fetched_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._mem[domain] = cached
        return cached

    def put(self, cached: CachedPolicy) -> None:
        self._mem[cached.domain] = cached
        if not self.directory:
            return
        path = self._path(cached.domain)
        tmp = f"{path}.tmp.{os.getpid()}"
        data = {"domain": cached.domain, "policy_id": cached.policy_id,
                "fetched_at": cached.fetched_at, "policy": asdict(cached.policy)}
        try:
            with open(tmp, "w", encoding="utf-8") as fh:  # small local write
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warn("cannot persist MTA-STS policy of {domain}: {error}", domain=cached.domain,
                     error=str(exc))


# ------------------------------------------------------------------------------------------
# Fetching


class FetchError(Exception):
    def __init__(self, result_type: str, detail: str) -> None:
        super().__init__(detail)
        self.result_type = result_type
        self.detail = detail


class _Body(Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(FetchError("sts-policy-invalid", "policy larger than 64 KiB"))
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(FetchError("sts-policy-fetch-error",
                                         f"body: {reason.getErrorMessage()}"))


@implementer(IStreamClientEndpoint)
class _ResolvingTlsEndpoint:
    """TLS to ``host``:``port``, resolving ``host`` with our own DNS (twisted.names)."""

    def __init__(self, reactor: Any, lookup: Callable[[str], Awaitable[tuple[str, ...]]],
                 host: str, port: int, creator: Any, timeout: float) -> None:
        self.reactor, self.lookup, self.host, self.port = reactor, lookup, host, port
        self.creator, self.timeout = creator, timeout

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        async def go() -> Any:
            addresses = await self.lookup(self.host)
            if not addresses:
                raise FetchError("sts-policy-fetch-error", f"{self.host} has no address")
            last: Exception | None = None
            for address in addresses[:4]:
                tcp: Any = (endpoints.TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
                    self.reactor, address, self.port, timeout=self.timeout) if ":" in address
                    else endpoints.TCP4ClientEndpoint(self.reactor, address, self.port,
                                                      timeout=self.timeout))
                try:
                    return await endpoints.wrapClientTLS(self.creator, tcp).connect(factory)
                except Exception as exc:
                    last = exc
            assert last is not None
            raise last
        return defer.Deferred.fromCoroutine(go())


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(self, fetcher: PolicyFetcher) -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        f = self.fetcher
        creator = ssl.optionsForClientTLS(host, trustRoot=f.trust_root)
        return _ResolvingTlsEndpoint(f.reactor, f.lookup, host, uri.port, creator,
                                     f.connect_timeout)


class PolicyFetcher:
    """HTTPS GET of ``/.well-known/mta-sts.txt`` with PKIX verification of ``mta-sts.<domain>``."""

    def __init__(self, reactor: Any, lookup: Callable[[str], Awaitable[tuple[str, ...]]],
                 trust_root: Any, connect_timeout: float, read_timeout: float,
                 port: int = 443) -> None:
        self.reactor = reactor
        self.lookup = lookup
        self.trust_root = trust_root
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.port = port

    def url(self, domain: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"

    def agent(self) -> Any:
        """An HTTPS agent that resolves hosts through our DNS servers and verifies them against
        the configured trust root (``outboundTls.caFile``): also what TLS-RPT reports to
        ``https:`` URIs are POSTed with."""
        return Agent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            self.reactor, _EndpointFactory(self))

    async def fetch(self, domain: str) -> str:
        agent = self.agent()
        d: defer.Deferred[Any] = agent.request(b"GET", self.url(domain).encode("ascii"))
        d.addTimeout(self.connect_timeout + self.read_timeout, self.reactor)
        try:
            response = await d
        except FetchError:
            raise
        except Exception as exc:
            text = _error_text(exc)
            kind = "sts-webpki-invalid" if _is_tls_verification(text) \
                else "sts-policy-fetch-error"
            raise FetchError(kind, text) from None
        if response.code != 200:
            response.deliverBody(_Body(0))  # discard
            raise FetchError("sts-policy-fetch-error", f"HTTP status {response.code}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Body(0))
            raise FetchError("sts-policy-invalid", f"content type {ctype.decode('latin-1')!r}")
        body = _Body(MAX_POLICY_BYTES)
        response.deliverBody(body)
        body.done.addTimeout(self.read_timeout, self.reactor)
        try:
            data = await body.done
        except FetchError:
            raise
        except Exception as exc:
            raise FetchError("sts-policy-fetch-error", _error_text(exc)) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError("sts-policy-invalid", "policy is not UTF-8") from None


def _error_text(exc: Exception) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)[:300]
    return (str(exc) or type(exc).__name__)[:300]


def _is_tls_verification(text: str) -> bool:
    low = text.lower()
    return "certificate" in low or "verif" in low or "ssl" in low or "tls" in low


# ------------------------------------------------------------------------------------------
# The resolver


class MtaStsResolver:
    """The policy to apply for a recipient domain right now (see the module docstring)."""

    def __init__(self, dns: SecureDns, fetcher: PolicyFetcher, cache: PolicyCache,
                 clock: Any) -> None:
        self.dns = dns
        self.fetcher = fetcher
        self.cache = cache
        self.clock = clock
        self.fetches = 0  # HTTPS fetches attempted (observability and tests)
        self._refreshing: dict[str, defer.Deferred[None]] = {}

    async def policy_for(self, domain: str) -> PolicyLookup:
        domain = domain.lower().rstrip(".")
        now = float(self.clock.seconds())
        cached = self.cache.get(domain)
        if cached is not None and not cached.fresh(now):
            cached = None
        answer = await self.dns.query(f"_mta-sts.{domain}", 16)
        policy_id = parse_txt(txt_strings(answer)) if answer.ok else None
        if policy_id is None:
            # No (valid) TXT record: RFC 8461 §5.1 — keep using an unexpired cached policy.
            if answer.status == "failure":
                log.info("MTA-STS TXT lookup for {domain} failed: {detail}", domain=domain,
                         detail=answer.detail)
            return PolicyLookup(cached)
        if cached is not None and cached.policy_id == policy_id:
            if now - cached.fetched_at >= min(cached.policy.max_age / 2, REFRESH_AFTER_MAX):
                self._refresh_soon(cached)
            return PolicyLookup(cached)
        self.fetches += 1
        try:
            text = await self.fetcher.fetch(domain)
            policy = parse_policy(text)
        except FetchError as exc:
            log.warn("MTA-STS policy fetch for {domain} failed ({kind}): {detail}; "
                     "{keeping}", domain=domain, kind=exc.result_type, detail=exc.detail,
                     keeping="keeping the cached policy" if cached else "no policy applied")
            return PolicyLookup(cached, exc.result_type, exc.detail)
        except PolicyError as exc:
            log.warn("MTA-STS policy of {domain} is invalid: {error}", domain=domain,
                     error=str(exc))
            return PolicyLookup(cached, "sts-policy-invalid", str(exc))
        fresh = CachedPolicy(domain, policy_id, policy, now)
        self.cache.put(fresh)
        log.info("MTA-STS policy for {domain}: id {policy_id} mode {mode} max_age {max_age}",
                 domain=domain, policy_id=policy_id, mode=policy.mode, max_age=policy.max_age)
        return PolicyLookup(fresh)

    def _refresh_soon(self, cached: CachedPolicy) -> None:
        domain = cached.domain
        if domain in self._refreshing:
            return
        d = defer.ensureDeferred(self._refresh(cached))
        if d.called:
            return
        self._refreshing[domain] = d
        d.addBoth(lambda _: self._refreshing.pop(domain, None))

    async def _refresh(self, cached: CachedPolicy) -> None:
        """Background: fetch the policy again under its id; keep the cached one on failure."""
        domain = cached.domain
        self.fetches += 1
        try:
            policy = parse_policy(await self.fetcher.fetch(domain))
        except (FetchError, PolicyError) as exc:
            detail = exc.detail if isinstance(exc, FetchError) else str(exc)
            log.warn("MTA-STS policy refresh for {domain} failed: {detail}; the cached policy "
                     "stays in force until it expires in {left:.0f}s", domain=domain,
                     detail=detail, left=cached.expires_at - float(self.clock.seconds()))
            return
        except Exception:  # a background task: log, never raise into nowhere
            log.failure("MTA-STS policy refresh for {domain} failed", domain=domain)
            return
        current = self.cache.get(domain)
        if current is not None and current.policy_id != cached.policy_id:
            return  # a new id was fetched meanwhile: that one wins
        self.cache.put(CachedPolicy(domain, cached.policy_id, policy,
                                    float(self.clock.seconds())))
        log.info("MTA-STS policy for {domain} refreshed: id {policy_id} mode {mode} max_age "
                 "{max_age}", domain=domain, policy_id=cached.policy_id, mode=policy.mode,
                 max_age=policy.max_age)
