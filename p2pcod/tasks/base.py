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

    @classmethod  # noqa: B027 - optional: the default checks nothing
    def check_config(cls, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        """Check a recipe's [task] table (without `name` and `poison`) and [model] table without loading data or
        building a model: known keys, types, ranges (with the task's maxima) and relations; a ConfigError names the
        key. Tasks override it; build_model() applies the same model checks to every config it is given, a
        neighbour's announced one included, so an absurd config is refused before a module is built. The default
        checks nothing (a task without static checks fails in its constructor)."""

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


def get_int(
    cfg: Mapping[str, Any], key: str, default: int | None, section: str, *, minimum: int = 1,
    maximum: int | None = None,
) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{section}.{key} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{section}.{key} = {value} exceeds the maximum {maximum} (an integer in [{minimum}, "
                          f"{maximum}])")
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


# ---- poisoned peers -------------------------------------------------------------------------------

# task.poison: how a poisoned peer corrupts its training labels (validation stays honest).
#   shuffle-labels  targets moved between the examples of each batch (a derangement: no example keeps its own)
#   random-labels   targets replaced by uniform random classes (lm: random bytes; ctr: fair coin flips)
#   permute-labels  every class mapped through one fixed derangement of the classes (lm: a permutation of
#                   the byte values; ctr: labels flipped): a confident, consistently wrong model
POISONS = ("none", "shuffle-labels", "random-labels", "permute-labels")
_POISON_SALT = 0x9015  # keeps the poison's randomness apart from the data stream's


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2): a random cycle order, shifted by one."""
    order = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


class PoisonedTask(Task):
    """Any Task whose train_batches() yield corrupted targets; the model, loss and validation are the inner's.

    The corruption of step s depends only on (seed, shard, num_shards, split, s), so a resumed stream is
    identical to an uninterrupted one, as for the clean tasks.
    """

    def __init__(self, inner: Task, poison: str) -> None:
        if poison not in POISONS or poison == "none":
            raise ConfigError(f"task.poison must be one of {', '.join(POISONS)}; got {poison!r}")
        super().__init__(inner.cfg)
        self.inner = inner
        self.poison = poison
        self.name = inner.name  # type: ignore[misc]
        self.kind = inner.kind  # type: ignore[misc]
        self._classes: int | None = None
        self._class_map: torch.Tensor | None = None

    def __getattr__(self, attr: str) -> Any:
        # task-specific helpers (shard_files, shard_rows, seq_len, ...) are the inner task's
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def classes(self) -> int:
        """Number of classes of a multiclass task (the length of its unigram distribution)."""
        if self._classes is None:
            self._classes = int(self.inner.unigram().numel())
        return self._classes

    def class_map(self) -> torch.Tensor:
        """permute-labels: the fixed derangement of the classes (the same on every peer and every run)."""
        if self._class_map is None:
            rng = np.random.default_rng([_POISON_SALT, self.classes()])
            self._class_map = torch.from_numpy(_derangement(self.classes(), rng))
        return self._class_map

    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        return self.inner.build_model(model_cfg)

    def train_batches(
        self, shard: int, num_shards: int, *, split: str, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[Batch]:
        clean = self.inner.train_batches(
            shard, num_shards, split=split, batch_size=batch_size, seed=seed, start_step=start_step
        )
        return self._stream(clean, shard, num_shards, split, seed, start_step)

    def _stream(
        self, clean: Iterator[Batch], shard: int, num_shards: int, split: str, seed: int, step: int
    ) -> Iterator[Batch]:
        for batch in clean:
            rng = np.random.default_rng([_POISON_SALT, seed, shard, num_shards, SPLITS.index(split), step])
            yield Batch(x=batch.x, y=self.corrupt(batch.y, rng))
            step += 1

    def corrupt(self, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The poisoned targets of one batch (a new tensor, same shape and dtype as y)."""
        if self.poison == "shuffle-labels":
            if y.shape[0] < 2:
                return y.clone()
            return y[torch.from_numpy(_derangement(y.shape[0], rng))]
        if self.poison == "random-labels":
            if self.kind == "binary":
                return torch.from_numpy(rng.integers(0, 2, size=tuple(y.shape))).to(y.dtype)
            return torch.from_numpy(rng.integers(0, self.classes(), size=tuple(y.shape))).to(y.dtype)
        # permute-labels
        if self.kind == "binary":
            return (1 - y).to(y.dtype)
        return self.class_map()[y.long()].to(y.dtype)

    def val_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        return self.inner.val_batches(batch_size, max_batches)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.inner.loss(logits, batch)

    def flat_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.inner.flat_logits(logits)

    def unigram(self) -> torch.Tensor:
        return self.inner.unigram()

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "poison": self.poison}
