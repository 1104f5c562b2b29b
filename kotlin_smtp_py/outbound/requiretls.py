"""REQUIRETLS (RFC 8689), outbound side: which TLS regime a queued message travels under.

* ``MAIL FROM ... REQUIRETLS`` (``Envelope.requiretls``): the message is relayed only when the
  next hop is authenticated — the MX RRset DNSSEC-validated or covered by an MTA-STS policy
  (§5.1 step 1; a smart host route is named by configuration instead), TLS negotiated, the
  certificate verified by DANE or PKIX against the host name, and the peer advertising
  REQUIRETLS (we then pass ``REQUIRETLS`` on our MAIL FROM). Anything else: the recipient is
  bounced with 5.7.30 (a permanent failure, reason ``tls``), never sent in the clear.
* ``TLS-Required: No`` (§4.1) without the REQUIRETLS parameter: the recipient domain's TLS
  policies (MTA-STS and DANE) are ignored for this message; our own ``outboundTls`` settings
  still apply. With the REQUIRETLS parameter the header is ignored (§4.1).
"""

from __future__ import annotations

MAX_HEADER_BYTES = 256 * 1024


def header_section(path: str, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The message's header section (bounded read of the spool file)."""
    with open(path, "rb") as fh:  # bounded local read
        data = fh.read(limit)
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[:end + len(sep)]
    return data


def tls_required_no(path: str) -> bool:
    """True when the message carries ``TLS-Required: No`` (case-insensitive, unfolded)."""
    text = header_section(path).decode("utf-8", "replace").replace("\r\n", "\n")
    unfolded = text.replace("\n ", " ").replace("\n\t", " ")
    for line in unfolded.split("\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "tls-required" and value.strip().lower() == "no":
            return True
    return False
