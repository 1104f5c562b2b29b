"""SIGHUP reloads TLS certificates and the users table without dropping connections."""

from __future__ import annotations

import base64
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from helpers import CertSet, make_certs, wait_until
from mtaproc import MtaProcess, make_config, write_config


def _cert_fingerprint(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO c.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True) or b""


def _auth(port: int, ca: Path, user: str, password: str) -> int:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ssl.create_default_context(cafile=str(ca)))
        s._host = "localhost"
        s.ehlo("c.test")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{user}\0{password}".encode()).decode())
        return code


def test_sighup_swaps_certificate_and_users_keeping_sessions(tmp_path: Path,
                                                             certs: CertSet) -> None:
    conf: dict[str, Any] = make_config(tmp_path / "data", overrides={"smtp": {
        "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                "privateKeyFile": str(certs.key)},
        "auth": {"users": {"olduser": "old-pass"}, "failureDelayMs": 0}}})
    cfg_path = write_config(tmp_path / "config.yaml", conf)
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "data", port, cfg_path).start()
    try:
        before = _cert_fingerprint(port, certs.ca_cert)
        assert _auth(port, certs.ca_cert, "olduser", "old-pass") == 235
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert idle.recv(1024).startswith(b"220")

        other = make_certs(tmp_path / "certs2")  # a new CA: verify against it after reload
        conf["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(other.cert),
                               "privateKeyFile": str(other.key)}
        conf["smtp"]["auth"]["users"] = {"newuser": "new-pass"}
        write_config(cfg_path, conf)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded TLS certificates" in proc.log(), message="reload logged")

        after = _cert_fingerprint(port, other.ca_cert)
        assert after and after != before
        assert _auth(port, other.ca_cert, "newuser", "new-pass") == 235
        assert _auth(port, other.ca_cert, "olduser", "old-pass") == 535
        idle.sendall(b"NOOP\r\n")  # the session opened before the reload is still served
        assert idle.recv(1024).startswith(b"250")
        idle.close()

        write_config(cfg_path, {"smtp": {"nonsense": 1}})  # a broken config changes nothing
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in proc.log(), message="failed reload logged")
        assert _auth(port, other.ca_cert, "newuser", "new-pass") == 235
        assert proc.running()
    finally:
        proc.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("reload-certs"))
