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
import struct

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

    Addresses usually arrive in that form (every node sends one): parsed by
    the C parser and written back here, that costs ~2 us where ipaddress
    takes ~10. The writing is ours, not libc's inet_ntop: glibc and musl
    (the Alpine image) place the "::" differently for some addresses, and
    replicas must store one spelling. IPv4-mapped addresses, which ipaddress
    writes with a dotted quad, are left to the full path."""
    if "." in text:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED or _compressed(packed) != text:
        return None
    return packed


def _compressed(packed: bytes) -> str:
    """RFC 5952: lower-case hex without leading zeros, and the first longest
    run of two or more zero groups written as "::"."""
    groups = struct.unpack("!8H", packed)
    best, best_len, start, run = 0, 1, 0, 0
    for i, group in enumerate(groups):
        if group:
            run = 0
            continue
        if not run:
            start = i
        run += 1
        if run > best_len:
            best, best_len = start, run
    hexes = [f"{group:x}" for group in groups]
    if best_len < 2:
        return ":".join(hexes)
    return ":".join(hexes[:best]) + "::" + ":".join(hexes[best + best_len:])


def canonical_ipv6(text: object) -> str:
    """``parse_ipv6(text).compressed``, with the same errors, and fast for
    text already in that form."""
    if isinstance(text, str):
        packed = compressed_ipv6_bytes(text)  # (never an IPv4-mapped one)
        if packed is not None and packed[0] != 0xFF and packed != bytes(16):  # multicast, ::
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
