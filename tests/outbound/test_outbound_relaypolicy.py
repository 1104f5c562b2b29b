"""Relay access policy: default rules, the rule chain, and the open-relay address-trick battery."""

from __future__ import annotations

from typing import Any

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kotlin_smtp_py.config import RelayConfig
from kotlin_smtp_py.envelope import Address, AddressError, parse_path
from kotlin_smtp_py.inbound.relaypolicy import (
    RelayAccessPolicy,
    RelayRequest,
    is_address_trick,
    load_rule,
)
from kotlin_smtp_py.interfaces import IRelayAccessPolicy

SENDER = parse_path("<alice@corp.test>")
REMOTE = parse_path("<bob@remote.test>")


def policy(**kwargs: Any) -> RelayAccessPolicy:
    return RelayAccessPolicy(RelayConfig(**{"enabled": True, **kwargs}))


def test_verify_interface() -> None:
    verifyObject(IRelayAccessPolicy, policy())


def test_disabled_relay_refuses_everyone() -> None:
    p = RelayAccessPolicy(RelayConfig(enabled=False))
    assert not p.relay_allowed("127.0.0.1", True, SENDER, REMOTE)


def test_authenticated_may_relay_unauthenticated_may_not() -> None:
    p = policy()
    assert p.relay_allowed("192.0.2.7", True, SENDER, REMOTE)
    assert not p.relay_allowed("192.0.2.7", False, SENDER, REMOTE)


def test_client_cidr_allows_unauthenticated() -> None:
    p = policy(allowedClientCidrs=["10.0.0.0/8", "2001:db8::/32"])
    assert p.relay_allowed("10.1.2.3", False, SENDER, REMOTE)
    assert p.relay_allowed("::ffff:10.1.2.3", False, SENDER, REMOTE)
    assert p.relay_allowed("2001:db8::5", False, SENDER, REMOTE)
    assert not p.relay_allowed("11.1.2.3", False, SENDER, REMOTE)
    assert not p.relay_allowed("not-an-ip", False, SENDER, REMOTE)


def test_sender_domain_allows_unauthenticated() -> None:
    p = policy(allowedSenderDomains=["corp.test"])
    assert p.relay_allowed("198.51.100.1", False, SENDER, REMOTE)
    assert not p.relay_allowed("198.51.100.1", False, parse_path("<x@other.test>"), REMOTE)
    assert not p.relay_allowed("198.51.100.1", False, None, REMOTE)  # null sender


def test_both_lists_must_match_when_both_set() -> None:
    p = policy(allowedClientCidrs=["10.0.0.0/8"], allowedSenderDomains=["corp.test"])
    assert p.relay_allowed("10.0.0.1", False, SENDER, REMOTE)
    assert not p.relay_allowed("10.0.0.1", False, parse_path("<x@other.test>"), REMOTE)
    assert not p.relay_allowed("192.0.2.1", False, SENDER, REMOTE)


def test_open_relay_only_when_explicitly_configured() -> None:
    assert policy(requireAuthForRelay=False).relay_allowed("192.0.2.1", False, None, REMOTE)
    assert not policy(requireAuthForRelay=True).relay_allowed("192.0.2.1", False, None, REMOTE)


@implementer(IRelayAccessPolicy)
class AllowPartner:
    def __init__(self, relay: RelayConfig) -> None:
        self.relay = relay

    def decide(self, session: Any, sender: Any, recipient: Any) -> bool | None:
        assert isinstance(session, RelayRequest)
        if session.peer_ip == "203.0.113.9":
            return True
        if session.peer_ip == "203.0.113.66":
            return False
        return None


def test_rule_chain_first_decision_wins_then_default() -> None:
    relay = RelayConfig(enabled=True, rules=[f"{__name__}.AllowPartner"])
    p = RelayAccessPolicy.from_config(relay)
    assert p.relay_allowed("203.0.113.9", False, SENDER, REMOTE)
    assert not p.relay_allowed("203.0.113.66", True, SENDER, REMOTE)  # rule beats auth
    assert p.relay_allowed("192.0.2.1", True, SENDER, REMOTE)  # no opinion → default
    assert not p.relay_allowed("192.0.2.1", False, SENDER, REMOTE)


def test_load_rule_rejects_non_policies() -> None:
    with pytest.raises(TypeError):
        load_rule("collections.OrderedDict", RelayConfig())
    with pytest.raises(ValueError):
        load_rule("nodots", RelayConfig())


# The open-relay battery: each trick, unauthenticated from an allowed network and also
# authenticated, must never relay.
TRICKS = [
    "<user%other.test@local.test>",
    '<"user@other.test"@local.test>',
    "<other.test!user@local.test>",
    "<user@[192.0.2.1]>",
    "<user@[IPv6:2001:db8::1]>",
    '<"user%other"@remote.test>',
]


@pytest.mark.parametrize("path", TRICKS)
@pytest.mark.parametrize("authenticated", [False, True])
def test_address_tricks_never_relay(path: str, authenticated: bool) -> None:
    rcpt = parse_path(path)
    assert rcpt is not None and is_address_trick(rcpt)
    p = policy(requireAuthForRelay=False)  # even an open relay refuses these
    assert not p.relay_allowed("10.0.0.1", authenticated, SENDER, rcpt)


def test_source_route_is_stripped_and_judged_as_the_final_mailbox() -> None:
    rcpt = parse_path("<@local.test,@relay.test:user@other.test>")
    assert rcpt == Address("user", "other.test")
    assert not policy().relay_allowed("192.0.2.1", False, SENDER, rcpt)
    assert policy().relay_allowed("192.0.2.1", True, SENDER, rcpt)


@pytest.mark.parametrize("path", ["<user@other.test.>", "<user@local.test.>",
                                  "<user@other..test>"])
def test_trailing_dots_are_rejected_by_the_parser(path: str) -> None:
    with pytest.raises(AddressError):
        parse_path(path)


def test_plain_remote_address_is_not_a_trick() -> None:
    rcpt = parse_path("<first.last+tag@remote.test>")
    assert rcpt is not None and not is_address_trick(rcpt)
