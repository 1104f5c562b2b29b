"""Fixtures for outbound tests (implementations in outbound_support.py)."""

from outbound_support import dns_server, make_config, sinks, tls_context

__all__ = ["dns_server", "make_config", "sinks", "tls_context"]
