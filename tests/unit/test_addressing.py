"""trustnet.addressing: deterministic ULAs and strict IPv6 parsing."""

import hashlib
import ipaddress

import pytest

import trustnet.addressing as addressing
from trustnet.addressing import (
    REGISTRY_PREFIX,
    TRUSTNET_PREFIX,
    canonical_ipv6,
    compressed_ipv6_bytes,
    parse_ipv6,
    ula_for,
)


def test_prefixes():
    assert TRUSTNET_PREFIX == ipaddress.IPv6Network("fd10:1234::/32")
    assert REGISTRY_PREFIX == ipaddress.IPv6Network("fd10:1234:ffff::/48")


def test_ula_is_deterministic():
    assert ula_for("node-1") == ula_for("node-1")
    assert isinstance(ula_for("node-1"), ipaddress.IPv6Address)


def test_ula_known_value():
    # fd10:1234 followed by the first 96 bits of sha256("node-1")
    digest = hashlib.sha256(b"node-1").hexdigest()
    assert digest[:4] != "ffff"
    expected = ipaddress.IPv6Address(int("fd101234" + digest[:24], 16))
    assert ula_for("node-1") == expected
    assert str(ula_for("node-1")) == "fd10:1234:3597:1be6:e9bb:24a:8955:82fe"


def test_ula_within_prefix_and_outside_registry_block():
    for i in range(2000):
        a = ula_for(f"node-{i}")
        assert a in TRUSTNET_PREFIX
        assert a not in REGISTRY_PREFIX


def test_ula_distinct_for_distinct_ids():
    ids = [f"node-{i}" for i in range(5000)] + ["a", "A", "a ", "ä", "abc123"]
    assert len({ula_for(i) for i in ids}) == len(ids)


def test_ula_uses_utf8():
    digest = hashlib.sha256("nœud".encode()).digest()[:12]
    assert digest[:2] != b"\xff\xff"
    assert ula_for("nœud").packed == bytes.fromhex("fd101234") + digest


def test_registry_block_is_avoided_when_hash_starts_with_ffff(monkeypatch):
    class FakeHash:
        def __init__(self, data):
            pass

        def digest(self):
            return bytes.fromhex("ffff" + "ab" * 30)

    monkeypatch.setattr(addressing.hashlib, "sha256", FakeHash)
    a = ula_for("unlucky")
    assert a not in REGISTRY_PREFIX
    assert a in TRUSTNET_PREFIX
    assert str(a).startswith("fd10:1234:fffe:abab:")


@pytest.mark.parametrize("bad", ["", None, 42, b"node"])
def test_ula_rejects_bad_ids(bad):
    with pytest.raises(ValueError):
        ula_for(bad)


@pytest.mark.parametrize("text", ["::1", "fd10:1234::1", "2001:db8::42", "FD10:1234:ABC1::1", " fe80::1 "])
def test_parse_ipv6_accepts(text):
    assert parse_ipv6(text) == ipaddress.IPv6Address(text.strip())


@pytest.mark.parametrize(
    "text, words",
    [
        ("1.2.3.4", "IPv4"),
        ("::ffff:1.2.3.4", "IPv4-mapped"),
        ("fe80::1%eth0", "zone id"),
        ("[::1]", "brackets"),
        ("::", "unspecified"),
        ("ff02::1", "multicast"),
        ("not-an-address", "not a valid IPv6 address"),
        ("", "not a valid IPv6 address"),
        ("fd10:1234::1/64", "not a valid IPv6 address"),
        (123, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_parse_ipv6_rejects_with_clear_message(text, words):
    with pytest.raises(ValueError) as info:
        parse_ipv6(text)
    assert words in str(info.value)


def test_parse_ipv6_message_shortens_huge_input():
    with pytest.raises(ValueError) as info:
        parse_ipv6("x" * 10_000)
    assert len(str(info.value)) < 120


def _address_texts(rng):
    """Addresses of every shape that matters to the compressed form: runs of
    zero groups of each length and place (ties too), leading zeros, upper
    case, IPv4-mapped and -compatible ones, multicast, the unspecified one."""
    for _ in range(4000):
        groups = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.randrange(0x10000)]) for _ in range(8)]
        if rng.random() < 0.1:
            groups[:6] = [0, 0, 0, 0, 0, rng.choice([0, 0xFFFF])]
        if rng.random() < 0.05:
            groups[0] = 0xFF00 | rng.randrange(0x100)
        addr = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
        yield addr.compressed
        yield addr.exploded
        yield addr.compressed.upper()
        yield str(addr)
        yield ":".join(f"{g:x}" for g in groups)  # nothing compressed


def test_fast_ipv6_paths_agree_with_ipaddress():
    """The fast path writes the compressed form itself (libc's inet_ntop
    differs between glibc and musl) and must agree with ipaddress."""
    import random
    rng = random.Random(7)
    for text in [*_address_texts(rng), "::", "::1", "::ffff:1.2.3.4", "::1.2.3.4", "fe80::1%eth0",
                 " fd10::1", "fd10::1 ", "[::1]", "1.2.3.4", "", "x", "fd10:::1", "fd10::01", "FD10::1",
                 # musl's inet_ntop writes this address so (the later, longer-by-text run);
                 # ipaddress and RFC 5952 write "::1:2:0:0:3:4"
                 "0:0:1:2::3:4", "fd10::1\x00", "fd10::\u0661"]:
        try:
            expected = parse_ipv6(text).compressed
        except ValueError as exc:
            with pytest.raises(ValueError) as info:
                canonical_ipv6(text)
            assert str(info.value) == str(exc)
        else:
            assert canonical_ipv6(text) == expected, text
        try:
            strict = ipaddress.IPv6Address(text)
        except ValueError:
            assert compressed_ipv6_bytes(text) is None, text
            continue
        packed = compressed_ipv6_bytes(text)
        if packed is not None:  # never a wrong yes
            assert text == strict.compressed and packed == strict.packed, text
        elif text == strict.compressed and strict.ipv4_mapped is None and strict.scope_id is None:
            # a no only for what ipaddress writes with a dotted quad or a zone
            raise AssertionError(f"{text} is compressed but was not recognised")
