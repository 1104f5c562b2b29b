"""Who exists locally: mailboxes, mailing lists and AUTH users (RFC 5321 §4.5.1 postmaster).

Local parts map to directory names, so only a conservative character set is ever used as a
path component; anything else simply does not exist (no path tricks reach the file system).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

_SAFE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
RECIPIENT_DELIMITER = "+"


def safe_name(local: str) -> str | None:
    """The file-system name for a local part, or None when it cannot be a local user."""
    if not local.isascii():  # "\u212aarl".lower() is "karl": no mapping onto ASCII names
        return None
    name = local.lower()
    if not _SAFE.match(name) or ".." in name:
        return None
    return name


class LocalDirectory:
    """Looks up local mailboxes and lists; ``postmaster`` always exists."""

    def __init__(self, mailbox_dir: str, lists_dir: str,
                 auth_user: Callable[[str], bool] = lambda _: False) -> None:
        self.mailbox_dir = mailbox_dir
        self.lists_dir = lists_dir
        self._auth_user = auth_user

    def list_path(self, name: str) -> str | None:
        path = os.path.join(self.lists_dir, name)
        return path if os.path.isfile(path) else None

    def _known(self, name: str) -> bool:
        return (name == "postmaster"
                or os.path.isdir(os.path.join(self.mailbox_dir, name))
                or self.list_path(name) is not None
                or self._auth_user(name))

    def resolve(self, local: str) -> str | None:
        """The canonical local name for ``local`` (``alice+tag`` → ``alice``), or None."""
        if not local.isascii():  # lower() maps e.g. KELVIN SIGN to "k": no ASCII look-alikes
            return None
        lowered = local.lower()
        base, sep, _ = lowered.partition(RECIPIENT_DELIMITER)
        for candidate in (lowered, base) if sep else (lowered,):
            name = safe_name(candidate)
            if name is not None and self._known(name):
                return name
        return None

    def maildir(self, name: str) -> str:
        return os.path.join(self.mailbox_dir, name, "Maildir")


def read_list(path: str) -> list[str]:
    """Members of a list file: one address per line, ``#`` comments and blank lines ignored."""
    members: list[str] = []
    # Undecodable bytes (a Latin-1 comment) must not fail every delivery through the list:
    # in a comment they go unseen, in an address they make it an invalid member.
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                members.append(line)
    return members
