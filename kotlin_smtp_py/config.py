"""Configuration: the schema with its defaults (the only place defaults live), loading,
validation.

The YAML file mirrors SPEC §2. Every section is a frozen dataclass below; a field's YAML key is its
name unless ``metadata["key"]`` says otherwise. Values may contain ``${VAR:default}``
placeholders, resolved from the environment before type checking. Unknown keys are errors naming
the key path and the nearest known key; the process must not start on any error.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

import yaml

from kotlin_smtp_py.envelope import canonical_domain


class ConfigError(ValueError):
    """Raised with every problem found; ``problems`` lists them one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _key(name: str) -> dict[str, str]:
    return {"key": name}


def _secret() -> dict[str, bool]:
    return {"secret": True}


@dataclass(frozen=True)
class ListenerConfig:
    port: int = 2525
    bindAddress: str = "0.0.0.0"
    serviceName: str = "ESMTP"
    implicitTls: bool = False
    enableStartTls: bool = True
    enableAuth: bool = True
    requireAuthForMail: bool = False
    idleTimeoutSeconds: int = 300
    proxyProtocol: bool = False
    allowPlaintextAuth: bool = False
    pregreetCheck: bool | None = None  # None = on for port 25 only
    pregreetDelayMs: int = 1000


@dataclass(frozen=True)
class RoutingConfig:
    localDomain: str = "localhost"
    localDomains: list[str] = field(default_factory=list)

    def all_local_domains(self) -> frozenset[str]:
        """Lower-case, in the A-label form recipients' domains are compared in (a domain
        configured as "bücher.test" must match "xn--bcher-kva.test")."""
        return frozenset(canonical_domain(d) for d in [self.localDomain, *self.localDomains]
                         if d)


@dataclass(frozen=True)
class StorageConfig:
    mailboxDir: str = "./data/mailboxes"
    tempDir: str = "./data/temp"
    listsDir: str = "./data/lists"


@dataclass(frozen=True)
class LimitsConfig:
    maxMessageSizeBytes: int = 26214400
    maxRecipients: int = 100
    maxCommandLineLength: int = 512


@dataclass(frozen=True)
class SslConfig:
    enabled: bool = False
    certChainFile: str = ""
    privateKeyFile: str = ""
    minTlsVersion: str = "TLSv1.2"
    handshakeTimeoutMs: int = 30000
    cipherSuites: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RedisSpoolConfig:
    keyPrefix: str = "kotlin-smtp:spool"
    maxRawBytes: int = 26214400
    lockTtlSeconds: int = 900
    minReplicas: int = 0


@dataclass(frozen=True)
class SpoolConfig:
    type: str = "auto"
    dir: str = "./data/spool"
    maxRetries: int = 5
    retryDelaySeconds: int = 60
    workerConcurrency: int = 1
    triggerCooldownMillis: int = 1000
    ioThreads: int = 1
    directLocalDelivery: bool = True
    # A delay notice (DSN "delayed") only once a message has waited this long (sendmail's
    # queuewarn); 0 = at the first deferral. Postfix sends none by default.
    delayWarningSeconds: int = 14400
    redis: RedisSpoolConfig = field(default_factory=RedisSpoolConfig)


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    sentinels: list[str] = field(default_factory=list)
    masterName: str = ""
    password: str = field(default="", metadata=_secret())
    connectTimeoutMs: int = 5000
    commandTimeoutMs: int = 5000


@dataclass(frozen=True)
class SentArchiveConfig:
    mode: str = "TRUSTED_SUBMISSION"


@dataclass(frozen=True)
class AuthRedisConfig:
    keyPrefix: str = "kotlin-smtp:auth-ratelimit"


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = True
    required: bool = False
    allowPlaintextPasswords: bool = True
    users: dict[str, str] = field(default_factory=dict, metadata=_secret())
    rateLimitEnabled: bool = True
    rateLimitBackend: str = "local"
    rateLimitMaxFailures: int = 5
    rateLimitWindowSeconds: int = 300
    rateLimitLockoutSeconds: int = 600
    failureDelayMs: int = 500
    rateLimitRedis: AuthRedisConfig = field(default_factory=AuthRedisConfig)


@dataclass(frozen=True)
class RateLimitRedisConfig:
    keyPrefix: str = "kotlin-smtp:conn-ratelimit"
    connectionCounterTtlSeconds: int = 900


@dataclass(frozen=True)
class RateLimitConfig:
    backend: str = "local"
    maxConnectionsPerIp: int = 10
    maxMessagesPerIpPerHour: int = 100
    # Like Postfix's smtpd_client_event_limit_exceptions ($mynetworks): local clients are exempt.
    exemptCidrs: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # IPv6 clients are counted per network of this many bits (Postfix 3.8's default 84).
    ipv6PrefixLength: int = 84
    redis: RateLimitRedisConfig = field(default_factory=RateLimitRedisConfig)


@dataclass(frozen=True)
class PluginsConfig:
    """Extension points loaded by dotted path or ``plugin:<name>`` (docs/EXTENDING.md)."""

    commandInterceptors: list[str] = field(default_factory=list)
    eventHooks: list[str] = field(default_factory=list)
    authService: str = ""
    routingPolicy: str = ""
    localDelivery: str = ""
    # A local-delivery plugin that never answers would hold one of workerConcurrency's slots
    # for ever; past this the call is abandoned and its recipients retried (4.4.1).
    localDeliveryTimeoutSeconds: float = 600.0


@dataclass(frozen=True)
class FeaturesConfig:
    vrfyEnabled: bool = False
    expnEnabled: bool = False
    etrnEnabled: bool = False


@dataclass(frozen=True)
class ProxyConfig:
    trustedCidrs: list[str] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])


@dataclass(frozen=True)
class LifecycleConfig:
    gracefulShutdownTimeoutMs: int = 30000


@dataclass(frozen=True)
class DnsConfig:
    servers: list[str] = field(default_factory=list)  # empty = /etc/resolv.conf
    timeoutMs: int = 5000


@dataclass(frozen=True)
class RouteConfig:
    domain: str = "*"
    host: str = ""
    port: int = 25
    username: str = ""
    password: str = field(default="", metadata=_secret())
    startTlsEnabled: bool | None = None
    startTlsRequired: bool | None = None
    checkServerIdentity: bool | None = None
    trustAll: bool | None = None
    trustHosts: list[str] | None = None


@dataclass(frozen=True)
class OutboundTlsConfig:
    ports: list[int] = field(default_factory=lambda: [25])
    startTlsEnabled: bool = True
    startTlsRequired: bool = False
    checkServerIdentity: bool = True
    trustAll: bool = False
    failOnTrustAll: bool = False
    trustHosts: list[str] = field(default_factory=list)
    connectTimeoutMs: int = 15000
    readTimeoutMs: int = 15000
    caFile: str = ""  # PEM bundle of trusted CAs for outbound TLS; empty = system trust store


@dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = False
    connectTimeoutMs: int = 3000
    readTimeoutMs: int = 5000
    policyCacheDir: str = ""  # empty = <smtp.spool.dir>/mta-sts (persisted across restarts)
    httpsPortOverride: int = 0  # TEST ONLY: fetch policies from this port instead of 443


@dataclass(frozen=True)
class DaneConfig:
    enabled: bool = False
    mode: str = "rfc7672"  # rfc7672 (DNSSEC-authenticated TLSA) | basic (TLSA present → TLS)


@dataclass(frozen=True)
class TlsRptConfig:
    enabled: bool = False
    reportingOrg: str = ""  # empty = smtp.hostname
    contactInfo: str = ""  # empty = postmaster@<smtp.hostname>
    intervalSeconds: int = 86400
    fromAddress: str = ""  # empty = postmaster@<smtp.hostname>
    stateDir: str = ""  # empty = <smtp.spool.dir>/tls-rpt


@dataclass(frozen=True)
class OutboundPolicyConfig:
    mtaSts: MtaStsConfig = field(default_factory=MtaStsConfig)
    dane: DaneConfig = field(default_factory=DaneConfig)
    tlsRpt: TlsRptConfig = field(default_factory=TlsRptConfig)


@dataclass(frozen=True)
class ConnectionCacheConfig:
    enabled: bool = True
    idleSeconds: float = 2.0
    maxUses: int = 100


@dataclass(frozen=True)
class RelayConfig:
    enabled: bool = False
    requireAuthForRelay: bool = True
    failOnOpenRelay: bool = False
    allowedSenderDomains: list[str] = field(default_factory=list)
    allowedClientCidrs: list[str] = field(default_factory=list)
    defaultRoute: RouteConfig | None = None
    routes: list[RouteConfig] = field(default_factory=list)
    outboundTls: OutboundTlsConfig = field(default_factory=OutboundTlsConfig)
    outboundPolicy: OutboundPolicyConfig = field(default_factory=OutboundPolicyConfig)
    rules: list[str] = field(default_factory=list)  # dotted paths of extra IRelayAccessPolicy rules
    maxConnectionsPerDestination: int = 5
    connectionCache: ConnectionCacheConfig = field(default_factory=ConnectionCacheConfig)


WORKER_SOCKETS = ("reuseport", "shared")


@dataclass(frozen=True)
class SmtpConfig:
    port: int = 2525
    # Processes serving the SMTP listeners; 0 = one per CPU core, 1 = one process.
    workers: int = 0
    # How they share a port: "reuseport" = a socket each (SO_REUSEPORT, the kernel hashes
    # connections over them whether their process is busy or not), "shared" = one listening
    # socket that every process inherits (a free process takes the next connection).
    workerSockets: str = "reuseport"
    hostname: str = "localhost"
    serviceName: str = "ESMTP"
    listeners: list[ListenerConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ssl: SslConfig = field(default_factory=SslConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    redis: RedisConfig | None = None
    sentArchive: SentArchiveConfig = field(default_factory=SentArchiveConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    rateLimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)

    def effective_listeners(self) -> list[ListenerConfig]:
        if self.listeners:
            return list(self.listeners)
        return [ListenerConfig(port=self.port, serviceName=self.serviceName)]


@dataclass(frozen=True)
class ManagementServerConfig:
    port: int = 8081
    bindAddress: str = "127.0.0.1"


@dataclass(frozen=True)
class ExposureConfig:
    include: list[str] = field(default_factory=lambda: ["health", "info", "metrics", "prometheus"])


@dataclass(frozen=True)
class WebEndpointsConfig:
    exposure: ExposureConfig = field(default_factory=ExposureConfig)


@dataclass(frozen=True)
class EndpointsConfig:
    web: WebEndpointsConfig = field(default_factory=WebEndpointsConfig)


@dataclass(frozen=True)
class ProbesConfig:
    enabled: bool = True
    add_additional_paths: bool = field(default=True, metadata=_key("add-additional-paths"))


@dataclass(frozen=True)
class HealthEndpointConfig:
    probes: ProbesConfig = field(default_factory=ProbesConfig)


@dataclass(frozen=True)
class EndpointConfig:
    health: HealthEndpointConfig = field(default_factory=HealthEndpointConfig)


@dataclass(frozen=True)
class MetricsConfig:
    # Recipient domains that get their own `domain` label on smtp_spool_delivery_failure_total;
    # every other domain is counted as "other" (keeps the series count bounded).
    trackedDomains: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ManagementConfig:
    enabled: bool = True
    server: ManagementServerConfig = field(default_factory=ManagementServerConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"
    level: str = "info"
    file: str = "stdout"

    @property
    def to_file(self) -> bool:
        """``file`` names a file (not stdout/stderr): checked, opened and reopened."""
        return self.file not in ("", "stdout", "stderr", "-")


@dataclass(frozen=True)
class Config:
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    management: ManagementConfig = field(default_factory=ManagementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading

T = TypeVar("T")


def yaml_key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key", f.name))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _expand(text: str, path: str, problems: list[str], env: typing.Mapping[str, str]) -> str:
    """``${NAME}`` / ``${NAME:default}`` in ``text``; a default may hold placeholders of its
    own (``${A:${B:x}}``: A, else B, else x), braces balanced as Spring does."""
    if "${" not in text:
        return text
    out: list[str] = []
    i = 0
    while True:
        j = text.find("${", i)
        if j < 0:
            out.append(text[i:])
            break
        m = _NAME.match(text, j + 2)
        k = m.end() if m else j + 2
        if m is None or k >= len(text) or text[k] not in ":}":
            out.append(text[i:k])  # not a placeholder: literal text
            i = k
            continue
        default: str | None = None
        if text[k] == "}":
            end = k + 1
        else:
            depth, q = 1, k + 1
            while q < len(text) and depth:
                if text.startswith("${", q):
                    depth, q = depth + 1, q + 2
                    continue
                depth -= text[q] == "}"
                q += 1
            if depth:  # unbalanced: the rest is literal text
                out.append(text[i:])
                break
            default, end = text[k + 1:q - 1], q
        out.append(text[i:j])
        name = m.group(0)
        if name in env:
            out.append(env[name])
        elif default is None:
            problems.append(f"{path}: environment variable {name} is not set and has no default")
        else:
            out.append(_expand(default, path, problems, env))
        i = end
    return "".join(out)


def _resolve_placeholders(value: Any, path: str, problems: list[str],
                          env: typing.Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _expand(value, path, problems, env)
    if isinstance(value, dict):
        return {k: _resolve_placeholders(v, f"{path}.{k}" if path else str(k), problems, env)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_placeholders(v, f"{path}[{i}]", problems, env)
                for i, v in enumerate(value)]
    return value


def _coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)  # type: ignore[arg-type]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:  # a key whose items are all commented out
            value = []
        elif isinstance(value, str) and not dataclasses.is_dataclass(item_tp):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not dataclasses.is_dataclass(item_tp):
            value = [value]  # one item given without the list (ports: 587)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return []
        return [_coerce(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return {}
        out: dict[str, str] = {}
        for k, v in value.items():
            if v is None or isinstance(v, (bool, dict, list)):
                # (``alice:`` with no value became the password "None")
                problems.append(f"{path}.{k}: expected a string, got "
                                f"{'nothing' if v is None else repr(v)} (quote it)")
                continue
            out[str(k)] = str(v)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        problems.append(f"{path}: expected true or false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return 0
        try:
            return int(str(value).strip())
        except ValueError:
            problems.append(f"{path}: expected an integer, got {value!r}")
            return 0
    if tp is float:
        if not isinstance(value, bool):
            try:
                number = float(str(value).strip())
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        problems.append(f"{path}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{path}: expected a string, got {type(value).__name__}")
            return ""
        return "" if value is None else str(value)
    return value


# Top-level sections of the Kotlin server's Spring configuration that its runbook has operators
# set: where the same thing is configured here.
_FOREIGN_HINTS = {
    "server": " (Spring's server.shutdown: the drain here is always graceful, its length "
              "smtp.lifecycle.gracefulShutdownTimeoutMs)",
    "spring": " (Spring's lifecycle timeout: smtp.lifecycle.gracefulShutdownTimeoutMs)",
}


def _build(cls: type[T], data: Any, path: str, problems: list[str]) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    data = _expand_dotted(data, fields)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        sub = f"{path}.{key}" if path else key
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else _FOREIGN_HINTS.get(sub, "")
            problems.append(f"{sub}: unknown key{hint}")
            continue
        f = fields[key]
        kwargs[f.name] = _coerce(hints[f.name], value, sub, problems)
    return cls(**kwargs)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def _expand_dotted(data: dict[Any, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Spring-style dotted keys (``endpoints.web.exposure.include``) become nesting, merged
    with any nested spelling of the same section whatever the order."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        head, _, rest = key.partition(".")
        if key not in fields and rest and head in fields:
            nested: Any = value
            for part in reversed(rest.split(".")):
                nested = {part: nested}
            value, key = nested, head
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_text(text: str, env: typing.Mapping[str, str] | None = None,
              create_dirs: DirMode = True) -> Config:
    """Parse YAML text into a validated :class:`Config` or raise :class:`ConfigError`.
    ``create_dirs``: create missing storage/spool directories (True: the server's start-up),
    only check that they exist (False: operator commands) or that they exist or could be
    created ("check": check-config)."""
    problems: list[str] = []
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
        duplicates = list(_duplicate_keys(yaml.compose(text))) if text.strip() else []
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)]) from None
    if duplicates:
        raise ConfigError(duplicates)
    raw = _resolve_placeholders(raw, "", problems, os.environ if env is None else env)
    config = _build(Config, raw, "", problems)
    # The checks run even when some values were refused (those keys hold their defaults
    # then), so that one run lists every problem; none repeats a key already named.
    parse_problems = list(problems)
    try:
        checked = validate(config, create_dirs=create_dirs if not parse_problems else "check")
    except (TypeError, ValueError, AttributeError, OSError) as exc:  # a check we got wrong:
        # still a clear answer and exit code, not a traceback
        checked = [] if parse_problems else [
            f"the configuration could not be checked ({exc}); please report this"]
    named = {p.split(":", 1)[0] for p in parse_problems}
    problems.extend(p for p in checked if p.split(":", 1)[0] not in named)
    if problems:
        raise ConfigError(problems)
    return config


def _duplicate_keys(node: Any, path: str = "") -> typing.Iterator[str]:
    """Keys given twice in one mapping, by path: yaml.safe_load keeps the last silently (a
    second ``smtp:`` section at the end of a file dropped the whole first one). Merge keys
    (``<<: *defaults``) may still be overridden, as YAML means them to be."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or \
                    not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                yield f"{key}: duplicate key (lines {seen[key_node.value]} and {line})"
            seen.setdefault(key_node.value, line)
            yield from _duplicate_keys(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]")


def _yaml_error(exc: yaml.YAMLError) -> str:
    """Where and what, without the offending line: PyYAML quotes it, and a mistyped line is
    often a password (``alice: Kx9: secret``), which then reached the journal."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = "; ".join(str(t) for t in (getattr(exc, "context", None),
                                      getattr(exc, "problem", None)) if t)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {what or type(exc).__name__}"


def load(path: str, env: typing.Mapping[str, str] | None = None,
         create_dirs: DirMode = True) -> Config:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {path} is not UTF-8 text (byte {exc.start})"]) from None
    return load_text(text, env, create_dirs=create_dirs)


# ---------------------------------------------------------------------------------------------
# Validation


DirMode = bool | typing.Literal["check"]


def _writable_dir(path: str, key: str, problems: list[str], create: DirMode = True) -> None:
    """``create``: True makes a missing directory (the server's start-up), False wants it to
    exist (operator commands on a spool), "check" wants it to exist or be creatable and
    creates nothing (check-config: it must not change the system it checks)."""
    if not path:
        problems.append(f"{key}: must be set")
        return
    if create == "check" and not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"{key}: directory {path} does not exist and cannot be created "
                            f"({parent} is not a writable directory)")
        return
    if create is not True:
        if not os.path.isdir(path):
            problems.append(f"{key}: directory {path} does not exist")
        elif create == "check" and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{key}: directory {path} is not writable")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        problems.append(f"{key}: cannot create directory {path}: {exc.strerror}")
        return
    if not os.access(path, os.W_OK | os.X_OK):
        problems.append(f"{key}: directory {path} is not writable")


def _check_port(port: int, key: str, problems: list[str], lowest: int = 0) -> None:
    """``lowest`` 0 for listeners (0: any free port), 1 for ports we connect to."""
    if not lowest <= port <= 65535:
        problems.append(f"{key}: port {port} is outside {lowest}..65535")


def _check_choice(value: str, choices: tuple[str, ...], key: str, problems: list[str]) -> None:
    if value not in choices:
        problems.append(f"{key}: must be one of {', '.join(choices)}, got {value!r}")


def is_bcrypt_hash(value: str) -> bool:
    return bool(re.match(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$", value))


def _addresses_overlap(a: str, b: str) -> bool:
    """Whether listening on ``a`` and on ``b`` (same port) would collide: the same address,
    ``::`` (dual-stack: every address), or the IPv4 wildcard with an IPv4 address."""
    a, b = a.strip().lower() or "0.0.0.0", b.strip().lower() or "0.0.0.0"
    if a == b or "::" in (a, b):
        return True
    return (a == "0.0.0.0" and ":" not in b) or (b == "0.0.0.0" and ":" not in a)


def validate(config: Config, create_dirs: DirMode = True) -> list[str]:
    """Semantic checks; returns the problems found (empty when the config can start)."""
    p: list[str] = []
    s = config.smtp
    _check_port(s.port, "smtp.port", p)
    for i, lst in enumerate(s.listeners):
        _check_port(lst.port, f"smtp.listeners[{i}].port", p)
        if lst.idleTimeoutSeconds < 0:
            p.append(f"smtp.listeners[{i}].idleTimeoutSeconds: must be >= 0")
        if lst.implicitTls and not s.ssl.enabled:
            p.append(f"smtp.listeners[{i}].implicitTls: requires smtp.ssl.enabled=true")
    _check_port(config.management.server.port, "management.server.port", p)
    # Two sockets on one address and port cannot both listen: said here, not by a traceback
    # from the second bind at start-up (wildcards overlap every address of their family).
    bound: list[tuple[str, str, int]] = []
    for i, lst in enumerate(s.effective_listeners()):
        key = f"smtp.listeners[{i}].port" if s.listeners else "smtp.port"
        clash = next((k for k, a, port in bound if port == lst.port != 0
                      and _addresses_overlap(a, lst.bindAddress)), None)
        if clash:
            p.append(f"{key}: {lst.port} on {lst.bindAddress or '*'} is already {clash}")
        bound.append((key, lst.bindAddress, lst.port))
    m = config.management
    clash = next((k for k, a, port in bound if m.enabled and port == m.server.port != 0
                  and _addresses_overlap(a, m.server.bindAddress)), None)
    if clash:
        p.append(f"management.server.port: {m.server.port} is already {clash} (the management "
                 "port is never an SMTP port)")
    if not s.hostname:
        p.append("smtp.hostname: must be set")
    for i, domain in enumerate([s.routing.localDomain, *s.routing.localDomains]):
        key = "smtp.routing.localDomain" if i == 0 else f"smtp.routing.localDomains[{i - 1}]"
        if domain and not domain.isascii() and \
                canonical_domain(domain) == domain.strip().lower().rstrip("."):
            p.append(f"{key}: {domain!r} is not a valid internationalised domain name")
    _writable_dir(s.storage.mailboxDir, "smtp.storage.mailboxDir", p, create_dirs)
    _writable_dir(s.storage.tempDir, "smtp.storage.tempDir", p, create_dirs)
    _writable_dir(s.storage.listsDir, "smtp.storage.listsDir", p, create_dirs)
    _check_choice(s.spool.type, ("auto", "file", "redis"), "smtp.spool.type", p)
    if spool_backend(config) == "file":
        _writable_dir(s.spool.dir, "smtp.spool.dir", p, create_dirs)
    if s.spool.type == "redis" and s.redis is None:
        p.append("smtp.spool.type: 'redis' requires an smtp.redis section")
    for key, value in (("smtp.limits.maxMessageSizeBytes", s.limits.maxMessageSizeBytes),
                       ("smtp.limits.maxRecipients", s.limits.maxRecipients),
                       ("smtp.spool.workerConcurrency", s.spool.workerConcurrency),
                       ("smtp.spool.retryDelaySeconds", s.spool.retryDelaySeconds),
                       ("smtp.plugins.localDeliveryTimeoutSeconds",
                        s.plugins.localDeliveryTimeoutSeconds)):
        if value <= 0:
            p.append(f"{key}: must be positive, got {value}")
    if not 0 <= s.workers <= 256:
        p.append(f"smtp.workers: must be between 0 (one per core) and 256, got {s.workers}")
    if s.workerSockets not in WORKER_SOCKETS:
        p.append(f"smtp.workerSockets: must be one of {', '.join(WORKER_SOCKETS)}, "
                 f"got {s.workerSockets!r}")
    if s.limits.maxCommandLineLength < 512:
        p.append("smtp.limits.maxCommandLineLength: must be at least 512 (RFC 5321 §4.5.3.1.4)")
    cc = s.relay.connectionCache
    if not 0 < cc.idleSeconds <= 300:
        p.append(f"smtp.relay.connectionCache.idleSeconds: must be in (0, 300], "
                 f"got {cc.idleSeconds}")
    if cc.maxUses < 1:
        p.append(f"smtp.relay.connectionCache.maxUses: must be at least 1, got {cc.maxUses}")
    if not 1 <= s.spool.ioThreads <= 64:
        p.append(f"smtp.spool.ioThreads: must be between 1 and 64, got {s.spool.ioThreads}")
    if s.spool.maxRetries < 0:
        p.append("smtp.spool.maxRetries: must be >= 0")
    _check_choice(s.ssl.minTlsVersion, ("TLSv1.2", "TLSv1.3"), "smtp.ssl.minTlsVersion", p)
    if s.ssl.enabled:
        readable = True
        for key, path in (("smtp.ssl.certChainFile", s.ssl.certChainFile),
                          ("smtp.ssl.privateKeyFile", s.ssl.privateKeyFile)):
            if path and os.path.isdir(path):
                p.append(f"{key}: {path!r} is a directory, not a PEM file")
                readable = False
            elif not path or not os.access(path, os.R_OK):
                p.append(f"{key}: file {path!r} is missing or not readable")
                readable = False
        if readable:
            _check_pem(s.ssl.certChainFile, s.ssl.privateKeyFile, p)
    if s.ssl.cipherSuites:
        _check_ciphers(s.ssl.cipherSuites, p)
    _check_choice(s.sentArchive.mode, ("TRUSTED_SUBMISSION", "AUTHENTICATED_ONLY", "DISABLED"),
                  "smtp.sentArchive.mode", p)
    _check_choice(s.auth.rateLimitBackend, ("local", "redis"), "smtp.auth.rateLimitBackend", p)
    _check_choice(s.rateLimit.backend, ("local", "redis"), "smtp.rateLimit.backend", p)
    if s.redis is not None:  # what twistd and the CLI parse at start: refused here already
        from kotlin_smtp_py.redisconn import parse_target

        try:
            parse_target(s.redis)
        except ValueError as exc:
            p.append(str(exc))
    else:  # (else twistd refused to start what check-config called OK)
        if s.rateLimit.backend == "redis":
            p.append("smtp.rateLimit.backend: 'redis' requires an smtp.redis section")
        if s.auth.rateLimitEnabled and s.auth.rateLimitBackend == "redis":
            p.append("smtp.auth.rateLimitBackend: 'redis' requires an smtp.redis section")
    if not 1 <= s.rateLimit.ipv6PrefixLength <= 128:
        p.append("smtp.rateLimit.ipv6PrefixLength: must be between 1 and 128, got "
                 f"{s.rateLimit.ipv6PrefixLength}")
    if s.rateLimit.redis.connectionCounterTtlSeconds < 3:  # its heartbeat runs every ttl/3
        p.append("smtp.rateLimit.redis.connectionCounterTtlSeconds: must be at least 3, got "
                 f"{s.rateLimit.redis.connectionCounterTtlSeconds}")
    if s.auth.rateLimitEnabled:
        for key, value in (("smtp.auth.rateLimitWindowSeconds", s.auth.rateLimitWindowSeconds),
                           ("smtp.auth.rateLimitLockoutSeconds",
                            s.auth.rateLimitLockoutSeconds)):
            if value <= 0:
                p.append(f"{key}: must be positive, got {value}")
    _check_choice(s.relay.outboundPolicy.dane.mode, ("rfc7672", "basic"),
                  "smtp.relay.outboundPolicy.dane.mode", p)
    _check_port(s.relay.outboundPolicy.mtaSts.httpsPortOverride,
                "smtp.relay.outboundPolicy.mtaSts.httpsPortOverride", p)
    for i, port in enumerate(s.relay.outboundTls.ports):
        _check_port(port, f"smtp.relay.outboundTls.ports[{i}]", p, lowest=1)
    if s.relay.defaultRoute is not None:
        _check_port(s.relay.defaultRoute.port, "smtp.relay.defaultRoute.port", p, lowest=1)
    for i, route in enumerate(s.relay.routes):
        _check_port(route.port, f"smtp.relay.routes[{i}].port", p, lowest=1)
    if s.relay.outboundPolicy.tlsRpt.intervalSeconds < 60:
        p.append("smtp.relay.outboundPolicy.tlsRpt.intervalSeconds: must be >= 60")
    if not s.auth.allowPlaintextPasswords:
        plain = sorted(u for u, v in s.auth.users.items() if not is_bcrypt_hash(v))
        if plain:
            p.append("smtp.auth.users: plaintext passwords are not allowed "
                     f"(allowPlaintextPasswords=false) for: {', '.join(plain)}")
    for i, cidr in enumerate(s.proxy.trustedCidrs):
        _check_cidr(cidr, f"smtp.proxy.trustedCidrs[{i}]", p)
    for i, cidr in enumerate(s.relay.allowedClientCidrs):
        _check_cidr(cidr, f"smtp.relay.allowedClientCidrs[{i}]", p)
    for i, cidr in enumerate(s.rateLimit.exemptCidrs):
        _check_cidr(cidr, f"smtp.rateLimit.exemptCidrs[{i}]", p)
    if s.relay.enabled and s.relay.failOnOpenRelay and relay_is_open(config):
        p.append("smtp.relay: relay is open to anyone (requireAuthForRelay=false and no "
                 "allowedClientCidrs/allowedSenderDomains) and failOnOpenRelay=true")
    tls = s.relay.outboundTls
    routes = [r for _, r in _named_routes(s)]
    if tls.failOnTrustAll and (tls.trustAll or any(r.trustAll for r in routes)):
        p.append("smtp.relay.outboundTls.trustAll: trustAll is set but failOnTrustAll=true")
    # trustHosts: ["*"] trusts every certificate exactly as trustAll does.
    if tls.failOnTrustAll and any(h.strip() == "*" for h in [
            *tls.trustHosts, *(h for r in routes for h in (r.trustHosts or []))]):
        p.append("smtp.relay.outboundTls.trustHosts: '*' trusts every certificate (as "
                 "trustAll) but failOnTrustAll=true")
    log_file = config.logging.file
    if config.logging.to_file:
        folder = os.path.dirname(os.path.abspath(log_file))
        if os.path.isdir(log_file):
            p.append(f"logging.file: {log_file} is a directory")
        elif os.path.exists(log_file) and not os.access(log_file, os.W_OK):
            p.append(f"logging.file: {log_file} is not writable")
        elif not os.path.exists(log_file) and not (os.path.isdir(folder)
                                                   and os.access(folder, os.W_OK | os.X_OK)):
            p.append(f"logging.file: cannot create {log_file} ({folder} is not a writable "
                     "directory)")
    _check_choice(config.logging.format, ("text", "json"), "logging.format", p)
    _check_choice(config.logging.level.lower(), ("debug", "info", "warn", "warning", "error"),
                  "logging.level", p)
    # No duration is negative (a negative DNS timeout deferred every message; 0 means "off"
    # or "at once" where a key allows it, and those keys say so).
    p.extend(f"{key}: must not be negative, got {value}"
             for key, value in _durations(config, "")
             if value < 0 and not any(q.startswith(f"{key}:") for q in p))
    return p


_DURATION_SUFFIXES = ("Ms", "Millis", "Seconds")


def _durations(obj: Any, path: str) -> typing.Iterator[tuple[str, float]]:
    """Every duration key (named ``...Ms``/``...Millis``/``...Seconds``) with its value,
    inside lists (listeners, routes) too."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _durations(item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            key = f"{path}.{yaml_key(f)}" if path else yaml_key(f)
            value = getattr(obj, f.name)
            if key.endswith(_DURATION_SUFFIXES) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                yield key, value
            else:
                yield from _durations(value, key)


def _check_pem(cert_path: str, key_path: str, problems: list[str]) -> None:
    """The certificate chain and key must parse and belong together."""
    from OpenSSL import SSL, crypto

    try:
        with open(cert_path, "rb") as fh:
            cert = crypto.load_certificate(crypto.FILETYPE_PEM, fh.read())
    except OSError as exc:
        problems.append(f"smtp.ssl.certChainFile: cannot read {cert_path}: {exc.strerror}")
        return
    except (crypto.Error, ValueError) as exc:
        problems.append(f"smtp.ssl.certChainFile: {cert_path} is not a PEM certificate ({exc})")
        return
    try:
        with open(key_path, "rb") as fh:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, fh.read())
    except OSError as exc:
        problems.append(f"smtp.ssl.privateKeyFile: cannot read {key_path}: {exc.strerror}")
        return
    except (crypto.Error, ValueError) as exc:
        problems.append(f"smtp.ssl.privateKeyFile: {key_path} is not a PEM private key ({exc})")
        return
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate(cert)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error:
        problems.append(f"smtp.ssl.privateKeyFile: {key_path} does not match the certificate "
                        f"in {cert_path}")


def _check_cidr(cidr: str, key: str, problems: list[str]) -> None:
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        problems.append(f"{key}: {cidr!r} is not a valid CIDR")


def _check_ciphers(suites: list[str], p: list[str]) -> None:
    """The TLS 1.2 cipher list as the server context will take it (Twisted refuses a list
    with no usable cipher at start-up, without naming the key)."""
    from twisted.internet import ssl as tssl

    text = ":".join(suites)
    try:
        tssl.CertificateOptions(acceptableCiphers=tssl.AcceptableCiphers.fromOpenSSLCipherString(
            text))  # type: ignore[no-untyped-call]
    except Exception as exc:
        p.append(f"smtp.ssl.cipherSuites: no usable cipher in {text!r} ({exc}); give OpenSSL "
                 "names of TLS 1.2 ciphers (e.g. ECDHE-RSA-AES256-GCM-SHA384); TLS 1.3 suites "
                 "are not configured here")


def relay_is_open(config: Config) -> bool:
    r = config.smtp.relay
    return r.enabled and not r.requireAuthForRelay and not r.allowedClientCidrs \
        and not r.allowedSenderDomains


def spool_backend(config: Config) -> str:
    """The spool type after resolving ``auto``: redis when smtp.redis is configured."""
    t = config.smtp.spool.type
    if t == "auto":
        return "redis" if config.smtp.redis is not None else "file"
    return t


def _named_routes(s: SmtpConfig) -> list[tuple[str, Any]]:
    """Every relay route with its key path: the routes, then the default route."""
    named: list[tuple[str, Any]] = [(f"smtp.relay.routes[{i}]", r)
                                    for i, r in enumerate(s.relay.routes)]
    if s.relay.defaultRoute is not None:
        named.append(("smtp.relay.defaultRoute", s.relay.defaultRoute))
    return named


def warnings(config: Config) -> list[str]:
    """Risky but legal settings, printed at start-up and by ``check-config``."""
    w: list[str] = []
    s = config.smtp
    if relay_is_open(config):
        w.append("relay is open: unauthenticated clients may relay to any domain")
    elif s.relay.enabled and s.relay.allowedSenderDomains and not s.relay.allowedClientCidrs:
        # The envelope sender is whatever the client says: anyone can claim such a domain.
        w.append("smtp.relay.allowedSenderDomains without allowedClientCidrs: any client that "
                 "gives a sender in those domains may relay (senders are not verified)")
    if s.relay.outboundTls.trustAll:
        w.append("smtp.relay.outboundTls.trustAll=true: outbound TLS certificates are not verified")
    named = _named_routes(s)
    for key, route in named:
        if route.trustAll:
            w.append(f"{key}.trustAll=true: certificates of {route.host or 'that route'} are "
                     "not verified")
    for key, hosts in [("smtp.relay.outboundTls.trustHosts", s.relay.outboundTls.trustHosts),
                       *((f"{k}.trustHosts", r.trustHosts or []) for k, r in named)]:
        if any(h.strip() == "*" for h in hosts):
            w.append(f"{key}: '*' trusts every certificate (as trustAll)")
    plain = [u for u, v in s.auth.users.items() if not is_bcrypt_hash(v)]
    if plain:
        w.append(f"smtp.auth.users: plaintext passwords for {len(plain)} user(s); use "
                 "`kotlin-smtp hash-password`")
    for flag in ("vrfyEnabled", "expnEnabled", "etrnEnabled"):
        if getattr(s.features, flag):
            w.append(f"smtp.features.{flag}=true")
    return w


# ---------------------------------------------------------------------------------------------
# Effective config (for logs and check-config)


def to_plain(obj: Any, mask: bool = True) -> Any:
    """The config as plain data with YAML key names; secrets masked."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if mask and f.metadata.get("secret") and value:
                value = ({k: "******" for k in value} if isinstance(value, dict) else "******")
            elif mask and f.name == "url" and isinstance(value, str):
                value = mask_url_password(value)
            out[yaml_key(f)] = to_plain(value, mask)
        return out
    if isinstance(obj, list):
        return [to_plain(v, mask) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v, mask) for k, v in obj.items()}
    return obj


def mask_url_password(url: str) -> str:
    """``redis://:secret@host/0`` → ``redis://:******@host/0`` (the example config's form)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:******@{host}"


def leaf_values(config: Config) -> dict[str, Any]:
    """Every leaf key path (``smtp.ssl.enabled``) with its value as plain data, secrets
    unmasked; lists and maps are leaves (``smtp.auth.users`` is one)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{yaml_key(f)}" if path else yaml_key(f))
        else:
            out[path] = to_plain(obj, mask=False)

    walk(config, "")
    return out


def dump_effective(config: Config) -> str:
    return yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=False)


def schema_keys(cls: type[Any] = Config, prefix: str = "") -> list[str]:
    """Every leaf key path of the schema (``smtp.limits.maxRecipients``,
    ``smtp.listeners[].port``)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{yaml_key(f)}" if prefix else yaml_key(f)
        tp = hints[f.name]
        if typing.get_origin(tp) in (Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if dataclasses.is_dataclass(tp):
            keys.extend(schema_keys(tp, path))  # type: ignore[arg-type]
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys.extend(schema_keys(typing.get_args(tp)[0], path + "[]"))
        else:
            keys.append(path)
    return keys
