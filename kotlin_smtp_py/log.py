"""Log output: human text lines (default) or one JSON object per line, with secrets masked.

Job: turn Twisted log events (``twisted.logger`` and legacy ``twisted.python.log``) into lines
on stdout (journald, ``docker logs``) or a file, filtered by ``logging.level``. Callers log with
one ``Logger()`` per module and named fields::

    _log.info("accepted {queue_id} from {peer}", event="message.accepted", session=sid,
              peer=peer, queue_id=qid, message_id=mid, sender=s, recipient=r)

JSON lines carry ``timestamp`` (ISO-8601 UTC), ``level``, ``logger`` (``log_namespace``),
``event`` (the ``event`` field when given, else the format string), ``message`` (rendered
text), then every other non-private field (names not starting with ``log_``). A failure adds
``error`` and ``traceback``.

Invariants:
- Secrets never reach the output: a field whose name contains ``password``, ``secret``,
  ``auth_data``, ``payload`` (or a word in ``redact``) is replaced by ``******`` before the
  message is rendered, so ``{password}`` in a format string prints the mask too; nested dicts
  are masked the same way, and ``AUTH PLAIN|LOGIN <data>`` in rendered text is scrubbed.
- The observer never raises (Twisted would drop it): a broken event yields a fallback line.
- Every line is flushed at once, so journald sees it even when stdout is a pipe.

twistd: the service maker runs after twistd chose its log observer, so the plugin should put
ours in place while options are parsed, in its ``Options.postOptions``::

    if not self.parent.get("logger"):
        self.parent["logger"] = twistd_logger_factory(config.logging)

(``twistd --logger dotted.name`` given by the operator still wins.)
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from kotlin_smtp_py.config import LoggingConfig

MASK = "******"
DEFAULT_REDACT: tuple[str, ...] = ("password", "passwd", "secret", "auth_data", "payload",
                                   "credential", "token")
# Legacy-event bookkeeping and our own top-level names: never copied as extra fields.
_SKIP_FIELDS = frozenset({"message", "isError", "system", "format", "time", "why", "failure",
                          "event", "timestamp", "level", "logger", "error", "traceback"})
_AUTH_LINE = re.compile(r"(?i)\b(AUTH\s+(?:PLAIN|LOGIN|XOAUTH2|CRAM-MD5))\s+\S+")
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "warning": LogLevel.warn, "error": LogLevel.error, "critical": LogLevel.critical}


_debug_on = [True]  # until configure_logging decides (tools and tests see everything)


def debug_enabled() -> bool:
    """Whether debug lines can reach the output. Twisted's ``Logger`` builds and publishes
    every event and the level filter drops it only at the observer (~4 µs a call), so debug
    lines on per-connection and per-message paths are guarded with this."""
    return _debug_on[0]


def parse_level(name: str) -> LogLevel:
    try:
        level: LogLevel = _LEVELS[name.strip().lower()]
        return level
    except KeyError:
        raise ValueError(f"unknown log level {name!r}") from None


class Redactor:
    """Masks secret-looking fields (by name, case-insensitive substring) and AUTH data."""

    def __init__(self, words: Iterable[str] = DEFAULT_REDACT) -> None:
        self.words = tuple(w.lower() for w in words if w)
        self._verdicts: dict[str, bool] = {}  # field names are few: decide each once
        # Per event shape (its keys, in order: fixed per call site): the secret fields and the
        # other non-``log_`` ones, so a line costs no per-field name checks.
        self._shapes: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def is_secret(self, name: str) -> bool:
        verdict = self._verdicts.get(name)
        if verdict is None:
            lowered = name.lower()
            verdict = any(w in lowered for w in self.words)
            if len(self._verdicts) < 4096:  # bounded even if callers invent names
                self._verdicts[name] = verdict
        return verdict

    def value(self, name: str, value: Any) -> Any:
        if self.is_secret(name):
            return MASK
        if isinstance(value, str):  # the common case first: Mapping is a slow ABC check
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(str(k), v) for k, v in value.items()}
        return value

    def _shape(self, keys: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        shape = self._shapes.get(keys)
        if shape is None:
            fields = [k for k in keys if not (isinstance(k, str) and k.startswith("log_"))]
            shape = (tuple(k for k in fields if self.is_secret(str(k))),
                     tuple(k for k in fields if not self.is_secret(str(k))))
            if len(self._shapes) < 4096:  # bounded even if callers invent names
                self._shapes[keys] = shape
        return shape

    def event(self, event: LogEvent) -> LogEvent:
        """``event`` with secret fields masked (``log_*`` keys kept as they are): a copy when
        anything was masked, else the event itself (most lines mask nothing)."""
        secret, others = self._shape(tuple(event))
        masked: LogEvent | None = None
        for k in others:
            v = event[k]
            if type(v) is str:  # the common case: only an AUTH line in it changes anything
                if "auth" not in v.lower():
                    continue
                new: Any = self.text(v)
            elif isinstance(v, (str, Mapping)):
                new = self.value(k, v)
            else:
                continue
            if new is not v:
                if masked is None:
                    masked = dict(event)
                masked[k] = new
        if secret:
            if masked is None:
                masked = dict(event)
            for k in secret:
                masked[k] = MASK
        return event if masked is None else masked

    @staticmethod
    def text(text: str) -> str:
        if "auth" not in text.lower():  # ~10x cheaper than the substitution finding nothing
            return text
        return _AUTH_LINE.sub(lambda m: f"{m.group(1)} {MASK}", text)


_second_cache: list[Any] = [None, ""]  # [whole second, "YYYY-MM-DDTHH:MM:SS"]


def _timestamp(event: LogEvent) -> str:
    t = event.get("log_time")
    if not isinstance(t, (int, float)):
        t = datetime.datetime.now(datetime.timezone.utc).timestamp()
    whole = int(t // 1)
    if _second_cache[0] != whole:  # one datetime per second, not per line
        dt = datetime.datetime.fromtimestamp(whole, tz=datetime.timezone.utc)
        _second_cache[:] = [whole, dt.strftime("%Y-%m-%dT%H:%M:%S")]
    millis = min(999, int((t - whole) * 1000))
    return f"{_second_cache[1]}.{millis:03d}Z"


_LEVEL_NAMES = {level: level.name.upper() for level in LogLevel.iterconstants()}


def _level(event: LogEvent) -> str:
    name = _LEVEL_NAMES.get(event.get("log_level"))  # type: ignore[call-overload]
    if name is None:  # not a LogLevel member
        other = getattr(event.get("log_level"), "name", None)
        name = other.upper() if isinstance(other, str) else "INFO"
    return name


def _logger(event: LogEvent) -> str:
    namespace = event.get("log_namespace")
    if namespace == "log_legacy" and event.get("system"):
        return str(event["system"])
    return str(namespace or "-")


_field_keys: dict[tuple[str, ...], tuple[str, ...]] = {}


def _field_names(event: LogEvent) -> tuple[str, ...]:
    """The event's own fields (not ``log_*``, ``_*`` or our top-level names), decided once
    per event shape (a few dozen call sites log the same shapes)."""
    shape = tuple(event)
    keys = _field_keys.get(shape)
    if keys is None:
        keys = tuple(k for k in shape if not k.startswith("log_") and not k.startswith("_")
                     and k not in _SKIP_FIELDS)
        if len(_field_keys) < 1024:
            _field_keys[shape] = keys
    return keys


def _fields(event: LogEvent) -> dict[str, Any]:
    return {k: event[k] for k in _field_names(event)}


def _event_name(event: LogEvent) -> str:
    name = event.get("event")
    if isinstance(name, str) and name:
        return name
    fmt = event.get("log_format")
    return fmt if isinstance(fmt, str) else ""


def _failure(event: LogEvent) -> Failure | None:
    f = event.get("log_failure")
    return f if isinstance(f, Failure) else None


def _render(event: LogEvent, redactor: Redactor) -> str:
    fmt = event.get("log_format")
    text: str | None = None
    if isinstance(fmt, str) and "()" not in fmt:
        # Plain ``{field}`` / ``{field:spec}`` formats (all of ours) render with str.format,
        # several times faster than Twisted's Formatter-based formatEvent; anything else, or
        # any error, takes the Twisted path (which also renders the "unable to format" text).
        try:
            text = fmt.format_map(event)
        except Exception:
            text = None
    if text is None:
        text = formatEvent(event)
    return redactor.text(text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def format_json(event: LogEvent, redactor: Redactor) -> str:
    """One JSON object (no newline) for an already-masked event."""
    record: dict[str, Any] = {
        "timestamp": _timestamp(event),
        "level": _level(event),
        "logger": _logger(event),
        "event": _event_name(event),
        "message": _render(event, redactor),
        "pid": os.getpid(),  # with smtp.workers, which process said it (asked each time:
        # twistd's daemon mode forks after the first lines are written)
    }
    for key, value in _fields(event).items():
        if key not in record:
            record[key] = value if type(value) is str else _jsonable(value)
    failure = _failure(event)
    if failure is not None:
        kind = getattr(failure.type, "__name__", "Exception")
        record["error"] = redactor.text(f"{kind}: {failure.getErrorMessage()}")
        record["traceback"] = redactor.text(failure.getTraceback())
    return json.dumps(record, ensure_ascii=False, default=str)


_extra_keys: dict[tuple[Any, tuple[str, ...]], tuple[str, ...]] = {}


def _extras(event: LogEvent) -> tuple[str, ...]:
    """The fields a text line shows after the message: those its format does not name.
    Decided once per format and event shape."""
    fmt = event.get("log_format")
    key = (fmt, tuple(event))
    extras = _extra_keys.get(key)
    if extras is None:
        text = str(fmt or "")
        extras = tuple(k for k in _field_names(event) if "{" + k not in text)
        if len(_extra_keys) < 1024:
            _extra_keys[key] = extras
    return extras


def escape(text: str) -> str:
    """``text`` with every non-printable character written as an escape (``\\n``,
    ``\\x1b``, ``\\u2028``), as Postfix does: an AUTH name, a Message-ID or a remote
    server's reply holding a line break or a terminal escape forged log lines or rewrote the
    operator's terminal. Printable text (any script) is returned as it is, at the cost of one
    ``str.isprintable`` call."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def format_text(event: LogEvent, redactor: Redactor) -> str:
    """``<timestamp> <LEVEL> [<logger>] <message> key=value...`` (+ traceback lines).
    The message and the fields are one line whatever they hold (see :func:`escape`); only
    a traceback adds lines."""
    message = escape(_render(event, redactor))
    extras = " ".join([f"{k}={escape(str(_jsonable(event[k])))}" for k in _extras(event)])
    line = f"{_timestamp(event)} {_level(event):<5} [{_logger(event)}] {message}"
    if extras:
        line += f" ({extras})"
    failure = _failure(event)
    if failure is not None:
        line += "\n" + redactor.text(failure.getTraceback()).rstrip("\n")
    return line


@implementer(ILogObserver)
class LineObserver:
    """Writes one formatted line per event and flushes; masks secrets first; never raises."""

    def __init__(self, stream: IO[str], formatter: Callable[[LogEvent, Redactor], str],
                 redactor: Redactor | None = None,
                 level: LogLevel = LogLevel.debug) -> None:
        self.stream = stream
        self.path: str | None = None  # the file behind ``stream`` when it is one (reopen)
        self.formatter = formatter
        self.redactor = redactor or Redactor()
        # The level filter as a set lookup: one default level, no per-namespace settings,
        # so Twisted's FilteringLogObserver and its predicate (~1.5 µs a line) are not needed.
        order = list(LogLevel.iterconstants())
        self._shown = frozenset(order[order.index(level):])

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level", LogLevel.info) not in self._shown:
            return
        try:
            line = self.formatter(self.redactor.event(event), self.redactor)
        except Exception as exc:  # a broken event must not take the observer down
            line = json.dumps({"timestamp": _timestamp(event), "level": "ERROR",
                               "logger": "kotlin_smtp_py.log", "event": "log.format_error",
                               "message": f"unformattable log event: {type(exc).__name__}"})
        try:
            try:
                self.stream.write(line + "\n")
            except UnicodeEncodeError:  # a file name with undecodable bytes (surrogates)
                self.stream.write(line.encode("utf-8", "backslashreplace").decode("utf-8")
                                  + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def reopen(self) -> None:
        """A log file renamed by logrotate: write to a new file at the configured path
        (SIGHUP, as the reload does); stdout/stderr are left alone."""
        path = self.path
        if path is None:
            return
        try:
            fresh = open_output(path)
        except OSError as exc:
            self(_reopen_failed(path, exc))
            return
        old, self.stream = self.stream, fresh
        try:
            old.close()
        except OSError:
            pass


def _reopen_failed(path: str, exc: OSError) -> LogEvent:
    return {"log_format": "cannot reopen log file {path}: {error}; still writing to the old one",
            "log_level": LogLevel.error, "log_namespace": "kotlin_smtp_py.log",
            "log_time": time.time(), "path": path, "error": exc.strerror,
            "event": "log_reopen_failed"}


def open_output(target: str) -> IO[str]:
    """``stdout``/``stderr`` or a file path (appended, line-buffered)."""
    if target in ("", "stdout", "-"):
        return sys.stdout
    if target == "stderr":
        return sys.stderr
    return open(target, "a", encoding="utf-8", buffering=1)  # lives as long as the process


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None,
                      redact: Iterable[str] = ()) -> ILogObserver:
    """The observer for ``config``: format, level filter and output (``stream`` overrides
    ``config.file``). Install it with ``globalLogBeginner.beginLoggingTo([observer])`` or hand
    it to twistd (see the module docstring)."""
    formatter = format_json if config.format == "json" else format_text
    redactor = Redactor((*DEFAULT_REDACT, *redact))
    out = stream if stream is not None else open_output(config.file)
    level = parse_level(config.level)
    _debug_on[0] = level is LogLevel.debug
    observer = LineObserver(out, formatter, redactor, level)
    if stream is None and config.to_file:
        observer.path = config.file
    _observers.append(observer)
    return observer


_observers: list[LineObserver] = []


def reopen_outputs() -> None:
    """Reopen every log file this process writes (SIGHUP, after logrotate renamed it)."""
    for observer in _observers:
        observer.reopen()


def twistd_logger_factory(config: LoggingConfig) -> Callable[[], ILogObserver]:
    """A zero-argument factory for twistd's ``logger`` option."""
    return lambda: configure_logging(config)
