"""The distillation term of codistillation: ψ losses, teacher aggregation, burn-in / weight schedule.

Per peer (Anil et al. 2018, Algorithm 1):

    step < burn_in:               loss = φ(y, F(θ, x))
    otherwise, with >= 1 teacher: loss = φ(y, F(θ, x)) + α · ψ(aggregate_j F(θ_j_stale, x), F(θ, x))

This module computes only the second term; the task owns φ. Pure torch, no I/O. It also holds what bounds the
term's cost (rows: the examples it runs on; draw_teachers: which teachers a step runs); p2pcod/distill_term.py
applies them in a training step.

Two kinds of output:
  "multiclass": logits of shape (..., C), classes on the last dim;
  "binary":     one logit per example, any shape; probability = sigmoid(logit).

Temperature T (ce / kl only): teacher and student probabilities are softmax(logits / T)
(sigmoid(logits / T) for binary), and the loss is multiplied by T² (Hinton et al. 2015), so that its
gradient keeps the same size whatever T is. mse compares raw logits and ignores T (dividing both logits
by T and scaling the loss by T² would give back the same loss).

Reductions: ce / kl sum over classes and take the mean over examples (every leading position of a
(..., C) tensor is an example, e.g. each token of an LM); mse sums the squared error over classes and
takes the mean over examples. All maths is in float32 whatever the student's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from p2pcod.errors import ConfigError, P2pcodError

PSIS = ("ce", "kl", "mse")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
AGGREGATES = ("mean", "median", "trimmed")
TARGETS = ("teachers", "uniform", "unigram")
KINDS = ("multiclass", "binary")

# Floor for a prior before taking its log (mse/unigram target): no log(0).
_PRIOR_EPS = 1e-6


class ShapeError(P2pcodError, ValueError):
    """Student, target or teacher tensors do not have matching shapes (also a ValueError)."""


@dataclass(frozen=True)
class DistillConfig:
    """How the distillation term is computed; see the module docstring for the maths."""

    psi: str = "ce"  # ce | kl | mse
    alpha: float = 1.0  # weight of ψ
    temperature: float = 1.0  # softmax / sigmoid temperature of ce and kl (loss scaled by T²)
    burn_in: int = 0  # no distillation term before this step
    aggregate: str = "mean"  # mean | median | trimmed, per example and class across teachers
    trim: float = 0.25  # fraction cut from EACH end for "trimmed"
    target: str = "teachers"  # teachers | uniform | unigram (label-smoothing baselines)
    # What a step with teachers costs (see docs/RESULTS.md, "What a teacher costs"). The paper's exact algorithm,
    # every teacher on every example in fp32, is teachers_per_step = 0, batch_fraction = 1, teacher_precision = "fp32".
    teachers_per_step: int = 1  # teachers run per step, drawn uniformly per step; 0 = all held (the exact mean)
    batch_fraction: float = 0.5  # ψ on the first ceil(f * B) examples of each batch: teachers run on those only
    teacher_precision: str = "auto"  # fp32 | bf16 | int8 | auto (bf16 where the device computes it natively)
    prefetch: bool = False  # compute the next batch's teacher target while the student runs its backward pass

    def __post_init__(self) -> None:
        _check_choice("psi", self.psi, PSIS)
        _check_choice("teacher_precision", self.teacher_precision, PRECISIONS)
        _check_choice("aggregate", self.aggregate, AGGREGATES)
        _check_choice("target", self.target, TARGETS)
        _check_number("alpha", self.alpha, lambda v: v >= 0, ">= 0")
        _check_number("temperature", self.temperature, lambda v: v > 0, "> 0")
        _check_number("trim", self.trim, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
        _check_number("batch_fraction", self.batch_fraction, lambda v: 0 < v <= 1, "in (0, 1]")
        for key in ("burn_in", "teachers_per_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"distill.{key} must be an integer >= 0, got {value!r}")
        if not isinstance(self.prefetch, bool):
            raise ConfigError(f"distill.prefetch must be true or false, got {self.prefetch!r}")

    @property
    def exact(self) -> bool:
        """Every teacher on every example in fp32: the paper's algorithm, the ablation of the cheap defaults."""
        return self.teachers_per_step == 0 and self.batch_fraction == 1.0 and self.teacher_precision == "fp32"

    @classmethod
    def from_dict(cls, d: Mapping) -> DistillConfig:
        """Build from a mapping (a TOML table); unknown keys and bad values raise ConfigError."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"distill config must be a table, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"unknown distill config key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"distill.{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_number(key: str, value: object, ok, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"distill.{key} must be a number {what}, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ConfigError(f"distill.{key} must be a finite number {what}, got {value!r}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"output kind must be one of {', '.join(KINDS)}; got {kind!r}")


# ---------------------------------------------------------------------------------------------- aggregation


def _reduce(stacked: torch.Tensor, how: str, trim: float) -> torch.Tensor:
    """Combine teachers along dim 0 (K, ...) -> (...) by mean, median or trimmed mean."""
    k = stacked.shape[0]
    if how == "mean" or k <= 2:  # with 1 or 2 teachers median and trimmed mean are the mean
        return stacked.mean(dim=0)
    ordered = stacked.sort(dim=0).values
    if how == "median":
        mid = k // 2
        return ordered[mid] if k % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    # trimmed: cut floor(trim * k) from each end, but always keep at least one (two for even k) teacher.
    cut = min(int(math.floor(trim * k)), (k - 1) // 2)
    return ordered[cut : k - cut].mean(dim=0)


def aggregate(teacher_logits: Sequence[torch.Tensor], cfg: DistillConfig, kind: str) -> torch.Tensor:
    """The distillation target from each teacher's logits, detached, float32.

    ce / kl: the aggregated probabilities at temperature T (multiclass: per class, renormalised to sum
    to 1 after median / trimmed; binary: the aggregated positive probability).
    mse: the aggregated logits (per element).
    """
    _check_kind(kind)
    if len(teacher_logits) == 0:
        raise ValueError("aggregate() needs at least one teacher's logits")
    shape = teacher_logits[0].shape
    for i, t in enumerate(teacher_logits):
        if t.shape != shape:
            raise ShapeError(f"teacher {i} logits have shape {tuple(t.shape)}, teacher 0 has {tuple(shape)}")
    if kind == "multiclass" and len(shape) == 0:
        raise ShapeError("multiclass logits need a class dimension, got a scalar")
    with torch.no_grad():
        values = (_to_target(t.detach().float(), cfg, kind) for t in teacher_logits)
        if len(teacher_logits) == 1:  # one teacher per step is the default: no division (a copy of mse's logits)
            return next(values).clone() if cfg.psi == "mse" else next(values)
        if cfg.aggregate == "mean" or len(teacher_logits) <= 2:
            # running sum: one teacher's worth of memory, not K (LM logits are large)
            total = next(values).clone()
            for v in values:
                total += v
            return total / len(teacher_logits)
        out = _reduce(torch.stack(list(values)), cfg.aggregate, cfg.trim)
        if kind == "multiclass" and cfg.psi != "mse":
            out = out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
        return out


def _to_target(logits: torch.Tensor, cfg: DistillConfig, kind: str) -> torch.Tensor:
    """One teacher's logits -> what is aggregated: logits (mse) or probabilities at temperature T."""
    if cfg.psi == "mse":
        return logits
    z = logits if cfg.temperature == 1 else logits / cfg.temperature
    return torch.sigmoid(z) if kind == "binary" else torch.softmax(z, dim=-1)


def smoothing_target(
    like: torch.Tensor, cfg: DistillConfig, kind: str, unigram: torch.Tensor | None
) -> torch.Tensor:
    """A constant target of the form aggregate() returns, shaped like `like` (the student's logits).

    target="uniform": probability 1/C (0.5 for binary); for mse, logits 0.
    target="unigram": the label prior `unigram` (multiclass: C non-negative weights, normalised here;
    binary: the positive rate, one number, or two weights [P(0), P(1)]); for mse, the centred log prior
    (multiclass) or logit(prior) (binary), with the prior floored at 1e-6 so no log(0).
    """
    _check_kind(kind)
    if cfg.target == "teachers":
        raise ConfigError("smoothing_target() needs distill.target 'uniform' or 'unigram', got 'teachers'")
    if kind == "multiclass" and like.dim() == 0:
        raise ShapeError("multiclass logits need a class dimension, got a scalar")
    if cfg.target == "uniform":
        prior = _uniform_prior(like, kind)
    else:
        if unigram is None:
            raise ConfigError("distill.target is 'unigram' but no label prior (unigram) was given")
        prior = _unigram_prior(unigram, like, kind)
    if cfg.psi == "mse":
        prior = _prior_logits(prior, kind)
    return prior.expand(like.shape)


def _uniform_prior(like: torch.Tensor, kind: str) -> torch.Tensor:
    n = 2 if kind == "binary" else like.shape[-1]
    value = 0.5 if kind == "binary" else 1.0 / n
    shape = () if kind == "binary" else (n,)
    return torch.full(shape, value, dtype=torch.float32, device=like.device)


def _unigram_prior(unigram: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    u = torch.as_tensor(unigram).detach().to(device=like.device, dtype=torch.float32).flatten()
    if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
        raise ConfigError("unigram prior must be finite and non-negative")
    if kind == "binary":
        if u.numel() == 1:
            if float(u) > 1:
                raise ConfigError(f"binary unigram prior is a probability in [0, 1], got {float(u)}")
            return u.reshape(())
        if u.numel() != 2 or float(u.sum()) <= 0:
            raise ShapeError(f"binary unigram prior needs 1 (P(1)) or 2 (P(0), P(1)) values, got {u.numel()}")
        return (u[1] / u.sum()).reshape(())
    if u.numel() != like.shape[-1]:
        raise ShapeError(f"unigram prior has {u.numel()} classes, student logits {tuple(like.shape)}")
    total = float(u.sum())
    if total <= 0:
        raise ConfigError("unigram prior sums to 0")
    return u / total


def _prior_logits(prior: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "binary":
        p = prior.clamp(_PRIOR_EPS, 1 - _PRIOR_EPS)
        return torch.log(p) - torch.log1p(-p)
    logp = torch.log(prior.clamp_min(_PRIOR_EPS))
    return logp - logp.mean()  # centred: logits have no absolute level, and uniform -> zeros


# ---------------------------------------------------------------------------------------------- losses


def psi(student_logits: torch.Tensor, target: torch.Tensor, cfg: DistillConfig, kind: str) -> torch.Tensor:
    """ψ(target, student): a float32 scalar, mean over examples; gradients flow only into the student."""
    _check_kind(kind)
    if student_logits.shape != target.shape:
        raise ShapeError(
            f"student logits shape {tuple(student_logits.shape)} != target shape {tuple(target.shape)}"
        )
    if kind == "multiclass" and student_logits.dim() == 0:
        raise ShapeError("multiclass logits need a class dimension, got a scalar")
    s = student_logits.float()
    t = target.detach().to(device=s.device, dtype=torch.float32)
    if s.numel() == 0:
        return s.sum()  # no examples: zero, still attached to the graph
    if cfg.psi == "mse":
        sq = (s - t).pow(2)
        return (sq.sum(dim=-1) if kind == "multiclass" else sq).mean()
    temp = cfg.temperature
    z = s if temp == 1 else s / temp
    if kind == "binary":
        per = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        if cfg.psi == "kl":  # KL = BCE - H(target)
            per = per + torch.xlogy(t, t) + torch.xlogy(1 - t, 1 - t)
        return per.mean() if temp == 1 else per.mean() * (temp * temp)
    logq = F.log_softmax(z, dim=-1)
    per = -(t * logq).sum(dim=-1)
    if cfg.psi == "kl":  # KL(t || q) = Σ t log t - Σ t log q; 0·log 0 = 0
        per = per + torch.xlogy(t, t).sum(dim=-1)
    return per.mean() if temp == 1 else per.mean() * (temp * temp)


def weight(step: int, cfg: DistillConfig) -> float:
    """The weight of ψ at `step`: 0 during burn-in, then alpha."""
    return 0.0 if step < cfg.burn_in else float(cfg.alpha)


def loss(
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    cfg: DistillConfig,
    kind: str,
    step: int,
) -> torch.Tensor:
    """weight(step) · ψ(target, student), or a zero scalar (no grad) with no target or zero weight."""
    w = weight(step, cfg)
    if target is None or w == 0.0:
        return torch.zeros((), dtype=torch.float32, device=student_logits.device)
    return w * psi(student_logits, target, cfg, kind)


# ---------------------------------------------------------------------------------------------- cost bounds


def rows(batch_size: int, cfg: DistillConfig) -> int:
    """How many examples of a batch of `batch_size` the teachers run on and ψ averages over: ceil(f * B)."""
    return max(1, min(batch_size, math.ceil(cfg.batch_fraction * batch_size - 1e-9)))


def draw_teachers(names: Sequence[str], cfg: DistillConfig, seed: int, step: int) -> list[str]:
    """The teachers this step runs: `teachers_per_step` of `names` drawn uniformly without replacement.

    The draw depends only on (seed, step), so a resumed run continues the same draws. For ψ = ce and kl the
    loss is linear in the target, and for mse the gradient is, so the mean over a uniform draw has the
    expected loss gradient of the full mean (tests/test_distill.py checks it). Median and trimmed means are
    not linear: they always use every teacher held (a draw of one would drop the robustness they exist for).
    """
    k = cfg.teachers_per_step
    if k == 0 or k >= len(names) or cfg.aggregate != "mean":
        return list(names)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, step, 0x7EAC4E])
    picked = rng.choice(len(names), size=k, replace=False)
    return [names[i] for i in sorted(picked)]


def take_rows(x: Any, n: int) -> Any:
    """The first n examples of a model input: a tensor, or a tuple / list of tensors (batch on dim 0)."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, tuple | list):
        return type(x)(take_rows(v, n) for v in x)
    raise ShapeError(f"cannot take examples of a model input of type {type(x).__name__}")
