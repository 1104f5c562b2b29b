"""Fixtures for the outbound TLS policy suite (implementations in tls_policy_support.py).

Reuses the outbound suite's SMTP sink (tests/outbound) and the e2e service factory (tests/e2e).
"""

from __future__ import annotations

import os
import sys

_TESTS = os.path.dirname(os.path.dirname(__file__))
for _sub in ("outbound", "e2e"):
    if os.path.join(_TESTS, _sub) not in sys.path:
        sys.path.insert(0, os.path.join(_TESTS, _sub))

from outbound_support import sinks  # noqa: E402
from tls_policy_support import policy_certs, policy_dns, sts_web  # noqa: E402

__all__ = ["policy_certs", "policy_dns", "sinks", "sts_web"]
