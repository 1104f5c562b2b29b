"""Direct local delivery: local recipients get their Maildir copy before the 250, not after.

For mail to our own mailboxes the queue is only a detour: the spool commit writes and fsyncs
the message and its envelope, and a moment later the scheduler leases the entry, writes and
fsyncs the Maildir copy and deletes the entry again (about 3.6 fsyncs, 5 file creations and 4
unlinks per message, measured). The Maildir copy, fsync'd and linked into ``new/`` with the
directory fsync'd, is itself durable storage, so when it is written before the 250 the promise
of the 250 holds and nothing needs queueing.

What goes direct, decided per recipient:
- the router sends it to the built-in :class:`LocalDelivery` (not a plugin, not the relay);
- it expands to local mailboxes only (a list with a remote member is queued, so the remote part
  is relayed as usual);
- it did not ask for a success DSN (NOTIFY=SUCCESS needs the scheduler's notice);
- the message is not owed a sent-archive copy (``archive_owner``: the scheduler makes it).

Everything else, and every recipient whose write fails, is committed to the spool in the same
disk job and delivered (or retried, or bounced) by the scheduler as before: the fallback is the
normal path, so no failure ends in silence. A recipient written here is never queued as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.local.delivery import ListProblem, LocalDelivery, maildir_prefix
from kotlin_smtp_py.local.maildir import finish_copy, maildir_name
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.scheduler import SpoolEvents, log_delivery, log_finished
from kotlin_smtp_py.status import DeliveryStatus

log = Logger()


@dataclass(frozen=True)
class MaildirTarget:
    """Where a message for one local recipient with one mailbox can be written as it arrives
    (a large message then skips its spool file and the copy out of it)."""

    recipient: Recipient
    mailbox: str
    root: str  # the Maildir
    prefix: bytes  # the lines local delivery puts above the message


def _write_failed(queue_id: str, rcpt: Recipient, exc: OSError) -> None:
    log.warn("direct delivery of {queue_id} to {recipient} failed, queueing it: {error}",
             queue_id=queue_id, recipient=rcpt.address, error=str(exc))


def _unreachable(problems: Sequence[ListProblem]) -> bool:
    """Members that reach nobody (the scheduler logs them, or bounces the list); a list that
    names itself again while it reaches others is only a harmless self-reference."""
    return any(p.kind != "loop" for p in problems)


class DirectLocalDelivery:
    """Used by the file spool's commit (``smtp.spool.directLocalDelivery``)."""

    def __init__(self, local: LocalDelivery, routes_to_local: Callable[[Recipient], bool],
                 events: SpoolEvents | None = None) -> None:
        """``routes_to_local``: whether the router hands a recipient to ``local``."""
        self.local = local
        self.routes_to_local = routes_to_local
        self.events = events or SpoolEvents()

    def candidates(self, envelope: Envelope) -> tuple[Recipient, ...]:
        """Reactor thread: the recipients that may go direct (routing plugins need not be
        thread-safe, so this is decided here; the file system is asked on the I/O thread)."""
        if envelope.archive_owner:
            return ()
        return tuple(r for r in envelope.recipients if self._may_go_direct(r))

    def _may_go_direct(self, rcpt: Recipient) -> bool:
        # NOTIFY=SUCCESS needs the scheduler's notice; plugins and the relay deliver the rest.
        if "SUCCESS" in rcpt.notify:
            return False
        try:
            return bool(self.routes_to_local(rcpt))
        except Exception:
            # A routing plugin that fails here (mid-DATA, when a large message starts to
            # spill) only means "not direct": the message is queued, and routing at
            # delivery time retries or bounces it.
            log.failure("routing {recipient} for direct delivery failed; queueing it",
                        recipient=rcpt.address)
            return False

    def _direct_mailboxes(self, rcpt: Recipient) -> list[str] | None:
        """The mailboxes ``rcpt`` stands for when it can go direct; None (or none) leaves it
        to the scheduler: lists with remote or unreachable members (the scheduler logs those
        and bounces a list that reaches no one), unknown users, an unreadable list (only this
        recipient is queued, not the rest)."""
        try:
            mailboxes, remote, problems = self.local.expand_checked(rcpt.address)
        except Exception:
            log.failure("expanding {recipient} for direct delivery failed; queueing it",
                        recipient=rcpt.address)
            return None
        if remote or _unreachable(problems):
            return None
        return mailboxes

    def target(self, sender: str, recipients: Sequence[Recipient]) -> MaildirTarget | None:
        """Reactor thread, before the first byte of a message that outgrew memory: its
        Maildir when it has a single recipient that goes direct to a single mailbox. The
        commit checks the final envelope again (``candidates``) and queues otherwise."""
        if len(recipients) != 1:
            return None
        rcpt = recipients[0]
        if not self._may_go_direct(rcpt):
            return None
        mailboxes = self._direct_mailboxes(rcpt)
        if mailboxes is None or len(mailboxes) != 1:
            return None
        return MaildirTarget(rcpt, mailboxes[0], self.local.directory.maildir(mailboxes[0]),
                             maildir_prefix(sender, rcpt.address))

    def deliver_sync(self, queue_id: str, envelope: Envelope, candidates: Sequence[Recipient],
                     source: bytes | bytearray | str) -> tuple[tuple[Recipient, ...], bool]:
        """I/O thread: write every candidate's copies; returns the recipients fully written,
        and whether a write failed (then some copies of a queued recipient may exist: a list
        with several mailboxes, so its later deliveries must look for them).

        Stops at the first failed write, so the rest is queued (``source``: the message, or
        the path of a file holding it). The caller's disk job fsyncs the ``new/``
        directories before it reports success (``diskio.sync_dir``)."""
        done: list[Recipient] = []
        written: set[str] = set()  # one copy per mailbox (alice, ALICE, alice+tag, lists)
        for rcpt in candidates:
            mailboxes = self._direct_mailboxes(rcpt)
            if not mailboxes:
                continue  # the scheduler's job
            try:
                # No earlier copy can exist: this queue id was never queued or leased.
                self.local.write_copies(queue_id, envelope, rcpt.address,
                                        [m for m in mailboxes if m not in written], source,
                                        check_existing=False)
            except OSError as exc:
                _write_failed(queue_id, rcpt, exc)
                return tuple(done), True
            written.update(mailboxes)
            done.append(rcpt)
        return tuple(done), False

    @staticmethod
    def link_sync(queue_id: str, envelope: Envelope, target: MaildirTarget, fd: int,
                  tmp: str | None) -> bool:
        """I/O thread: finish the copy written into ``target`` as the message arrived (fd
        ``fd``, ``tmp/`` path ``tmp``): fsync, drop it from the page cache, link it into
        ``new/``. False when that failed (logged): the caller queues the message."""
        try:
            finish_copy(target.root, maildir_name(queue_id, target.mailbox,
                                                  envelope.received_at),
                        fd, tmp, drop_cache=True)
        except OSError as exc:
            _write_failed(queue_id, target.recipient, exc)
            return False
        return True

    def report(self, entry: QueueEntry) -> None:
        """Reactor thread, after the 250: the same metrics and log lines as a delivery by the
        scheduler, so dashboards and log searches see no difference."""
        for rcpt in entry.delivered_directly:
            status = DeliveryStatus.delivered("delivered to mailbox before acceptance")
            self.events.delivery_result(entry, rcpt, status)
            log_delivery(entry, rcpt, status, attempt=1)
        if not entry.pending:
            self.events.entry_finished(entry, "completed", 0.0)
            log_finished(entry, "completed")

