"""Simulator experiment specs (topologies/*.toml): schema, defaults and validation.

Everything is checked here, before the simulator starts a single process: an unknown key or an
impossible value is a ConfigError that names it (`fault[2].peer = 7 but the swarm has 4 peers`).
The schema is documented in p2pcod/sim.py and topologies/README.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcod.config import Recipe, load_recipe, read_toml
from p2pcod.errors import ConfigError
from p2pcod.tasks import poison_of

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FAULT_KINDS = ("kill", "restart", "join", "cut")
MAX_PEERS = 64
MAX_GROUP = 16  # ranks of one peer on one machine
SECTIONS = ("task", "model", "train", "distill", "exchange")

SWARM_KEYS = {
    "name", "recipe", "peers", "topology", "k", "split", "steps", "budget_s", "threads", "set",
    "upload_mbit", "download_mbit", "latency_ms", "compare_alone", "baseline", "startup_timeout_s",
    "stop_timeout_s", "description", "sync_start", "compare_clean", "group_size",
}
PEER_KEYS = {"index", "name", "recipe", "set", "upload_mbit", "download_mbit", "latency_ms", "group_size"}
ADVERSARY_KEYS = {"role", "attacks", "attack_every_s"}  # [[peer]] keys of a hostile peer
ROLES = ("honest", "adversary")
FAULT_KEYS = {"kind", "peer", "at_step", "at_s", "after_s", "duration_s"}


@dataclass(frozen=True)
class PeerSpec:
    """One peer of the experiment: its recipe file and the `--set` overrides it runs with."""

    index: int
    name: str
    recipe: Path
    overrides: tuple[str, ...]
    recipe_cfg: Recipe  # the effective recipe, loaded once to validate it
    group_size: int = 1  # ranks (processes) of this peer: > 1 is a torch.distributed group, rank 0 the swarm member
    role: str = "honest"  # or "adversary": p2pcod/adversary.py attacking the others (tests, experiments)
    attacks: tuple[str, ...] = ()  # an adversary's attacks, cycled
    attack_every_s: float = 20.0

    @property
    def honest(self) -> bool:
        return self.role == "honest"


@dataclass(frozen=True)
class FaultSpec:
    """kill | restart | join | cut, for one peer, triggered by a step or a time."""

    index: int  # position in the [[fault]] array (for messages and events)
    kind: str
    peer: int
    at_step: int | None = None  # kill/cut: this peer's step; join: the most advanced peer's step
    at_s: float | None = None  # seconds since the simulation started
    after_s: float | None = None  # restart: seconds after this peer's previous kill
    duration_s: float = 0.0  # cut: how long the partition lasts


@dataclass(frozen=True)
class SimSpec:
    name: str
    path: Path
    peers: tuple[PeerSpec, ...]
    faults: tuple[FaultSpec, ...]
    topology: str
    steps: int
    budget_s: float  # 0 = no wall-clock budget
    threads: int  # torch threads per peer
    compare_alone: bool = False
    compare_clean: bool = False  # then run the honest peers alone in the same swarm (no adversaries)
    baseline: Path | None = None
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 60.0
    description: str = ""
    sync_start: bool = True  # initial peers start training together (held until all have joined)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def late_peers(self) -> set[int]:
        return {f.peer for f in self.faults if f.kind == "join"}

    @property
    def honest_peers(self) -> tuple[PeerSpec, ...]:
        return tuple(p for p in self.peers if p.honest)

    def clean(self) -> SimSpec:
        """The same swarm without its adversaries (same faults for the honest peers): the comparison run."""
        keep = {p.index: i for i, p in enumerate(self.honest_peers)}
        peers = tuple(dataclasses.replace(p, index=keep[p.index]) for p in self.honest_peers)
        faults = tuple(dataclasses.replace(f, peer=keep[f.peer]) for f in self.faults if f.peer in keep)
        return dataclasses.replace(self, name=f"{self.name}-clean", peers=peers, faults=faults, compare_alone=False,
                                   compare_clean=False, baseline=None,
                                   description=f"{self.name}: the same honest peers without the adversaries")

    def alone(self) -> SimSpec:
        """The same peers trained alone (topology none, no faults, no caps): the comparison run."""
        peers = tuple(  # the honest ones: adversaries have nothing to train alone
            PeerSpec(i, p.name, p.recipe, p.overrides + ('exchange.topology="none"', "exchange.edges=[]"),
                     p.recipe_cfg.replace(exchange={"topology": "none", "edges": []}), group_size=p.group_size)
            for i, p in enumerate(self.honest_peers)
        )
        return SimSpec(
            name=f"{self.name}-alone", path=self.path, peers=peers, faults=(), topology="none",
            steps=self.steps, budget_s=self.budget_s, threads=self.threads, compare_alone=False,
            startup_timeout_s=self.startup_timeout_s, stop_timeout_s=self.stop_timeout_s,
            sync_start=self.sync_start, description=f"{self.name}: the same peers alone (topology none)", raw=self.raw,
        )


def load_spec(path: str | Path, cores: int | None = None) -> SimSpec:
    """Read and fully validate a spec file; raises ConfigError naming the offending key."""
    path = Path(path)
    raw = read_toml(path, "spec")
    try:
        return parse_spec(raw, path, cores=cores)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_spec(raw: Mapping[str, Any], path: Path, cores: int | None = None) -> SimSpec:
    _check_keys(raw, {"swarm", "peer", "fault"}, "")
    swarm = _table(raw, "swarm", required=True)
    _check_keys(swarm, SWARM_KEYS, "swarm.")
    n = _int(swarm, "peers", "swarm.peers", required=True)
    if not 1 <= n <= MAX_PEERS:
        raise ConfigError(f"swarm.peers = {n}: need 1 to {MAX_PEERS} peers")
    steps = _int(swarm, "steps", "swarm.steps", default=0)
    budget = _num(swarm, "budget_s", "swarm.budget_s", default=0.0)
    if steps < 0 or budget < 0:
        raise ConfigError("swarm.steps and swarm.budget_s must be >= 0")
    cores = cores or _cores()
    peer_tables = _peer_tables(raw, n)
    sizes = [_group_size(peer_tables.get(i, {}), swarm, i) for i in range(n)]
    if sum(sizes) > MAX_PEERS:
        raise ConfigError(f"group_size: the peers run as {sum(sizes)} rank processes in all; at most {MAX_PEERS}")
    _check_gpus(sizes)
    threads = _int(swarm, "threads", "swarm.threads", default=0) or max(1, cores // sum(sizes))  # per rank
    if threads < 1:
        raise ConfigError(f"swarm.threads = {threads} must be >= 1")
    base_dir = path.parent
    default_recipe = swarm.get("recipe")
    common = _overrides(swarm, "swarm")
    peers = tuple(_peer(i, peer_tables.get(i, {}), swarm, default_recipe, common, steps, threads, base_dir, sizes[i])
                  for i in range(n))
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ConfigError(f"peer names must be unique, got {names}")
    steps = steps or max(p.recipe_cfg.train.steps for p in peers)
    faults = _faults(raw, n, steps)
    baseline = swarm.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"swarm.baseline must be a run directory path, got {baseline!r}")
    compare_alone = _bool(swarm, "compare_alone", False)
    compare_clean = _bool(swarm, "compare_clean", False)
    _check_roles(peers, faults, compare_clean)
    name = swarm.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"swarm.name = {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    spec = SimSpec(
        name=name, path=path, peers=peers, faults=faults, topology=peers[0].recipe_cfg.exchange.topology,
        steps=steps, budget_s=budget, threads=threads, compare_alone=compare_alone, compare_clean=compare_clean,
        baseline=Path(baseline) if baseline else None,
        startup_timeout_s=_num(swarm, "startup_timeout_s", "swarm.startup_timeout_s", default=180.0),
        stop_timeout_s=_num(swarm, "stop_timeout_s", "swarm.stop_timeout_s", default=60.0),
        description=str(swarm.get("description", "")), sync_start=_bool(swarm, "sync_start", True), raw=dict(raw),
    )
    # the comparison runs are built now, so an error in them stops the spec before any process starts
    if compare_alone:
        spec.alone()
    if compare_clean:
        spec.clean()
    return spec


# ---- peers ----------------------------------------------------------------------------------------
def _peer_tables(raw: Mapping[str, Any], n: int) -> dict[int, Mapping[str, Any]]:
    tables = raw.get("peer", [])
    if not isinstance(tables, list):
        raise ConfigError("[[peer]] must be an array of tables")
    out: dict[int, Mapping[str, Any]] = {}
    for j, table in enumerate(tables):
        where = f"peer[{j}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        _check_keys(table, PEER_KEYS | ADVERSARY_KEYS, f"{where}.")
        index = _int(table, "index", f"{where}.index", required=True)
        if not 0 <= index < n:
            raise ConfigError(f"{where}.index = {index} but the swarm has {n} peers")
        if index in out:
            raise ConfigError(f"{where}.index = {index} appears twice in [[peer]]")
        out[index] = table
    return out


def _peer(i: int, table: Mapping[str, Any], swarm: Mapping[str, Any], default_recipe: Any,
          common: list[str], steps: int, threads: int, base_dir: Path, group_size: int = 1) -> PeerSpec:
    where = f"peer[{i}]" if table else "swarm"
    name = table.get("name", f"p{i}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"peer[{i}].name = {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    recipe = table.get("recipe", default_recipe)
    if not isinstance(recipe, str):
        raise ConfigError(f"{where}.recipe is missing (a peer recipe TOML, e.g. peers/lm-tiny.toml)")
    recipe_path = _resolve(recipe, base_dir, f"{where}.recipe")
    overrides = list(common)
    for key in ("topology", "k", "split"):
        if key in swarm:
            section = "train" if key == "split" else "exchange"
            overrides.append(f"{section}.{key}={_toml(swarm[key])}")
    if steps:
        overrides.append(f"train.steps={steps}")
    overrides.append(f"train.threads={threads}")
    for key in ("upload_mbit", "download_mbit", "latency_ms"):
        if key in table or key in swarm:
            value = _num(table if key in table else swarm, key, f"{where}.{key}")
            if value < 0:
                raise ConfigError(f"{where}.{key} = {value} must be >= 0")
            overrides.append(f"exchange.{key}={float(value)}")
    overrides += _overrides(table, f"peer[{i}]")
    recipe_cfg = _load_recipe(recipe_path, overrides, f"peer {name}")
    role, attacks, every = _role(table, f"peer[{i}]")
    return PeerSpec(index=i, name=name, recipe=recipe_path, overrides=tuple(overrides), recipe_cfg=recipe_cfg,
                    group_size=group_size, role=role, attacks=attacks, attack_every_s=every)


def _role(table: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...], float]:
    from p2pcod.adversary import ATTACKS

    role = table.get("role", "honest")
    if role not in ROLES:
        raise ConfigError(f"{where}.role = {role!r} is not one of {', '.join(ROLES)}")
    if role == "honest":
        extra = sorted(k for k in ADVERSARY_KEYS - {"role"} if k in table)
        if extra:
            raise ConfigError(f"{where}.{extra[0]} only applies to role = \"adversary\"")
        return role, (), 20.0
    attacks = table.get("attacks")
    if isinstance(attacks, str):
        attacks = [attacks]
    if not isinstance(attacks, list) or not attacks:
        raise ConfigError(f"{where}.attacks is missing: a list of some of {', '.join(ATTACKS)}")
    for a in attacks:
        if a not in ATTACKS:
            raise ConfigError(f"{where}.attacks: {a!r} is not one of {', '.join(ATTACKS)}")
    every = _num(table, "attack_every_s", f"{where}.attack_every_s", default=20.0)
    if not (every > 0 and math.isfinite(every)):
        raise ConfigError(f"{where}.attack_every_s = {every} must be a number > 0")
    return role, tuple(attacks), every


def _check_roles(peers: Sequence[PeerSpec], faults: Sequence[FaultSpec], compare_clean: bool) -> None:
    if not peers[0].honest:
        raise ConfigError("peer[0] bootstraps the swarm and must be honest (make another index the adversary)")
    for p in peers:
        if not p.honest and p.group_size != 1:
            raise ConfigError(f"peer[{p.index}].group_size = {p.group_size}: an adversary is one process")
    for f in faults:
        if not peers[f.peer].honest:
            raise ConfigError(f"fault[{f.index}].peer = {f.peer} is an adversary: faults apply to honest peers")
    if compare_clean and all(p.honest for p in peers):
        raise ConfigError("swarm.compare_clean = true needs at least one [[peer]] with role = \"adversary\"")


def _group_size(table: Mapping[str, Any], swarm: Mapping[str, Any], i: int) -> int:
    """[[peer]] group_size, else [swarm] group_size, else 1: how many ranks (processes) the peer runs as."""
    source, name = (table, f"peer[{i}].group_size") if "group_size" in table else (swarm, "swarm.group_size")
    size = _int(source, "group_size", name, default=1)
    if not 1 <= size <= MAX_GROUP:
        raise ConfigError(f"{name} = {size}: a peer runs as 1 to {MAX_GROUP} rank processes")
    return size


def _check_gpus(sizes: list[int]) -> None:
    """Ranks run with --device auto: on a machine with GPUs, NCCL needs a GPU of its own for each rank of a group."""
    biggest = max(sizes)
    gpus = _cuda_devices() if biggest > 1 else 0
    if 0 < gpus < biggest:
        i = sizes.index(biggest)
        raise ConfigError(f"peer[{i}].group_size = {biggest}: its ranks would train on CUDA (--device auto), one GPU "
                          f"each, but {gpus} GPU(s) are visible; hide them (CUDA_VISIBLE_DEVICES=) to run on CPU")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _load_recipe(path: Path, overrides: Sequence[str], who: str) -> Recipe:
    try:
        recipe = load_recipe(path, overrides)
        recipe.exchange.topology_config()  # validates the topology name and its parameters
        poison_of(recipe.task)  # a bad task.poison must stop the spec, not one peer minutes later
    except ConfigError as err:
        raise ConfigError(f"{who}: {err}") from None
    return recipe


def _overrides(table: Mapping[str, Any], where: str) -> list[str]:
    """`set = {train = {lr = 1e-3}}` (or [swarm.set.train]) -> ["train.lr=0.001"]."""
    value = table.get("set", {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.set must be a table of recipe sections, e.g. [{where}.set.train]")
    out = []
    for section, keys in value.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}.set.{section}: unknown recipe section (known: {', '.join(SECTIONS)})")
        if not isinstance(keys, Mapping):
            raise ConfigError(f"{where}.set.{section} must be a table of keys")
        out += [f"{section}.{key}={_toml(v)}" for key, v in keys.items()]
    return out


# ---- faults ---------------------------------------------------------------------------------------
def _faults(raw: Mapping[str, Any], n: int, steps: int) -> tuple[FaultSpec, ...]:
    tables = raw.get("fault", [])
    if not isinstance(tables, list):
        raise ConfigError("[[fault]] must be an array of tables")
    faults: list[FaultSpec] = []
    killed: dict[int, int] = {}  # peer -> kills not yet followed by a restart
    joined: set[int] = set()
    for j, table in enumerate(tables):
        where = f"fault[{j}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        _check_keys(table, FAULT_KEYS, f"{where}.")
        kind = table.get("kind")
        if kind not in FAULT_KINDS:
            raise ConfigError(f"{where}.kind = {kind!r} is not one of {', '.join(FAULT_KINDS)}")
        peer = _int(table, "peer", f"{where}.peer", required=True)
        if not 0 <= peer < n:
            raise ConfigError(f"{where}.peer = {peer} but the swarm has {n} peers")
        fault = FaultSpec(
            index=j, kind=kind, peer=peer,
            at_step=_int(table, "at_step", f"{where}.at_step", default=None),
            at_s=_num(table, "at_s", f"{where}.at_s", default=None),
            after_s=_num(table, "after_s", f"{where}.after_s", default=None),
            duration_s=_num(table, "duration_s", f"{where}.duration_s", default=0.0),
        )
        _check_fault(fault, where, steps, killed, joined)
        faults.append(fault)
    return tuple(faults)


def _check_fault(f: FaultSpec, where: str, steps: int, killed: dict[int, int], joined: set[int]) -> None:
    triggers = [k for k in ("at_step", "at_s", "after_s") if getattr(f, k) is not None]
    allowed = ("at_s", "after_s") if f.kind == "restart" else ("at_step", "at_s")
    if len(triggers) != 1 or triggers[0] not in allowed:
        raise ConfigError(f"{where} ({f.kind}) needs exactly one of {' / '.join(allowed)}, got {triggers or 'none'}")
    if f.at_step is not None and not 0 < f.at_step <= steps:
        raise ConfigError(f"{where}.at_step = {f.at_step} is outside the run's 1..{steps} steps")
    for key in ("at_s", "after_s"):
        value = getattr(f, key)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{where}.{key} = {value} must be a finite number >= 0")
    if f.kind == "cut" and not f.duration_s > 0:
        raise ConfigError(f"{where}.duration_s = {f.duration_s}: a cut needs a duration > 0")
    if f.kind != "cut" and f.duration_s:
        raise ConfigError(f"{where}.duration_s only applies to kind = \"cut\"")
    if f.kind == "join":
        if f.peer == 0:
            raise ConfigError(f"{where}.peer = 0: peer 0 bootstraps the swarm and cannot join late")
        if f.peer in joined:
            raise ConfigError(f"{where}: peer {f.peer} already joins late in an earlier fault")
        joined.add(f.peer)
    elif f.kind == "kill":
        killed[f.peer] = killed.get(f.peer, 0) + 1
    elif f.kind == "restart":
        if not killed.get(f.peer):
            raise ConfigError(f"{where}: restart of peer {f.peer} without an earlier kill of it")
        killed[f.peer] -= 1


# ---- small helpers ----------------------------------------------------------------------------------
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve(value: str, base_dir: Path, key: str) -> Path:
    """Relative to the working directory first (peers/lm-tiny.toml from the repo), then to the spec."""
    for candidate in (Path(value), base_dir / value, base_dir.parent / value):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{key} = {value!r}: no such file")


def _check_keys(table: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key {prefix}{key} (known: {', '.join(sorted(known))})")


def _table(raw: Mapping[str, Any], name: str, required: bool = False) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None and required:
        raise ConfigError(f"[{name}] table is missing")
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _int(table: Mapping[str, Any], key: str, name: str, default: Any = 0, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{name} is missing")
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


def _num(table: Mapping[str, Any], key: str, name: str, default: Any = 0.0) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"swarm.{key} must be true or false, got {value!r}")
    return value


def _toml(value: Any) -> str:
    """A TOML literal for a `--set` value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise ConfigError(f"cannot pass {value!r} as a recipe override (tables are not supported)")
