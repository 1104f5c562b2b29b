"""systemd integration with real processes: Type=notify messages and socket activation."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import free_port, wait_until
from mtaproc import TWISTD, MtaProcess, make_config, proc_env, write_config


def test_notify_ready_after_listeners_and_stopping_on_sigterm(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(120)  # start-up on a loaded CI box can be slow
    conf = make_config(tmp_path / "data")
    cfg = write_config(tmp_path / "config.yaml", conf)
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "data", port, cfg, env={"NOTIFY_SOCKET": notify_path})
    try:
        proc.start(wait=False)
        message = sock.recv(4096).decode()
        assert "READY=1" in message
        # READY is only sent once the listener accepts connections.
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.noop()[0] == 250
        proc.signal(signal.SIGTERM)
        seen = ""
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode()
        assert proc.proc is not None
        assert proc.proc.wait(120) == 0
    finally:
        proc.close()
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None and
                    os.environ.get("CI") != "true", reason="systemd-socket-activate missing")
def test_socket_activation_adopts_the_listening_socket(tmp_path: Path) -> None:
    port = free_port()
    conf = make_config(tmp_path / "data", smtp_port=0)  # the config's own port is not used
    cfg = write_config(tmp_path / "config.yaml", conf)
    log = open(tmp_path / "activate.log", "wb")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=smtp",
         "-E", "PYTHONPATH", TWISTD, "-n", "--pidfile=", "smtp", "--config", str(cfg)],
        env=proc_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        def greeted() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: sa\r\n\r\nx\r\n")
                return True
            except OSError:
                return False

        wait_until(greeted, timeout=60, interval=0.2, message="socket-activated server")
        mail = tmp_path / "data" / "mailboxes" / "alice" / "Maildir" / "new"
        wait_until(lambda: mail.is_dir() and any(mail.iterdir()), message="delivery")
        text = (tmp_path / "activate.log").read_text(errors="replace")
        assert f"127.0.0.1:{port}" in text  # the adopted socket, not the config's port 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
