"""Log output: JSON lines with the contract fields, text lines, level filter, secrets masked."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from twisted.logger import Logger, LogPublisher

from kotlin_smtp_py.config import LoggingConfig
from kotlin_smtp_py.log import configure_logging

PASSWORD = "correct-horse-battery-staple-9431"


def logger_for(config: LoggingConfig, stream: io.StringIO | None = None,
               **kwargs: Any) -> tuple[Logger, io.StringIO]:
    out = stream or io.StringIO()
    publisher = LogPublisher(configure_logging(config, stream=out, **kwargs))
    return Logger(namespace="kotlin_smtp_py.inbound.protocol", observer=publisher), out


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines and all(line.startswith("{") and line.endswith("}") for line in lines), text
    return [json.loads(line) for line in lines]


def test_json_one_object_per_line_with_fields() -> None:
    log, out = logger_for(LoggingConfig(format="json", level="info"))
    log.info("accepted {queue_id} from {peer}", event="message.accepted", session="S1",
             peer="192.0.2.7", helo="client.test", queue_id="Q123", message_id="<m@x>",
             sender="a@x.test", recipient="b@y.test", status="2.0.0", duration_ms=12)
    log.warn("delivery to {recipient} deferred: {reason}", queue_id="Q123",
             recipient="b@y.test", reason="dns", status="4.4.3")
    first, second = json_lines(out.getvalue())
    assert first["event"] == "message.accepted"
    assert first["message"] == "accepted Q123 from 192.0.2.7"
    assert first["level"] == "INFO" and first["logger"] == "kotlin_smtp_py.inbound.protocol"
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    for key, value in {"session": "S1", "peer": "192.0.2.7", "helo": "client.test",
                       "queue_id": "Q123", "message_id": "<m@x>", "sender": "a@x.test",
                       "recipient": "b@y.test", "status": "2.0.0", "duration_ms": 12}.items():
        assert first[key] == value, key
    assert not any(k.startswith("log_") for k in first)
    # without an explicit event name, the format string is the event
    assert second["event"] == "delivery to {recipient} deferred: {reason}"
    assert (second["level"], second["reason"]) == ("WARN", "dns")


def test_secrets_never_appear_json_and_text() -> None:
    for fmt in ("json", "text"):
        log, out = logger_for(LoggingConfig(format=fmt, level="debug"), redact=["apikey"])
        log.info("login {user} {password}", user="bob", password=PASSWORD)
        log.debug("auth", auth_data=PASSWORD.encode(), payload=PASSWORD, client_secret=PASSWORD)
        log.info("relay route", route={"host": "smarthost", "password": PASSWORD})
        log.info("command {line}", line=f"AUTH PLAIN {PASSWORD}")
        log.info("custom", myApiKey=PASSWORD)
        try:
            raise ValueError(f"AUTH LOGIN {PASSWORD}")
        except ValueError:
            log.failure("boom")
        text = out.getvalue()
        assert PASSWORD not in text, fmt
        assert "******" in text
        assert "bob" in text and "smarthost" in text


def test_level_filter() -> None:
    log, out = logger_for(LoggingConfig(format="json", level="warn"))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert [r["message"] for r in json_lines(out.getvalue())] == ["w", "e"]


def test_failure_fields() -> None:
    log, out = logger_for(LoggingConfig(format="json"))
    try:
        {}["missing"]
    except KeyError:
        log.failure("spool tick failed", queue_id="Q9", event="spool.tick_failed")
    (record,) = json_lines(out.getvalue())
    assert record["level"] == "CRITICAL"
    assert record["error"].startswith("KeyError")
    assert "Traceback" in record["traceback"] and record["queue_id"] == "Q9"


def test_text_format_is_one_line_with_context() -> None:
    log, out = logger_for(LoggingConfig(format="text"))
    log.info("accepted {queue_id}", queue_id="Q1", peer="192.0.2.1")
    line = out.getvalue()
    assert line.count("\n") == 1
    assert "INFO" in line and "accepted Q1" in line and "peer=192.0.2.1" in line
    assert not line.startswith("{")


def test_unrenderable_event_still_logs() -> None:
    log, out = logger_for(LoggingConfig(format="json"))
    log.info("broken {missing.attr}")
    log.info("after")
    records = json_lines(out.getvalue())
    assert records[-1]["message"] == "after"
    assert len(records) == 2


def test_file_output(tmp_path: Path) -> None:
    target = tmp_path / "smtp.log"
    observer = configure_logging(LoggingConfig(format="json", file=str(target)))
    Logger(namespace="t", observer=observer).info("to file", queue_id="QF")
    (record,) = json_lines(target.read_text())
    assert record["queue_id"] == "QF"


def test_hot_path_debug_lines_are_built_only_at_debug_level() -> None:
    from kotlin_smtp_py.log import debug_enabled

    try:
        logger_for(LoggingConfig(format="text", level="info"))
        assert not debug_enabled()
        log, out = logger_for(LoggingConfig(format="text", level="debug"))
        assert debug_enabled()
        log.debug("shown")
        assert "shown" in out.getvalue()
    finally:
        logger_for(LoggingConfig(format="text", level="debug"))  # the default for other tests


def test_cached_event_shapes_still_mask_each_line() -> None:
    """Field handling is decided once per event shape; values are still checked per line."""
    for fmt in ("json", "text"):
        log, out = logger_for(LoggingConfig(format=fmt, level="info"))
        for line in ("EHLO client.test", f"AUTH PLAIN {PASSWORD}", "NOOP"):
            log.info("command {command}", command=line, peer="192.0.2.9", session="S")
        log.info("command {command}", command="QUIT", peer="192.0.2.9", session="S",
                 password=PASSWORD)  # a new shape with a secret field
        text = out.getvalue()
        assert PASSWORD not in text, fmt
        assert "EHLO client.test" in text and "NOOP" in text and "QUIT" in text
        lines = text.splitlines()
        assert len(lines) == 4
        assert "AUTH PLAIN ******" in lines[1]
        assert "******" not in lines[0] + lines[2] and "******" in lines[3]
