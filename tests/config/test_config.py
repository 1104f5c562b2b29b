"""Config validation (SPEC §2): every bad config is refused with a message naming the key.

Most cases go through ``config.load_text`` with an explicit environment; the last ones run
``twistd -n smtp --config bad.yaml`` and prove it exits non-zero, says why on stderr, and never
opens its port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from kotlin_smtp_py import config as cfg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from helpers import TCP_LISTEN, process_socket_inodes, tcp_socket_inodes
from mtaproc import TWISTD, make_config, proc_env, write_config


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    """A valid config whose paths all live under tmp_path."""
    return make_config(tmp_path / "data")


def _merge(conf: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    from helpers import deep_merge

    return deep_merge(conf, extra)


def _load(conf: dict[str, Any] | str, env: dict[str, str] | None = None) -> cfg.Config:
    text = conf if isinstance(conf, str) else yaml.safe_dump(conf, sort_keys=False)
    return cfg.load_text(text, env={} if env is None else env)


def _problems(conf: dict[str, Any] | str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        _load(conf, env)
    assert str(info.value).startswith("invalid configuration:")
    for p in info.value.problems:
        assert p in str(info.value)
    return info.value.problems


def _one(conf: dict[str, Any] | str, key: str, *fragments: str,
         env: dict[str, str] | None = None) -> str:
    """Exactly the problems about ``key`` — and the message names it and says what is wrong."""
    problems = _problems(conf, env)
    mine = [p for p in problems if p.startswith(key + ":") or p.startswith(key + " ")]
    assert mine, f"no problem names {key!r}: {problems}"
    for frag in fragments:
        assert any(frag in p for p in mine), (frag, mine)
    return mine[0]


def test_base_config_is_valid(base: dict[str, Any]) -> None:
    config = _load(base)
    assert config.smtp.hostname == "mx.test"
    assert cfg.validate(config) == []


# -- unknown keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra,key,suggestion", [
    ({"smtp": {"limits": {"maxRecipent": 5}}}, "smtp.limits.maxRecipent", "maxRecipients"),
    ({"smpt": {}}, "smpt", "smtp"),
    ({"smtp": {"spool": {"retryDelaySecond": 5}}}, "smtp.spool.retryDelaySecond",
     "retryDelaySeconds"),
    ({"smtp": {"listeners": [{"port": 2525, "bindAdress": "127.0.0.1"}]}},
     "smtp.listeners[0].bindAdress", "bindAddress"),
    ({"management": {"server": {"prot": 1}}}, "management.server.prot", "port"),
])
def test_unknown_key_names_path_and_nearest_key(base: dict[str, Any], extra: dict[str, Any],
                                                key: str, suggestion: str) -> None:
    msg = _one(_merge(base, extra), key, "unknown key")
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_without_close_match_has_no_bogus_hint(base: dict[str, Any]) -> None:
    msg = _one(_merge(base, {"smtp": {"zzzzqqqq": 1}}), "smtp.zzzzqqqq", "unknown key")
    assert "did you mean" not in msg


def test_every_problem_is_reported_at_once(base: dict[str, Any]) -> None:
    problems = _problems(_merge(base, {"smtp": {"port": "x", "colour": 1,
                                                "limits": {"maxRecipients": "many"}}}))
    assert any(p.startswith("smtp.port:") for p in problems)
    assert any(p.startswith("smtp.colour:") for p in problems)
    assert any(p.startswith("smtp.limits.maxRecipients:") for p in problems)


# -- types ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,key,fragment", [
    ({"smtp": {"port": "twenty-five"}}, "smtp.port", "expected an integer"),
    ({"smtp": {"port": True}}, "smtp.port", "expected an integer"),
    ({"smtp": {"limits": {"maxMessageSizeBytes": 1.5e3}}}, "smtp.limits.maxMessageSizeBytes",
     "expected an integer"),
    ({"smtp": {"ssl": {"enabled": "maybe"}}}, "smtp.ssl.enabled", "expected true or false"),
    ({"smtp": {"routing": {"localDomains": {"a": 1}}}}, "smtp.routing.localDomains",
     "expected a list"),
    ({"smtp": {"auth": {"users": ["alice"]}}}, "smtp.auth.users", "expected a mapping"),
    ({"smtp": {"hostname": ["a", "b"]}}, "smtp.hostname", "expected a string"),
    ({"smtp": {"limits": 5}}, "smtp.limits", "expected a mapping"),
    ({"smtp": {"listeners": "2525"}}, "smtp.listeners", "expected a list"),
    ({"smtp": {"relay": {"connectionCache": {"idleSeconds": "abc"}}}},
     "smtp.relay.connectionCache.idleSeconds", "expected a number"),
    ({"smtp": {"relay": {"connectionCache": {"idleSeconds": True}}}},
     "smtp.relay.connectionCache.idleSeconds", "expected a number"),
    ({"smtp": {"relay": {"connectionCache": {"idleSeconds": ".nan"}}}},
     "smtp.relay.connectionCache.idleSeconds", "expected a number"),
    ({"smtp": {"relay": {"outboundTls": {"ports": [25, 70000]}}}},
     "smtp.relay.outboundTls.ports[1]", "outside 1..65535"),
    ({"smtp": {"relay": {"routes": [{"domain": "x.test", "host": "h", "port": 0}]}}},
     "smtp.relay.routes[0].port", "outside 1..65535"),
    ({"smtp": {"relay": {"defaultRoute": {"host": "h", "port": 99999}}}},
     "smtp.relay.defaultRoute.port", "outside 1..65535"),
])
def test_wrong_types_name_key(base: dict[str, Any], extra: dict[str, Any], key: str,
                              fragment: str) -> None:
    _one(_merge(base, extra), key, fragment)


def test_string_values_are_coerced_like_environment_values(base: dict[str, Any]) -> None:
    config = _load(_merge(base, {"smtp": {"port": " 2526 ", "ssl": {"enabled": "false"},
                                          "routing": {"localDomains": "a.test, b.test"}}}))
    assert config.smtp.port == 2526
    assert config.smtp.ssl.enabled is False
    assert config.smtp.routing.localDomains == ["a.test", "b.test"]


def test_spring_shutdown_keys_point_to_ours(base: dict[str, Any]) -> None:
    """The Kotlin server's runbook sets Spring's shutdown keys: refused, naming our key."""
    conf = _merge(base, {"server": {"shutdown": "graceful"},
                         "spring": {"lifecycle": {"timeout-per-shutdown-phase": "30s"}}})
    _one(conf, "server", "unknown key", "smtp.lifecycle.gracefulShutdownTimeoutMs")
    _one(conf, "spring", "unknown key", "smtp.lifecycle.gracefulShutdownTimeoutMs")


def test_number_values_from_placeholders(base: dict[str, Any]) -> None:
    """A float key set through ${VAR:default} (a string until coerced) is a number."""
    conf = _merge(base, {"smtp": {"relay": {"connectionCache": {"idleSeconds": "${IDLE:3}"}}}})
    assert _load(conf).smtp.relay.connectionCache.idleSeconds == 3.0
    assert _load(conf, env={"IDLE": "0.5"}).smtp.relay.connectionCache.idleSeconds == 0.5
    _one(conf, "smtp.relay.connectionCache.idleSeconds", "expected a number",
         env={"IDLE": "soon"})


@pytest.mark.parametrize("text", ["smtp: [unclosed", "smtp:\n  port: 1\n port: 2\n"])
def test_yaml_syntax_error(text: str) -> None:
    problems = _problems(text)
    assert problems[0].startswith("YAML syntax error")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(str(tmp_path / "nope.yaml"))
    assert "cannot read config file" in str(info.value)
    assert "nope.yaml" in str(info.value)


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1.1", "TLSv1", "tlsv1.2", "SSLv3", ""])
def test_bad_min_tls_version(base: dict[str, Any], version: str) -> None:
    _one(_merge(base, {"smtp": {"ssl": {"minTlsVersion": version}}}), "smtp.ssl.minTlsVersion",
         "TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_good_min_tls_version(base: dict[str, Any], version: str) -> None:
    assert _load(_merge(base, {"smtp": {"ssl": {"minTlsVersion": version}}})) \
        .smtp.ssl.minTlsVersion == version


@pytest.mark.parametrize("port", [-1, 65536, 100000])
@pytest.mark.parametrize("where,key", [
    ("smtp", "smtp.port"),
    ("listener", "smtp.listeners[0].port"),
    ("management", "management.server.port"),
])
def test_port_out_of_range(base: dict[str, Any], port: int, where: str, key: str) -> None:
    if where == "smtp":
        extra: dict[str, Any] = {"smtp": {"port": port}}
    elif where == "listener":
        extra = {"smtp": {"listeners": [{"port": port}]}}
    else:
        extra = {"management": {"server": {"port": port}}}
    _one(_merge(base, extra), key, str(port), "0..65535")


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_edges_accepted(base: dict[str, Any], port: int) -> None:
    management = {0: 0, 1: 65535, 65535: 1}[port]  # (never the SMTP port itself)
    config = _load(_merge(base, {"smtp": {"listeners": [{"port": port}]},
                                 "management": {"server": {"port": management}}}))
    assert config.smtp.listeners[0].port == port
    assert config.management.server.port == management


def test_tls_enabled_without_cert_or_key(base: dict[str, Any], tmp_path: Path) -> None:
    problems = _problems(_merge(base, {"smtp": {"ssl": {"enabled": True}}}))
    assert any(p.startswith("smtp.ssl.certChainFile:") for p in problems), problems
    assert any(p.startswith("smtp.ssl.privateKeyFile:") for p in problems), problems
    missing = str(tmp_path / "missing.pem")
    msg = _one(_merge(base, {"smtp": {"ssl": {"enabled": True, "certChainFile": missing,
                                              "privateKeyFile": missing}}}),
               "smtp.ssl.certChainFile", "missing or not readable")
    assert missing in msg


def test_tls_enabled_with_readable_files(base: dict[str, Any], certs: Any) -> None:
    config = _load(_merge(base, {"smtp": {"ssl": {"enabled": True,
                                                  "certChainFile": str(certs.cert),
                                                  "privateKeyFile": str(certs.key)}}}))
    assert config.smtp.ssl.enabled


def test_implicit_tls_listener_requires_ssl(base: dict[str, Any]) -> None:
    _one(_merge(base, {"smtp": {"listeners": [{"port": 4650, "implicitTls": True}]}}),
         "smtp.listeners[0].implicitTls", "smtp.ssl.enabled")


@pytest.mark.parametrize("key", ["mailboxDir", "tempDir", "listsDir"])
def test_unwritable_storage_path(base: dict[str, Any], tmp_path: Path, key: str) -> None:
    # Tests run as root, so permissions do not stop us: a path *under a regular file* can never
    # be created.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = str(blocker / "sub")
    msg = _one(_merge(base, {"smtp": {"storage": {key: bad}}}), f"smtp.storage.{key}",
               "cannot create directory")
    assert bad in msg


def test_unwritable_spool_dir(base: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one(_merge(base, {"smtp": {"spool": {"dir": str(blocker / "spool")}}}), "smtp.spool.dir",
         "cannot create directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a 0o500 directory")
def test_read_only_storage_dir_for_non_root(base: dict[str, Any], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    _one(_merge(base, {"smtp": {"storage": {"mailboxDir": str(ro)}}}), "smtp.storage.mailboxDir",
         "not writable")


def test_empty_storage_path(base: dict[str, Any]) -> None:
    _one(_merge(base, {"smtp": {"storage": {"mailboxDir": ""}}}), "smtp.storage.mailboxDir",
         "must be set")


def test_plaintext_password_refused_when_not_allowed(base: dict[str, Any]) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    msg = _one(_merge(base, {"smtp": {"auth": {"allowPlaintextPasswords": False,
                                               "users": {"alice": "hunter2", "bob": hashed}}}}),
               "smtp.auth.users", "plaintext passwords are not allowed", "alice")
    assert "hunter2" not in msg  # never echo the secret
    assert "bob" not in msg
    config = _load(_merge(base, {"smtp": {"auth": {"allowPlaintextPasswords": False,
                                                   "users": {"bob": hashed}}}}))
    assert config.smtp.auth.users == {"bob": hashed}


def test_plaintext_password_allowed_by_default_but_warned(base: dict[str, Any]) -> None:
    config = _load(_merge(base, {"smtp": {"auth": {"users": {"alice": "hunter2"}}}}))
    assert any("plaintext passwords" in w for w in cfg.warnings(config))


def test_fail_on_open_relay(base: dict[str, Any]) -> None:
    relay = {"enabled": True, "requireAuthForRelay": False, "failOnOpenRelay": True}
    _one(_merge(base, {"smtp": {"relay": relay}}), "smtp.relay", "open", "failOnOpenRelay")
    # Not open once an allowlist restricts it; and open but allowed when failOnOpenRelay=false.
    _load(_merge(base, {"smtp": {"relay": {**relay, "allowedClientCidrs": ["10.0.0.0/8"]}}}))
    _load(_merge(base, {"smtp": {"relay": {**relay, "requireAuthForRelay": True}}}))
    config = _load(_merge(base, {"smtp": {"relay": {**relay, "failOnOpenRelay": False}}}))
    assert any("relay is open" in w for w in cfg.warnings(config))


def test_sender_domains_alone_are_warned_about(base: dict[str, Any]) -> None:
    """The envelope sender is unverified: a sender-domain allowlist without a client allowlist
    lets anyone relay who claims such a sender (start-up and check-config say so)."""
    relay = {"enabled": True, "allowedSenderDomains": ["example.org"]}
    config = _load(_merge(base, {"smtp": {"relay": relay}}))
    assert any("senders are not verified" in w for w in cfg.warnings(config))
    both = _load(_merge(base, {"smtp": {"relay": {**relay,
                                                  "allowedClientCidrs": ["10.0.0.0/8"]}}}))
    assert not any("senders are not verified" in w for w in cfg.warnings(both))


@pytest.mark.parametrize("where", ["outboundTls", "route", "defaultRoute"])
def test_fail_on_trust_all(base: dict[str, Any], where: str) -> None:
    relay: dict[str, Any] = {"enabled": True, "outboundTls": {"failOnTrustAll": True}}
    if where == "outboundTls":
        relay["outboundTls"]["trustAll"] = True
    elif where == "route":
        relay["routes"] = [{"domain": "*", "host": "smarthost.test", "trustAll": True}]
    else:
        relay["defaultRoute"] = {"host": "smarthost.test", "trustAll": True}
    _one(_merge(base, {"smtp": {"relay": relay}}), "smtp.relay.outboundTls.trustAll",
         "failOnTrustAll")
    relay["outboundTls"]["failOnTrustAll"] = False
    _load(_merge(base, {"smtp": {"relay": relay}}))


@pytest.mark.parametrize("extra,key", [
    ({"smtp": {"limits": {"maxRecipients": 0}}}, "smtp.limits.maxRecipients"),
    ({"smtp": {"limits": {"maxMessageSizeBytes": -5}}}, "smtp.limits.maxMessageSizeBytes"),
    ({"smtp": {"limits": {"maxCommandLineLength": 100}}}, "smtp.limits.maxCommandLineLength"),
    ({"smtp": {"spool": {"type": "s3"}}}, "smtp.spool.type"),
    ({"smtp": {"spool": {"workerConcurrency": 0}}}, "smtp.spool.workerConcurrency"),
    ({"smtp": {"sentArchive": {"mode": "ALWAYS"}}}, "smtp.sentArchive.mode"),
    ({"smtp": {"proxy": {"trustedCidrs": ["10.0.0.0/33"]}}}, "smtp.proxy.trustedCidrs[0]"),
    ({"smtp": {"listeners": [{"port": 25, "idleTimeoutSeconds": -1}]}},
     "smtp.listeners[0].idleTimeoutSeconds"),
    ({"logging": {"format": "xml"}}, "logging.format"),
    ({"logging": {"level": "chatty"}}, "logging.level"),
])
def test_bad_values_name_key(base: dict[str, Any], extra: dict[str, Any], key: str) -> None:
    _one(_merge(base, extra), key)


# -- placeholders -----------------------------------------------------------------------------


PLACEHOLDER_YAML = textwrap.dedent("""\
    smtp:
      hostname: ${SMTP_HOSTNAME:mx.default.test}
      port: ${SMTP_PORT:2600}
      storage:
        mailboxDir: ${BOX_ROOT}/mailboxes
        tempDir: ${BOX_ROOT}/temp
        listsDir: ${BOX_ROOT}/lists
      spool:
        dir: ${SPOOL_DIR:@DEFAULT_SPOOL@}
      ssl:
        enabled: ${TLS_ON:false}
    """)


def test_placeholders_unset_use_default(tmp_path: Path) -> None:
    config = cfg.load_text(PLACEHOLDER_YAML.replace("@DEFAULT_SPOOL@", f"{tmp_path}/spool"),
                           env={"BOX_ROOT": str(tmp_path)})
    assert config.smtp.hostname == "mx.default.test"
    assert config.smtp.port == 2600
    assert config.smtp.storage.mailboxDir == f"{tmp_path}/mailboxes"
    assert config.smtp.spool.dir == f"{tmp_path}/spool"
    assert config.smtp.ssl.enabled is False


def test_placeholders_set_override_default(tmp_path: Path) -> None:
    env = {"BOX_ROOT": str(tmp_path), "SMTP_HOSTNAME": "mx.env.test", "SMTP_PORT": "2700",
           "SPOOL_DIR": str(tmp_path / "envspool"), "TLS_ON": "false"}
    text = PLACEHOLDER_YAML.replace("@DEFAULT_SPOOL@", "/nonexistent")
    config = cfg.load_text(text, env=env)
    assert config.smtp.hostname == "mx.env.test"
    assert config.smtp.port == 2700
    assert config.smtp.spool.dir == str(tmp_path / "envspool")


def test_placeholder_set_to_empty_string_is_used(base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base).replace("hostname: mx.test", "hostname: ${HN:mx.default.test}")
    _one(text, "smtp.hostname", "must be set", env={"HN": ""})


def test_placeholder_unset_without_default_is_an_error(base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base).replace("hostname: mx.test", "hostname: ${NO_SUCH_VAR_X}")
    msg = _one(text, "smtp.hostname", "NO_SUCH_VAR_X", "not set")
    assert "no default" in msg


def test_placeholder_value_is_type_checked(base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base).replace("idleTimeoutSeconds: 60", "idleTimeoutSeconds: ${IDLE}")
    _one(text, "smtp.listeners[0].idleTimeoutSeconds", "expected an integer",
         env={"IDLE": "soon"})


def test_placeholder_from_process_environment(base: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSMTP_TEST_HOSTNAME", "mx.process-env.test")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base).replace("hostname: mx.test",
                                                 "hostname: ${KSMTP_TEST_HOSTNAME}"))
    assert cfg.load(str(path)).smtp.hostname == "mx.process-env.test"


# -- Spring-style dotted keys -----------------------------------------------------------------


def test_spring_dotted_keys(base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base) + textwrap.dedent("""\
        management.endpoint.health.probes.enabled: false
        """)
    text = text.replace("management:\n", "management:\n"
                        "  endpoints.web.exposure.include: health,prometheus\n"
                        "  endpoint.health.probes.add-additional-paths: false\n", 1)
    config = _load(text)
    assert config.management.endpoints.web.exposure.include == ["health", "prometheus"]
    assert config.management.endpoint.health.probes.add_additional_paths is False
    assert config.management.endpoint.health.probes.enabled is False
    assert config.management.server.port == base["management"]["server"]["port"]


def test_spring_dotted_key_and_nested_section_combine(base: dict[str, Any]) -> None:
    """A dotted key must not be lost when the same section is also written nested (any order)."""
    for first_dotted in (True, False):
        items = [("endpoint.health.probes.enabled", False),
                 ("endpoint", {"health": {"probes": {"add-additional-paths": False}}})]
        if not first_dotted:
            items.reverse()
        mgmt = {**base["management"], **dict(items)}
        config = _load({**base, "management": mgmt})
        probes = config.management.endpoint.health.probes
        assert (probes.enabled, probes.add_additional_paths) == (False, False), first_dotted


def test_spring_dotted_unknown_key_named(base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base).replace(
        "management:\n", "management:\n  endpoints.web.exposure.inclued: health\n", 1)
    msg = _one(text, "management.endpoints.web.exposure.inclued", "unknown key")
    assert "include" in msg


def test_spring_underscore_property_name(base: dict[str, Any]) -> None:
    _one(_merge(base, {"management": {"endpoint": {"health": {"probes": {
        "add_additional_paths": False}}}}}),
        "management.endpoint.health.probes.add_additional_paths", "unknown key",
        "add-additional-paths")


# -- defaults ---------------------------------------------------------------------------------


SPEC_DEFAULTS = {
    "smtp.port": 2525, "smtp.hostname": "localhost", "smtp.serviceName": "ESMTP",
    "smtp.limits.maxMessageSizeBytes": 26214400, "smtp.limits.maxRecipients": 100,
    "smtp.limits.maxCommandLineLength": 512, "smtp.ssl.enabled": False,
    "smtp.ssl.minTlsVersion": "TLSv1.2", "smtp.ssl.handshakeTimeoutMs": 30000,
    "smtp.ssl.cipherSuites": [], "smtp.spool.type": "auto", "smtp.spool.maxRetries": 5,
    "smtp.spool.retryDelaySeconds": 60, "smtp.spool.workerConcurrency": 1,
    "smtp.spool.triggerCooldownMillis": 1000, "smtp.spool.redis.keyPrefix": "kotlin-smtp:spool",
    "smtp.spool.redis.maxRawBytes": 26214400, "smtp.spool.redis.lockTtlSeconds": 900,
    "smtp.sentArchive.mode": "TRUSTED_SUBMISSION", "smtp.auth.required": False,
    "smtp.auth.allowPlaintextPasswords": True, "smtp.auth.rateLimitEnabled": True,
    "smtp.auth.rateLimitBackend": "local", "smtp.auth.rateLimitMaxFailures": 5,
    "smtp.auth.rateLimitWindowSeconds": 300, "smtp.auth.rateLimitLockoutSeconds": 600,
    "smtp.auth.rateLimitRedis.keyPrefix": "kotlin-smtp:auth-ratelimit",
    "smtp.rateLimit.backend": "local", "smtp.rateLimit.maxConnectionsPerIp": 10,
    "smtp.rateLimit.maxMessagesPerIpPerHour": 100,
    "smtp.rateLimit.redis.keyPrefix": "kotlin-smtp:conn-ratelimit",
    "smtp.rateLimit.redis.connectionCounterTtlSeconds": 900,
    "smtp.features.vrfyEnabled": False, "smtp.features.expnEnabled": False,
    "smtp.features.etrnEnabled": False, "smtp.proxy.trustedCidrs": ["127.0.0.1/32", "::1/128"],
    "smtp.lifecycle.gracefulShutdownTimeoutMs": 30000, "smtp.dns.timeoutMs": 5000,
    "smtp.relay.enabled": False, "smtp.relay.requireAuthForRelay": True,
    "smtp.relay.failOnOpenRelay": False, "smtp.relay.allowedSenderDomains": [],
    "smtp.relay.allowedClientCidrs": [], "smtp.relay.outboundTls.ports": [25],
    "smtp.relay.outboundTls.startTlsEnabled": True,
    "smtp.relay.outboundTls.startTlsRequired": False,
    "smtp.relay.outboundTls.checkServerIdentity": True, "smtp.relay.outboundTls.trustAll": False,
    "smtp.relay.outboundTls.failOnTrustAll": False, "smtp.relay.outboundTls.trustHosts": [],
    "smtp.relay.outboundTls.connectTimeoutMs": 15000,
    "smtp.relay.outboundTls.readTimeoutMs": 15000,
    "smtp.relay.outboundPolicy.mtaSts.enabled": False,
    "smtp.relay.outboundPolicy.mtaSts.connectTimeoutMs": 3000,
    "smtp.relay.outboundPolicy.mtaSts.readTimeoutMs": 5000,
    "smtp.relay.outboundPolicy.dane.enabled": False,
    "management.server.port": 8081, "management.server.bindAddress": "127.0.0.1",
    "management.endpoints.web.exposure.include": ["health", "info", "metrics", "prometheus"],
    "management.endpoint.health.probes.enabled": True,
    "management.endpoint.health.probes.add-additional-paths": True,
    "logging.format": "text", "logging.level": "info", "logging.file": "stdout",
}

LISTENER_DEFAULTS = {"bindAddress": "0.0.0.0", "implicitTls": False, "enableStartTls": True,
                     "enableAuth": True, "requireAuthForMail": False, "idleTimeoutSeconds": 300,
                     "proxyProtocol": False, "allowPlaintextAuth": False}


def _lookup(plain: dict[str, Any], dotted: str) -> Any:
    node: Any = plain
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: missing at {part!r}"
        node = node[part]
    return node


def test_defaults_match_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # storage defaults are relative (./data/...)
    config = cfg.load_text("", env={})
    plain = cfg.to_plain(config, mask=False)
    wrong = {k: (_lookup(plain, k), v) for k, v in SPEC_DEFAULTS.items()
             if _lookup(plain, k) != v}
    assert not wrong, wrong
    listener = cfg.to_plain(config.smtp.effective_listeners()[0], mask=False)
    assert listener["port"] == 2525
    assert {k: listener[k] for k in LISTENER_DEFAULTS} == LISTENER_DEFAULTS
    assert config.smtp.spool.dir == "./data/spool"
    assert cfg.spool_backend(config) == "file"  # auto without smtp.redis
    # every SPEC key in our sample is a schema key (the names are the contract)
    keys = set(cfg.schema_keys())
    assert set(SPEC_DEFAULTS) <= keys, set(SPEC_DEFAULTS) - keys


def test_embedded_default_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kotlin_smtp_py.twistd import DEFAULT_CONFIG

    monkeypatch.chdir(tmp_path)
    config = cfg.load(DEFAULT_CONFIG, env={"SMTP_PORT": "2999"})
    assert config.smtp.effective_listeners()[0].port == 2999
    assert config.smtp.effective_listeners()[0].bindAddress == "127.0.0.1"
    assert "localhost" in config.smtp.routing.all_local_domains()
    assert (tmp_path / "data" / "spool").is_dir()


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"
    cfg.load(str(example), env={})


# -- twistd refuses to start ------------------------------------------------------------------


def _run_twistd_watching_port(config_path: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Run twistd; while it runs, watch whether *it* listens on ``port`` — it never may.
    (Connecting would also reach another test's server that happens to get the port.)"""
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "smtp", "--config", str(config_path)],
                            cwd=config_path.parent, env=proc_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    connected = False
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if tcp_socket_inodes(port, TCP_LISTEN) & process_socket_inodes(proc.pid):
                connected = True
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not connected, "the SMTP port was opened by a server with an invalid config"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# (Every other kind of problem takes the same path; those are covered in-process above.)
@pytest.mark.parametrize("case", ["unknown-key", "cert-missing"])
def test_twistd_refuses_bad_config(tmp_path: Path, case: str) -> None:
    conf = make_config(tmp_path / "data")
    port = conf["smtp"]["listeners"][0]["port"]
    if case == "unknown-key":
        conf["smtp"]["limits"] = {"maxMesageSizeBytes": 10}
        expect = ["smtp.limits.maxMesageSizeBytes", "did you mean 'maxMessageSizeBytes'"]
    else:
        conf["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(tmp_path / "none.pem"),
                               "privateKeyFile": str(tmp_path / "none.key")}
        expect = ["smtp.ssl.certChainFile", "none.pem", "smtp.ssl.privateKeyFile"]
    path = write_config(tmp_path / "bad.yaml", conf)
    res = _run_twistd_watching_port(path, port)
    assert res.returncode != 0, res
    for fragment in expect:
        assert fragment in res.stderr, (fragment, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "listening" not in res.stdout + res.stderr


def test_twistd_refuses_unparsable_certificate(tmp_path: Path) -> None:
    """A readable but invalid cert passes the file check; start-up must still fail cleanly,
    naming the file, before any port is opened."""
    conf = make_config(tmp_path / "data")
    port = conf["smtp"]["listeners"][0]["port"]
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    conf["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(junk),
                           "privateKeyFile": str(junk)}
    res = _run_twistd_watching_port(write_config(tmp_path / "bad.yaml", conf), port)
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    assert "junk.pem" in res.stderr or "certChainFile" in res.stderr, res.stderr


def test_twistd_missing_config_file(tmp_path: Path) -> None:
    res = subprocess.run([TWISTD, "-n", "--pidfile=", "smtp", "--config",
                          str(tmp_path / "absent.yaml")], cwd=tmp_path, env=proc_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "absent.yaml" in res.stderr and "cannot read config file" in res.stderr, res.stderr


def test_worker_sockets_must_be_a_known_mode(base: dict[str, Any]) -> None:
    _one(_merge(base, {"smtp": {"workerSockets": "round-robin"}}), "smtp.workerSockets",
         "reuseport", "shared", "round-robin")
    for mode in ("reuseport", "shared"):
        assert _load(_merge(base, {"smtp": {"workerSockets": mode}})).smtp.workerSockets == mode
