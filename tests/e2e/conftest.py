"""Fixtures for the end-to-end suite (implementations in e2e_support.py).

The loopback DNS server and the scriptable SMTP sink are the outbound suite's
(tests/outbound/outbound_support.py, outbound_sink.py); this directory reuses them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "outbound"))

from e2e_support import E2EServer, make_server_factory
from helpers import CertSet
from outbound_support import DnsPorts, Sinks, dns_server, sinks

__all__ = ["dns_server", "sinks"]


@pytest.fixture
def e2e_server(tmp_path: Path, certs: CertSet, dns_server: DnsPorts, sinks: Sinks,
               reactor_thread: None) -> Iterator[Callable[..., E2EServer]]:
    yield from make_server_factory(tmp_path, certs, dns_server.port, sinks.port)
