"""Bug hunt: configuration loading and validation, and the operator commands around it.

Pure parsing goes through ``config.load_text`` / ``config.load`` with an explicit environment;
what an operator sees (exit codes, stderr, secrets) runs the real ``kotlin-smtp`` CLI or
``twistd -n smtp`` in a subprocess. Thirty-one cases found bugs (fifteen causes, all fixed
since): nested placeholders, duplicate keys, null/map passwords, problems hidden behind the
first parse error, a certificate path that is a directory, Redis settings only refused at
start-up (and with a traceback), check-config creating directories and printing the password
of a Redis URL, YAML errors echoing the line, negative durations, a single value or nothing
for a list, route trustAll without a warning, hash-password at end of input.
(tests/config/test_config.py and tests/cli/test_cli.py cover the basics; nothing here repeats
them.)
"""

from __future__ import annotations

import os
import select
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
from helpers import deep_merge
from mtaproc import KOTLIN_SMTP, PYTHON, TWISTD, make_config, proc_env, write_config

SECRET = "Zq8-S3cr3t-Wd41"


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    """A valid config whose paths all live (and exist) under tmp_path."""
    return make_config(tmp_path / "data")


def _text(conf: dict[str, Any]) -> str:
    return yaml.safe_dump(conf, sort_keys=False)


def _load(conf: dict[str, Any] | str, env: dict[str, str] | None = None) -> cfg.Config:
    return cfg.load_text(conf if isinstance(conf, str) else _text(conf),
                         env={} if env is None else env)


def _problems(conf: dict[str, Any] | str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        _load(conf, env)
    return info.value.problems


def _about(problems: list[str], key: str) -> list[str]:
    return [p for p in problems if p.startswith(key + ":") or p.startswith(key + " ")]


def run_cli(*args: str, stdin: str | bytes | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    res = subprocess.run([KOTLIN_SMTP, *args], input=data, capture_output=True, timeout=60,
                         env=proc_env(env), cwd=cwd)
    return subprocess.CompletedProcess(res.args, res.returncode,
                                       res.stdout.decode("utf-8", "replace"),
                                       res.stderr.decode("utf-8", "replace"))


def run_twistd(config_path: Path) -> subprocess.CompletedProcess[str]:
    """``twistd -n smtp --config`` on a config start-up must refuse (bounded by a timeout)."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", "smtp", "--config", str(config_path)],
                          cwd=config_path.parent, env=proc_env(), capture_output=True,
                          text=True, timeout=60)


# -- placeholders -----------------------------------------------------------------------------


def test_placeholder_empty_default_and_several_in_one_value(base: dict[str, Any]) -> None:
    conf = deep_merge(base, {"smtp": {"serviceName": "a${EMPTY_DEF:}b ${H:host}:${P:25}"}})
    assert _load(conf).smtp.serviceName == "ab host:25"
    assert _load(conf, env={"H": "mx", "P": "587", "EMPTY_DEF": "-"}).smtp.serviceName \
        == "a-b mx:587"


def test_placeholder_default_may_contain_colons_and_slashes(base: dict[str, Any]) -> None:
    """A URL default (``${REDIS:redis://h:6379/0}``) keeps everything after the first colon,
    written plain in block style as operators do."""
    text = _text(base).replace("  spool:\n", "  redis:\n    url: ${REDIS_URL:redis://h.test:6379/2}\n"
                                             "  spool:\n", 1)
    assert "${REDIS_URL:redis://h.test:6379/2}" in text
    assert _load(text).smtp.redis.url == "redis://h.test:6379/2"  # type: ignore[union-attr]
    assert _load(text, env={"REDIS_URL": "redis://o.test:1/0"}).smtp.redis.url \
        == "redis://o.test:1/0"  # type: ignore[union-attr]


def test_placeholders_in_list_items_and_comma_lists(base: dict[str, Any]) -> None:
    conf = deep_merge(base, {"smtp": {
        "routing": {"localDomains": ["${D1:a.test}", "b.test"]},
        "relay": {"outboundTls": {"ports": "${OUT_PORTS:25,587}",
                                  "trustHosts": "${TRUST:}"}},
        "listeners": [{**base["smtp"]["listeners"][0],
                       "enableAuth": "${AUTH_ON:off}", "idleTimeoutSeconds": "${IDLE:45}"}]}})
    config = _load(conf)
    assert config.smtp.routing.localDomains == ["a.test", "b.test"]
    assert config.smtp.relay.outboundTls.ports == [25, 587]
    assert config.smtp.relay.outboundTls.trustHosts == []
    assert config.smtp.listeners[0].enableAuth is False
    assert config.smtp.listeners[0].idleTimeoutSeconds == 45
    config = _load(conf, env={"D1": "c.test", "OUT_PORTS": "2525", "AUTH_ON": "TRUE",
                              "IDLE": "0"})
    assert config.smtp.routing.localDomains == ["c.test", "b.test"]
    assert config.smtp.relay.outboundTls.ports == [2525]
    assert config.smtp.listeners[0].enableAuth is True
    assert config.smtp.listeners[0].idleTimeoutSeconds == 0


def test_every_unset_placeholder_is_reported_with_its_path(base: dict[str, Any]) -> None:
    conf = deep_merge(base, {"smtp": {"hostname": "${NO_HN_X}",
                                      "routing": {"localDomains": ["x.test", "${NO_DOM_X}"]},
                                      "colour": 1}})
    problems = _problems(conf)
    assert any("NO_HN_X" in p for p in _about(problems, "smtp.hostname")), problems
    assert any("NO_DOM_X" in p for p in _about(problems, "smtp.routing.localDomains[1]")), \
        problems
    assert _about(problems, "smtp.colour"), problems


def test_nested_placeholder_in_default(base: dict[str, Any]) -> None:
    conf = deep_merge(base, {"smtp": {"serviceName": "${OUTER_X:${INNER_X:plain}}"}})
    assert _load(conf).smtp.serviceName == "plain"
    assert _load(conf, env={"INNER_X": "inner"}).smtp.serviceName == "inner"
    assert _load(conf, env={"OUTER_X": "outer", "INNER_X": "inner"}).smtp.serviceName == "outer"


# -- unknown keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra,key,hint", [
    ({"smtp": {"listeners": [{"port": 2600}, {"prot": 2601}]}}, "smtp.listeners[1].prot", "port"),
    ({"smtp": {"relay": {"routes": [{"domain": "a.test", "host": "h"},
                                    {"domain": "b.test", "hots": "h"}]}}},
     "smtp.relay.routes[1].hots", "host"),
    ({"smtp": {"relay": {"routes": [{"domain": "a.test", "host": "h",
                                     "startTlsRequierd": True}]}}},
     "smtp.relay.routes[0].startTlsRequierd", "startTlsRequired"),
    ({"smtp": {"relay": {"defaultRoute": {"host": "h", "passwrod": SECRET}}}},
     "smtp.relay.defaultRoute.passwrod", "password"),
    ({"smtp": {"relay": {"outboundPolicy": {"mtaSts": {"enabeld": True}}}}},
     "smtp.relay.outboundPolicy.mtaSts.enabeld", "enabled"),
    ({"smtp": {"spool": {"redis": {"keyPrefx": "p"}}}}, "smtp.spool.redis.keyPrefx", "keyPrefix"),
    ({"smtp": {"redis": {"pasword": SECRET}}}, "smtp.redis.pasword", "password"),
    ({"smtp": {"ssl": {"minTLSVersion": "TLSv1.3"}}}, "smtp.ssl.minTLSVersion", "minTlsVersion"),
    ({"smtp": {"relay": {"failOnOpenRealy": True}}}, "smtp.relay.failOnOpenRealy",
     "failOnOpenRelay"),
    ({"smtp": {"limits": {"max-recipients": 5}}}, "smtp.limits.max-recipients",
     "maxRecipients"),  # Spring's kebab-case spelling: refused, pointing at ours
    ({"logging": {"levl": "debug"}}, "logging.levl", "level"),
    ({"management": {"endpoint": {"health": {"probes": {"enabeld": True}}}}},
     "management.endpoint.health.probes.enabeld", "enabled"),
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_unknown_key_at_every_level_names_path_and_nearest_key(
        base: dict[str, Any], extra: dict[str, Any], key: str, hint: str) -> None:
    problems = _problems(deep_merge(base, extra))
    mine = _about(problems, key)
    assert mine, problems
    assert "unknown key" in mine[0] and f"'{hint}'" in mine[0], mine
    assert SECRET not in "\n".join(problems)  # the value of a mistyped secret key is not shown


@pytest.mark.parametrize("key,value", [
    ("smtp.lifecycle.gracefulShutdownTimeoutMs", "30s"),
    ("smtp.spool.retryDelaySeconds", "1m"),
    ("smtp.dns.timeoutMs", "5 s"),
])
def test_durations_take_the_unit_of_their_key_only(base: dict[str, Any], key: str,
                                                   value: str) -> None:
    """Not Spring's Duration syntax: the unit is in the key's name, a suffix is refused."""
    section, _, leaf = key.removeprefix("smtp.").rpartition(".")
    extra: dict[str, Any] = {leaf: value}
    for part in reversed(section.split(".")):
        extra = {part: extra}
    mine = _about(_problems(deep_merge(base, {"smtp": extra})), key)
    assert mine and "expected an integer" in mine[0], mine


# -- YAML shapes ------------------------------------------------------------------------------


def test_yaml_anchors_and_merge_keys(base: dict[str, Any]) -> None:
    port = base["smtp"]["listeners"][0]["port"]
    text = _text({k: v for k, v in base.items() if k != "smtp"}) + "smtp:\n" + textwrap.indent(
        _text({k: v for k, v in base["smtp"].items() if k != "listeners"}), "  ") + (
        "  listeners:\n"
        f"  - &mx {{port: {port}, bindAddress: 127.0.0.1, idleTimeoutSeconds: 61}}\n"
        "  - <<: *mx\n"
        "    port: 0\n"
        "    requireAuthForMail: true\n")
    listeners = _load(text).smtp.listeners
    assert [(lst.port, lst.idleTimeoutSeconds, lst.requireAuthForMail) for lst in listeners] \
        == [(port, 61, False), (0, 61, True)]


@pytest.mark.parametrize("text,got", [("- smtp\n- port\n", "list"), ("just text\n", "str"),
                                      ("42\n", "int")])
def test_file_that_is_not_a_mapping(text: str, got: str) -> None:
    problems = _problems(text)
    assert problems == [f"<root>: expected a mapping, got {got}"]


def test_utf8_bom_and_comment_only_file(tmp_path: Path, base: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + _text(base).encode())
    assert cfg.load(str(bom), env={}).smtp.hostname == "mx.test"
    monkeypatch.chdir(tmp_path)  # the defaults' storage paths are relative
    comments = tmp_path / "comments.yaml"
    comments.write_text("# nothing set yet\n\n# smtp:\n#   port: 25\n")
    assert cfg.load(str(comments), env={}).smtp.port == 2525


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(str(tmp_path), env={})
    assert info.value.problems == [f"cannot read config file {tmp_path}: Is a directory"]


@pytest.mark.parametrize("case", ["same-mapping", "second-section"])
def test_duplicate_keys_are_an_error(base: dict[str, Any], case: str) -> None:
    text = _text(base)
    if case == "same-mapping":
        text = text.replace("  hostname: mx.test\n", "  hostname: mx.test\n  hostname: mx2.test\n")
        key = "smtp.hostname"
    else:
        text += "smtp:\n  serviceName: second\n"
        key = "smtp"
    problems = _problems(text)
    assert any(key in p and "duplicate" in p.lower() for p in problems), problems


@pytest.mark.parametrize("value", [None, {"password": "x"}, ["x"]], ids=["null", "map", "list"])
def test_user_password_must_be_a_string(base: dict[str, Any], value: Any) -> None:
    problems = _problems(deep_merge(base, {"smtp": {"auth": {"users": {"alice": value}}}}))
    assert any(p.startswith("smtp.auth.users") and "alice" in p for p in problems), problems


def test_single_number_for_a_list_of_ports(base: dict[str, Any]) -> None:
    assert _load(deep_merge(base, {"smtp": {"relay": {"outboundTls": {"ports": "587"}}}})) \
        .smtp.relay.outboundTls.ports == [587]  # (works: a string)
    assert _load(deep_merge(base, {"smtp": {"relay": {"outboundTls": {"ports": 587}}}})) \
        .smtp.relay.outboundTls.ports == [587]


def test_empty_list_key_is_an_empty_list(base: dict[str, Any]) -> None:
    text = _text(deep_merge(base, {"smtp": {"relay": {"enabled": True}}})).replace(
        "    enabled: true\n",
        "    enabled: true\n    routes:\n    # - {domain: '*', host: smarthost.test}\n", 1)
    assert _load(text).smtp.relay.routes == []


# -- validation: every problem, every refusal -------------------------------------------------


def test_parse_and_semantic_problems_are_listed_together(base: dict[str, Any]) -> None:
    problems = _problems(deep_merge(base, {"smtp": {"colour": 1, "ssl": {"minTlsVersion": "TLSv1"},
                                                    "listeners": [{"port": 70000}]}}))
    assert _about(problems, "smtp.colour"), problems
    assert _about(problems, "smtp.ssl.minTlsVersion"), problems
    assert _about(problems, "smtp.listeners[0].port"), problems


@pytest.mark.parametrize("key", [
    "smtp.dns.timeoutMs", "smtp.relay.outboundTls.connectTimeoutMs",
    "smtp.relay.outboundTls.readTimeoutMs", "smtp.lifecycle.gracefulShutdownTimeoutMs",
    "smtp.relay.outboundPolicy.mtaSts.readTimeoutMs", "smtp.spool.triggerCooldownMillis",
])
def test_negative_timeouts_are_refused(base: dict[str, Any], key: str) -> None:
    extra: Any = -1
    for part in reversed(key.split(".")):
        extra = {part: extra}
    assert _about(_problems(deep_merge(base, extra)), key)


def test_tls_certificate_path_that_is_a_directory(base: dict[str, Any], tmp_path: Path) -> None:
    problems = _problems(deep_merge(base, {"smtp": {"ssl": {
        "enabled": True, "certChainFile": str(tmp_path), "privateKeyFile": str(tmp_path)}}}))
    assert _about(problems, "smtp.ssl.certChainFile"), problems


@pytest.mark.parametrize("redis,key", [
    ({"url": "redis://127.0.0.1:70000/0"}, "smtp.redis.url"),
    ({"url": "http://127.0.0.1:6379/0"}, "smtp.redis.url"),
    ({"sentinels": ["127.0.0.1:26379"]}, "smtp.redis.masterName"),
], ids=["port-out-of-range", "scheme", "sentinels-without-master"])
def test_redis_section_is_validated(base: dict[str, Any], redis: dict[str, Any],
                                    key: str) -> None:
    conf = deep_merge(base, {"smtp": {"spool": {"type": "auto"}, "redis": redis}})
    assert _about(_problems(conf), key)


def test_twistd_lists_every_spec_refusal_without_leaking(tmp_path: Path) -> None:
    """SPEC §2's start-up refusals, all in one file: twistd exits non-zero, names each key,
    shows no traceback and no password."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    conf = make_config(tmp_path / "data", overrides={
        "smtp": {
            "listeners": [{"port": 70000, "bindAddress": "127.0.0.1"}],
            "ssl": {"minTlsVersion": "TLSv1.1"},
            "storage": {"listsDir": str(blocker / "lists")},
            "auth": {"allowPlaintextPasswords": False, "users": {"alice": SECRET}},
            "relay": {"enabled": True, "requireAuthForRelay": False, "failOnOpenRelay": True,
                      "outboundTls": {"trustAll": True, "failOnTrustAll": True},
                      "defaultRoute": {"host": "smarthost.test", "password": SECRET}},
        },
        "management": {"server": {"port": -1}},
    })
    res = run_twistd(write_config(tmp_path / "bad.yaml", conf))
    assert res.returncode != 0, res
    for key in ("smtp.listeners[0].port", "management.server.port", "smtp.ssl.minTlsVersion",
                "smtp.storage.listsDir", "smtp.auth.users", "smtp.relay:",
                "smtp.relay.outboundTls.trustAll"):
        assert key in res.stderr, (key, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_twistd_bad_redis_url_no_traceback(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "spool": {"type": "redis"}, "redis": {"url": "redis://127.0.0.1:70000/0"}}})
    res = run_twistd(write_config(tmp_path / "c.yaml", conf))
    assert res.returncode != 0
    assert "smtp.redis.url" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_twistd_certificate_directory_no_traceback(tmp_path: Path) -> None:
    certdir = tmp_path / "tls"
    certdir.mkdir()
    conf = make_config(tmp_path / "data", overrides={"smtp": {"ssl": {
        "enabled": True, "certChainFile": str(certdir), "privateKeyFile": str(certdir)}}})
    res = run_twistd(write_config(tmp_path / "c.yaml", conf))
    assert res.returncode != 0
    assert "smtp.ssl.certChainFile" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr


# -- check-config -----------------------------------------------------------------------------


@pytest.mark.parametrize("content,fragment", [
    (b"smtp:\n  hostname: caf\xe9.test\n", "not UTF-8"),
    (b"- a\n- b\n", "<root>: expected a mapping"),
    (b"smtp: [unclosed\n", "YAML syntax error"),
    (None, "Is a directory"),
], ids=["latin-1", "list", "syntax", "directory"])
def test_check_config_bad_file_exits_2_without_traceback(tmp_path: Path, content: bytes | None,
                                                         fragment: str) -> None:
    if content is None:
        path = tmp_path / "conf.d"
        path.mkdir()
    else:
        path = tmp_path / "c.yaml"
        path.write_bytes(content)
    res = run_cli("check-config", str(path), cwd=tmp_path)
    assert res.returncode == 2, res
    assert res.stdout == ""
    assert str(path) in res.stderr and fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_check_config_masks_every_secret_key(tmp_path: Path) -> None:
    """Route passwords inside relay.routes[] and the defaultRoute, the Redis password (also when
    it comes from the environment), every user's password; the rest is printed as set."""
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "spool": {"type": "file"},
        "redis": {"sentinels": ["127.0.0.1:26379"], "masterName": "mymaster",
                  "password": "${KS_REDIS_PW}"},
        "auth": {"users": {"alice": SECRET + "a", "bob": SECRET + "b"}},
        "relay": {"enabled": True,
                  "defaultRoute": {"host": "smart.test", "username": "du",
                                   "password": SECRET + "d"},
                  "routes": [{"domain": "a.test", "host": "ha.test"},
                             {"domain": "b.test", "host": "hb.test", "username": "ru",
                              "password": SECRET + "r"}]}}})
    res = run_cli("check-config", str(write_config(tmp_path / "c.yaml", conf)),
                  env={"KS_REDIS_PW": SECRET + "e"})
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    eff = yaml.safe_load(res.stdout)
    smtp = eff["smtp"]
    assert smtp["redis"]["password"] == "******"
    assert smtp["redis"]["masterName"] == "mymaster"
    assert smtp["auth"]["users"] == {"alice": "******", "bob": "******"}
    assert smtp["relay"]["defaultRoute"]["password"] == "******"
    assert [r["password"] for r in smtp["relay"]["routes"]] == ["", "******"]
    assert smtp["relay"]["routes"][1]["username"] == "ru"


def test_check_config_output_is_a_loadable_config(tmp_path: Path, base: dict[str, Any]) -> None:
    """Like ``postconf -n``: the effective config printed is itself a valid config that gives
    the same effective config."""
    first = run_cli("check-config", str(write_config(tmp_path / "c.yaml", base)))
    assert first.returncode == 0, first.stderr
    effective = tmp_path / "effective.yaml"
    effective.write_text(first.stdout)
    second = run_cli("check-config", str(effective))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_check_config_creates_no_directories(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data")
    absent = tmp_path / "not-yet"
    conf["smtp"]["storage"] = {"mailboxDir": str(absent / "mailboxes"),
                               "tempDir": str(absent / "temp"), "listsDir": str(absent / "lists")}
    conf["smtp"]["spool"]["dir"] = str(absent / "spool")
    res = run_cli("check-config", str(write_config(tmp_path / "c.yaml", conf)))
    assert not absent.exists(), (res.returncode, sorted(p.name for p in absent.iterdir()))
    if res.returncode != 0:
        assert "smtp.storage.mailboxDir" in res.stderr, res.stderr


@pytest.mark.parametrize("url", ["redis://:${KS_RPW}@127.0.0.1:6379/0",
                                 "rediss://default:${KS_RPW}@127.0.0.1:6380/1"],
                         ids=["password-only", "user-and-password"])
def test_check_config_masks_password_in_redis_url(tmp_path: Path, url: str) -> None:
    conf = make_config(tmp_path / "data", overrides={"smtp": {"spool": {"type": "file"},
                                                              "redis": {"url": url}}})
    res = run_cli("check-config", str(write_config(tmp_path / "c.yaml", conf)),
                  env={"KS_RPW": SECRET})
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    shown = yaml.safe_load(res.stdout)["smtp"]["redis"]["url"]
    assert "127.0.0.1:63" in shown and "******" in shown, shown


def test_yaml_syntax_error_does_not_echo_a_secret(tmp_path: Path, base: dict[str, Any]) -> None:
    text = _text(base).replace("  hostname: mx.test\n",
                               f"  hostname: mx.test\n  auth:\n    users:\n"
                               f"      alice: Kx9: {SECRET}\n")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = text.splitlines().index(f"      alice: Kx9: {SECRET}") + 1
    res = run_cli("check-config", str(path))
    assert res.returncode == 2
    assert "YAML syntax error" in res.stderr and f"line {line}" in res.stderr, res.stderr
    assert SECRET not in res.stderr, res.stderr


# -- hash-password ----------------------------------------------------------------------------


def _read_until(fd: int, marker: bytes, seen: bytearray, deadline: float) -> None:
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {marker!r}: {bytes(seen)!r}"
            seen.extend(chunk)


def _hash_password_on_a_tty(inputs: list[bytes]) -> tuple[int, str, str]:
    """Run ``kotlin-smtp hash-password`` with a pseudo-terminal as stdin (no controlling
    terminal, so getpass uses stdin); answer each prompt (seen on stderr) with the next
    input. Returns (exit status, stdout, stderr)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([PYTHON, "-m", "kotlin_smtp_py", "hash-password"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc_env(),
                            start_new_session=True)
    os.close(slave)
    try:
        assert proc.stderr is not None
        seen = bytearray()
        deadline = time.monotonic() + 30
        for i, data in enumerate(inputs):
            # The prompt is written after echo is off and pending input is flushed.
            _read_until(proc.stderr.fileno(), [b"Password: ", b"Again: "][i], seen, deadline)
            os.write(master, data)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out.decode(), (bytes(seen) + err).decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_hash_password_from_a_terminal_asks_twice() -> None:
    password = "tty p4ss wörd"
    code, out, err = _hash_password_on_a_tty([password.encode() + b"\n"] * 2)
    assert code == 0, err
    assert bcrypt.checkpw(password.encode(), out.strip().encode())
    assert password not in out + err
    assert "GetPassWarning" not in err  # echo really was turned off
    code, out, err = _hash_password_on_a_tty([b"first\n", b"second\n"])
    assert (code, out) == (2, ""), err
    assert "do not match" in err


def test_hash_password_longer_than_bcrypt_reads_still_verifies() -> None:
    """bcrypt reads 72 bytes: the hash of a longer password must verify through the server's
    own check with the full password (both truncate alike)."""
    from kotlin_smtp_py.inbound.auth import _check_sync

    password = "é" * 50  # 100 bytes
    res = run_cli("hash-password", "--stdin", "--rounds", "4", stdin=password + "\n")
    assert res.returncode == 0, res.stderr
    hashed = res.stdout.strip()
    assert _check_sync(hashed, password.encode(), allow_plaintext=False, cost=4)
    assert not _check_sync(hashed, b"x" + password.encode(), allow_plaintext=False, cost=4)


@pytest.mark.parametrize("case", ["tty-ctrl-d", "pipe-one-line", "pipe-empty"])
def test_hash_password_end_of_input_at_a_prompt(case: str) -> None:
    if case == "tty-ctrl-d":
        code, out, err = _hash_password_on_a_tty([b"\x04"])
    else:
        res = run_cli("hash-password", stdin="only-once\n" if case == "pipe-one-line" else "")
        code, out, err = res.returncode, res.stdout, res.stderr
    assert code == 2, (code, err)
    assert out == ""
    assert "Traceback" not in err, err


def test_hash_password_rounds_out_of_range_is_a_usage_error() -> None:
    for rounds in ("3", "32", "many"):
        res = run_cli("hash-password", "--stdin", "--rounds", rounds, stdin="pw\n")
        assert res.returncode == 2, (rounds, res)
        assert res.stdout == "" and "--rounds" in res.stderr, res.stderr


# -- warnings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["routes", "defaultRoute", "trustHosts"])
def test_route_trust_all_is_warned_like_the_global_one(base: dict[str, Any], where: str) -> None:
    relay: dict[str, Any] = {"enabled": True}
    if where == "routes":
        relay["routes"] = [{"domain": "a.test", "host": "h.test"},
                           {"domain": "*", "host": "smart.test", "trustAll": True}]
    elif where == "defaultRoute":
        relay["defaultRoute"] = {"host": "smart.test", "trustAll": True}
    else:
        relay["outboundTls"] = {"trustHosts": ["*"]}
    warned = cfg.warnings(_load(deep_merge(base, {"smtp": {"relay": relay}})))
    assert any("trust" in w for w in warned), warned
