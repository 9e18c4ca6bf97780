"""The Task interface (model factory + training shards + validation + loss) and config helpers.

A Task is built from the recipe's [task] table (minus "name"); `build_model` takes the [model] table, so
peers of one swarm may run different model sizes of the same task and still read the same data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from p2pcod.errors import ConfigError

SPLITS = ("disjoint", "same", "noniid")
KINDS = ("multiclass", "binary")


@dataclass
class Batch:
    x: torch.Tensor | tuple[torch.Tensor, ...]  # model input; model(x) -> logits
    y: torch.Tensor  # targets


class Task(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]  # "multiclass" (logits over the last dim) or "binary" (one logit per example)

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(cfg)

    @abstractmethod
    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module: ...

    @abstractmethod
    def train_batches(
        self, shard: int, num_shards: int, *, split: str, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[Batch]: ...

    @abstractmethod
    def val_batches(self, batch_size: int, max_batches: int) -> list[Batch]: ...

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...

    def flat_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) for multiclass, (N,) for binary: one row per example that distillation/churn compare."""
        if self.kind == "binary":
            return logits.reshape(-1)
        return logits.reshape(-1, logits.shape[-1])

    @abstractmethod
    def unigram(self) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "kind": self.kind}


# ---- helpers shared by the tasks ------------------------------------------------------------------


def check_keys(cfg: Mapping[str, Any], allowed: set[str] | frozenset[str], section: str) -> None:
    """ConfigError naming the first unknown key (sorted, so the message is stable)."""
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]} (known keys of {section}: {', '.join(sorted(allowed))})"
        )


def get_int(cfg: Mapping[str, Any], key: str, default: int | None, section: str, *, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def get_float(
    cfg: Mapping[str, Any],
    key: str,
    default: float,
    section: str,
    *,
    low: float,
    high: float,
    high_open: bool = True,
) -> float:
    value = cfg.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok:
        value = float(value)
        ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{section}.{key} must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def get_bool(cfg: Mapping[str, Any], key: str, default: bool, section: str) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
    return value


def check_shard_args(
    shard: int, num_shards: int, split: str, batch_size: int, seed: int, start_step: int
) -> None:
    """The arguments every train_batches() validates before touching data."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ConfigError(f"shard must be in [0, {num_shards}), got {shard!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ConfigError(f"start_step must be a non-negative integer, got {start_step!r}")


def step_rng(seed: int, shard: int, num_shards: int, split: str, step: int) -> np.random.Generator:
    """The randomness of one training step, derived (not replayed) so a resumed stream is identical."""
    return np.random.default_rng([seed, shard, num_shards, SPLITS.index(split), step])


def balanced_assignment(sizes: list[int], keys: list[str], num_shards: int) -> list[int]:
    """Shard of each item: largest first onto the lightest shard (ties by key, then shard index)."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], keys[i]))
    load = [0] * num_shards
    count = [0] * num_shards
    out = [0] * len(sizes)
    for i in order:
        # an empty shard first, so every shard gets data when there are enough items
        s = min(range(num_shards), key=lambda j: (count[j] > 0, load[j], j))
        out[i] = s
        load[s] += sizes[i]
        count[s] += 1
    return out
