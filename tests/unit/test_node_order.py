"""NodeOrder: node ids in order, overall and per domain (pure, in memory)."""

from __future__ import annotations

import random

import pytest

from trustnet.registry.node_order import NodeOrder


def test_pages_follow_id_order_per_domain_and_overall():
    order = NodeOrder([("c", "d1"), ("a", "d1"), ("b", "d2")])
    assert order.page(None, None, 10) == ["a", "b", "c"]
    assert order.page("d1", None, 10) == ["a", "c"]
    assert order.page("d1", "a", 10) == ["c"]  # after is exclusive
    assert order.page("d1", "b", 10) == ["c"]  # and need not be a node
    assert order.page(None, "a", 1) == ["b"]
    assert order.page("nowhere", None, 10) == []


def test_a_node_moves_between_domains_and_leaves():
    order = NodeOrder([("a", "d1"), ("b", "d1")])
    order.place("a", "d2")
    assert order.page("d1", None, 10) == ["b"] and order.page("d2", None, 10) == ["a"]
    assert order.page(None, None, 10) == ["a", "b"]
    order.place("a", None)
    order.place("ghost", None)  # an unknown node leaving is nothing
    assert order.page(None, None, 10) == ["b"] and order.page("d2", None, 10) == []
    assert len(order) == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_moves_match_a_sorted_model(seed):
    rng = random.Random(seed)
    model: dict[str, str] = {}
    order = NodeOrder()
    names = [f"n{i:03d}" for i in range(60)]
    for _ in range(600):
        node = rng.choice(names)
        domain = rng.choice(["d1", "d2", "d3", None])
        order.place(node, domain)
        if domain is None:
            model.pop(node, None)
        else:
            model[node] = domain
        for d in (None, "d1", "d2", "d3"):
            after = rng.choice([None, *names])
            count = rng.randrange(1, 8)
            expected = sorted(n for n, nd in model.items()
                              if (d is None or nd == d) and (after is None or n > after))
            assert order.page(d, after, count) == expected[:count]
    assert len(order) == len(model)
    # built at once from the rows, it pages the same
    built = NodeOrder(list(model.items()))
    for d in (None, "d1", "d2", "d3"):
        for after in (None, *names[::7]):
            assert built.page(d, after, 1000) == order.page(d, after, 1000)
