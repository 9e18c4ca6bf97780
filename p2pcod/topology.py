"""Who learns from whom: (me, members, round) -> the neighbours whose checkpoints I distil from.

Pure and deterministic: every peer computes the same graph from the same member list, whatever order
the DHT returned it in. Rings are laid out in `order_members` order and recomputed from the current
members, so when a peer leaves the ring closes over the gap.

Member order: natural sort of the names ("peer-2" before "peer-10"), ties broken by the plain string.
It is readable in reports (peer-3 learns from peer-2 in a ring) and needs no coordination. Peer names
carry no meaning beyond identity, so this order is as good as a hash for who pairs with whom.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from p2pcod.errors import ConfigError

TOPOLOGIES = ("full", "ring", "ring-bi", "k-ring", "exponential", "random-k", "none", "edges")

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class TopologyConfig:
    name: str = "full"
    k: int = 2  # k-ring: how many predecessors; random-k: how many random teachers per round
    seed: int = 0  # random-k
    edges: tuple[tuple[str, str], ...] = ()  # name="edges": (teacher, student) pairs by peer name

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", check_topology(self.name, self.k, self.seed, self.edges))

    @classmethod
    def from_dict(cls, d: Mapping) -> TopologyConfig:
        """Build from a mapping (a TOML table); unknown keys and bad values raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"topology config must be a table, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"unknown topology config key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))


TOPOLOGY_KEYS = {"name": "topology.name", "k": "topology.k", "seed": "topology.seed", "edges": "topology.edges"}


def check_topology(name: object, k: object, seed: object, edges: object,
                   keys: Mapping[str, str] = TOPOLOGY_KEYS) -> tuple[tuple[str, str], ...]:
    """The rules of a topology config: ConfigError naming the key, else the edges as (teacher, student) pairs.

    `keys` is what errors call each field: a recipe names them exchange.topology, exchange.k, ... (config.py).
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"{keys['name']} must be one of {', '.join(TOPOLOGIES)}; got {name!r}")
    for field, v in (("k", k), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{keys[field]} must be an integer, got {v!r}")
    if k < 1:
        raise ConfigError(f"{keys['k']} must be >= 1, got {k!r}")
    pairs = _normalise_edges(edges, keys["edges"])
    if pairs and name != "edges":
        raise ConfigError(f"{keys['edges']} is only used with {keys['name']} = 'edges', but it is {name!r}")
    if name == "edges" and not pairs:
        raise ConfigError(f"{keys['name']} = 'edges' needs {keys['edges']}: a non-empty list of [teacher, student] "
                          "pairs")
    return pairs


def _normalise_edges(edges: object, key: str) -> tuple[tuple[str, str], ...]:
    """Lists of lists (TOML) -> a tuple of (teacher, student) string pairs, validated."""
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Iterable):
        raise ConfigError(f"{key} must be a list of [teacher, student] pairs, got {edges!r}")
    out = []
    for e in edges:
        if isinstance(e, (str, bytes)) or not isinstance(e, Iterable):
            raise ConfigError(f"{key} entry {e!r} is not a [teacher, student] pair")
        pair = tuple(e)
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ConfigError(f"{key} entry {e!r} must be a pair of two non-empty peer names")
        if pair[0] == pair[1]:
            raise ConfigError(f"{key} entry {e!r}: a peer cannot be its own teacher")
        out.append(pair)
    return tuple(out)


def _natural_key(name: str) -> tuple:
    parts = _DIGITS.split(name)  # alternates text, digits, text, ...
    return tuple((1, int(p), "") if i % 2 else (0, 0, p) for i, p in enumerate(parts)), name


def order_members(members: Iterable[str]) -> list[str]:
    """The member order every peer computes identically: deduplicated, natural sort of the names."""
    unique = set()
    for m in members:
        if not isinstance(m, str) or not m:
            raise ConfigError(f"peer names must be non-empty strings, got {m!r}")
        unique.add(m)
    return sorted(unique, key=_natural_key)


def _random_k(me: str, others: list[str], k: int, seed: int, round: int) -> list[str]:
    """k others drawn uniformly without replacement; a pure function of (seed, round, me, others)."""
    digest = hashlib.sha256(f"{seed}\x00{round}\x00{me}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(others, min(k, len(others)))


def neighbours(me: str, members: Iterable[str], round: int, cfg: TopologyConfig) -> list[str]:
    """The peers `me` learns from in this round, in order_members order; never `me` itself.

    `me` is placed in the order as if it were a member, whether or not `members` lists it.
    """
    if not isinstance(me, str) or not me:
        raise ConfigError(f"peer name must be a non-empty string, got {me!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ConfigError(f"round must be an integer >= 0, got {round!r}")
    order = order_members([*members, me])
    n, i = len(order), order.index(me)
    others = [m for m in order if m != me]
    if cfg.name == "full":
        chosen = others
    elif cfg.name in ("ring", "ring-bi", "k-ring", "exponential"):
        chosen = [order[(i - d) % n] for d in _distances(cfg, n)]
    elif cfg.name == "random-k":
        chosen = _random_k(me, others, cfg.k, cfg.seed, round)
    elif cfg.name == "none":
        chosen = []
    else:  # edges: only teachers that are members right now
        present = set(others)
        chosen = [t for t, s in cfg.edges if s == me and t in present]
    picked = set(chosen) - {me}
    return [m for m in order if m in picked]


def _distances(cfg: TopologyConfig, n: int) -> list[int]:
    """Ring offsets (positive = predecessor) for the ring-shaped topologies on n members."""
    if n < 2:
        return []
    if cfg.name == "ring":
        return [1]
    if cfg.name == "ring-bi":
        return [1, -1]
    if cfg.name == "k-ring":
        return list(range(1, min(cfg.k, n - 1) + 1))
    out, d = [], 1  # exponential: 1, 2, 4, ... < n
    while d < n:
        out.append(d)
        d *= 2
    return out


def graph(members: Iterable[str], round: int, cfg: TopologyConfig) -> dict[str, list[str]]:
    """Everyone's neighbours: {student: [teachers]}, in member order."""
    order = order_members(members)
    return {m: neighbours(m, order, round, cfg) for m in order}
