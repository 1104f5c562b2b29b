"""Local delivery: recipients in our domains go to Maildirs; lists expand at delivery time.

Lists expand recursively in memory (with a visited set, so lists that include each other end);
local members are written directly, remote members are resubmitted to the spool as one new entry
(relayed like any other mail). The list recipient counts as delivered once both are durable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from kotlin_smtp_py.envelope import AddressError, Envelope, Recipient, parse_mailbox
from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.local.directory import LocalDirectory, read_list
from kotlin_smtp_py.local.maildir import maildir_name, write_maildir
from kotlin_smtp_py.log import debug_enabled
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus, Reason

log = Logger()
MAX_LIST_DEPTH = 8
Result = tuple[Recipient, DeliveryStatus]


def maildir_prefix(sender: str, recipient: str) -> bytes:
    """The lines a local delivery puts above the message (RFC 5321 §4.4 Return-Path)."""
    return (b"Return-Path: <" + sender.encode("utf-8") + b">\r\n"
            + b"Delivered-To: " + recipient.encode("utf-8") + b"\r\n")



@dataclass(frozen=True)
class ListProblem:
    """A list member that reaches nobody: an unknown local user (``unknown``), a list nested
    deeper than MAX_LIST_DEPTH (``too_deep``), a member naming a list that is being expanded
    already (``loop``), or a line that is no address (``invalid``)."""

    address: str
    kind: str = "unknown"

    @property
    def too_deep(self) -> bool:
        return self.kind == "too_deep"

    @property
    def text(self) -> str:
        why = {"too_deep": f"lists nested deeper than {MAX_LIST_DEPTH}",
               "loop": "a list that includes itself (mail loop)",
               "invalid": "not an address"}.get(self.kind, "no such user here")
        return f"{self.address}: {why}"


@implementer(IDelivery)
class LocalDelivery:
    """Delivers to ``mailboxDir/<user>/Maildir`` and expands ``listsDir/<list>`` files."""

    def __init__(self, directory: LocalDirectory, is_local_domain: Callable[[str], bool],
                 resubmit: Callable[[Envelope, str], defer.Deferred[Any]] | None = None,
                 run_in_thread: Callable[..., defer.Deferred[Any]] | None = None) -> None:
        self.directory = directory
        self.is_local_domain = is_local_domain
        self.resubmit = resubmit
        self._thread = run_in_thread or threads.deferToThread

    def expand(self, address: str) -> tuple[list[str], list[str]]:
        """(local mailbox names, remote addresses) that ``address`` stands for."""
        local, remote, _ = self.expand_checked(address)
        return local, remote

    def expand_checked(self, address: str) -> tuple[list[str], list[str], list[ListProblem]]:
        """Like :meth:`expand`, plus the list members that reach nobody (unknown local
        users, lists nested deeper than MAX_LIST_DEPTH)."""
        local: list[str] = []
        remote: list[str] = []
        problems: list[ListProblem] = []
        seen: set[str] = set()
        expanding: set[str] = set()  # the lists on the way down to this member

        def visit(addr: str, depth: int) -> None:
            text = addr.strip()
            if depth > 0:
                # List files as people write them (Postfix's :include: files too): <a@b>,
                # a trailing dot on the domain, and a bare name for a user of ours.
                if text.startswith("<") and text.endswith(">"):
                    text = text[1:-1].strip()
                text = text.rstrip(".") if "@" in text else text
            if depth > 0 and "@" not in text:
                local_part = text
            else:
                try:
                    parsed = parse_mailbox(text, utf8=True)
                except AddressError:
                    problems.append(ListProblem(addr, "invalid"))
                    return
                if not self.is_local_domain(parsed.domain):
                    if text.lower() not in seen:
                        seen.add(text.lower())
                        remote.append(str(parsed))
                    return
                local_part = parsed.local
            name = self.directory.resolve(local_part)
            if name is None:
                if depth > 0:
                    problems.append(ListProblem(addr, "unknown"))
                return
            if name in seen:
                if name in expanding:
                    problems.append(ListProblem(addr, "loop"))
                return
            seen.add(name)
            list_path = self.directory.list_path(name)
            if list_path is not None and depth < MAX_LIST_DEPTH:
                expanding.add(name)
                for member in read_list(list_path):
                    visit(member, depth + 1)
                expanding.discard(name)
            elif list_path is not None:
                problems.append(ListProblem(addr, "too_deep"))
            else:
                local.append(name)

        visit(address, 0)
        return local, remote, problems

    def _deliver_one_sync(self, entry: QueueEntry, message_path: str, rcpt: Recipient,
                          written: set[str]) -> tuple[DeliveryStatus, list[str]]:
        """``written``: the mailboxes this delivery run wrote already (updated here)."""
        try:
            parse_mailbox(rcpt.address, utf8=True)
        except AddressError:  # never "delivered" to an address nobody can parse
            return DeliveryStatus.permanent_failure(
                Reason.RECIPIENT, "bad recipient address syntax", "5.1.3"), []
        local, remote, problems = self.expand_checked(rcpt.address)
        for problem in problems:
            log.warn("list {recipient} of {queue_id}: member {problem}", recipient=rcpt.address,
                     queue_id=entry.queue_id, problem=problem.text,
                     event="list_member_unreachable")
        if not local and not remote:
            if self.directory.resolve(rcpt.address.rpartition("@")[0]) is None:
                return DeliveryStatus.permanent_failure(
                    Reason.RECIPIENT, "no such user here", "5.1.1"), []
            if problems:
                # Like Postfix's bounce of an alias whose members all fail: the sender learns
                # the list reached nobody (5.4.6 for a nesting loop or depth, RFC 3463).
                deep = any(p.kind in ("too_deep", "loop") for p in problems)
                return DeliveryStatus.permanent_failure(
                    Reason.RECIPIENT,
                    "list reaches no one: " + "; ".join(p.text for p in problems[:5]),
                    "5.4.6" if deep else "5.1.1"), []
            return replace(DeliveryStatus.delivered("list has no members"),
                           success_action="expanded"), []
        # Earlier recipients of this run that reached the same mailbox (alice, ALICE,
        # alice+tag, a list with alice) wrote it already; on a first delivery nothing else
        # would notice once a reader moved that copy to cur/.
        fresh = [m for m in local if m not in written]
        self.write_copies(entry.queue_id, entry.envelope, rcpt.address, fresh, message_path,
                          check_existing=not entry.first_delivery)
        written.update(fresh)
        status = DeliveryStatus.delivered(f"delivered to {len(local)} mailbox(es)")
        if self._is_list(rcpt.address):
            # RFC 3461 §6.2.7.3: a list's success is "expanded"; its members' notices (SUCCESS
            # dropped for them) are the list's business.
            status = replace(status, success_action="expanded")
        return status, remote

    def _is_list(self, address: str) -> bool:
        name = self.directory.resolve(address.rpartition("@")[0])
        return name is not None and self.directory.list_path(name) is not None

    def write_copies(self, queue_id: str, envelope: Envelope, address: str,
                     mailboxes: Sequence[str], message: str | bytes | bytearray,
                     check_existing: bool) -> None:
        """Blocking: the copies of one message for ``address`` into ``mailboxes`` (see
        ``write_maildir`` for ``message`` and ``check_existing``); raises OSError."""
        prefix = maildir_prefix(envelope.sender, address)
        error: OSError | None = None
        for name in mailboxes:
            try:
                fresh = write_maildir(self.directory.maildir(name),
                                      # One copy per mailbox per message, like Postfix's
                                      # local(8) duplicate elimination (alice, alice+tag,
                                      # lists with alice).
                                      maildir_name(queue_id, name, envelope.received_at),
                                      prefix, message, check_existing=check_existing)
            except OSError as exc:
                # The other members still get theirs (one broken mailbox held up the whole
                # list); the retry finds their copies by name and writes only the missing.
                log.warn("copy of {queue_id} for {recipient} into mailbox {mailbox} failed: "
                         "{error}", queue_id=queue_id, recipient=address, mailbox=name,
                         error=str(exc), event="mailbox_write_failed")
                error = error or exc
                continue
            if debug_enabled():
                log.debug("delivered {queue_id} to {recipient} mailbox {mailbox}{dup}",
                          queue_id=queue_id, recipient=address, mailbox=name,
                          dup="" if fresh else " (already present)", event="delivered")
        if error is not None:
            raise error

    @defer.inlineCallbacks
    def _deliver(self, entry: QueueEntry, message_path: str,
                 recipients: Sequence[Recipient]) -> Any:
        results: list[Result] = []
        written: set[str] = set()
        for rcpt in recipients:
            try:
                status, remote = yield self._thread(self._deliver_one_sync, entry, message_path,
                                                    rcpt, written)
                if remote:
                    if self.resubmit is None:
                        status = DeliveryStatus.permanent_failure(
                            Reason.POLICY, "list has remote members but relay is unavailable",
                            "5.7.1")
                    else:
                        # The members inherit what the sender asked for the list address
                        # (RFC 3461 §5.2.7.3): its NOTIFY (a success notice is the list's own
                        # business, so SUCCESS is dropped), the list as original recipient,
                        # RET, ENVID and the arrival time.
                        notify = tuple(n for n in rcpt.notify if n.upper() != "SUCCESS")
                        if rcpt.notify and not notify:
                            notify = ("NEVER",)
                        orcpt = rcpt.orcpt or f"rfc822;{rcpt.address}"
                        src = entry.envelope
                        env = Envelope(sender=src.sender,
                                       recipients=tuple(Recipient(a, notify, orcpt)
                                                        for a in remote),
                                       helo=src.helo, peer=src.peer, smtputf8=src.smtputf8,
                                       body=src.body, ret=src.ret, envid=src.envid,
                                       size=src.size, received_at=src.received_at,
                                       message_id=src.message_id)
                        yield self.resubmit(env, message_path)
            except OSError as exc:
                log.error("local delivery of {queue_id} to {recipient} failed: {error}",
                          queue_id=entry.queue_id, recipient=rcpt.address, error=str(exc))
                status = DeliveryStatus.transient(Reason.OTHER, f"mailbox unavailable: {exc}",
                                                  "4.2.0")
            except Exception as exc:  # never raise out of a delivery: unknown = transient
                log.failure("local delivery of {queue_id} failed", queue_id=entry.queue_id)
                status = DeliveryStatus.transient(Reason.OTHER, f"local delivery error: {exc}",
                                                  "4.3.0")
            results.append((rcpt, status))
        return results

    def deliver(self, entry: QueueEntry, message_path: str,
                recipients: Sequence[Recipient]) -> defer.Deferred[list[Result]]:
        return self._deliver(entry, message_path, recipients)  # type: ignore[no-any-return]
