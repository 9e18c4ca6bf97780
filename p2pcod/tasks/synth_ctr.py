"""Synthetic click logs in the exact Criteo Display Ad TSV format, from a fixed ground-truth model.

`label \\t I1..I13 \\t C1..C26`: 13 integer counts (some negative, some missing) and 26 categorical columns
of 8-hex-digit ids (some missing). The click probability is a logistic model over per-category effects of
some columns, two-column interactions, dense effects (with a threshold and a missing-value effect), with a
bias calibrated to a base CTR of 0.25: a DNN has something to learn, a linear model not all of it.

The ground truth is fixed (it does not depend on `seed`): files written with different seeds are samples
of one distribution, so a synthetic validation file matches a synthetic training file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pcod.errors import ConfigError
from p2pcod.tasks.ctr import N_CAT, N_INT, CtrRows

BASE_CTR = 0.25
CHUNK = 65_536  # rows generated per random stream: the in-memory and file variants agree chunk by chunk
_TRUTH_SEED = 2018
_INTERACTIONS = ((0, 1), (2, 3), (4, 7))
_PAIR_TABLE = 4096


@dataclass(frozen=True)
class _Truth:
    card: np.ndarray  # (26,) categories per column
    vocab: tuple[np.ndarray, ...]  # per column: the 32-bit ids written as 8 hex digits
    cat_missing: np.ndarray  # (26,) missing rates
    cat_effect: tuple[np.ndarray, ...]  # per column: logit effect of each category
    pair_effect: np.ndarray  # (_PAIR_TABLE,) hashed effects of the interacting column pairs
    int_mu: np.ndarray  # (13,) log-scale location of the counts
    int_sigma: np.ndarray
    int_shift: np.ndarray  # (13,) subtracted from the counts (makes some columns go negative)
    int_missing: np.ndarray
    int_weight: np.ndarray
    miss_weight: np.ndarray  # logit effect of a missing integer
    bias: float


@functools.lru_cache(maxsize=1)
def _truth() -> _Truth:
    rng = np.random.default_rng(_TRUTH_SEED)
    card = np.round(np.exp(rng.uniform(np.log(3), np.log(3000), N_CAT))).astype(np.int64)
    vocab = tuple(rng.choice(2**32, size=int(c), replace=False).astype(np.uint64) for c in card)
    sigma = rng.choice([0.0, 0.15, 0.4, 0.8], size=N_CAT)
    sigma[[0, 1, 2, 3, 4, 7]] = 0.6  # the interacting columns matter on their own too
    partial = _Truth(
        card=card,
        vocab=vocab,
        cat_missing=rng.choice([0.0, 0.0, 0.0, 0.03, 0.1, 0.3], size=N_CAT),
        cat_effect=tuple(rng.normal(0.0, s, int(c)) for s, c in zip(sigma, card, strict=True)),
        pair_effect=rng.normal(0.0, 0.6, _PAIR_TABLE),
        int_mu=rng.uniform(0.0, 5.0, N_INT),
        int_sigma=rng.uniform(0.5, 1.5, N_INT),
        int_shift=np.where(np.arange(N_INT) == 1, 3, 0),  # like Criteo's I2, which has negative values
        int_missing=rng.choice([0.0, 0.02, 0.2, 0.45], size=N_INT),
        int_weight=rng.normal(0.0, 0.35, N_INT),
        miss_weight=rng.normal(0.0, 0.3, N_INT),
        bias=0.0,
    )
    # calibrate the bias on a fixed sample so that the mean click probability is BASE_CTR
    z = _sample(partial, 20_000, np.random.default_rng(_TRUTH_SEED + 1))[1]
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(z + mid).mean() < BASE_CTR else (lo, mid)
    return _Truth(**{**partial.__dict__, "bias": (lo + hi) / 2})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _sample(t: _Truth, n: int, rng: np.random.Generator) -> tuple[CtrRows, np.ndarray, np.ndarray]:
    """n rows, their true logits (before the bias) and the vocabulary index of each category."""
    # categories: a power law over each vocabulary, as real ids are (few frequent, many rare)
    idx = np.floor(t.card * rng.random((n, N_CAT)) ** 2.5).astype(np.int64)
    cat_missing = rng.random((n, N_CAT)) < t.cat_missing
    z = np.zeros(n)
    for c in range(N_CAT):
        z += np.where(cat_missing[:, c], 0.0, t.cat_effect[c][idx[:, c]])
    for a, b in _INTERACTIONS:
        h = (idx[:, a] * 1_000_003 + idx[:, b] * 7919 + a) % _PAIR_TABLE
        z += np.where(cat_missing[:, a] | cat_missing[:, b], 0.0, t.pair_effect[h])
    latent = rng.standard_normal((n, N_INT))
    ints = np.floor(np.expm1(t.int_mu + t.int_sigma * latent).clip(0, 1e9)).astype(np.int64) - t.int_shift
    int_missing = rng.random((n, N_INT)) < t.int_missing
    f = np.where(int_missing, 0.0, latent)
    z += f @ t.int_weight + int_missing @ t.miss_weight
    z += 0.8 * (f[:, 0] > 0.7) - 0.6 * np.abs(f[:, 3]) + 0.5 * f[:, 5] * f[:, 6]  # non-linear dense effects
    cats = np.stack([t.vocab[c][idx[:, c]] for c in range(N_CAT)], axis=1).astype(np.int64)
    rows = CtrRows(
        label=np.zeros(n, dtype=np.uint8),
        ints=np.where(int_missing, 0, ints),
        int_missing=int_missing,
        cats=np.where(cat_missing, 0, cats),
        cat_missing=cat_missing,
    )
    return rows, z, idx


def _chunks(rows: int, seed: int):
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"synthetic rows must be an integer >= 1, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    t = _truth()
    for i, start in enumerate(range(0, rows, CHUNK)):
        rng = np.random.default_rng([seed, i])
        part, z, idx = _sample(t, min(CHUNK, rows - start), rng)
        part.label[:] = rng.random(len(z)) < _sigmoid(z + t.bias)
        yield part, idx


def synthetic_ctr(rows: int, seed: int = 0) -> CtrRows:
    """`rows` synthetic rows in memory: exactly what reading `write_synthetic_ctr(path, rows, seed)` gives."""
    return CtrRows.concat([part for part, _ in _chunks(rows, seed)])


def write_synthetic_ctr(path: str | Path, rows: int, seed: int = 0) -> Path:
    """Write `rows` synthetic rows to `path` in the Criteo TSV format; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = _truth()
    hexes = [np.array([f"{int(v):08x}" for v in t.vocab[c]] + [""]) for c in range(N_CAT)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="\n") as out:
        for part, idx in _chunks(rows, seed):
            cols = [part.label.astype(str).tolist()]
            for c in range(N_INT):
                s = part.ints[:, c].astype(str)
                cols.append(np.where(part.int_missing[:, c], "", s).tolist())
            for c in range(N_CAT):
                pos = np.where(part.cat_missing[:, c], -1, idx[:, c])  # -1: the trailing "" of hexes[c]
                cols.append(hexes[c][pos].tolist())
            out.write("\n".join(map("\t".join, zip(*cols, strict=True))) + "\n")
    tmp.replace(path)  # a reader never sees a half-written file
    return path
