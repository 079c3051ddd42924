"""IPv6 addressing plan (architecture record, section 4).

TrustNet uses the ULA prefix ``fd10:1234::/32``. A node's address is derived
deterministically from its id: ``fd10:1234`` followed by the first 96 bits of
``sha256(node_id)``. ``fd10:1234:ffff::/48`` is reserved for the registry, so a
node whose hash starts with ``ffff`` gets the lowest bit of that group flipped
(``ffff`` -> ``fffe``): node addresses never fall into the registry block.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket

__all__ = ["REGISTRY_PREFIX", "TRUSTNET_PREFIX", "canonical_ipv6", "compressed_ipv6_bytes", "parse_ipv6",
           "ula_for"]

TRUSTNET_PREFIX = ipaddress.IPv6Network("fd10:1234::/32")
REGISTRY_PREFIX = ipaddress.IPv6Network("fd10:1234:ffff::/48")


def ula_for(node_id: str) -> ipaddress.IPv6Address:
    """The node's deterministic ULA in ``fd10:1234::/32``, outside the registry /48."""
    if not isinstance(node_id, str) or not node_id:
        raise ValueError(f"node id must be a non-empty string, got {node_id!r}")
    bits = bytearray(hashlib.sha256(node_id.encode("utf-8")).digest()[:12])
    if bits[0] == 0xFF and bits[1] == 0xFF:
        bits[1] ^= 0x01  # ffff is the registry's /48: use fffe
    return ipaddress.IPv6Address(TRUSTNET_PREFIX.network_address.packed[:4] + bytes(bits))


def _shown(text: object) -> str:
    r = repr(text)
    return r if len(r) <= 60 else r[:57] + "..."


_V4_MAPPED = bytes(10) + b"\xff\xff"


def compressed_ipv6_bytes(text: str) -> bytes | None:
    """The 16 bytes of `text` when it is an IPv6 address written exactly as
    ``IPv6Address(text).compressed`` writes it, else None.

    Addresses usually arrive in that form (every node sends one); the C
    parser recognises it in well under a microsecond, where ipaddress takes
    ~10 us. For the forms without a dotted quad, glibc's inet_ntop and
    ipaddress write the same text (RFC 5952: the first longest run of two
    or more zero groups, lower case, no leading zeros)."""
    if "." in text:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    return packed if socket.inet_ntop(socket.AF_INET6, packed) == text else None


def canonical_ipv6(text: object) -> str:
    """``parse_ipv6(text).compressed``, with the same errors, and fast for
    text already in that form."""
    if isinstance(text, str):
        packed = compressed_ipv6_bytes(text)
        if (packed is not None and packed[0] != 0xFF and packed != bytes(16)
                and packed[:12] != _V4_MAPPED):
            return text
    return parse_ipv6(text).compressed


def parse_ipv6(text: object) -> ipaddress.IPv6Address:
    """Parse a unicast IPv6 address as a peer or node would announce it.

    Raises ``ValueError`` with a message fit for an API client when the text is
    not a string, is IPv4 or IPv4-mapped, carries brackets or a zone id
    (``%eth0``), or is the unspecified (``::``) or a multicast address.
    """
    if not isinstance(text, str):
        raise ValueError(f"IPv6 address must be a string, got {type(text).__name__}")
    s = text.strip()
    if s.startswith("[") or s.endswith("]"):
        raise ValueError(f"IPv6 address must be given without brackets, got {_shown(text)}")
    if "%" in s:
        raise ValueError(f"IPv6 address must not carry a zone id (%...), got {_shown(text)}")
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        raise ValueError(f"not a valid IPv6 address: {_shown(text)}") from None
    if isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"IPv4 addresses are not accepted, an IPv6 address is required: {_shown(text)}")
    if addr.ipv4_mapped is not None:
        raise ValueError(f"IPv4-mapped addresses are not accepted, an IPv6 address is required: {_shown(text)}")
    if addr.is_unspecified:
        raise ValueError(f"the unspecified address {_shown(text)} is not a usable address")
    if addr.is_multicast:
        raise ValueError(f"multicast address {_shown(text)} is not a usable address")
    return addr
