"""LeaseTable: in-memory leases in one-second buckets (no clock, no I/O)."""

from __future__ import annotations

import random

import orjson
import pytest

from trustnet.registry.leases import LeaseTable

T0 = 1_769_774_400.0  # 2026-01-30T12:00:00Z


@pytest.fixture
def table() -> LeaseTable:
    return LeaseTable(ttl=30.0)


# ------------------------------------------------------------------ grant


def test_grant_defaults_to_now_plus_ttl(table):
    assert table.grant("a", T0) == T0 + 30
    assert table.deadline("a") == T0 + 30
    assert table.last_renewal("a") == T0
    assert "a" in table and len(table) == 1


def test_grant_with_explicit_deadline(table):
    assert table.grant("a", T0, T0 + 500.25) == T0 + 500.25
    assert table.deadline("a") == T0 + 500.25
    assert table.last_renewal("a") == T0


def test_unknown_node_has_no_lease(table):
    assert table.deadline("nobody") is None
    assert table.last_renewal("nobody") is None
    assert "nobody" not in table and len(table) == 0


def test_regrant_moves_the_lease_out_of_its_old_bucket(table):
    table.grant("a", T0)  # deadline T0 + 30
    table.grant("a", T0 + 100)  # deadline T0 + 130
    assert table.expired(T0 + 31) == []  # the old deadline no longer counts
    assert table.expired(T0 + 130) == ["a"]


def test_regrant_to_an_earlier_deadline_expires_at_the_new_one(table):
    table.grant("a", T0, T0 + 100)
    table.grant("a", T0 + 1, T0 + 5)
    assert table.expired(T0 + 5) == ["a"]


# ------------------------------------------------------------------ renew


def test_renew_pushes_the_deadline_forward(table):
    table.grant("a", T0)
    assert table.renew("a", T0 + 20) == T0 + 50
    assert table.deadline("a") == T0 + 50
    assert table.last_renewal("a") == T0 + 20
    assert table.expired(T0 + 30) == []
    assert table.expired(T0 + 50) == ["a"]


def test_renew_of_an_unknown_node_is_none_and_grants_nothing(table):
    assert table.renew("ghost", T0) is None
    assert "ghost" not in table
    assert table.take_dirty() == []


# ------------------------------------------------------------------ drop


def test_drop_forgets_the_lease(table):
    table.grant("a", T0)
    table.drop("a")
    assert "a" not in table and table.deadline("a") is None
    assert table.last_renewal("a") is None
    assert table.expired(T0 + 1000) == []
    assert table.take_dirty() == []  # a dropped lease is not checkpointed
    assert table.renew("a", T0 + 1) is None


def test_drop_of_an_unknown_node_is_harmless(table):
    table.drop("ghost")
    assert len(table) == 0


def test_dropped_then_regranted_node_counts_once(table):
    table.grant("a", T0)
    table.drop("a")
    table.grant("a", T0 + 10)
    assert len(table) == 1
    assert table.expired(T0 + 30) == []
    assert table.expired(T0 + 40) == ["a"]


# ------------------------------------------------------------------ expired


def test_expired_is_empty_before_any_deadline(table):
    table.grant("a", T0)  # deadline T0 + 30
    table.grant("b", T0, T0 + 29.75)  # shares the bucket of second 29 with "now" below
    assert table.expired(T0) == []
    assert table.expired(T0 + 29.5) == []
    assert table.expired(T0 + 29.749) == []
    assert table.expired(T0 + 29.999) == ["b"]


def test_deadline_exactly_at_now_is_expired(table):
    table.grant("a", T0)
    assert table.expired(T0 + 30) == ["a"]


def test_fractional_deadlines_within_one_bucket(table):
    # 10.2 and 10.8 share the bucket of second 10; only the passed one is due.
    table.grant("early", T0, T0 + 10.2)
    table.grant("late", T0, T0 + 10.8)
    assert table.expired(T0 + 10.1) == []
    assert table.expired(T0 + 10.2) == ["early"]
    assert table.expired(T0 + 10.5) == ["early"]
    assert table.expired(T0 + 10.8) == ["early", "late"]


def test_fractional_deadline_just_past_a_bucket_boundary(table):
    table.grant("a", T0, T0 + 11.0)
    table.grant("b", T0, T0 + 10.999_999)
    assert table.expired(T0 + 10.5) == []
    assert table.expired(T0 + 10.999_999) == ["b"]
    assert table.expired(T0 + 11.0) == ["a", "b"]


def test_deadline_at_bucket_start_seen_from_a_later_bucket(table):
    table.grant("a", T0, T0 + 10.0)
    assert table.expired(T0 + 9.999) == []
    assert table.expired(T0 + 57.5) == ["a"]


def test_expired_leases_stay_until_dropped(table):
    """An expiry that fails to commit must be found again by the next sweep."""
    table.grant("a", T0)
    assert table.expired(T0 + 31) == ["a"]
    assert table.expired(T0 + 32) == ["a"]
    assert "a" in table
    table.drop("a")
    assert table.expired(T0 + 33) == []


def test_expired_order_is_sorted_by_id_across_buckets(table):
    table.grant("zeta", T0, T0 + 1)
    table.grant("alpha", T0, T0 + 5)
    table.grant("mid", T0, T0 + 3.5)
    assert table.expired(T0 + 10) == ["alpha", "mid", "zeta"]


def test_a_renewed_lease_left_an_empty_bucket_behind(table):
    table.grant("a", T0)
    table.renew("a", T0 + 25)
    # the bucket of T0 + 30 is empty now; sweeping it finds nothing and is safe
    assert table.expired(T0 + 30) == []
    assert table.expired(T0 + 30) == []
    assert table.expired(T0 + 55) == ["a"]


# ------------------------------------------------------------------ take_dirty


def test_take_dirty_returns_changes_once(table):
    table.grant("b", T0)
    table.grant("a", T0 + 1)
    assert table.take_dirty() == [("a", T0 + 31, T0 + 1), ("b", T0 + 30, T0)]
    assert table.take_dirty() == []


def test_take_dirty_reports_the_latest_renewal(table):
    table.grant("a", T0)
    table.take_dirty()
    table.renew("a", T0 + 5)
    table.renew("a", T0 + 9)
    assert table.take_dirty() == [("a", T0 + 39, T0 + 9)]


def test_take_dirty_skips_untouched_leases(table):
    table.grant("a", T0)
    table.grant("b", T0)
    table.take_dirty()
    table.renew("b", T0 + 2)
    assert table.take_dirty() == [("b", T0 + 32, T0 + 2)]


def test_failed_renew_does_not_dirty(table):
    table.grant("a", T0)
    table.take_dirty()
    table.renew("ghost", T0 + 1)
    assert table.take_dirty() == []


# ------------------------------------------------------------------ many nodes


def test_many_nodes_expire_exactly_at_their_deadlines():
    rng = random.Random(7)
    table = LeaseTable(ttl=90.0)
    deadlines = {f"node-{i:05d}": T0 + rng.uniform(0, 120) for i in range(10_000)}
    for node_id, deadline in deadlines.items():
        table.grant(node_id, T0, deadline)
    # renew a third of them; their deadlines move to now + ttl
    for node_id in list(deadlines)[::3]:
        deadlines[node_id] = table.renew(node_id, T0 + 10)
        assert deadlines[node_id] == T0 + 100
    assert len(table) == 10_000

    for now in (T0, T0 + 0.5, T0 + 37.25, T0 + 60, T0 + 99.999, T0 + 100, T0 + 119.5, T0 + 121):
        want = sorted(n for n, d in deadlines.items() if d <= now)
        assert table.expired(now) == want, now

    dirty = table.take_dirty()
    assert [n for n, _, _ in dirty] == sorted(deadlines)
    assert all(d == deadlines[n] for n, d, _ in dirty)


def test_sweep_and_drop_in_rounds_like_the_actor():
    table = LeaseTable(ttl=30.0)
    for i in range(1000):
        table.grant(f"n{i:04d}", T0 + i / 100)  # deadlines spread over 10 s
    seen: list[str] = []
    now = T0 + 30
    for _ in range(20):  # 14 s of sweeps cover the 10 s spread; a miss must fail, not hang
        for node_id in table.expired(now):
            seen.append(node_id)
            table.drop(node_id)
        now += 0.7
    assert len(table) == 0
    assert sorted(seen) == sorted(f"n{i:04d}" for i in range(1000))
    assert len(seen) == len(set(seen))
    assert table.expired(now + 1000) == []


def test_lease_fields_close_a_node_object_and_every_change_is_announced():
    changed: list[str] = []

    def fmt(t: float) -> str:
        return f"t={t}"

    def node(table: LeaseTable) -> dict:
        [fields] = table.lease_fields(["a"], fmt)
        return orjson.loads(b'{"id":"a"' + fields)

    table = LeaseTable(ttl=30.0)
    table.on_change = changed.append
    assert table.lease_fields(["a"], fmt) == [None]
    table.grant("a", 100.0)
    assert node(table) == {"id": "a", "last_heartbeat": "t=100.0", "lease_deadline": 130.0}
    table.renew("a", 110.25)
    assert node(table) == {"id": "a", "last_heartbeat": "t=110.25", "lease_deadline": 140.25}
    table.grant("a", 120.0, deadline=125.5)  # a granted deadline, not now + ttl
    assert node(table)["lease_deadline"] == 125.5
    table.grant("b", 121.0)
    assert [f is not None for f in table.lease_fields(["x", "b", "a", "y"], fmt)] == \
        [False, True, True, False]
    table.renew("ghost", 122.0)  # no lease: nothing changes
    table.drop("a")
    table.drop("a")
    assert table.lease_fields(["a"], fmt) == [None]
    assert changed == ["a", "a", "a", "b", "a"]


def test_a_lease_already_stored_is_not_dirty():
    table = LeaseTable(ttl=30.0)
    table.grant("a", 100.0, stored=True)  # a registration wrote it
    assert table.take_dirty() == []
    table.renew("a", 110.0)
    table.grant("a", 120.0, 150.0, stored=True)  # registered again after a renewal
    assert table.take_dirty() == []
    table.renew("a", 130.0)
    assert table.take_dirty() == [("a", 160.0, 130.0)]


def test_extend_moves_every_deadline_and_marks_them_for_the_disk_only_after_a_clock_step(table):
    """A stall (the process stood still) only moves deadlines later, so the
    stored ones may lag; a step of the clock must reach the stored ones too
    (RegistryActor._now): then every lease is dirty."""
    table.grant("a", T0)
    table.grant("b", T0, T0 + 10)
    table.take_dirty()
    table.extend(5.0)
    assert (table.deadline("a"), table.deadline("b")) == (T0 + 35, T0 + 15)
    assert table.take_dirty() == []
    assert table.expired(T0 + 14) == [] and table.expired(T0 + 15) == ["b"]
    table.extend(-100.0, stored_too=True)
    assert table.take_dirty() == [("a", T0 - 65, T0), ("b", T0 - 85, T0)]
