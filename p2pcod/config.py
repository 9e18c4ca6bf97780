"""Recipes: a peer's whole configuration, from TOML, then `--set section.key=value` overrides.

A recipe has the tables [task] (task name + task keys), [model] (model config, passed to the task's
model factory and announced to peers), [train], [distill] and [exchange]. Unknown keys and values of
the wrong type or out of range are a ConfigError that names the key; [task] and [model] are checked by
the task (`Task.check_config`) without loading any data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from p2pcod.errors import CodecError, ConfigError
from p2pcod.topology import check_topology

OPTIMIZERS = ("adamw", "adam", "sgd", "adagrad")
# what topology.check_topology's errors call the exchange keys it checks
_TOPOLOGY_KEYS = {"name": "exchange.topology", "k": "exchange.k", "seed": "exchange.topology_seed",
                  "edges": "exchange.edges"}
SPLITS = ("disjoint", "same", "noniid")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    split: str = "disjoint"
    log_every: int = 10  # metrics line every this many steps
    eval_every: int = 50
    eval_batches: int = 8
    eval_batch_size: int = 32
    checkpoint_every: int = 100
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.split", self.split, SPLITS)
        for key in ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "eval_batch_size",
                    "checkpoint_every"):
            _check_positive(f"train.{key}", getattr(self, key))
        for key in ("warmup", "threads", "seed"):
            _check_non_negative(f"train.{key}", getattr(self, key))
        _check_positive("train.lr", self.lr)
        _check_non_negative("train.grad_clip", self.grad_clip)
        _check_non_negative("train.weight_decay", self.weight_decay)


@dataclass(frozen=True)
class ExchangeConfig:
    reload_every: int = 50  # publish a checkpoint / refresh teachers every this many steps
    topology: str = "ring"
    k: int = 2  # for k-ring and random-k
    topology_seed: int = 0
    edges: tuple[tuple[str, str], ...] = ()  # explicit (teacher, student) pairs for topology "edges"
    block: int = 256  # codec absmax block
    keep_dtype: str = "fp32"  # how the codec stores 1-D / small float tensors
    level: int = 1  # zstd level (1: same ratio as higher levels on int8 weights, fastest)
    max_blob_mb: float = 2048.0  # refuse checkpoints larger than this
    upload_mbit: float = 0.0  # upload cap in Mbit/s; 0 = unlimited
    download_mbit: float = 0.0
    latency_ms: float = 0.0  # added delay before every transfer (simulated slow links)
    fetch_timeout: float = 120.0  # bound on one whole checkpoint download (longer at min_fetch_mbit, below)
    min_fetch_mbit: float = 1.0  # slowest link a download must be given time for: size / this, if longer
    stall_timeout: float = 15.0  # a download fails when the peer sends nothing for this long
    ttl: float = 30.0  # peer records expire unless refreshed within this many seconds
    heartbeat: float = 5.0
    max_teachers: int = 0  # 0 = as many as the topology gives
    ban_after: int = 5  # consecutive failed fetches from a peer before we stop fetching from it
    ban_for: float = 300.0  # seconds a ban lasts (fetching from it, and serving it)
    max_streams_per_peer: int = 4  # blob streams one remote peer may hold open at our server at once

    def __post_init__(self) -> None:
        from p2pcod.codec import check_options  # lazily: it imports torch

        _check_positive("exchange.reload_every", self.reload_every)
        for key in ("max_blob_mb", "fetch_timeout", "ttl", "heartbeat", "ban_after", "ban_for", "max_streams_per_peer",
                    "stall_timeout", "min_fetch_mbit"):
            _check_positive(f"exchange.{key}", getattr(self, key))
        for key in ("upload_mbit", "download_mbit", "latency_ms", "max_teachers", "topology_seed"):
            _check_non_negative(f"exchange.{key}", getattr(self, key))
        if self.heartbeat >= self.ttl:
            raise ConfigError(f"exchange.heartbeat ({self.heartbeat}) must be shorter than exchange.ttl ({self.ttl})")
        # the topology's and the codec's own rules, so that a bad value stops the recipe here, not a reload or a
        # publish later (with --models 1 or as a peer's background publisher: never, or only in a log)
        edges = check_topology(self.topology, self.k, self.topology_seed, self.edges, keys=_TOPOLOGY_KEYS)
        object.__setattr__(self, "edges", edges)
        try:
            check_options(self.codec_options(), prefix="exchange")
        except CodecError as err:
            raise ConfigError(str(err)) from None

    def codec_options(self):
        from p2pcod.codec import CodecOptions

        return CodecOptions(block=self.block, keep_dtype=self.keep_dtype, level=self.level)

    def topology_config(self):
        from p2pcod.topology import TopologyConfig

        return TopologyConfig.from_dict(
            {"name": self.topology, "k": self.k, "seed": self.topology_seed, "edges": [list(e) for e in self.edges]}
        )


@dataclass(frozen=True)
class Recipe:
    task: dict[str, Any]
    model: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: Any = None  # p2pcod.distill.DistillConfig
    exchange: ExchangeConfig = field(default_factory=ExchangeConfig)
    source: str = ""

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    def to_dict(self) -> dict[str, Any]:
        """Plain, TOML/JSON-able form (what `from_dict` reads back)."""
        out = {
            "task": dict(self.task),
            "model": dict(self.model),
            "train": dataclasses.asdict(self.train),
            "distill": dataclasses.asdict(self.distill),
            "exchange": dataclasses.asdict(self.exchange),
        }
        out["exchange"]["edges"] = [list(e) for e in self.exchange.edges]
        return out

    def replace(self, **sections: Mapping[str, Any]) -> Recipe:
        """A copy with some keys of some sections changed, e.g. replace(train={"seed": 3})."""
        raw = self.to_dict()
        for section, values in sections.items():
            if section not in raw:
                raise ConfigError(f"unknown recipe section {section!r}")
            raw[section].update(values)
        return Recipe.from_dict(raw, source=self.source)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "") -> Recipe:
        from p2pcod.distill import DistillConfig
        from p2pcod.tasks import check_config

        where = f" in {source}" if source else ""
        unknown = set(raw) - {"task", "model", "train", "distill", "exchange"}
        if unknown:
            raise ConfigError(f"unknown recipe section {sorted(unknown)[0]!r}{where}")
        task = _table(raw, "task", where)
        if "name" not in task:
            raise ConfigError(f"task.name is missing{where}")
        model = _table(raw, "model", where)
        try:
            check_config(task, model)  # the task's keys and model config, statically: no data, no model built
            distill = DistillConfig.from_dict(_table(raw, "distill", where))
        except ConfigError as err:
            raise ConfigError(f"{err}{where}") from None
        return cls(
            task=task,
            model=model,
            train=build_dataclass(TrainConfig, _table(raw, "train", where), "train", where),
            distill=distill,
            exchange=build_dataclass(ExchangeConfig, _table(raw, "exchange", where), "exchange", where),
            source=source,
        )


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; ConfigError saying which `what` (recipe, spec...) is missing or malformed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe TOML file and apply `section.key=value` overrides (values parsed as TOML)."""
    raw = read_toml(path, "recipe")
    apply_overrides(raw, overrides)
    return Recipe.from_dict(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """`train.steps=100`, `model.hidden=[64, 32]`, `task.corpus="/data"`: the value is TOML, or a bare string."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, _, name = key.strip().partition(".")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: {section} is not a table")
        raw[section][name.strip()] = value


def build_dataclass(cls: type, values: Mapping[str, Any], section: str, where: str = ""):
    """Instantiate a config dataclass, naming the key on unknown keys and on wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}{where} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}{where}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err}{where}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
        return value
    if origin is tuple:  # only exchange.edges: a list of [teacher, student] name pairs
        pairs = value if isinstance(value, list | tuple) else None
        if pairs is None or not all(isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(n, str) for n in p)
                                    for p in pairs):
            raise ConfigError(f"{key} must be a list of [teacher, student] name pairs, got {value!r}")
        return tuple(tuple(p) for p in pairs)
    if origin in (typing.Union, types.UnionType) or hint is Any:
        return value
    return value


def _table(raw: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table{where}")
    return dict(value)


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")


def _check_non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
