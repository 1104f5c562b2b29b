"""The epoll reactor's dispatch loop without a legacy logging context per I/O event.

Twisted's ``EPollReactor.doPoll`` hands every ready descriptor to ``log.callWithLogger``, which
asks the protocol for its ``logPrefix()``, copies the current legacy log context twice and
pushes and pops it, so that a ``twisted.python.log.msg`` made inside the handler is tagged with
``system=<prefix>``. We log through ``twisted.logger`` with our own fields (session, queue id),
so nothing reads that tag, but the wrapper runs five or six times per SMTP message: with
``py-spy --gil`` it was about 13 % of a worker's Python time under the W1 benchmark.

:func:`lighten_dispatch` replaces ``doPoll`` on the installed reactor with the same loop minus
the wrapper. What changes for an operator: an exception escaping a protocol's handler is still
logged (by Twisted's ``_doReadOrWrite``, as before) and the connection still dropped, but the
line names the logger ``-`` instead of the protocol's prefix. Any other reactor class (or a
Twisted whose epoll reactor no longer has the attributes relied on here) is left alone.

The lighter loop also runs :func:`before_poll` hooks at the end of every turn, before it
polls again: ``diskio.DiskIO`` wakes its I/O thread there once for all the jobs of the turn.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

_log = Logger()
_NEEDED = ("_poller", "_selectables", "_doReadOrWrite", "doPoll", "doIteration")
_BEFORE_POLL = "_ksmtp_before_poll"


def before_poll(reactor: Any, hook: Callable[[], None]) -> bool:
    """Run ``hook`` at the end of every reactor turn, before it polls for more events; False
    when the reactor has not the lighter dispatch (the caller then acts at once instead)."""
    hooks = getattr(reactor, _BEFORE_POLL, None)
    if hooks is None:
        return False
    hooks.append(hook)
    return True


def drop_before_poll(reactor: Any, hook: Callable[[], None]) -> None:
    """Stop running ``hook`` (registered with :func:`before_poll`; otherwise nothing)."""
    hooks = getattr(reactor, _BEFORE_POLL, None)
    if hooks is not None and hook in hooks:
        hooks.remove(hook)


def lighten_dispatch(reactor: Any) -> bool:
    """Install the lighter ``doPoll`` on ``reactor``; False when it does not apply."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor or not all(hasattr(reactor, a) for a in _NEEDED):
        return False
    poller = reactor._poller
    selectables: dict[int, Any] = reactor._selectables
    dispatch: Any = reactor._doReadOrWrite

    hooks: list[Callable[[], None]] = []

    def do_poll(timeout: float | None) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:
                _log.failure("before-poll hook failed", event="reactor.hook_failed")
        try:
            # At most one event per tracked descriptor, as Twisted's own loop asks.
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:  # removed by an earlier handler in this round
                continue
            try:
                # _doReadOrWrite logs and disconnects on a handler's exception itself; this
                # only guards the rest of the round against a failure in that clean-up.
                dispatch(selectable, fd, event)
            except Exception:
                _log.failure("I/O event handling failed for {selectable!r}",
                             selectable=selectable, event="reactor.dispatch_failed")

    patched: Any = reactor  # instance attributes shadow the class's methods
    patched.doPoll = patched.doIteration = do_poll
    setattr(patched, _BEFORE_POLL, hooks)
    return True


def guard_stop_signals(reactor: Any) -> None:
    """Once the reactor runs: SIGTERM/SIGINT stop it once; a repeat during the drain does
    nothing. Twisted's own handler calls ``reactor.stop()`` again, which raises
    ReactorNotRunning (a CRITICAL traceback in the log): ``systemctl stop`` signals the whole
    group and the parent signals its workers as well, so workers always got two."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # tests run the reactor in a thread

    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stopping:
            return
        stopping.append(signum)
        _log.info("signal {signum} received: stopping", signum=signum)
        reactor.callFromThread(_stop_if_running, reactor)

    def install() -> None:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    reactor.callWhenRunning(install)  # after Twisted installed its own


def _stop_if_running(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()
