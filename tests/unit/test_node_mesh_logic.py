import random

import pytest

from trustnet.identity import NodeIdentity
from trustnet.node.flood import Inbox, SeenSet, flood_step
from trustnet.node.handshake import check_proof, new_challenge, sign_challenge


def test_flood_delivers_once_and_forwards_to_others():
    seen = SeenSet()
    deliver, fwd = flood_step(seen, 0.0, "b", "m1", "a", "a", 5, None, ["a", "c", "d"])
    assert deliver and fwd == ["c", "d"]
    assert flood_step(seen, 1.0, "b", "m1", "a", "c", 4, None, ["a", "c", "d"]) == (False, [])


def test_hop_limit_and_target():
    seen = SeenSet()
    assert flood_step(seen, 0, "b", "m1", "a", "a", 0, None, ["a", "c"]) == (True, [])
    assert flood_step(seen, 0, "b", "m2", "a", "a", 3, "z", ["a", "c"]) == (False, ["c"])
    assert flood_step(seen, 0, "z", "m3", "a", "c", 3, "z", ["a", "c", "d"]) == (True, [])


def test_seen_set_is_bounded_by_size_and_age():
    seen = SeenSet(capacity=3, max_age=10.0)
    for i in range(5):
        seen.add(f"m{i}", float(i))
    assert len(seen) == 3 and "m0" not in seen and "m4" in seen
    seen.add("late", 100.0)
    assert len(seen) == 1


def test_flood_on_a_graph_reaches_every_node_exactly_once():
    rng = random.Random(1)
    nodes = [f"n{i}" for i in range(30)]
    links = {n: set() for n in nodes}
    for i, n in enumerate(nodes[1:], 1):  # a random connected graph
        for p in rng.sample(nodes[:i], min(i, 3)):
            links[n].add(p)
            links[p].add(n)
    seen = {n: SeenSet() for n in nodes}
    delivered = {n: 0 for n in nodes}
    seen["n0"].add("m", 0)
    queue = [(p, "n0", 15) for p in sorted(links["n0"])]
    while queue:
        node, via, hops = queue.pop(0)
        deliver, fwd = flood_step(seen[node], 0, node, "m", "n0", via, hops, None, sorted(links[node]))
        delivered[node] += deliver
        queue += [(p, node, hops - 1) for p in fwd]
    assert all(delivered[n] == 1 for n in nodes[1:]) and delivered["n0"] == 0


def test_inbox_is_bounded_and_paged():
    inbox = Inbox(capacity=2)
    for i in range(3):
        inbox.add(msg_id=f"m{i}", origin="a", kind="broadcast", payload='{"x": 1}', at=0.0)
    assert [m["id"] for m in inbox.since(0)] == ["m1", "m2"]
    assert [m["seq"] for m in inbox.since(2)] == [3]
    assert inbox.since(0)[0]["payload"] == {"x": 1}


def test_challenge_response():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    c = new_challenge(random.Random(1))
    sig = sign_challenge(b, c, "b", "a", "b")
    assert check_proof(b.public_key, sig, c, "b", "a", "b")
    assert not check_proof(a.public_key, sig, c, "b", "a", "b")        # wrong key (impostor)
    assert not check_proof(b.public_key, sig, new_challenge(random.Random(2)), "b", "a", "b")
    assert not check_proof(b.public_key, sig, c, "b", "b", "a")        # other direction
    assert not check_proof(b.public_key, sig, c, "b", "a", "x")        # another link
    assert not check_proof(None, sig, c, "b", "a", "b")
    assert not check_proof(b.public_key, "garbage", c, "b", "a", "b")


def test_a_later_copy_with_more_hops_left_is_forwarded_not_delivered():
    seen = SeenSet()
    # The first copy came the long way round: no hops left, delivered, not forwarded.
    assert flood_step(seen, 0.0, "me", "m1", "o", "a", 0, None, ["a", "b", "c"]) == (True, [])
    # A shorter-path copy still has hops: forwarded onward, not delivered again.
    assert flood_step(seen, 0.1, "me", "m1", "o", "b", 3, None, ["a", "b", "c"]) == (False, ["a", "c"])
    # No better than what was already forwarded: dropped.
    assert flood_step(seen, 0.2, "me", "m1", "o", "c", 3, None, ["a", "b", "c"]) == (False, [])
    assert flood_step(seen, 0.3, "me", "m1", "o", "c", 2, None, ["a", "b", "c"]) == (False, [])


def test_a_copy_claiming_more_hops_than_a_broadcast_has_is_not_believed():
    """A peer that re-sends one message id claiming 1, 2, ... 1000 hops left
    would have it forwarded again for each larger claim, and travel 1000 hops:
    believed, a copy has at most what a fresh broadcast starts with."""
    from trustnet.node.flood import arriving_hops

    hops = 8
    assert arriving_hops(10**9, hops) == hops - 1
    assert arriving_hops(3, hops) == 3 and arriving_hops(-5, hops) == -5
    seen = SeenSet()
    forwards = sum(bool(flood_step(seen, 0.0, "b", "m1", "a", "a", arriving_hops(h, hops), None,
                                   ["a", "c"])[1]) for h in range(1, 1001))
    assert forwards == hops - 1


def test_inbox_keeps_payloads_as_text_and_shows_them_parsed():
    inbox = Inbox(capacity=2)
    shown = inbox.add(msg_id="m1", origin="a", kind="broadcast", payload='{"a": [1, {}]}', at=1.0)
    assert shown["payload"] == {"a": [1, {}]}
    inbox.add(msg_id="m2", origin="a", kind="broadcast", payload="not json", at=2.0)
    assert [i["payload"] for i in inbox.since(0)] == [{"a": [1, {}]}, "not json"]
    # what it holds is the text: a peer's payload costs its size, not ~20x
    assert all(isinstance(i["payload"], str) for i in inbox._items)


def test_the_mesh_forgets_old_backoffs_and_trims_its_peer_cache():
    """Both tables used to keep every peer ever seen, gone ones too."""
    from trustnet.node.mesh import forget_old_backoffs, trim_known

    backoff = {"old": (5, 100.0), "recent": (2, 150.0), "waiting": (1, 300.0)}
    forget_old_backoffs(backoff, now=200.0, horizon=60.0)
    assert set(backoff) == {"recent", "waiting"}

    known = {f"p{i}": {"address": f"ws://[::1]:{i + 1}"} for i in range(10)}
    trim_known(known, keep={"p3", "p7"}, limit=10)
    assert len(known) == 10  # within the limit: a cache is left alone
    known["p10"] = {"address": "ws://[::1]:11"}
    trim_known(known, keep={"p3", "p7"}, limit=10)
    assert set(known) == {"p3", "p7"}


def test_a_hello_identity_checks_only_for_its_node_addresses_time_and_key():
    """What a TLS node's hello carries (peer_tls.PeerTLS): the dialler's
    signature over both addresses, the key pinned for the acceptor and the
    time."""
    from trustnet.node.handshake import check_hello_identity, hello_identity, hello_node

    a, b, other = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    frm, to, now = "wss://[fd10::1]:9000", "wss://[fd10::2]:9000", 1_800_000_000.5
    ident = hello_identity(a, "a", frm, to, b.public_key, now)
    assert hello_node(ident) == "a"

    def check(key=a.public_key, ident=ident, frm=frm, to=to, to_key=b.public_key, at=now):
        check_hello_identity(key, ident, frm, to, to_key, at, 60)

    check(at=now + 59)  # fine
    for wrong in ({"key": other.public_key},  # someone else's name
                  {"to": "wss://[fd10::3]:9000"},  # passed on to another address
                  {"to_key": other.public_key},  # to whoever held that address's pin
                  {"frm": "wss://[fd10::4]:9000"},
                  {"ident": {**ident, "node": "b"}},
                  {"key": None}):
        with pytest.raises(ValueError, match="not signed by the key"):
            check(**wrong)
    with pytest.raises(ValueError, match="not within 60s"):
        check(at=now + 61)  # an old one
    with pytest.raises(ValueError, match="not within"):
        check(ident={**ident, "ts": True})
    for bad in (None, "a", {"node": "a"}, {**ident, "extra": 1}, {**ident, "node": 3}):
        with pytest.raises(ValueError, match="signed identity"):
            hello_node(bad)


def test_peer_tls_pins_only_the_nodes_it_dials_or_links_and_never_a_registry(tmp_path):
    """A registry replica's certificate is checked against its CA (no pin,
    and no identity sent to it); a peer's against the key of the node being
    dialled or linked there; any other address gets a pin no certificate
    carries, never a CA check (a node that registered at the registry's
    address could otherwise have its key pinned for it)."""
    import types

    from trustnet.node.peer_tls import NO_PIN, PeerTLS
    from trustnet.tls import peer_pin

    me, peer = NodeIdentity.load_or_create(tmp_path), NodeIdentity.generate()
    tls = PeerTLS(me, "me", str(tmp_path / "node.key"), "fd10::1", str(tmp_path))
    registry, linked = "wss://[fd10::ffff]:8001", "wss://[fd10::2]:9000"
    mesh = types.SimpleNamespace(key_at=lambda address: {
        linked: peer.public_key, registry: peer.public_key}.get(address))
    tls.node = types.SimpleNamespace(registry_addresses=(registry,), actors={"mesh": mesh},
                                     system=types.SimpleNamespace(address="wss://[fd10::1]:9000"))
    assert tls.pin(registry) is None and tls.hello(registry) is None
    assert tls.pin(linked) == peer_pin(peer.public_key)
    assert tls.pin("wss://[fd10::3]:9000") == NO_PIN
    assert tls.hello(linked)["node"] == "me"
