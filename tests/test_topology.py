import math
import random

import pytest

from p2pcod.errors import ConfigError
from p2pcod.topology import TOPOLOGIES, TopologyConfig, graph, neighbours, order_members

PEERS = [f"peer-{i}" for i in range(10)]


def _reachable(g: dict[str, list[str]], start: str) -> set[str]:
    """Peers whose knowledge reaches `start`'s students: follow teacher -> student edges."""
    students: dict[str, set[str]] = {m: set() for m in g}
    for student, teachers in g.items():
        for t in teachers:
            students[t].add(student)
    seen, todo = {start}, [start]
    while todo:
        for s in students[todo.pop()]:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def _strongly_connected(g: dict[str, list[str]]) -> bool:
    return all(_reachable(g, m) == set(g) for m in g)


def test_order_is_natural_and_deduplicated():
    assert order_members(["peer-10", "peer-2", "peer-1", "peer-2"]) == ["peer-1", "peer-2", "peer-10"]
    assert order_members(["b", "a1", "a01", "a"]) == ["a", "a01", "a1", "b"]
    with pytest.raises(ConfigError):
        order_members(["a", ""])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 17])
def test_degrees(n):
    members = PEERS[:n] if n <= 10 else [f"p{i}" for i in range(n)]
    expected = {
        "full": n - 1,
        "ring": 1,
        "ring-bi": 2 if n > 2 else 1,
        "k-ring": min(3, n - 1),
        "exponential": math.floor(math.log2(n - 1)) + 1,
        "random-k": min(3, n - 1),
        "none": 0,
    }
    for name, degree in expected.items():
        g = graph(members, 0, TopologyConfig(name=name, k=3))
        for me, teachers in g.items():
            assert len(teachers) == degree, (name, me, teachers)
            assert me not in teachers and len(set(teachers)) == len(teachers)
            assert set(teachers) <= set(members)


def test_ring_shapes():
    assert neighbours("peer-3", PEERS, 0, TopologyConfig(name="ring")) == ["peer-2"]
    assert neighbours("peer-0", PEERS, 0, TopologyConfig(name="ring")) == ["peer-9"]  # wraps
    assert neighbours("peer-0", PEERS, 0, TopologyConfig(name="ring-bi")) == ["peer-1", "peer-9"]
    assert neighbours("peer-5", PEERS, 0, TopologyConfig(name="k-ring", k=3)) == [
        "peer-2",
        "peer-3",
        "peer-4",
    ]
    assert neighbours("peer-9", PEERS, 0, TopologyConfig(name="exponential")) == [
        "peer-1",
        "peer-5",
        "peer-7",
        "peer-8",
    ]


@pytest.mark.parametrize("name", ["full", "ring", "ring-bi", "k-ring", "exponential"])
def test_connectivity(name):
    for n in (2, 3, 7, 10):
        assert _strongly_connected(graph(PEERS[:n], 0, TopologyConfig(name=name))), (name, n)


def test_random_k_connectivity_over_rounds_and_none_is_disconnected():
    cfg = TopologyConfig(name="random-k", k=2, seed=7)
    union: dict[str, set[str]] = {m: set() for m in PEERS}
    for r in range(20):
        for m, ts in graph(PEERS, r, cfg).items():
            union[m].update(ts)
    assert _strongly_connected({m: sorted(ts) for m, ts in union.items()})
    assert not _strongly_connected(graph(PEERS, 0, TopologyConfig(name="none")))


def _symmetric(g: dict[str, list[str]]) -> bool:
    return all(s in g[t] for s, ts in g.items() for t in ts)


def test_symmetry():
    for n in (3, 6):
        assert _symmetric(graph(PEERS[:n], 0, TopologyConfig(name="full")))
        assert _symmetric(graph(PEERS[:n], 0, TopologyConfig(name="ring-bi")))
        assert not _symmetric(graph(PEERS[:n], 0, TopologyConfig(name="ring")))


@pytest.mark.parametrize("name", [t for t in TOPOLOGIES if t != "edges"])
def test_deterministic_and_order_independent(name):
    cfg = TopologyConfig(name=name, k=3, seed=1)
    shuffled = PEERS[:]
    random.Random(0).shuffle(shuffled)
    assert graph(PEERS, 4, cfg) == graph(shuffled + PEERS[:3], 4, cfg)
    assert neighbours("peer-4", PEERS, 4, cfg) == neighbours("peer-4", reversed(PEERS), 4, cfg)


def test_me_need_not_be_listed():
    others = [p for p in PEERS if p != "peer-4"]
    for name in ("full", "ring", "ring-bi", "exponential", "random-k"):
        cfg = TopologyConfig(name=name)
        assert neighbours("peer-4", others, 2, cfg) == neighbours("peer-4", PEERS, 2, cfg)


def test_ring_closes_over_a_departed_member():
    gone = [p for p in PEERS if p != "peer-4"]
    assert neighbours("peer-5", PEERS, 0, TopologyConfig(name="ring")) == ["peer-4"]
    assert neighbours("peer-5", gone, 0, TopologyConfig(name="ring")) == ["peer-3"]
    g = graph(gone, 0, TopologyConfig(name="ring"))
    assert all(len(ts) == 1 for ts in g.values()) and _strongly_connected(g)


def test_random_k_changes_between_rounds_but_not_within():
    cfg = TopologyConfig(name="random-k", k=3, seed=11)
    per_round = [tuple(neighbours("peer-0", PEERS, r, cfg)) for r in range(10)]
    assert per_round == [tuple(neighbours("peer-0", PEERS, r, cfg)) for r in range(10)]
    assert len(set(per_round)) > 3
    other_seed = [
        tuple(neighbours("peer-0", PEERS, r, TopologyConfig(name="random-k", k=3, seed=12)))
        for r in range(10)
    ]
    assert other_seed != per_round
    # roughly uniform: every other peer gets picked over many rounds
    counts = {p: 0 for p in PEERS[1:]}
    for r in range(300):
        for t in neighbours("peer-0", PEERS, r, cfg):
            counts[t] += 1
    assert min(counts.values()) > 60 and max(counts.values()) < 140  # expected 100 each


def test_edges():
    cfg = TopologyConfig.from_dict(
        {"name": "edges", "edges": [["a", "c"], ["b", "c"], ["c", "a"], ["a", "c"]]}
    )
    assert cfg.edges == (("a", "c"), ("b", "c"), ("c", "a"), ("a", "c"))
    members = ["a", "b", "c"]
    assert graph(members, 0, cfg) == {"a": ["c"], "b": [], "c": ["a", "b"]}
    assert neighbours("c", ["a", "c"], 0, cfg) == ["a"]  # b left: not a teacher any more


def test_config_errors():
    assert TopologyConfig.from_dict({"name": "k-ring", "k": 4}) == TopologyConfig(name="k-ring", k=4)
    cases = [
        ({"nmae": "ring"}, "nmae"),
        ({"name": "star"}, "star"),
        ({"name": "k-ring", "k": 0}, "k"),
        ({"k": 1.5}, "1.5"),
        ({"seed": "x"}, "seed"),
        ({"name": "edges"}, "edges"),
        ({"name": "edges", "edges": [["a", "a"]]}, "own teacher"),
        ({"name": "edges", "edges": [["a"]]}, "pair"),
        ({"name": "edges", "edges": "a->b"}, "edges"),
        ({"name": "ring", "edges": [["a", "b"]]}, "edges"),
    ]
    for d, match in cases:
        with pytest.raises(ConfigError, match=match):
            TopologyConfig.from_dict(d)
    with pytest.raises(ConfigError, match="round"):
        neighbours("a", ["a", "b"], -1, TopologyConfig())


def test_single_peer_has_no_neighbours():
    for name in ("full", "ring", "ring-bi", "k-ring", "exponential", "random-k", "none"):
        assert neighbours("solo", [], 0, TopologyConfig(name=name)) == []
