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
    assert canonical({"a": 1, "sig": "x"}) == canonical({"a": 1})


def test_replay_cache_is_pruned():
    me = NodeIdentity.generate()
    guard = ReplayGuard(max_skew=10)
    for t in range(0, 1000, 5):
        guard.check(me.statement("hb", "n", {}, now=float(t)), me.public_key, "hb", now=float(t))
    assert len(guard._seen) < 20
