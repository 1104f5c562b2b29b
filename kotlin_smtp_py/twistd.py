"""Glue for ``twistd smtp``: load and validate the config, refuse to start on any error, attach
our log observer to the twistd application (an explicit ``--logger`` still wins)."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.logger import ILogObserver, Logger

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.eventloop import guard_stop_signals, lighten_dispatch
from kotlin_smtp_py.memory import tune_malloc

log = Logger()
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default-config.yaml")


def load_or_exit(path: str | None) -> cfg.Config:
    path = path or DEFAULT_CONFIG
    try:
        return cfg.load(path)
    except cfg.ConfigError as exc:
        sys.stderr.write(f"kotlin-smtp: {path}: {exc}\n")
        raise SystemExit(2) from None


def check_redis_reachable(config: cfg.Config) -> None:
    """Refuse to start when Redis is selected but not answering (a blocking check is fine here:
    the reactor is not running yet)."""
    import socket

    from kotlin_smtp_py.redisconn import parse_target

    redis = config.smtp.redis
    if redis is None:
        return
    needs = (cfg.spool_backend(config) == "redis" or config.smtp.rateLimit.backend == "redis"
             or config.smtp.auth.rateLimitBackend == "redis")
    if not needs:
        return
    target = parse_target(redis)  # (validated: load_or_exit refused a bad one already)
    hosts = list(target.sentinels) or [(target.host, target.port)]
    timeout = max(redis.connectTimeoutMs, 1) / 1000.0
    errors = []
    for host, port in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    sys.stderr.write(f"kotlin-smtp: cannot start: Redis at {target.describe()} is unreachable "
                     f"({'; '.join(errors)})\n")
    raise SystemExit(1)


def make_service(config_path: str | None) -> Any:
    config = load_or_exit(config_path)
    tune_malloc()
    from twisted.internet import reactor

    lighten_dispatch(reactor)  # twistd installed its reactor before asking for the service
    guard_stop_signals(reactor)
    check_redis_reachable(config)
    from kotlin_smtp_py.service import build_service
    from kotlin_smtp_py.workers import prepare_parent

    try:
        svc = build_service(config, os.path.abspath(config_path or DEFAULT_CONFIG),
                            cluster=prepare_parent(config))
    except Exception as exc:
        sys.stderr.write(f"kotlin-smtp: cannot start: {exc}\n")
        raise SystemExit(1) from None
    return _WithLogObserver(svc, config)


def _log_warnings(config: cfg.Config) -> None:
    from twisted.logger import Logger

    log = Logger(namespace="kotlin_smtp_py.config")
    for warning in cfg.warnings(config):
        log.warn("configuration warning: {warning}", warning=warning, event="config_warning")


class _WithLogObserver:
    """Wraps the service so that, when twistd parents it, our observer becomes the app's."""

    def __init__(self, svc: Any, config: cfg.Config) -> None:
        self._svc = svc
        self._config = config

    def setServiceParent(self, parent: Any) -> Any:
        from kotlin_smtp_py.log import configure_logging

        if hasattr(parent, "setComponent"):
            try:
                observer = configure_logging(self._config.logging)
            except OSError as exc:  # logging.file cannot be opened: one line, no traceback
                sys.stderr.write(f"kotlin-smtp: cannot start: logging.file: cannot open "
                                 f"{self._config.logging.file}: {exc.strerror}\n")
                raise SystemExit(1) from None
            parent.setComponent(ILogObserver, observer)
        # Through the log (JSON lines stay JSON), once twistd has started logging to it.
        from twisted.internet import reactor

        reactor.callWhenRunning(_log_warnings, self._config)
        return self._svc.setServiceParent(parent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._svc, name)
