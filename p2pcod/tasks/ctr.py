"""`ctr`: a click-through-rate DNN on the Criteo Display Ad TSV format (or synthetic rows in that format).

Each line is `label \\t I1..I13 \\t C1..C26`. Dense features are log1p(max(I, 0)) (missing -> 0, optionally
with missing indicators); each categorical column is hashed into `hash_buckets` buckets (missing -> bucket
0) and embedded. hash_buckets is a *task* key: the featuriser and every peer's model must agree on it,
whatever model size each peer runs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pcod.errors import ConfigError, DataError
from p2pcod.tasks.base import (
    Batch,
    Task,
    check_keys,
    check_shard_args,
    get_bool,
    get_float,
    get_int,
    step_rng,
)

N_INT, N_CAT = 13, 26
N_COLS = 1 + N_INT + N_CAT
TASK_KEYS = frozenset(
    {
        "data",
        "val_data",
        "val_fraction",
        "max_rows",
        "synthetic_rows",
        "skip_bad_lines",
        "hash_buckets",
        "missing_indicator",
    }
)
MODEL_KEYS = frozenset({"hidden", "embed_dim"})
# Maxima of a model config (any peer's, an announced one included) and of the task's hash_buckets: generous,
# finite, so that even building an absurd config on the meta device costs next to nothing.
MAX_HIDDEN_LAYERS = 64  # entries of model.hidden
MAX_HIDDEN = 65536  # units of one hidden layer
MAX_EMBED_DIM = 4096
MAX_BUCKETS = 1 << 30  # task.hash_buckets
MAX_TABLE = 1 << 31  # 26 * hash_buckets * embed_dim: entries of the embedding table (8 GiB of fp32)
READ_CHUNK = 8 << 20  # bytes parsed at a time: bounded memory on a large file
NONIID_SKEW = 0.6  # noniid: shard i gets weight 1 ± 0.6 of the positives (and the reverse of the negatives)
_DEC = np.full(256, -1, dtype=np.int8)
_DEC[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX = np.full(256, -1, dtype=np.int8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


@dataclass
class CtrRows:
    """Parsed rows: raw values plus missing masks (featurisation is separate)."""

    label: np.ndarray  # (n,) uint8 0/1
    ints: np.ndarray  # (n, 13) int64, 0 where missing
    int_missing: np.ndarray  # (n, 13) bool
    cats: np.ndarray  # (n, 26) int64 ids (the hex value), 0 where missing
    cat_missing: np.ndarray  # (n, 26) bool
    skipped: int = 0  # malformed lines skipped (skip_bad_lines)

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: np.ndarray | slice) -> CtrRows:
        return CtrRows(
            self.label[idx], self.ints[idx], self.int_missing[idx], self.cats[idx], self.cat_missing[idx]
        )

    @staticmethod
    def concat(parts: list[CtrRows]) -> CtrRows:
        if not parts:
            return CtrRows(
                np.zeros(0, np.uint8),
                np.zeros((0, N_INT), np.int64),
                np.zeros((0, N_INT), bool),
                np.zeros((0, N_CAT), np.int64),
                np.zeros((0, N_CAT), bool),
            )
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
        return CtrRows(
            cat("label"),
            cat("ints"),
            cat("int_missing"),
            cat("cats"),
            cat("cat_missing"),
            sum(p.skipped for p in parts),
        )


# ---- reading the TSV format -----------------------------------------------------------------------


def column_name(col: int) -> str:
    return "label" if col == 0 else f"I{col}" if col <= N_INT else f"C{col - N_INT}"


def parse_ctr(
    data: bytes, *, source: str = "<bytes>", first_line: int = 1, skip_bad_lines: bool = False
) -> CtrRows:
    """Parse whole lines of Criteo TSV (vectorised).

    A malformed line is a DataError naming source:line, or, with skip_bad_lines, skipped and counted."""
    arr = np.frombuffer(data, dtype=np.uint8)
    seps = np.flatnonzero((arr == 9) | (arr == 10))  # every field ends at a tab or a newline
    if data and not data.endswith(b"\n"):
        seps = np.append(seps, len(arr))  # the last line has no newline
    is_nl = np.ones(len(seps), dtype=bool)
    is_nl[seps < len(arr)] = arr[seps[seps < len(arr)]] == 10
    line_end = np.flatnonzero(is_nl)  # index into seps of each line's last separator
    fields = np.diff(line_end, prepend=-1)
    good = fields == N_COLS
    if not good.all() and not skip_bad_lines:
        j = int(np.flatnonzero(~good)[0])
        raise DataError(
            f"{source}:{first_line + j}: expected {N_COLS} tab-separated columns, got {fields[j]}"
        )
    fe = seps[line_end[good][:, None] + np.arange(1 - N_COLS, 1)]  # (n, 40) field ends (exclusive)
    fs = np.empty_like(fe)
    fs[:, 1:] = fe[:, :-1] + 1
    prev = line_end[good] - N_COLS  # the separator before the line (-1: the line starts the block)
    fs[:, 0] = np.where(prev >= 0, seps[np.maximum(prev, 0)] + 1, 0)
    if len(fe):
        fe[:, -1] -= (fe[:, -1] > fs[:, -1]) & (arr[np.maximum(fe[:, -1] - 1, 0)] == 13)  # CRLF files
    label, bad_label = _parse_int(arr, fs[:, :1], fe[:, :1], base=10)
    bad_label |= (label < 0) | (label > 1) | (fe[:, :1] == fs[:, :1])
    ints, bad_int = _parse_int(arr, fs[:, 1 : 1 + N_INT], fe[:, 1 : 1 + N_INT], base=10)
    cats, bad_cat = _parse_int(arr, fs[:, 1 + N_INT :], fe[:, 1 + N_INT :], base=16)
    bad = np.concatenate([bad_label, bad_int, bad_cat], axis=1)
    line_no = first_line + np.flatnonzero(good)
    if bad.any() and not skip_bad_lines:
        i, col = (int(v) for v in np.argwhere(bad)[0])
        text = bytes(arr[fs[i, col] : fe[i, col]])[:40]
        kind = "a 0/1 label" if col == 0 else "an integer" if col <= N_INT else "a hex id of 1-8 digits"
        raise DataError(f"{source}:{line_no[i]}: column {column_name(col)} is not {kind}: {text!r}")
    ok = ~bad.any(axis=1)
    rows = CtrRows(
        label[ok, 0].astype(np.uint8),
        ints[ok],
        (fe == fs)[ok, 1 : 1 + N_INT],
        cats[ok],
        (fe == fs)[ok, 1 + N_INT :],
    )
    rows.skipped = int((~good).sum() + (~ok).sum())
    return rows


def _parse_int(arr: np.ndarray, fs: np.ndarray, fe: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Values of fields arr[fs:fe] (decimal with optional '-', or hex); empty -> 0. Returns (values, bad).

    Digits are gathered right-aligned into a (..., width) matrix and multiplied by the powers of the base
    in float64 (BLAS; exact below 2**53: at most 15 decimal or 8 hex digits)."""
    lens = fe - fs
    first = arr[np.minimum(fs, len(arr) - 1)]
    neg = (lens > 0) & (first == ord("-")) if base == 10 else np.zeros(lens.shape, dtype=bool)
    ndig = lens - neg
    longest = 15 if base == 10 else 8
    bad = (ndig > longest) | (neg & (ndig == 0))
    width = int(min(ndig.max(initial=0), longest))
    if width == 0:
        return np.zeros(lens.shape, dtype=np.int64), bad
    k = np.arange(width, dtype=np.int32)
    pos = fe.astype(np.int32)[..., None] + (k - width)
    digit = (_DEC if base == 10 else _HEX)[arr[np.maximum(pos, 0)]]  # int8, -1 for a non-digit
    inside = k >= (width - np.minimum(ndig, width)).astype(np.int32)[..., None]
    bad |= (inside & (digit < 0)).any(axis=-1)
    powers = float(base) ** np.arange(width - 1, -1, -1)
    vals = (np.where(inside, digit, 0).astype(np.float64) @ powers).astype(np.int64)
    return np.where(neg, -vals, vals), bad


def read_ctr(path: str | Path, *, max_rows: int | None = None, skip_bad_lines: bool = False) -> CtrRows:
    """Read a Criteo-format TSV file in chunks of whole lines (at most `max_rows` good rows)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CTR data file {str(path)!r} does not exist")
    parts, n, line, tail = [], 0, 1, b""
    with path.open("rb") as f:
        while max_rows is None or n < max_rows:
            chunk = f.read(READ_CHUNK)
            buf = tail + chunk
            cut = len(buf) if not chunk else buf.rfind(b"\n") + 1
            if cut == 0 and chunk:  # no newline yet: a very long line; keep reading
                tail = buf
                continue
            block, tail = buf[:cut], buf[cut:]
            if block:
                rows = parse_ctr(block, source=str(path), first_line=line, skip_bad_lines=skip_bad_lines)
                line += block.count(b"\n") + (not block.endswith(b"\n"))
                parts.append(rows)
                n += len(rows)
            if not chunk:
                break
    rows = CtrRows.concat(parts)
    if max_rows is not None and len(rows) > max_rows:
        skipped, rows = rows.skipped, rows.take(slice(0, max_rows))
        rows.skipped = skipped
    if not len(rows):
        raise DataError(f"CTR data file {str(path)!r} has no rows")
    return rows


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int, max_rows: int | None, skip: bool) -> CtrRows:
    return read_ctr(path, max_rows=max_rows, skip_bad_lines=skip)


@functools.lru_cache(maxsize=2)
def _synthetic_cached(rows: int) -> CtrRows:
    from p2pcod.tasks.synth_ctr import synthetic_ctr

    return synthetic_ctr(rows, seed=0)


def write_synthetic_ctr(path: str | Path, rows: int, seed: int = 0) -> Path:
    """Write `rows` synthetic rows in the Criteo TSV format (see synth_ctr.py)."""
    from p2pcod.tasks.synth_ctr import write_synthetic_ctr as write

    return write(path, rows, seed=seed)


# ---- features and model ---------------------------------------------------------------------------


def hash_buckets(cats: np.ndarray, missing: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of every id, per column (splitmix64 of id and column); missing -> bucket 0."""
    h = cats.astype(np.uint64) + (
        np.arange(1, cats.shape[1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    )
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    out = (h % np.uint64(buckets - 1)).astype(np.int64) + 1
    return np.where(missing, 0, out)


def dense_features(rows: CtrRows, missing_indicator: bool) -> np.ndarray:
    dense = np.where(rows.int_missing, 0.0, np.log1p(np.maximum(rows.ints, 0))).astype(np.float32)
    if missing_indicator:
        dense = np.concatenate([dense, rows.int_missing.astype(np.float32)], axis=1)
    return dense


class CTRNet(nn.Module):
    """model((dense (B, D), cats (B, 26))) -> click logits (B,): a ReLU MLP over [embeddings, dense]."""

    def __init__(self, buckets: int, embed_dim: int, hidden: list[int], dense_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(N_CAT * buckets, embed_dim)  # one table; column c owns rows [c*B, (c+1)*B)
        nn.init.normal_(self.embed.weight, std=0.05)
        self.register_buffer("offsets", torch.arange(N_CAT) * buckets, persistent=False)
        layers: list[nn.Module] = []
        width = N_CAT * embed_dim + dense_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        dense, cats = x
        e = self.embed(cats + self.offsets).flatten(1)  # (B, 26 * embed_dim)
        return self.mlp(torch.cat([e, dense], dim=1)).squeeze(-1)


# ---- the task -------------------------------------------------------------------------------------


class CTRTask(Task):
    name = "ctr"
    kind = "binary"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        c = ctr_settings(cfg)
        self.data, self.val_data, self.val_fraction, self.max_rows = c.data, c.val_data, c.val_fraction, c.max_rows
        self.synthetic_rows, self.skip_bad_lines, self.buckets = c.synthetic_rows, c.skip_bad_lines, c.buckets
        self.missing_indicator = c.missing_indicator
        rows = self._load(self.data) if self.data else _synthetic_cached(self.synthetic_rows)
        if self.val_data:
            train, val = rows, self._load(self.val_data)
        else:
            n_val = min(len(rows) - 1, max(1, int(round(self.val_fraction * len(rows)))))
            if n_val < 1:
                raise DataError(f"CTR data has {len(rows)} row(s): too few to hold out validation rows")
            train, val = rows.take(slice(0, len(rows) - n_val)), rows.take(slice(len(rows) - n_val, None))
        self.skipped = rows.skipped
        self._train = self._featurise(train)
        self._val = self._featurise(val)
        self._labels = train.label
        self._parts: dict[tuple[int, str], list[np.ndarray]] = {}

    def _load(self, path: str) -> CtrRows:
        p = Path(path).expanduser().resolve()
        if not p.is_file():
            raise DataError(f"CTR data file {str(p)!r} does not exist")
        st = p.stat()
        return _read_cached(str(p), st.st_mtime_ns, st.st_size, self.max_rows, self.skip_bad_lines)

    def _featurise(self, rows: CtrRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dense = torch.from_numpy(dense_features(rows, self.missing_indicator))
        cats = torch.from_numpy(hash_buckets(rows.cats, rows.cat_missing, self.buckets))
        return dense, cats, torch.from_numpy(rows.label.astype(np.float32))

    @property
    def dense_dim(self) -> int:
        return N_INT * (2 if self.missing_indicator else 1)

    # ---- model / loss ---------------------------------------------------------------------------
    @classmethod
    def check_config(cls, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        _model_settings(model_cfg, ctr_settings(task_cfg).buckets)

    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        hidden, embed_dim = _model_settings(model_cfg, self.buckets)
        return CTRNet(self.buckets, embed_dim, hidden, self.dense_dim)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1).float(), batch.y.reshape(-1).float())

    def unigram(self) -> torch.Tensor:
        return torch.tensor(float(self._labels.mean()), dtype=torch.float32)

    # ---- data -----------------------------------------------------------------------------------
    def shard_rows(self, shard: int, num_shards: int, split: str) -> np.ndarray:
        """Indices (into the training rows) that `shard` of `num_shards` samples from under `split`."""
        check_shard_args(shard, num_shards, split, 1, 0, 0)
        if split == "same":
            return np.arange(len(self._labels))
        key = (num_shards, split)
        if key not in self._parts:
            self._parts[key] = _partition(self._labels, num_shards, split)
        rows = self._parts[key][shard]
        if not len(rows):
            raise ConfigError(
                f"split {split!r}: shard {shard} of {num_shards} gets no rows "
                f"(only {len(self._labels)} training rows)"
            )
        return rows

    def train_batches(
        self, shard: int, num_shards: int, *, split: str, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[Batch]:
        check_shard_args(shard, num_shards, split, batch_size, seed, start_step)
        rows = self.shard_rows(shard, num_shards, split)
        return self._stream(rows, shard, num_shards, split, batch_size, seed, start_step)

    def _stream(
        self, rows: np.ndarray, shard: int, num_shards: int, split: str, batch_size: int, seed: int, step: int
    ) -> Iterator[Batch]:
        dense, cats, y = self._train
        while True:
            pick = torch.from_numpy(
                rows[step_rng(seed, shard, num_shards, split, step).integers(0, len(rows), batch_size)]
            )
            yield Batch(x=(dense[pick], cats[pick]), y=y[pick])
            step += 1

    def val_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        """The first batch_size * max_batches held-out rows, in file order: the same for every peer."""
        for key, value in (("batch_size", batch_size), ("max_batches", max_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"val_batches: {key} must be an integer >= 1, got {value!r}")
        dense, cats, y = self._val
        n = min(len(y), batch_size * max_batches)
        return [
            Batch(x=(dense[i : i + batch_size], cats[i : i + batch_size]), y=y[i : i + batch_size])
            for i in range(0, n, batch_size)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "data": self.data or f"synthetic:{self.synthetic_rows}",
            "val_data": self.val_data or f"last {self.val_fraction:g} of data",
            "train_rows": len(self._labels),
            "val_rows": len(self._val[2]),
            "train_ctr": round(float(self._labels.mean()), 4),
            "skipped_lines": self.skipped,
            "hash_buckets": self.buckets,
            "shards": {f"{k}/{sp}": [len(r) for r in parts] for (k, sp), parts in self._parts.items()},
        }


@dataclass(frozen=True)
class CTRSettings:
    """The [task] table of a ctr peer, checked without reading data."""

    data: str
    val_data: str
    val_fraction: float
    max_rows: int | None
    synthetic_rows: int
    skip_bad_lines: bool
    buckets: int
    missing_indicator: bool


def ctr_settings(cfg: Mapping[str, Any]) -> CTRSettings:
    check_keys(cfg, TASK_KEYS, "task")
    c = CTRSettings(
        data=_path_key(cfg, "data"),
        val_data=_path_key(cfg, "val_data"),
        val_fraction=get_float(cfg, "val_fraction", 0.1, "task", low=0.0, high=1.0),
        max_rows=get_int(cfg, "max_rows", None, "task") if cfg.get("max_rows") is not None else None,
        synthetic_rows=get_int(cfg, "synthetic_rows", 100_000, "task", minimum=2),
        skip_bad_lines=get_bool(cfg, "skip_bad_lines", False, "task"),
        buckets=get_int(cfg, "hash_buckets", 10_000, "task", minimum=2, maximum=MAX_BUCKETS),
        missing_indicator=get_bool(cfg, "missing_indicator", False, "task"),
    )
    if not c.val_data and c.val_fraction == 0.0:
        raise ConfigError("task.val_fraction must be > 0 when task.val_data is not given")
    return c


def _model_settings(model_cfg: Mapping[str, Any], buckets: int) -> tuple[list[int], int]:
    """(hidden, embed_dim) of a [model] table, checked against the maxima above."""
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"[model] must be a table, got {type(model_cfg).__name__}")
    if "hash_buckets" in model_cfg:
        raise ConfigError(
            "model.hash_buckets: hash_buckets is a task key (task.hash_buckets) for ctr, "
            "so every peer featurises alike"
        )
    check_keys(model_cfg, MODEL_KEYS, "model")
    hidden = model_cfg.get("hidden", [256, 128, 64])
    if not isinstance(hidden, list | tuple) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise ConfigError(f"model.hidden must be a list of positive integers, got {hidden!r}")
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise ConfigError(f"model.hidden has {len(hidden)} layers, more than the maximum {MAX_HIDDEN_LAYERS}")
    if max(hidden, default=0) > MAX_HIDDEN:
        raise ConfigError(f"model.hidden: a layer of {max(hidden)} units exceeds the maximum {MAX_HIDDEN}")
    embed_dim = get_int(model_cfg, "embed_dim", 8, "model", maximum=MAX_EMBED_DIM)
    if N_CAT * buckets * embed_dim > MAX_TABLE:
        raise ConfigError(f"model.embed_dim: {N_CAT} columns * task.hash_buckets * embed_dim = {N_CAT} * {buckets} * "
                          f"{embed_dim} embedding entries exceeds the maximum {MAX_TABLE}")
    return list(hidden), embed_dim


def _path_key(cfg: Mapping[str, Any], key: str) -> str:
    value = cfg.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"task.{key} must be a path (a string), got {value!r}")
    return value


def _partition(labels: np.ndarray, k: int, split: str) -> list[np.ndarray]:
    """Disjoint row sets. disjoint: a fixed shuffle cut into k equal blocks (a time-ordered file is not
    cut into time periods). noniid: positives and negatives dealt with opposite weights, so shard i's
    positive rate rises with i."""
    rng = np.random.default_rng(0)  # fixed: every peer computes the same partition
    if split == "disjoint":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), k)]
    w = 1.0 + NONIID_SKEW * (np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1))
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls, weights in ((1, w), (0, 2.0 - w)):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(weights) / weights.sum() * len(idx)).astype(np.int64)[:-1]
        for i, p in enumerate(np.split(idx, cuts)):
            parts[i].append(p)
    return [np.sort(np.concatenate(p)) for p in parts]
