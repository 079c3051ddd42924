"""The registry state machine: commands, refusals, batches, replay, storage."""

from __future__ import annotations

import os
import sqlite3

import orjson
import pytest

from actors.codec import error_body, error_from_body, from_wire, to_wire
from trustnet.registry.commands import (
    AddPeer,
    CheckpointLeases,
    Conflict,
    CreateDomain,
    DeleteNode,
    ExpireNodes,
    Invalid,
    LeaseEntry,
    NotFound,
    RegisterNode,
    ReleaseIdentity,
    RemovePeer,
    ReputationEntry,
    SetReputation,
)
from trustnet.registry.leases import LeaseTable
from trustnet.registry.state import (
    _NODE_FIELDS,
    _NODE_SELECT,
    AlreadyApplied,
    DatabaseUnavailable,
    NotARegistryDatabase,
    RegistryState,
    domain_id_for,
    iso_utc,
)

T0 = 1_769_774_400.0  # 2026-01-30T12:00:00Z
NODE_KEYS = {"id", "domain", "ipv6", "port", "reputation", "last_heartbeat",
             "registered_at", "lease_deadline", "public_key"}


def reg(node_id: str, ipv6: str, domain: str = "alpha", at: float = T0, **kw) -> RegisterNode:
    return RegisterNode(node_id=node_id, ipv6=ipv6, port=kw.pop("port", 7000), domain=domain,
                        at=at, lease_deadline=kw.pop("lease_deadline", at + 30), **kw)


class Log:
    """Feeds commands with consecutive indices, as consensus would."""

    def __init__(self, state: RegistryState):
        self.state = state
        self.index = state.applied_index

    def apply(self, cmd):
        self.index += 1
        return self.state.apply(self.index, cmd)

    def batch(self, cmds):
        items = [(self.index + i, cmd) for i, cmd in enumerate(cmds, 1)]
        self.index += len(cmds)
        return self.state.apply_batch(items)


@pytest.fixture
def state():
    s = RegistryState.open(":memory:")
    yield s
    s.close()


@pytest.fixture
def log(state):
    return Log(state)


# ------------------------------------------------------------------ nodes


def test_register_creates_node_and_its_domain(state, log):
    node = log.apply(reg("n1", "FD10:1234:0:0:0:0:0:1", public_key="pk1"))

    assert set(node) == NODE_KEYS
    assert node == {
        "id": "n1", "domain": "alpha", "ipv6": "fd10:1234::1", "port": 7000,
        "reputation": 0.5, "last_heartbeat": "2026-01-30T12:00:00.000000Z",
        "registered_at": "2026-01-30T12:00:00.000000Z", "lease_deadline": T0 + 30,
        "public_key": "pk1",
    }
    assert state.get_node("n1") == node
    assert state.list_domains() == [{"id": domain_id_for("alpha"), "name": "alpha",
                                     "created_at": "2026-01-30T12:00:00.000000Z"}]
    assert state.node_count() == 1
    assert state.applied_index == 1


def test_register_again_updates_but_keeps_registration_time_and_key(state, log):
    log.apply(reg("n1", "fd10::1", public_key="pk1"))
    node = log.apply(reg("n1", "fd10::2", domain="beta", at=T0 + 60, port=7001,
                         public_key="pk1"))

    assert node["ipv6"] == "fd10::2" and node["port"] == 7001 and node["domain"] == "beta"
    assert node["registered_at"] == "2026-01-30T12:00:00.000000Z"
    assert node["last_heartbeat"] == "2026-01-30T12:01:00.000000Z"
    assert node["lease_deadline"] == T0 + 90
    assert node["public_key"] == "pk1"
    assert [d["name"] for d in state.list_domains()] == ["alpha", "beta"]
    # the old address is free again
    assert log.apply(reg("n2", "fd10::1"))["ipv6"] == "fd10::1"


def test_a_registration_answers_exactly_the_stored_row(state, log):
    """The upsert's RETURNING row is what a read gives, on create and on update."""
    created = log.apply(reg("a", "fd10::1", domain="alpha", public_key="k" * 43))
    assert created == state.get_node("a")
    log.apply(SetReputation(entries=(ReputationEntry(node_id="a", reputation=0.9),)))
    updated = log.apply(reg("a", "fd10::2", domain="beta", at=T0 + 5, public_key="k" * 43))
    assert updated == state.get_node("a")
    assert list(updated) == list(state.get_node("a"))  # same fields, same order
    assert updated["registered_at"] == created["registered_at"] and updated["reputation"] == 0.9
    assert updated["domain"] == "beta" and updated["ipv6"] == "fd10::2"


def test_ipv6_taken_by_another_node_is_a_conflict(state, log):
    log.apply(reg("n1", "fd10:1234::1"))
    before = state.state_hash()

    with pytest.raises(Conflict) as caught:
        log.apply(reg("n2", "fd10:1234:0::1"))  # same address, other spelling

    assert caught.value.code == "ipv6_taken"
    assert caught.value.details == {"ipv6": "fd10:1234::1", "node_id": "n1"}
    assert state.state_hash() == before
    assert state.applied_index == 2  # a refused entry is still applied
    with pytest.raises(NotFound):
        state.get_node("n2")


@pytest.mark.parametrize("field, value", [
    ("ipv6", "not-an-address"),
    ("ipv6", "192.0.2.1"),
    ("ipv6", 1),
    ("ipv6", "fe80::1%eth0"),
    ("port", 0),
    ("port", 65536),
    ("port", "7000"),
    ("port", True),
    ("at", float("nan")),
    ("at", 1e300),
    ("lease_deadline", float("inf")),
    ("node_id", ""),
    ("domain", None),
])
def test_malformed_registration_is_refused_without_side_effects(state, log, field, value):
    fields = {"node_id": "n1", "ipv6": "fd10::1", "port": 7000, "domain": "alpha",
              "at": T0, "lease_deadline": T0 + 30}
    fields[field] = value
    with pytest.raises(Invalid) as caught:
        log.apply(RegisterNode(**fields))
    assert caught.value.code == "invalid"
    assert caught.value.details == {"field": field}
    assert state.node_count() == 0 and state.list_domains() == []


def test_delete_node(state, log):
    log.apply(reg("n1", "fd10::1"))
    deleted = log.apply(DeleteNode("n1"))
    assert deleted["id"] == "n1"
    assert state.node_count() == 0
    with pytest.raises(NotFound) as caught:
        log.apply(DeleteNode("n1"))
    assert caught.value.code == "not_found"
    assert [d["name"] for d in state.list_domains()] == ["alpha"]  # domains outlive nodes


def test_create_domain_and_duplicate(state, log):
    domain = log.apply(CreateDomain("beta", T0))
    assert domain == {"id": domain_id_for("beta"), "name": "beta",
                      "created_at": "2026-01-30T12:00:00.000000Z"}
    with pytest.raises(Conflict) as caught:
        log.apply(CreateDomain("beta", T0 + 1))
    assert caught.value.code == "domain_exists"
    assert domain_id_for("beta") == domain_id_for("beta") != domain_id_for("gamma")


# ------------------------------------------------------------------ peers


def test_peers_are_normalised_idempotent_and_removable_in_any_order(state, log):
    log.batch([reg("b", "fd10::2"), reg("a", "fd10::1"), reg("c", "fd10::3")])

    first = log.apply(AddPeer("b", "a", T0))
    again = log.apply(AddPeer("a", "b", T0 + 5))

    assert first == again == {"node_a": "a", "node_b": "b",
                              "connected_at": "2026-01-30T12:00:00.000000Z"}
    log.apply(AddPeer("c", "b", T0))
    assert [(p["node_a"], p["node_b"]) for p in state.list_peers()] == [("a", "b"), ("b", "c")]
    assert [(p["node_a"], p["node_b"]) for p in state.list_peers("a")] == [("a", "b")]
    assert log.apply(RemovePeer("b", "a")) == {"node_a": "a", "node_b": "b"}
    assert [(p["node_a"], p["node_b"]) for p in state.list_peers()] == [("b", "c")]
    with pytest.raises(NotFound):
        log.apply(RemovePeer("a", "b"))


def test_peer_refusals(state, log):
    log.apply(reg("a", "fd10::1"))
    with pytest.raises(Invalid):
        log.apply(AddPeer("a", "a", T0))
    with pytest.raises(NotFound) as caught:
        log.apply(AddPeer("a", "ghost", T0))
    assert caught.value.details == {"node_id": "ghost"}
    with pytest.raises(NotFound):
        state.list_peers("ghost")
    assert state.list_peers() == []


def test_deleting_a_node_deletes_its_peer_links(state, log):
    log.batch([reg("a", "fd10::1"), reg("b", "fd10::2"), reg("c", "fd10::3"),
               AddPeer("a", "b", T0), AddPeer("b", "c", T0), AddPeer("a", "c", T0)])

    log.apply(DeleteNode("b"))

    assert [(p["node_a"], p["node_b"]) for p in state.list_peers()] == [("a", "c")]


# ------------------------------------------------------------------ leases


def test_expire_removes_only_present_nodes(state, log):
    log.batch([reg("a", "fd10::1"), reg("b", "fd10::2"), reg("c", "fd10::3"),
               AddPeer("a", "c", T0)])

    result = log.apply(ExpireNodes(("c", "ghost", "a", "c"), T0 + 100))

    assert result == {"expired": ["c", "a"]}
    assert [n["id"] for n in state.list_nodes()["nodes"]] == ["b"]
    assert state.list_peers() == []
    assert log.apply(ExpireNodes(("a",), T0 + 101)) == {"expired": []}


def test_checkpoint_updates_known_nodes_and_skips_unknown(state, log):
    log.batch([reg("a", "fd10::1"), reg("b", "fd10::2")])

    result = log.apply(CheckpointLeases((LeaseEntry("a", T0 + 300, T0 + 270),
                                         LeaseEntry("ghost", T0 + 300, T0 + 270))))

    assert result == {"updated": 1}
    assert state.get_node("a")["lease_deadline"] == T0 + 300
    assert state.get_node("a")["last_heartbeat"] == "2026-01-30T12:04:30.000000Z"
    assert state.lease_table() == {"a": (T0 + 300, T0 + 270), "b": (T0 + 30, T0)}


def test_checkpoint_with_a_bad_entry_changes_nothing(state, log):
    log.apply(reg("a", "fd10::1"))
    with pytest.raises(Invalid):
        log.apply(CheckpointLeases((LeaseEntry("a", T0 + 300, T0 + 270),
                                    LeaseEntry("a", float("nan"), T0))))
    assert state.lease_table() == {"a": (T0 + 30, T0)}


def test_checkpoints_keep_the_last_leader_pulse_and_snapshots_carry_it(state, log):
    """A new leader learns from it how long the group was down
    (RegistryActor._become_leader); a replica restored from a snapshot must
    know it as well as one that applied the log."""
    assert state.leader_pulse() is None
    log.apply(CheckpointLeases(()))  # written before the pulse existed: no pulse
    assert state.leader_pulse() is None
    log.apply(CheckpointLeases((), at=T0 + 10))  # a leader whose clock ran ahead
    log.apply(CheckpointLeases((), at=T0 + 5))  # the next leader's: the last one counts
    assert state.leader_pulse() == T0 + 5
    log.apply(CheckpointLeases((), at=T0 + 10))
    with pytest.raises(Invalid):
        log.apply(CheckpointLeases((), at="soon"))
    other = RegistryState.open(":memory:")
    try:
        other.restore(state.snapshot(), state.applied_index)
        assert other.leader_pulse() == T0 + 10
        empty = RegistryState.open(":memory:")
        other.restore(empty.snapshot(), 0)  # a snapshot without one removes it
        empty.close()
        assert other.leader_pulse() is None
    finally:
        other.close()


# ------------------------------------------------------------------ reads


def _pages(state, **kw):
    ids, after, pages = [], None, 0
    while True:
        page = state.list_nodes(after=after, **kw)
        ids += [n["id"] for n in page["nodes"]]
        pages += 1
        after = page["next"]
        if after is None:
            return ids, pages


def test_pagination_across_1000_nodes_with_domain_filter(state, log):
    domains = ("alpha", "beta", "gamma")
    cmds = [reg(f"node-{i:04d}", f"fd10::{i + 1:x}", domain=domains[i % 3])
            for i in reversed(range(1000))]
    log.batch(cmds)

    beta, pages = _pages(state, domain="beta", limit=50)
    assert beta == sorted(f"node-{i:04d}" for i in range(1000) if i % 3 == 1)
    assert pages == 7  # 333 nodes: six full pages and one of 33

    everyone, _ = _pages(state, limit=1000)
    assert everyone == sorted(c.node_id for c in cmds)
    page = state.list_nodes(domain="gamma", limit=5, after="node-0500")
    assert [n["id"] for n in page["nodes"]] == [
        "node-0503", "node-0506", "node-0509", "node-0512", "node-0515"]
    assert all(n["domain"] == "gamma" for n in page["nodes"])
    assert page["next"] == "node-0515"
    with pytest.raises(NotFound):
        state.list_nodes(domain="nowhere")
    with pytest.raises(Invalid):
        state.list_nodes(limit=0)


def test_pages_take_ids_from_memory_and_read_only_uncached_rows_by_key(state, log):
    log.apply(reg("n1", "fd10::1"))
    leases = LeaseTable(ttl=30.0)
    statements: list[str] = []
    state._conn.set_trace_callback(statements.append)
    state.list_nodes(domain="alpha", limit=10, after="a", leases=leases)
    state.list_nodes(limit=10, after="a", leases=leases)
    state._conn.set_trace_callback(None)

    selects = [s for s in statements if "FROM nodes" in s and s.lstrip().startswith("SELECT")]
    # the ids come from NodeOrder; n1's row is read once (the second page
    # finds it cached), by primary key
    assert len(selects) == 1, selects
    plan = " | ".join(row[3] for row in state._conn.execute("EXPLAIN QUERY PLAN " + selects[0]))
    assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    assert "(id=?)" in plan, plan


def test_a_renewal_keeps_the_row_and_only_its_lease_is_read_again(state, log):
    """A renewal changes only a row's lease fields: the next page appends the
    new lease to the row it had, without reading SQLite; a write to the row
    after that renewal still shows."""
    log.apply(reg("n1", "fd10::1", port=7001))
    leases = LeaseTable(ttl=30.0)
    leases.grant("n1", T0)
    state.list_nodes(limit=10, leases=leases)  # cached
    leases.grant("n1", T0 + 5)
    statements: list[str] = []
    state._conn.set_trace_callback(statements.append)
    [row] = state.list_nodes(limit=10, leases=leases)["nodes"]
    state._conn.set_trace_callback(None)
    assert not [s for s in statements if "FROM nodes" in s], statements
    assert row["lease_deadline"] == T0 + 35 and row["last_heartbeat"] == iso_utc(T0 + 5)

    leases.grant("n1", T0 + 6)  # renewed again, then the row itself changes
    log.apply(reg("n1", "fd10::1", port=7002))
    [row] = state.list_nodes(limit=10, leases=leases)["nodes"]
    assert row["port"] == 7002 and row["last_heartbeat"] == iso_utc(T0 + 6)
    leases.drop("n1")  # no live lease: the stored one shows
    [row] = state.list_nodes(limit=10, leases=leases)["nodes"]
    assert row == _uncached_pages(state, None, leases)[0]


class _RowsThatYield(dict):
    """A row cache that runs `hook` inside its next pop(): another thread
    gets the GIL right where a renewal has taken the row out."""

    hook = None

    def pop(self, *args):
        row = super().pop(*args)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return row


def test_a_renewal_racing_a_write_applied_in_a_thread_never_brings_the_old_row_back(state, log):
    """Batches of many entries are applied in a worker thread while renewals
    arrive on the event loop: the renewal must not file the head of a row
    the batch has just rewritten (found by review: port 7001 came back)."""
    import threading
    log.apply(reg("n1", "fd10::1", port=7001))
    leases = LeaseTable(ttl=30.0)
    leases.grant("n1", T0)
    state.list_nodes(limit=10, leases=leases)  # n1 cached
    state._rows = _RowsThatYield(state._rows)
    worker = threading.Thread(target=log.apply, args=(reg("n1", "fd10::1", port=7002),))

    def write_in_a_thread():
        worker.start()
        worker.join(timeout=0.5)  # done by then, unless it waits for the renewal

    state._rows.hook = write_in_a_thread
    leases.grant("n1", T0 + 5)  # the renewal
    worker.join()
    [row] = state.list_nodes(limit=10, leases=leases)["nodes"]
    assert row["port"] == 7002
    assert row == _uncached_pages(state, None, leases)[0]


def test_a_renewal_while_a_batch_holds_the_state_drops_the_row_without_waiting(state, log):
    import threading
    log.apply(reg("n1", "fd10::1", port=7001))
    leases = LeaseTable(ttl=30.0)
    leases.grant("n1", T0)
    state.list_nodes(limit=10, leases=leases)
    held, release = threading.Event(), threading.Event()

    def batch_under_way():
        with state._lock:
            held.set()
            release.wait()

    worker = threading.Thread(target=batch_under_way, daemon=True)
    worker.start()
    held.wait()
    try:
        leases.grant("n1", T0 + 5)  # returns at once, the lock being held elsewhere
        assert "n1" not in state._rows and "n1" not in state._heads
    finally:
        release.set()
        worker.join()
    [row] = state.list_nodes(limit=10, leases=leases)["nodes"]
    assert row == _uncached_pages(state, None, leases)[0]


def _with_lease(row: dict, leases: LeaseTable) -> dict:
    if leases.deadline(row["id"]) is not None:
        row = {**row, "lease_deadline": leases.deadline(row["id"]),
               "last_heartbeat": iso_utc(leases.last_renewal(row["id"]))}
    return row


def _uncached_pages(state, domain, leases):
    """Every node as a page would show it, read straight from the table."""
    rows = [dict(zip(_NODE_FIELDS, row)) for row in state._conn.execute(
        _NODE_SELECT + " ORDER BY n.id")]
    return [_with_lease(r, leases) for r in rows if domain is None or r["domain"] == domain]


@pytest.mark.parametrize("seed", range(6))
def test_pages_served_from_the_row_cache_always_match_the_table(state, log, seed):
    """Random writes of every kind (refused ones, a batch rolled back by a bug,
    a snapshot restored) and lease changes (renewals, drops, a new lease
    table) between page reads: a cached row is never stale."""
    import random
    rng = random.Random(seed)
    names = [f"n{i:02d}" for i in range(12)]
    domains = ("alpha", "beta")
    key = "MCowBQYDK2VwAyEA" + "A" * 43 + "="  # not a real key: stored as given
    other = RegistryState.open(":memory:")
    Log(other).batch([reg("x1", "fd10::99"), reg("n00", "fd10::98", domain="beta")])
    now = T0
    leases = LeaseTable(ttl=60.0)

    def change_leases():
        nonlocal leases
        for node in rng.sample(names, rng.randrange(0, 4)):
            if rng.random() < 0.3:
                leases.drop(node)
            else:
                leases.grant(node, now + rng.random())
        if rng.random() < 0.03:  # a restarted actor, a new leader
            leases = LeaseTable(ttl=60.0)

    def command():
        node = rng.choice(names)
        match rng.randrange(8):
            case 0 | 1:  # register or update: domain, port, address, key may change
                return reg(node, f"fd10::{rng.randrange(1, 30):x}", domain=rng.choice(domains),
                           at=now, port=rng.randrange(1, 9), public_key=rng.choice([None, key]))
            case 2:
                return DeleteNode(node_id=node)
            case 3:
                return ExpireNodes(node_ids=tuple(rng.sample(names, 3)), at=now + 60)
            case 4:
                return CheckpointLeases(entries=tuple(
                    LeaseEntry(node_id=n, deadline=now + rng.random() * 90, last_heartbeat=now)
                    for n in rng.sample(names, 4)))
            case 5:
                return SetReputation(entries=tuple(
                    ReputationEntry(node_id=n, reputation=rng.random()) for n in rng.sample(names, 3)))
            case 6:
                return ReleaseIdentity(node_id=node)
            case 7:
                return AddPeer(node_a=node, node_b=rng.choice(names), at=now)

    for step in range(80):
        now += 1
        if rng.random() < 0.5:  # renewals before the writes too: a row cached,
            change_leases()     # renewed, then written
        roll = rng.random()
        if roll < 0.05:
            state.restore(other.snapshot(), other.applied_index)
            log.index = other.applied_index
        elif roll < 0.1:
            with pytest.raises(TypeError):
                log.batch([command(), command(), object()])  # a bug: all rolled back
            log.index -= 3
        else:
            log.batch([command() for _ in range(rng.randrange(1, 4))])
        change_leases()
        for domain in (None, *domains):
            try:
                ids, _ = _pages(state, domain=domain, limit=rng.choice([1, 3, 100]))
            except NotFound:  # the domain is gone with a restore
                continue
            # (get_node reads the table)
            nodes = [_with_lease(state.get_node(i), leases) for i in ids]
            page_rows = []
            after = None
            while True:
                page = state.list_nodes(domain=domain, limit=5, after=after, leases=leases)
                page_rows += page["nodes"]
                if (after := page["next"]) is None:
                    break
            assert page_rows == _uncached_pages(state, domain, leases) == nodes, (seed, step)
            stored = state.list_nodes(domain=domain, limit=1000)["nodes"]
            assert stored == _uncached_pages(state, domain, LeaseTable(ttl=1.0)), (seed, step)
    other.close()


# ------------------------------------------------------------------ batches and replay


def test_batch_keeps_the_others_when_one_is_refused(state, log):
    results = log.batch([reg("a", "fd10::1"), reg("b", "fd10::1"), reg("c", "fd10::3")])

    assert results[0]["id"] == "a" and results[2]["id"] == "c"
    assert isinstance(results[1], Conflict) and results[1].code == "ipv6_taken"
    assert [n["id"] for n in state.list_nodes()["nodes"]] == ["a", "c"]
    assert state.applied_index == 3


def test_a_refused_command_is_rolled_back_to_its_own_savepoint(state, log):
    # No real handler writes before it refuses today; this one does, to pin
    # down that a refusal undoes its command's partial work and nothing else.
    def writes_then_refuses(cmd):
        state._ensure_domain("half-done", "2026-01-30T12:00:00.000000Z")
        raise Invalid("refused after writing", {"field": "node_id"})

    state._handlers[DeleteNode] = writes_then_refuses
    results = log.batch([CreateDomain("kept-1", T0), DeleteNode("x"), CreateDomain("kept-2", T0)])

    assert isinstance(results[1], Invalid)
    assert [d["name"] for d in state.list_domains()] == ["kept-1", "kept-2"]
    assert state.applied_index == 3


def test_a_bug_in_a_batch_rolls_back_the_whole_batch(state, log):
    log.apply(reg("a", "fd10::1"))
    before = state.state_hash()

    with pytest.raises(TypeError):
        state.apply_batch([(2, reg("b", "fd10::2")), (3, object()), (4, reg("c", "fd10::3"))])

    assert state.state_hash() == before
    assert state.applied_index == 1
    assert state.apply(2, reg("b", "fd10::2"))["id"] == "b"  # the batch can be retried


def test_replaying_an_applied_index_is_a_no_op(state):
    assert state.apply(1, reg("a", "fd10::1", lease_deadline=T0 + 30))["id"] == "a"
    assert state.apply(1, reg("a", "fd10::9", lease_deadline=T0 + 99)) is AlreadyApplied
    assert state.get_node("a")["ipv6"] == "fd10::1"

    results = state.apply_batch([(1, DeleteNode("a")), (2, reg("b", "fd10::2"))])
    assert results[0] is AlreadyApplied and results[1]["id"] == "b"
    assert state.node_count() == 2 and state.applied_index == 2


def test_apply_next_numbers_commands_under_the_lock(tmp_path):
    """Two threads apply_next at once: every command gets its own index."""
    import threading

    state = RegistryState.open(str(tmp_path / "r.db"))
    try:
        errors: list[BaseException] = []

        def writer(prefix: str, n: int) -> None:
            try:
                for i in range(n):
                    [result] = state.apply_next([reg(f"{prefix}{i}", f"fd10:{prefix == 'b':x}::{i + 1:x}")])
                    assert result is not AlreadyApplied and result["id"] == f"{prefix}{i}"
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(p, 60)) for p in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert state.node_count() == 120 and state.applied_index == 120
    finally:
        state.close()


def test_indices_must_increase(state):
    with pytest.raises(ValueError):
        state.apply_batch([(2, reg("a", "fd10::1")), (2, reg("b", "fd10::2"))])
    with pytest.raises(ValueError):
        state.apply(0, reg("a", "fd10::1"))
    assert state.node_count() == 0 and state.applied_index == 0


def test_unknown_command_type_is_a_bug_not_a_refusal(state):
    with pytest.raises(TypeError, match="not a registry command"):
        state.apply(1, LeaseEntry("a", T0, T0))
    assert state.applied_index == 0


# ------------------------------------------------------------------ storage


def test_state_survives_close_and_reopen(tmp_path):
    path = str(tmp_path / "registry.db")
    with RegistryState.open(path) as state:
        Log(state).batch([reg("a", "fd10::1"), reg("b", "fd10::2"), AddPeer("a", "b", T0)])
        digest = state.state_hash()

    with RegistryState.open(path) as state:
        assert state.applied_index == 3
        assert state.state_hash() == digest
        assert state.list_peers() == [{"node_a": "a", "node_b": "b",
                                       "connected_at": "2026-01-30T12:00:00.000000Z"}]
        assert state.apply(3, DeleteNode("a")) is AlreadyApplied  # replay after restart
        assert state.node_count() == 2
        mode = state._conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    original = path.read_bytes()

    with pytest.raises(NotARegistryDatabase, match="no 'meta' table") as caught:
        RegistryState.open(str(path))

    assert str(path) in str(caught.value)
    assert path.read_bytes() == original


def test_a_meta_table_of_another_app_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    conn.execute("INSERT INTO meta VALUES ('app', 'something-else')")
    conn.commit()
    conn.close()
    with pytest.raises(NotARegistryDatabase, match="something-else"):
        RegistryState.open(str(path))


def test_a_newer_schema_version_is_refused(tmp_path):
    path = str(tmp_path / "registry.db")
    RegistryState.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(NotARegistryDatabase, match="schema_version is 99"):
        RegistryState.open(path)


def test_a_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(NotARegistryDatabase, match="not an SQLite database") as caught:
        RegistryState.open(str(path))
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("where, why", [
    ("missing/registry.db", "does not exist"),
    ("", "is a directory"),
])
def test_an_unopenable_path_is_unavailable(tmp_path, where, why):
    path = str(tmp_path / where) if where else str(tmp_path)
    with pytest.raises(DatabaseUnavailable, match=why) as caught:
        RegistryState.open(path)
    assert path in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_path_without_permission_is_unavailable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(DatabaseUnavailable, match="permission"):
        RegistryState.open(str(locked / "registry.db"))


def test_an_empty_file_becomes_a_registry(tmp_path):
    path = tmp_path / "registry.db"
    path.touch()
    with RegistryState.open(str(path)) as state:
        assert state.applied_index == 0 and state.node_count() == 0
    with RegistryState.open(str(path)) as state:
        assert state.applied_index == 0


# ------------------------------------------------------------------ determinism


def _history():
    return [
        reg("a", "fd10::1"), reg("b", "fd10::2", domain="beta"), reg("c", "fd10::3"),
        AddPeer("c", "a", T0 + 1), reg("d", "fd10::1"),  # refused
        CheckpointLeases((LeaseEntry("a", T0 + 60, T0 + 40),)),
        ExpireNodes(("b",), T0 + 90), CreateDomain("gamma", T0 + 91),
    ]


def test_replicas_fed_the_same_commands_have_the_same_hash(tmp_path):
    with RegistryState.open(":memory:") as one, \
            RegistryState.open(str(tmp_path / "two.db")) as two:
        Log(one).batch(_history())
        two_log = Log(two)
        for cmd in _history():  # one at a time here: batching must not matter
            try:
                two_log.apply(cmd)
            except (Conflict, NotFound, Invalid):
                pass
        assert one.state_hash() == two.state_hash()
        assert len(one.state_hash()) == 64

        two_log.apply(CheckpointLeases((LeaseEntry("a", T0 + 61, T0 + 40),)))
        assert one.state_hash() != two.state_hash()


def test_hash_covers_every_table(state, log):
    hashes = {state.state_hash()}
    log.apply(CreateDomain("alpha", T0))
    hashes.add(state.state_hash())
    log.batch([reg("a", "fd10::1"), reg("b", "fd10::2")])
    hashes.add(state.state_hash())
    log.apply(AddPeer("a", "b", T0))
    hashes.add(state.state_hash())
    assert len(hashes) == 4


# ------------------------------------------------------------------ wire


@pytest.mark.parametrize("cmd", [
    reg("n1", "fd10::1"),
    reg("n1", "fd10::1", public_key="pk"),
    DeleteNode("n1"),
    CreateDomain("alpha", T0),
    AddPeer("a", "b", T0),
    RemovePeer("a", "b"),
    ExpireNodes(("a", "b"), T0),
    ExpireNodes((), T0),
    CheckpointLeases((LeaseEntry("a", T0 + 30, T0), LeaseEntry("b", T0 + 31, T0 + 1))),
], ids=lambda cmd: type(cmd).__name__)
def test_commands_round_trip_the_wire(cmd):
    decoded = from_wire(orjson.loads(orjson.dumps(to_wire(cmd))))
    assert decoded == cmd
    assert type(decoded) is type(cmd)
    assert hash(decoded) == hash(cmd)


@pytest.mark.parametrize("refusal", [
    NotFound("node 'x' is not registered", {"node_id": "x"}),
    Conflict("ipv6_taken", "taken", {"ipv6": "fd10::1"}),
    Invalid("port must be ...", {"field": "port"}),
])
def test_refusals_cross_the_wire_as_themselves(refusal):
    rebuilt = error_from_body(orjson.loads(orjson.dumps(error_body(refusal))))
    assert type(rebuilt) is type(refusal)
    assert (rebuilt.code, rebuilt.message, rebuilt.details) == (
        refusal.code, refusal.message, refusal.details)


# ------------------------------------------------------------ identities


def test_first_keyed_registration_binds_the_name(state, log):
    log.apply(reg("n1", "fd10::1", public_key="pk1"))
    with pytest.raises(Conflict) as other_key:
        log.apply(reg("n1", "fd10::1", public_key="pk2"))
    assert other_key.value.code == "name_taken"
    with pytest.raises(Conflict) as unsigned:
        log.apply(reg("n1", "fd10::1"))
    assert unsigned.value.code == "name_taken"
    assert state.public_key_of("n1") == "pk1"


def test_binding_outlives_expiry_until_released(state, log):
    log.apply(reg("n1", "fd10::1", public_key="pk1"))
    log.apply(ExpireNodes(node_ids=("n1",), at=T0 + 100))
    with pytest.raises(Conflict):
        log.apply(reg("n1", "fd10::1", public_key="thief"))
    assert log.apply(ReleaseIdentity(node_id="n1")) == {"node_id": "n1", "released": True}
    assert log.apply(reg("n1", "fd10::1", public_key="new"))["public_key"] == "new"
    with pytest.raises(NotFound):
        log.apply(ReleaseIdentity(node_id="nobody"))


def test_the_key_cache_follows_binds_releases_rollbacks_and_restores(state, log):
    """public_key_of answers from memory: it must never answer stale."""
    assert state.public_key_of("n1") is None  # cached as unbound...
    log.apply(reg("n1", "fd10::1", public_key="pk1"))
    assert state.public_key_of("n1") == "pk1"  # ...and forgotten when bound
    snap, at = state.snapshot(), state.applied_index
    log.apply(ReleaseIdentity(node_id="n1"))
    assert state.public_key_of("n1") is None
    # A registration that binds a name but is refused (address taken) binds nothing.
    log.apply(reg("n2", "fd10::2"))
    assert state.public_key_of("n3") is None
    with pytest.raises(Conflict):
        log.apply(reg("n3", "fd10::2", public_key="pk3"))
    assert state.public_key_of("n3") is None
    # Restoring an older snapshot brings the old binding back.
    state.restore(snap, at)
    assert state.public_key_of("n1") == "pk1"
    # The cache agrees with the table throughout.
    for name in ("n1", "n2", "n3"):
        row = state._conn.execute("SELECT public_key FROM identities WHERE node_id = ?",
                                  [name]).fetchone()
        assert state.public_key_of(name) == (row[0] if row else None)


def test_unkeyed_names_stay_open(state, log):
    log.apply(reg("n1", "fd10::1"))
    assert log.apply(reg("n1", "fd10::2"))["ipv6"] == "fd10::2"
    assert state.public_key_of("n1") is None


def test_set_reputation(state, log):
    log.apply(reg("n1", "fd10::1"))
    out = log.apply(SetReputation(entries=(ReputationEntry("n1", 0.9),
                                           ReputationEntry("ghost", 0.1))))
    assert out == {"updated": 1}
    assert state.get_node("n1")["reputation"] == 0.9
    with pytest.raises(Invalid):
        log.apply(SetReputation(entries=(ReputationEntry("n1", 1.5),)))
