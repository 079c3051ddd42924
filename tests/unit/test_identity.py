import os
import stat

import pytest

from trustnet.identity import (
    IdentityError,
    NodeIdentity,
    ReplayGuard,
    canonical,
    verify,
)


def test_key_created_once_with_mode_0600(tmp_path):
    first = NodeIdentity.load_or_create(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode)
    assert mode == 0o600
    again = NodeIdentity.load_or_create(tmp_path)
    assert again.public_key == first.public_key
    assert NodeIdentity.load_or_create(tmp_path / "other").public_key != first.public_key


def test_garbage_key_file_is_a_clear_error(tmp_path):
    (tmp_path / "node.key").write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="node.key"):
        NodeIdentity.load_or_create(tmp_path)


def test_statement_verifies_and_is_accepted_once():
    me = NodeIdentity.generate()
    guard = ReplayGuard(max_skew=60)
    stmt = me.statement("heartbeat", "node-1", {"seq": 1}, now=1000.0)
    assert guard.check(stmt, me.public_key, "heartbeat", now=1010.0) == {"seq": 1}
    with pytest.raises(IdentityError, match="replay"):
        guard.check(stmt, me.public_key, "heartbeat", now=1011.0)


def test_statement_from_another_key_is_refused():
    me, thief = NodeIdentity.generate(), NodeIdentity.generate()
    stmt = thief.statement("register", "node-1", {}, now=1000.0)
    with pytest.raises(IdentityError, match="does not verify"):
        ReplayGuard().check(stmt, me.public_key, "register", now=1000.0)


@pytest.mark.parametrize("change", [
    {"body": {"seq": 2}}, {"node_id": "node-2"}, {"ts": 1001.0}, {"nonce": "0" * 24},
])
def test_tampered_statement_is_refused(change):
    me = NodeIdentity.generate()
    stmt = {**me.statement("heartbeat", "node-1", {"seq": 1}, now=1000.0), **change}
    with pytest.raises(IdentityError):
        ReplayGuard().check(stmt, me.public_key, "heartbeat", now=1000.0)


def test_stale_or_future_or_wrong_purpose_is_refused():
    me = NodeIdentity.generate()
    guard = ReplayGuard(max_skew=60)
    with pytest.raises(IdentityError, match="timestamp"):
        guard.check(me.statement("heartbeat", "n", {}, now=0.0), me.public_key, "heartbeat", now=61.0)
    with pytest.raises(IdentityError, match="timestamp"):
        guard.check(me.statement("heartbeat", "n", {}, now=200.0), me.public_key, "heartbeat", now=100.0)
    with pytest.raises(IdentityError, match="expected"):
        guard.check(me.statement("register", "n", {}, now=0.0), me.public_key, "heartbeat", now=0.0)


def test_malformed_statements_are_errors_not_crashes():
    me = NodeIdentity.generate()
    good = me.statement("heartbeat", "n", {}, now=0.0)
    for bad in ({}, {**good, "extra": 1}, {**good, "sig": 5}, {**good, "ts": "0"},
                {**good, "nonce": 7}, {**good, "sig": "!!!"}):
        with pytest.raises(IdentityError):
            ReplayGuard().check(bad, me.public_key, "heartbeat", now=0.0)
    with pytest.raises(IdentityError):
        ReplayGuard().check(good, "short", "heartbeat", now=0.0)


def test_verify_raw_bytes():
    me = NodeIdentity.generate()
    sig = me.sign(b"challenge")
    assert verify(me.public_key, b"challenge", sig)
    assert not verify(me.public_key, b"challengf", sig)
    assert not verify(NodeIdentity.generate().public_key, b"challenge", sig)
    assert canonical({"a": 1, "sig": "x"}) == canonical({"a": 1})


@pytest.mark.parametrize("key, sig", [
    ("short", None), (None, "short"), ("not base64!", None), (None, "not base64!"),
    (None, ""), ("", None), (None, "A" * 87), ("A" * 44, None)])
def test_verify_says_no_to_malformed_keys_and_signatures(key, sig):
    """Whatever a peer sends as its key or signature, verify answers False."""
    me = NodeIdentity.generate()
    good = me.sign(b"challenge")
    assert not verify(key if key is not None else me.public_key, b"challenge",
                      sig if sig is not None else good)


def test_replay_cache_is_pruned():
    me = NodeIdentity.generate()
    guard = ReplayGuard(max_skew=10)
    for t in range(0, 1000, 5):
        guard.check(me.statement("hb", "n", {}, now=float(t)), me.public_key, "hb", now=float(t))
    assert len(guard._seen) < 20


# ------------------------------------------------------------------ heartbeat sessions


def test_both_ends_of_a_session_derive_the_same_key_and_only_they():
    from trustnet.identity import session_key, session_mac, session_mac_ok, session_share

    node_private, node_share = session_share()
    reg_private, reg_share = session_share()
    at_node = session_key(node_private, reg_share, "n1", node_share, reg_share)
    at_registry = session_key(reg_private, node_share, "n1", node_share, reg_share)
    assert at_node == at_registry and len(at_node) == 32
    # bound to the node's name and to the shares exchanged
    assert session_key(reg_private, node_share, "n2", node_share, reg_share) != at_node
    _, other_share = session_share()
    assert session_key(reg_private, other_share, "n1", other_share, reg_share) != at_node

    mac = session_mac(at_node, "s1", 7)
    assert session_mac_ok(at_registry, "s1", 7, mac)
    assert not session_mac_ok(at_registry, "s1", 8, mac)
    assert not session_mac_ok(at_registry, "s2", 7, mac)
    assert not session_mac_ok(bytes(32), "s1", 7, mac)
    assert not session_mac_ok(at_registry, "s1", 7, None)


def test_a_session_key_needs_a_real_x25519_share():
    from trustnet.identity import b64, session_key, session_share

    private, share = session_share()
    for bad in (b64(bytes(31)), b64(bytes(32)), "***"):
        with pytest.raises(IdentityError):
            session_key(private, bad, "n1", bad, share)


def test_session_table_one_session_per_node():
    from trustnet.identity import session_key, session_mac, session_share
    from trustnet.registry.sessions import BadSession, NoSession, SessionTable

    table = SessionTable()
    private, share = session_share()
    sid, theirs = table.open("n1", "pk1", share)
    key = session_key(private, theirs, "n1", share, theirs)
    assert table.check(sid, 1, session_mac(key, sid, 1)).node_id == "n1"
    with pytest.raises(BadSession):
        table.check(sid, 1, session_mac(key, sid, 1))
    with pytest.raises(BadSession):
        table.check(sid, True, session_mac(key, sid, 1))
    sid2, _ = table.open("n1", "pk1", session_share()[1])
    assert len(table) == 1
    with pytest.raises(NoSession):
        table.check(sid, 2, session_mac(key, sid, 2))
    table.drop("n1")
    table.drop("n1")  # dropping nothing is fine
    assert len(table) == 0
    with pytest.raises(NoSession):
        table.check(sid2, 1, "x")
    with pytest.raises(IdentityError):
        table.open("n2", "pk2", None)
