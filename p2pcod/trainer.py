"""The training loop of one model: Algorithm 1 of the paper over a Task and a TeacherPool.

    first burn_in steps:             loss = φ(y, F(θ, x))
    afterwards, with >= 1 teacher:   loss = φ(y, F(θ, x)) + α · ψ(aggregate_j F(θ_j, x), F(θ, x))

The trainer never touches the network: whoever owns it (the in-process group in `local.py`, or a
swarm peer) swaps teachers into its TeacherPool. It evaluates every `eval_every` steps, writes
metrics as JSON lines, and keeps an atomic local checkpoint every `checkpoint_every` steps from which
`resume()` continues with the same data order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pcod import checkpoint
from p2pcod.config import Recipe
from p2pcod.distill_term import DistillTerm
from p2pcod.errors import CheckpointError
from p2pcod.tasks.base import Batch, Task
from p2pcod.teachers import TeacherPool

CHECKPOINT_NAME = "checkpoint.ckpt"
log = logging.getLogger(__name__)


def build_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.Adagrad(params, lr=t.lr, weight_decay=t.weight_decay)


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; a torn last line (crash mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def seed_for(recipe: Recipe, shard: int) -> int:
    """Each model gets its own seed: same recipe, different initialisation and data order."""
    return recipe.train.seed * 1000 + shard


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        task: Task,
        *,
        shard: int,
        num_shards: int,
        run_dir: str | Path,
        teachers: TeacherPool | None = None,
        seed: int | None = None,
        val_batches: list[Batch] | None = None,
        device: str | torch.device = "cpu",
        metrics_path: str | Path | None = None,
    ) -> None:
        self.recipe = recipe
        self.task = task
        self.shard = shard
        self.num_shards = num_shards
        self.run_dir = Path(run_dir)
        self.seed = seed_for(recipe, shard) if seed is None else seed
        self.device = torch.device(device)
        torch.manual_seed(self.seed)
        self.model = task.build_model(recipe.model).to(self.device)
        # what train_step runs the batch through: the model itself, or a wrapper of it applied from outside
        # (DistributedDataParallel in a group, see p2pcod/group.py); checkpoints and teachers use self.model
        self.train_model: torch.nn.Module = self.model
        self.optimizer = build_optimizer(self.model.parameters(), recipe)
        self.step = 0
        val = val_batches if val_batches is not None else self._val_batches()
        self.val = [to_device(b, self.device) for b in val]
        self.metrics = MetricsLog(Path(metrics_path) if metrics_path else self.run_dir / "metrics.jsonl")
        self._batches: Iterator[Batch] | None = None
        self._peeked: Batch | None = None
        unigram = task.unigram() if recipe.distill.target == "unigram" else None
        self.distill = DistillTerm(recipe.distill, task.kind, teachers, unigram)
        self._logged_settings = False
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite gradient (see train_step)
        # (train loss, distill loss, teachers, teacher passes) per step since the last metrics line
        self._window: list[tuple[float, float, int, int]] = []
        self._started = time.time()
        self.last_val_loss: float | None = None

    @property
    def teachers(self) -> TeacherPool | None:
        """The pool the distillation term draws from (given to the constructor; swapped into from outside)."""
        return self.distill.teachers

    # ---- training -------------------------------------------------------------------------------
    def _val_batches(self) -> list[Batch]:
        t = self.recipe.train
        return self.task.val_batches(t.eval_batch_size, t.eval_batches)

    def _next_batch(self) -> Batch:
        if self._batches is None:
            t = self.recipe.train
            self._batches = self.task.train_batches(
                self.shard, self.num_shards, split=t.split, batch_size=t.batch_size,
                seed=self.seed, start_step=self.step,
            )
        return to_device(next(self._batches), self.device)

    def _lr(self) -> float:
        t = self.recipe.train
        if t.warmup and self.step < t.warmup:
            return t.lr * (self.step + 1) / t.warmup
        return t.lr

    def _peek_batch(self) -> Batch:
        """The next batch without consuming it (distill.prefetch computes its teacher target ahead)."""
        if self._peeked is None:
            self._peeked = self._next_batch()
        return self._peeked

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns this step's losses."""
        self.model.train()
        batch, self._peeked = self._peek_batch(), None
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        logits = self.train_model(batch.x)
        task_loss = self.task.loss(logits, batch)
        term = self.distill.loss(logits, batch.x, self.step, self.seed)
        loss = task_loss + term.loss
        if self.recipe.distill.prefetch and self.step + 1 < self.recipe.train.steps:
            # the next batch's teacher target is computed while this step runs backward (distill.prefetch)
            self.distill.prefetch(self._peek_batch().x, tuple(logits.shape), self.step + 1, self.seed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the total gradient norm (clipped to train.grad_clip when set); after DDP's all-reduce it is the same on
        # every rank of a group, so every rank takes the same decision below
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip or float("inf"))
        if bool(torch.isfinite(norm)):
            self.optimizer.step()
        else:  # a NaN / inf loss or gradient (a hostile teacher, a bad batch) must not reach the weights
            self._skip_step(float(task_loss.detach()), float(term.loss.detach()))
        self.step += 1
        out = {
            "train_loss": float(task_loss.detach()),
            "distill_loss": float(term.loss.detach()),
            "teachers": len(self.teachers or ()) if term.teacher_passes else 0,
            "teacher_passes": term.teacher_passes,
        }
        self._window.append((out["train_loss"], out["distill_loss"], out["teachers"], term.teacher_passes))
        return out

    def _skip_step(self, task_loss: float, distill_loss: float) -> None:
        self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped_steps == 1 or self.skipped_steps % 100 == 0:
            log.warning("step %d: non-finite gradient (task loss %s, distillation loss %s): step skipped, weights "
                        "unchanged (%d skipped so far)", self.step, task_loss, distill_loss, self.skipped_steps)

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val:
            total += float(self.task.loss(self.model(batch.x), batch)) * _batch_size(batch)
            count += _batch_size(batch)
        self.last_val_loss = total / max(count, 1)
        return self.last_val_loss

    @torch.no_grad()
    def predictions(self) -> np.ndarray:
        """Per-example predicted probabilities on the validation set (for churn)."""
        self.model.eval()
        return predictions_of([self.model], self.task, self.val)

    def log(self, extra: dict[str, Any] | None = None, evaluate: bool = False) -> dict[str, Any]:
        """Write one metrics line: means over the steps since the last line, plus validation loss."""
        record: dict[str, Any] = {"step": self.step, "time": round(time.time() - self._started, 3)}
        if self._window:
            arr = np.array(self._window, dtype=np.float64)
            record["train_loss"] = round(float(arr[:, 0].mean()), 6)
            record["distill_loss"] = round(float(arr[:, 1].mean()), 6)
            record["teachers"] = int(arr[-1, 2])
            record["teacher_passes"] = round(float(arr[:, 3].mean()), 3)  # per step, mean since the last line
            self._window.clear()
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        if not self._logged_settings:  # what the distillation term costs, once per run (and per resume)
            record["distill"] = dataclasses.asdict(self.recipe.distill)
            self._logged_settings = True
        if evaluate:
            record["val_loss"] = round(self.evaluate(), 6)
        if self.teachers is not None:
            record["teachers"] = len(self.teachers)
            record["staleness"] = self.teachers.staleness(self.step)
        if extra:
            record.update(extra)
        self.metrics.write(record)
        return record

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.recipe.train.steps

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "model": _to_cpu(self.model.state_dict()),
            "model_config": dict(self.recipe.model),  # what resume() compares: a different model is no resume
            "optimizer_name": self.recipe.train.optimizer,
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng": checkpoint.rng_state(),
            "elapsed": time.time() - self._started,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; CheckpointError naming the mismatch if it is another model or optimizer."""
        self.check_state(state)
        self.model.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"the optimizer state does not fit train.optimizer = "
                                  f"{self.recipe.train.optimizer!r}: {err}") from None
        checkpoint.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._started = time.time() - float(state.get("elapsed", 0.0))
        self._batches = None  # restart the data stream at self.step
        self._peeked = None
        self.distill.discard()
        self._window.clear()

    def check_state(self, state: dict[str, Any]) -> None:
        """CheckpointError unless `state` is this trainer's model and optimizer: names the model config keys
        that differ and the tensors that do not fit."""
        stored = state.get("model_config")  # absent in checkpoints from before it was stored
        current = dict(self.recipe.model)
        differs = [] if stored is None else _config_diff(stored, current)
        mismatched = _tensor_mismatch(state.get("model"), self.model.state_dict())
        if differs or mismatched:
            what = []
            if differs:
                what.append("its model config differs: " + ", ".join(differs))
            if mismatched:
                what.append("its tensors do not fit this model: " + "; ".join(mismatched))
            raise CheckpointError("the checkpoint holds another model than the recipe's ("
                                  + "; ".join(what) + "): resume with the model config it was trained with, "
                                  "or start a new run directory")
        name = state.get("optimizer_name")
        if name is not None and name != self.recipe.train.optimizer:
            raise CheckpointError(f"the checkpoint was trained with train.optimizer = {name!r}, the recipe now "
                                  f"says {self.recipe.train.optimizer!r}: resume with {name!r}, or start a new run "
                                  "directory")

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def save(self, extra: dict[str, Any] | None = None) -> None:
        state = self.state()
        if extra:
            state["extra"] = extra
        checkpoint.save(self.checkpoint_path, state)

    def resume(self) -> dict[str, Any] | None:
        """Load the local checkpoint if there is one; returns its `extra` payload (or None if none)."""
        if not self.checkpoint_path.exists():
            return None
        state = checkpoint.load(self.checkpoint_path)
        if not isinstance(state.get("model"), dict) or "step" not in state:
            raise CheckpointError(f"{self.checkpoint_path} is not a single model's checkpoint (a `p2pcod train` "
                                  "run's? `p2pcod inspect` it)")
        try:
            self.load_state(state)
        except CheckpointError as err:
            raise CheckpointError(f"{self.checkpoint_path}: {err}") from None
        return state.get("extra", {})

    def close(self) -> None:
        self.distill.close()
        self.metrics.close()
        self.train_model = self.model  # release a DistributedDataParallel wrapper before its group closes


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device` (the same object when it is already there)."""
    if device.type == "cpu":
        return batch
    x = batch.x
    x = x.to(device) if isinstance(x, torch.Tensor) else type(x)(v.to(device) for v in x)
    return dataclasses.replace(batch, x=x, y=batch.y.to(device))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _config_diff(old: Any, new: dict[str, Any]) -> list[str]:
    """`model.key: old -> new` for every key whose value differs (or is set in only one of them)."""
    old = dict(old) if isinstance(old, dict) else {}
    unset = "(not set)"
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, unset), new.get(key, unset)
        if _plain(a) != _plain(b):
            out.append(f"model.{key}: {a!r} -> {b!r}")
    return out


def _plain(value: Any) -> Any:
    """Lists and tuples alike (a checkpoint gives back what TOML gave as a list)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tensor_mismatch(stored: Any, current: dict[str, torch.Tensor], limit: int = 4) -> list[str]:
    """What keeps `stored` from loading into a model whose state_dict is `current`: missing, unexpected and
    mis-shaped tensors (the first `limit` of each kind, then how many more)."""
    if not isinstance(stored, dict):
        return [f"no model state (got {type(stored).__name__})"]

    def shape(t: Any) -> tuple[int, ...] | None:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    def listed(kind: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return [f"{kind} {', '.join(items[:limit])}{more}"]

    missing = [k for k in current if k not in stored]
    unexpected = [k for k in stored if k not in current]
    shapes = [f"{k} {list(shape(stored[k]) or ())} vs {list(current[k].shape)}" for k in current
              if k in stored and shape(stored[k]) != tuple(current[k].shape)]
    return (listed("shape (checkpoint vs recipe):", shapes) + listed("missing from the checkpoint:", missing)
            + listed("not in this model:", unexpected))


def _batch_size(batch: Batch) -> int:
    return int(batch.y.shape[0])


@torch.no_grad()
def predictions_of(models: list[torch.nn.Module], task: Task, batches: list[Batch]) -> np.ndarray:
    """Averaged predicted probabilities of `models` (an ensemble when several) over `batches`."""
    out = []
    for batch in batches:
        probs = None
        for model in models:
            model.eval()
            p = _probabilities(task.flat_logits(model(batch.x)).float(), task.kind)
            probs = p if probs is None else probs + p
        out.append((probs / len(models)).cpu().numpy())
    return np.concatenate(out, axis=0)


@torch.no_grad()
def ensemble_loss(models: list[torch.nn.Module], task: Task, batches: list[Batch]) -> float:
    """Validation loss of the averaged probabilities of `models` (the paper's ensemble baseline)."""
    total, count = 0.0, 0
    for batch in batches:
        probs = None
        for model in models:
            model.eval()
            p = _probabilities(model(batch.x).float(), task.kind)
            probs = p if probs is None else probs + p
        probs = (probs / len(models)).clamp(1e-7, 1 - 1e-7) if task.kind == "binary" else probs / len(models)
        # Logits whose softmax / sigmoid is exactly the averaged probability, so task.loss applies.
        logits = torch.log(probs.clamp_min(1e-12)) if task.kind != "binary" else torch.logit(probs)
        total += float(task.loss(logits, batch)) * _batch_size(batch)
        count += _batch_size(batch)
    return total / max(count, 1)


def _probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.sigmoid(logits) if kind == "binary" else torch.softmax(logits, dim=-1)

