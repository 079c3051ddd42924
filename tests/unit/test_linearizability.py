"""Tests of the linearizability checker on histories known to be (or not be) linearizable."""

from __future__ import annotations

import random
import time

import pytest

from trustnet.consensus.linearizability import (
    CONFLICT,
    NOT_FOUND,
    OK,
    UNKNOWN,
    KVModel,
    Operation,
    RegistryModel,
    check,
    describe_history,
)

KV = KVModel()


def op(client, key, inp, call, ret, output=UNKNOWN):
    return Operation(client_id=client, key=key, input=inp, call=call, ret=ret, output=output)


def put(client, call, ret, value, key="x", output=OK):
    return op(client, key, ("put", value), call, ret, output)


def get(client, call, ret, value, key="x"):
    return op(client, key, ("get",), call, ret, value)


def cas(client, call, ret, old, new, ok, key="x"):
    return op(client, key, ("cas", old, new), call, ret, ok)


def assert_ok(model, history, **kw):
    result = check(model, history, **kw)
    assert result.ok is True, result.explanation
    assert result
    return result


def assert_bad(model, history, keys=None, **kw):
    result = check(model, history, **kw)
    assert result.ok is False, result.explanation
    assert not result
    assert result.bad_partition
    if keys is not None:
        assert set(result.keys) == set(keys), result.explanation
    assert "NOT linearizable" in result.explanation
    return result


# ---------------------------------------------------------------- basics


def test_empty_history_is_linearizable():
    result = assert_ok(KV, [])
    assert result.partitions == 0


def test_operation_validation():
    with pytest.raises(ValueError):
        op(1, "x", ("get",), 5, 4, None)
    assert op(1, "x", ("put", 1), 0, None).unknown
    assert op(1, "x", ("put", 1), 0, 3, UNKNOWN).unknown
    assert op(1, "x", ("put", 1), 0, 3, UNKNOWN).return_time == float("inf")
    with pytest.raises(TypeError):
        check(KV, [("not", "an", "operation")])


def test_sequential_history():
    history = [
        get(1, 0, 1, None),
        put(1, 2, 3, 1),
        get(2, 4, 5, 1),
        cas(2, 6, 7, 1, 2, True),
        cas(1, 8, 9, 1, 3, False),
        get(1, 10, 11, 2),
        op(1, "x", ("delete",), 12, 13, OK),
        get(2, 14, 15, None),
    ]
    assert_ok(KV, history)


def test_concurrent_writes_reads_may_see_either_order():
    # put(1) and put(2) overlap: a later read may see either, as long as all
    # later reads agree on which one won.
    writes = [put(1, 0, 10, 1), put(2, 1, 11, 2)]
    assert_ok(KV, writes + [get(3, 20, 21, 1), get(4, 22, 23, 1)])
    assert_ok(KV, writes + [get(3, 20, 21, 2), get(4, 22, 23, 2)])
    # a read overlapping both writes may see the old value, either new one
    for seen in (None, 1, 2):
        assert_ok(KV, writes + [get(3, 2, 9, seen)])


def test_reads_concurrent_with_write_flip_once():
    # old then new is fine; two overlapping reads may even disagree
    history = [put(1, 0, 10, 1), get(2, 1, 3, None), get(3, 4, 6, 1), get(4, 2, 9, None)]
    assert_ok(KV, history)


def test_touching_operations_count_as_concurrent():
    # the write returns at 5 and the read is called at 5: either order is fine
    assert_ok(KV, [put(1, 0, 5, 1), get(2, 5, 6, None)])
    assert_bad(KV, [put(1, 0, 5, 1), get(2, 5.001, 6, None)])


# ---------------------------------------------------------------- violations


def test_stale_read_after_completed_write():
    history = [put(1, 0, 1, 1), put(1, 2, 3, 2), get(2, 4, 5, 1)]
    result = assert_bad(KV, history, keys=["x"])
    assert len(result.linearization) == 2
    assert result.linearization[-1].input == ("put", 2)
    assert "get() -> 1" in result.explanation
    assert "illegal in that state" in result.explanation


def test_read_of_a_value_never_written():
    history = [put(1, 0, 2, 1), put(2, 1, 3, 2), get(3, 1, 4, 99)]
    assert_bad(KV, history, keys=["x"])


def test_two_reads_in_an_impossible_order():
    # the writes race, but once a read saw 2 after both completed, a later
    # read cannot go back to 1 (there is no further write)
    history = [put(1, 0, 10, 1), put(2, 0, 10, 2), get(3, 20, 30, 2), get(4, 40, 50, 1)]
    assert_bad(KV, history, keys=["x"])
    # with overlapping reads both orders are possible
    overlapping = [put(1, 0, 10, 1), put(2, 0, 10, 2), get(3, 5, 30, 2), get(4, 6, 50, 1)]
    assert_ok(KV, overlapping)


def test_lost_acknowledged_write():
    history = [put(1, 0, 1, 7), get(2, 2, 3, 7), get(3, 5, 6, None)]
    assert_bad(KV, history, keys=["x"])


def test_cas_that_claims_success_on_a_wrong_value():
    history = [put(1, 0, 1, 1), cas(2, 2, 3, 5, 6, True)]
    assert_bad(KV, history)
    history = [put(1, 0, 1, 1), cas(2, 2, 3, 1, 6, False)]
    assert_bad(KV, history)


def test_smallest_failing_partition_is_reported():
    good = [put(1, i * 2, i * 2 + 1, i, key="good") for i in range(10)]
    big_bad = [put(1, 100, 101, 1, key="big"), put(2, 102, 103, 2, key="big"),
               get(3, 104, 105, 2, key="big"), get(3, 106, 107, 1, key="big")]
    small_bad = [put(4, 0, 1, 1, key="small"), get(5, 2, 3, 5, key="small")]
    result = assert_bad(KV, good + big_bad + small_bad, keys=["small"])
    assert len(result.bad_partition) == 2
    assert result.partitions == 3


# ---------------------------------------------------------------- unknown outcomes


def test_unknown_write_that_took_effect():
    history = [put(1, 0, 1, 1), put(2, 2, None, 2, output=UNKNOWN), get(3, 10, 11, 2)]
    assert_ok(KV, history)


def test_unknown_write_that_did_not_take_effect():
    history = [put(1, 0, 1, 1), put(2, 2, None, 2, output=UNKNOWN), get(3, 10, 11, 1),
               get(3, 12, 13, 1)]
    assert_ok(KV, history)


def test_unknown_write_may_take_effect_long_after_its_call():
    # a timed-out write still in flight: not visible at 10, visible at 20
    history = [put(2, 0, None, 5, output=UNKNOWN), get(1, 10, 11, None), get(1, 20, 21, 5)]
    assert_ok(KV, history)
    # timed out with an answer time recorded: still treated as +infinity
    history = [put(2, 0, 3, 5, output=UNKNOWN), get(1, 10, 11, None), get(1, 20, 21, 5)]
    assert_ok(KV, history)


def test_unknown_write_cannot_take_effect_twice():
    history = [put(2, 0, None, 5, output=UNKNOWN), put(1, 1, 2, 1), get(1, 10, 11, 5),
               put(1, 12, 13, 1), get(1, 20, 21, 5)]
    assert_bad(KV, history)


def test_unknown_write_cannot_take_effect_before_its_call():
    history = [get(1, 0, 1, 5), put(2, 2, None, 5, output=UNKNOWN)]
    assert_bad(KV, history)


def test_unknown_read_constrains_nothing():
    history = [put(1, 0, 1, 1), get(2, 2, None, UNKNOWN), get(3, 3, 4, 1)]
    assert_ok(KV, history)


def test_only_unknown_operations():
    assert_ok(KV, [put(1, 0, None, 1), put(2, 0, None, 2), get(3, 1, None, UNKNOWN)])


# ---------------------------------------------------------------- Porcupine's classics


REG = KVModel(initial=0)


def test_porcupine_register_examples():
    # from MIT 6.824 2017 quiz 2, section VII (Porcupine's TestRegisterModel)
    assert_ok(REG, [put(0, 0, 100, 100), get(1, 25, 75, 100), get(2, 30, 60, 0)])
    assert_bad(REG, [put(0, 0, 100, 200), get(1, 10, 30, 200), get(2, 40, 90, 0)])


def test_porcupine_zero_duration_examples():
    assert_ok(REG, [put(0, 0, 100, 100), get(1, 25, 75, 100), get(2, 30, 30, 0),
                    get(3, 30, 30, 0)])
    assert_bad(REG, [put(0, 0, 100, 200), get(1, 10, 10, 200), get(2, 10, 10, 200),
                     get(3, 40, 90, 0)])


def test_etcd_style_cas_history_with_crashes():
    # a Jepsen-like single-register history with a crashed cas and a timed-out read
    history = [
        put(0, 0, 2, 0),
        cas(1, 3, None, 0, 1, UNKNOWN),  # crashed: may or may not have happened
        get(2, 4, 5, 0),  # ... not yet
        cas(3, 6, 7, 0, 2, False),  # ... now it has (the value is no longer 0)
        get(4, 8, 9, 1),
        get(2, 10, 11, UNKNOWN),
        cas(4, 12, 13, 1, 3, True),
        get(0, 14, 15, 3),
    ]
    assert_ok(REG, history)
    mutated = history[:-1] + [get(0, 14, 15, 1)]
    assert_bad(REG, mutated)


# ---------------------------------------------------------------- timeout


def test_timeout_gives_unknown():
    # 22 concurrent writes then a read of a value nobody wrote: refuting it
    # means trying (almost) every subset of the writes
    history = [put(i, 0, 100, i) for i in range(22)] + [get(99, 200, 201, -1)]
    result = check(KV, history, timeout=0.05)
    assert result.ok is None
    assert result.timed_out and not result
    assert "timed out" in result.explanation


# ---------------------------------------------------------------- randomized


def random_kv_history(rng: random.Random, n_ops: int, n_keys: int, clients: int,
                      crash_rate: float = 0.03, values: int = 5):
    """A history produced by a real sequential KV store: every operation takes
    effect at a random point inside its window (or, if it crashed, maybe never),
    so the result is linearizable by construction."""
    planned = []
    free_at = [0.0] * clients  # each client waits for its answer before its next call
    for _ in range(n_ops):
        c = rng.randrange(clients)
        call = free_at[c] + rng.expovariate(2.0)
        ret = call + rng.expovariate(1.0) + 0.01
        kind = rng.choice(["put", "get", "get", "cas"])
        if kind == "put":
            inp = ("put", rng.randrange(values))
        elif kind == "get":
            inp = ("get",)
        else:
            inp = ("cas", rng.randrange(values), rng.randrange(values))
        crashed = rng.random() < crash_rate
        planned.append((rng.uniform(call, ret), c, f"k{rng.randrange(n_keys)}", inp, call, ret,
                        crashed))
        free_at[c] = ret
    store: dict[str, object] = {}
    history = []
    for _, c, key, inp, call, ret, crashed in sorted(planned):
        if crashed:
            history.append(Operation(c, key, inp, call, None, UNKNOWN))
            if rng.random() < 0.5:
                continue  # never reached the store
        before = store.get(key)
        _, store[key] = KV.step(before, inp, UNKNOWN)
        if crashed:
            continue
        if inp[0] == "get":
            output = before
        elif inp[0] == "cas":
            output = before == inp[1]
        else:
            output = OK
        history.append(Operation(c, key, inp, call, ret, output))
    rng.shuffle(history)  # the checker must not depend on the input order
    return history


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_from_a_real_execution_are_linearizable(seed):
    rng = random.Random(seed)
    history = random_kv_history(rng, n_ops=rng.randrange(20, 200),
                                n_keys=rng.randrange(1, 6), clients=rng.randrange(2, 7))
    result = check(KV, history, timeout=30)
    assert result.ok is True, f"seed {seed}: {result.explanation}"


@pytest.mark.parametrize("seed", range(40))
def test_random_history_with_a_corrupted_read_is_not_linearizable(seed):
    rng = random.Random(1000 + seed)
    history = random_kv_history(rng, n_ops=rng.randrange(20, 200),
                                n_keys=rng.randrange(1, 6), clients=rng.randrange(2, 7))
    reads = [i for i, o in enumerate(history) if o.input == ("get",) and not o.unknown]
    i = rng.choice(reads)
    history[i] = Operation(history[i].client_id, history[i].key, ("get",), history[i].call,
                           history[i].ret, "never-written")
    result = check(KV, history, timeout=30)
    assert result.ok is False, f"seed {seed}"
    assert result.keys == (history[i].key,)
    assert history[i] in result.bad_partition


def brute_force_linearizable(model, ops) -> bool:
    """Try every order (no memo, no pruning) of one small partition."""
    n = len(ops)
    outputs = [UNKNOWN if o.unknown else o.output for o in ops]
    known = {i for i in range(n) if not ops[i].unknown}

    def extend(done: frozenset, state) -> bool:
        if known <= done:
            return True
        for i in range(n):
            if i in done:
                continue
            if any(j not in done and j in known and ops[j].ret < ops[i].call for j in range(n)):
                continue  # some pending operation returned before this one was called
            ok, after = model.step(state, ops[i].input, outputs[i])
            if ok and extend(done | {i}, after):
                return True
        return False

    return extend(frozenset(), model.init())


class PlainKV(KVModel):
    read_only = None  # no read-only pruning: the bare Wing-Gong/Lowe search


def random_small_history(rng: random.Random, n: int):
    ops = []
    for c in range(n):
        call = rng.randrange(10)
        ret = None if rng.random() < 0.15 else call + rng.randrange(6)
        kind = rng.choice(["put", "get", "get", "cas"])
        if kind == "put":
            inp, out = ("put", rng.randrange(3)), OK
        elif kind == "get":
            inp, out = ("get",), rng.choice([None, 0, 1, 2])
        else:
            inp, out = ("cas", rng.randrange(3), rng.randrange(3)), rng.random() < 0.5
        ops.append(Operation(c, "x", inp, call, ret, UNKNOWN if ret is None else out))
    return ops


def test_search_agrees_with_brute_force_on_small_histories():
    rng = random.Random(2024)
    verdicts = {True: 0, False: 0}
    for _ in range(600):
        history = random_small_history(rng, rng.randrange(1, 8))
        expected = brute_force_linearizable(KV, history)
        verdicts[expected] += 1
        for model in (KV, PlainKV()):
            result = check(model, history)
            assert result.ok is expected, describe_history(KV, history)
    assert min(verdicts.values()) > 50  # both kinds were exercised


def test_models_need_only_init_and_step():
    class Counter:  # duck-typed: no partition, no describe_*, no read_only
        def init(self):
            return 0

        def step(self, state, input, output):
            if input == "inc":
                return True, state + 1
            return output == state, state

    history = [Operation(1, "c", "inc", 0, 1, None), Operation(2, "c", "read", 2, 3, 1),
               Operation(1, "d", "read", 0, 1, 0)]
    assert check(Counter(), history).ok is True
    result = check(Counter(), history + [Operation(3, "d", "read", 4, 5, 7)])
    assert result.ok is False and result.keys == ("d",)
    assert "'read' -> 7" in result.explanation


def mean_concurrency(history) -> float:
    """Average number of completed operations in flight when one is called."""
    windows = [(o.call, o.ret) for o in history if not o.unknown]
    return sum(sum(1 for c, r in windows if c <= call < r) for call, _ in windows) / len(windows)


@pytest.mark.parametrize("n_keys,clients", [(50, 7), (5, 12)])
def test_performance_1000_ops(capsys, n_keys, clients):
    rng = random.Random(7)
    history = random_kv_history(rng, n_ops=1000, n_keys=n_keys, clients=clients)
    started = time.perf_counter()
    result = check(KV, history, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.ok is True, result.explanation
    with capsys.disabled():
        print(f"\nlinearizability: {len(history)} ops, {n_keys} keys, {clients} clients, "
              f"mean concurrency {mean_concurrency(history):.1f}: {elapsed * 1000:.1f} ms")


# ---------------------------------------------------------------- RegistryModel


REGISTRY = RegistryModel()
LENIENT = RegistryModel(exact_conflicts=False)


def reg(client, node, inp, call, ret, output=UNKNOWN):
    return Operation(client, node, inp, call, ret, output)


def test_registry_sequential():
    history = [
        reg(1, "n1", ("get",), 0, 1, NOT_FOUND),
        reg(1, "n1", ("heartbeat",), 2, 3, NOT_FOUND),
        reg(1, "n1", ("register", "fd00::1", 7000, "dom"), 4, 5, OK),
        reg(2, "n1", ("get",), 6, 7, {"id": "n1", "ipv6": "fd00:0::1"}),
        reg(2, "n1", ("heartbeat",), 8, 9, OK),
        reg(1, "n1", ("register", "fd00::2"), 10, 11, OK),
        reg(2, "n1", ("get",), 12, 13, "fd00::2"),
        reg(1, "n1", ("delete",), 14, 15, OK),
        reg(2, "n1", ("delete",), 16, 17, NOT_FOUND),
        reg(2, "n1", ("get",), 18, 19, None),
    ]
    assert_ok(REGISTRY, history)
    assert_ok(LENIENT, history)


def test_registry_lost_registration():
    history = [
        reg(1, "n1", ("register", "fd00::1"), 0, 1, OK),
        reg(2, "n2", ("register", "fd00::2"), 0, 1, OK),
        reg(3, "n1", ("get",), 2, 3, NOT_FOUND),
    ]
    result = assert_bad(REGISTRY, history, keys=["n1"])
    assert "register('n1'" in result.explanation


def test_registry_expiry_with_unknown_time():
    # an expiry decided by the leader some time after 5: the node may be seen
    # before it, never after a read that already missed it
    expire = reg("leader", "n1", ("expire",), 5, None, UNKNOWN)
    base = [reg(1, "n1", ("register", "fd00::1"), 0, 1, OK), expire]
    assert_ok(REGISTRY, base + [reg(2, "n1", ("get",), 10, 11, "fd00::1"),
                                reg(2, "n1", ("get",), 12, 13, NOT_FOUND)])
    assert_bad(REGISTRY, base + [reg(2, "n1", ("get",), 10, 11, NOT_FOUND),
                                 reg(2, "n1", ("get",), 12, 13, "fd00::1")])
    # a known expiry: OK means the node was there
    assert_bad(REGISTRY, [reg("leader", "n1", ("expire",), 0, 1, OK)])
    assert_ok(REGISTRY, [reg("leader", "n1", ("expire",), 0, 1, None)])


def test_registry_cross_key_conflicts():
    taken = [reg(1, "a", ("register", "fd00::1"), 0, 1, OK),
             reg(2, "b", ("register", "fd00::1"), 2, 3, CONFLICT)]
    assert_ok(REGISTRY, taken)
    # the 409 is wrong once "a" released the address ...
    released = [reg(1, "a", ("register", "fd00::1"), 0, 1, OK),
                reg(1, "a", ("delete",), 2, 3, OK),
                reg(2, "b", ("register", "fd00::1"), 4, 5, CONFLICT)]
    result = assert_bad(REGISTRY, released)
    assert set(result.keys) == {"a", "b"}  # checked together, exactly
    assert_ok(LENIENT, released)  # the per-key model cannot see it
    # ... and so is an OK while "a" still holds it
    double = [reg(1, "a", ("register", "fd00::1"), 0, 1, OK),
              reg(2, "b", ("register", "fd00::1"), 2, 3, OK)]
    assert_bad(REGISTRY, double, keys=["a", "b"])
    assert_ok(LENIENT, double)
    # a concurrent release makes either answer possible
    racing = [reg(1, "a", ("register", "fd00::1"), 0, 1, OK),
              reg(1, "a", ("register", "fd00::9"), 2, 6, OK),
              reg(2, "b", ("register", "fd00::1"), 3, 5, OK)]
    assert_ok(REGISTRY, racing)


def test_registry_partitions_stay_per_node_without_shared_addresses():
    history = [reg(i, f"n{i}", ("register", f"fd00::{i + 1:x}"), i, i + 1, OK) for i in range(10)]
    history.append(reg(0, "n0", ("register", "fd00::1"), 20, 21, OK))
    result = assert_ok(REGISTRY, history)
    assert result.partitions == 10


def random_registry_history(rng: random.Random, n_ops: int, nodes: int, addrs: int, clients: int):
    planned = []
    free_at = [0.0] * clients
    for _ in range(n_ops):
        c = rng.randrange(clients)
        call = free_at[c] + rng.expovariate(2.0)
        ret = call + rng.expovariate(1.0) + 0.01
        node = f"n{rng.randrange(nodes)}"
        kind = rng.choice(["register", "register", "get", "get", "delete", "heartbeat",
                           "expire"])
        inp = ("register", f"fd00::{rng.randrange(addrs) + 1:x}", 7000) if kind == "register" \
            else (kind,)
        planned.append((rng.uniform(call, ret), c, node, inp, call, ret, rng.random() < 0.03))
        free_at[c] = ret
    table: dict[str, str] = {}  # the real sequential registry
    history = []
    for _, c, node, inp, call, ret, crashed in sorted(planned):
        kind = inp[0]
        present = node in table
        if kind == "register":
            holder = next((n for n, a in table.items() if a == inp[1] and n != node), None)
            if holder is None:
                table[node] = inp[1]
            output = OK if holder is None else CONFLICT
        elif kind == "get":
            output = {"id": node, "ipv6": table[node]} if present else NOT_FOUND
        elif kind in ("delete", "expire"):
            table.pop(node, None)
            output = OK if present else NOT_FOUND
        else:
            output = OK if present else NOT_FOUND
        if crashed:
            history.append(Operation(c, node, inp, call, None, UNKNOWN))
        else:
            history.append(Operation(c, node, inp, call, ret, output))
    return history


@pytest.mark.parametrize("seed", range(25))
def test_random_registry_histories(seed):
    rng = random.Random(seed)
    history = random_registry_history(rng, n_ops=rng.randrange(20, 150), nodes=rng.randrange(1, 8),
                                      addrs=rng.randrange(2, 6), clients=rng.randrange(2, 6))
    assert check(REGISTRY, history, timeout=30).ok is True
    assert check(LENIENT, history, timeout=30).ok is True
    # corrupt one completed read
    reads = [i for i, o in enumerate(history) if o.input == ("get",) and not o.unknown]
    if reads:
        i = rng.choice(reads)
        history[i] = Operation(history[i].client_id, history[i].key, ("get",), history[i].call,
                               history[i].ret, "fd00::dead")
        result = check(REGISTRY, history, timeout=30)
        assert result.ok is False
        assert history[i].key in result.keys


def test_registry_partitioning_agrees_with_brute_force_on_the_whole_registry():
    # brute force over the unpartitioned history, every node in one state
    rng = random.Random(77)
    verdicts = {True: 0, False: 0}
    answers = {"register": [OK, OK, CONFLICT], "get": [NOT_FOUND, "fd00::1", "fd00::2"],
               "delete": [OK, NOT_FOUND], "heartbeat": [OK, NOT_FOUND],
               "expire": [OK, NOT_FOUND, None]}
    for _ in range(400):
        history = []
        for c in range(rng.randrange(1, 8)):
            call = rng.randrange(10)
            ret = None if rng.random() < 0.15 else call + rng.randrange(5)
            kind = rng.choice(["register", "register", "get", "get", "delete", "heartbeat",
                               "expire"])
            inp = ("register", f"fd00::{rng.randrange(2) + 1}") if kind == "register" else (kind,)
            out = UNKNOWN if ret is None else rng.choice(answers[kind])
            history.append(Operation(c, f"n{rng.randrange(3)}", inp, call, ret, out))
        keyed = [Operation(o.client_id, "all", (o.key, o.input), o.call, o.ret, o.output)
                 for o in history]
        for model in (REGISTRY, LENIENT):
            expected = brute_force_linearizable(model, keyed)
            verdicts[expected] += 1
            assert check(model, history).ok is expected, describe_history(model, keyed)
    assert min(verdicts.values()) > 50
