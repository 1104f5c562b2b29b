"""A private Postfix instance as a receiving MX (Debian package ``postfix``; `make test` installs
it non-interactively with the debconf answer ``postfix/main_mailer_type select No
configuration``).

Everything lives in one temporary directory (mode 0755 so Postfix's unprivileged daemons can
reach it): ``etc/`` (main.cf, master.cf, the virtual mailbox map), ``queue/``, ``data/``,
``mail/`` (virtual Maildirs) and ``maillog`` (postlogd, since containers have no syslog). The only
listener is ``127.0.0.1:<free port>``; the system instance in /etc/postfix is never touched.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from helpers import CertSet, free_port, wait_until

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_missing() -> str | None:
    """Why Postfix cannot run here, or None."""
    if shutil.which("postfix") is None and not os.path.exists("/usr/sbin/postfix"):
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons drop to the postfix user)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or postdrop group is missing"
    return None


class PostfixInstance:
    def __init__(self, certs: CertSet, domain: str = "normal.test",
                 mailboxes: tuple[str, ...] = ("user",), hostname: str = "mx.test") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kotlin-smtp-postfix-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.domain = domain
        self.hostname = hostname
        self.certs = certs
        self.mailboxes = mailboxes
        self.etc = self.dir / "etc"
        self.maillog = self.dir / "maillog"
        self.started = False

    def _write_config(self) -> None:
        pw = pwd.getpwnam("postfix")
        for sub in ("etc", "queue", "data", "mail", "tls"):
            (self.dir / sub).mkdir()
        for sub in ("data", "mail"):
            os.chown(self.dir / sub, pw.pw_uid, pw.pw_gid)
        # Certificates are read by smtpd before it drops privileges; copy them next to the
        # instance so no path below a 0700 pytest directory is needed.
        tls = self.dir / "tls"
        shutil.copy(self.certs.cert, tls / "server.pem")
        shutil.copy(self.certs.key, tls / "server.key")
        os.chmod(tls / "server.key", 0o600)
        d = self.dir
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {d}/queue
data_directory = {d}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
mydomain = {self.hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
append_dot_mydomain = no
local_header_rewrite_clients =
biff = no
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
virtual_mailbox_domains = {self.domain}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_mailbox_base = {d}/mail
virtual_uid_maps = static:{pw.pw_uid}
virtual_gid_maps = static:{pw.pw_gid}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {tls}/server.pem
smtpd_tls_key_file = {tls}/server.key
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
""")
        (self.etc / "vmailbox").write_text(
            "".join(f"{m}@{self.domain} {m}/\n" for m in self.mailboxes))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        self._write_config()
        run = self._postfix("start")  # runs `postfix check` and creates the queue first
        if run.returncode != 0:
            raise RuntimeError(f"postfix start failed: {run.stderr}{self.log()}")
        self.started = True
        wait_until(self._listening, timeout=15, message=f"postfix on 127.0.0.1:{self.port}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(64).startswith(b"220")
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def messages(self, mailbox: str = "user") -> list[bytes]:
        new = self.dir / "mail" / mailbox / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        if pid is None:
            self._postfix("stop")
            self.started = False
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        # SIGTERM to this instance's master (by its pid) = `postfix abort`: children follow.
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(gone, timeout=10, message="postfix master to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
        self.started = False

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
