"""`lm`: a byte-level causal language model (a small GPT) on any tree of text files.

Default corpus: the Python standard library's source of the running interpreter (real text, on every
machine). Files are held out for validation by a stable hash of their relative path; training files are
split between shards by file (disjoint), not at all (same), or by top-level directory (noniid).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
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
    balanced_assignment,
    check_keys,
    check_shard_args,
    get_bool,
    get_float,
    get_int,
    step_rng,
)

VOCAB = 256
TASK_KEYS = frozenset({"corpus", "val_fraction", "max_bytes", "take", "seq_len", "pattern"})
TAKES = ("first", "spread")  # which files task.max_bytes keeps
MODEL_KEYS = frozenset({"layers", "width", "heads", "context", "mlp_ratio", "dropout", "tie_head"})
# Maxima of a model config (any peer's, an announced one included): generous for a byte-level model, finite, so
# that even building an absurd config on the meta device costs next to nothing.
MAX_LAYERS = 256
MAX_WIDTH = 65536
MAX_CONTEXT = 1 << 20  # also the maximum task.seq_len
MAX_MLP_HIDDEN = 1 << 20  # round(mlp_ratio * width): the MLP's hidden units
MAX_POS_TABLE = 1 << 30  # context * width: entries of the position-embedding table (4 GiB of fp32)
# Directories never read from the default corpus (third-party code and the test suites).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})


# ---- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    width: int
    heads: int
    context: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    tie_head: bool = True


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.dropout = c.dropout
        self.ln1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width)
        hidden = max(1, int(round(c.mlp_ratio * c.width)))
        self.fc = nn.Linear(c.width, hidden)
        self.fc_out = nn.Linear(hidden, c.width)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(C, dim=2)
        # (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, C)))
        return h + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(h)))))


class GPT(nn.Module):
    """model(x: LongTensor (B, T)) -> logits (B, T, 256), T <= context."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(VOCAB, c.width)
        self.pos = nn.Embedding(c.context, c.width)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, VOCAB, bias=False)
        if c.tie_head:
            self.head.weight = self.tok.weight
        self.apply(_init_weights)
        # GPT-2: residual projections scaled down with depth so the residual stream keeps its size
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * c.layers) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.config.context:
            raise DataError(f"sequence length {T} is longer than the model's context {self.config.context}")
        h = self.drop(self.tok(x) + self.pos(torch.arange(T, device=x.device)))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def gpt_config(model_cfg: Mapping[str, Any]) -> GPTConfig:
    """The [model] table of an lm peer, checked (keys, types, the maxima above, width % heads == 0)."""
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"[model] must be a table, got {type(model_cfg).__name__}")
    check_keys(model_cfg, MODEL_KEYS, "model")
    missing = [k for k in ("layers", "width", "heads", "context") if k not in model_cfg]
    if missing:
        raise ConfigError(f"model.{missing[0]} is required for task lm")
    c = GPTConfig(
        layers=get_int(model_cfg, "layers", None, "model", maximum=MAX_LAYERS),
        width=get_int(model_cfg, "width", None, "model", maximum=MAX_WIDTH),
        heads=get_int(model_cfg, "heads", None, "model", maximum=MAX_WIDTH),
        context=get_int(model_cfg, "context", None, "model", maximum=MAX_CONTEXT),
        mlp_ratio=get_float(model_cfg, "mlp_ratio", 4.0, "model", low=1e-6, high=1e6),
        dropout=get_float(model_cfg, "dropout", 0.0, "model", low=0.0, high=1.0),
        tie_head=get_bool(model_cfg, "tie_head", True, "model"),
    )
    if c.width % c.heads:
        raise ConfigError(f"model.width ({c.width}) must be divisible by model.heads ({c.heads})")
    hidden = int(round(c.mlp_ratio * c.width))
    if hidden > MAX_MLP_HIDDEN:
        raise ConfigError(f"model.mlp_ratio: mlp_ratio * width = {c.mlp_ratio:g} * {c.width} = {hidden} hidden units "
                          f"exceeds the maximum {MAX_MLP_HIDDEN}")
    if c.context * c.width > MAX_POS_TABLE:
        raise ConfigError(f"model.context: context * width = {c.context} * {c.width} position-embedding entries "
                          f"exceeds the maximum {MAX_POS_TABLE}")
    return c


@dataclass(frozen=True)
class LMSettings:
    """The [task] table of an lm peer, checked without reading the corpus."""

    entries: tuple[str, ...]  # corpus paths as given (empty: the default corpus)
    pattern: str
    val_fraction: float
    max_bytes: int
    seq_len: int
    take: str = "first"


def lm_settings(cfg: Mapping[str, Any]) -> LMSettings:
    check_keys(cfg, TASK_KEYS, "task")
    corpus = cfg.get("corpus", "")
    if isinstance(corpus, str):
        entries = (corpus,) if corpus else ()
    elif isinstance(corpus, list | tuple) and corpus and all(isinstance(e, str) and e for e in corpus):
        entries = tuple(corpus)
    else:
        raise ConfigError(f"task.corpus must be a path or a non-empty list of paths, got {corpus!r}")
    pattern = cfg.get("pattern", "")
    if not isinstance(pattern, str):
        raise ConfigError(f"task.pattern must be a file-name glob like '*.py', got {pattern!r}")
    val_fraction = get_float(cfg, "val_fraction", 0.05, "task", low=0.0, high=1.0)
    if val_fraction == 0.0:
        raise ConfigError("task.val_fraction must be > 0 (validation needs held-out files), got 0")
    return LMSettings(
        entries=entries,
        pattern=pattern or ("*.py" if not entries else "*"),
        val_fraction=val_fraction,
        max_bytes=get_int(cfg, "max_bytes", 32_000_000, "task"),
        seq_len=get_int(cfg, "seq_len", 128, "task", maximum=MAX_CONTEXT),
        take=_take(cfg.get("take", "first")),
    )


def _take(value: Any) -> str:
    if value not in TAKES:
        raise ConfigError(f"task.take must be one of {', '.join(TAKES)} (which files task.max_bytes keeps), "
                          f"got {value!r}")
    return str(value)


def _check_context(c: GPTConfig, seq_len: int) -> None:
    if c.context < seq_len:
        raise ConfigError(f"model.context ({c.context}) must be >= task.seq_len ({seq_len})")


# ---- the corpus -----------------------------------------------------------------------------------


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, pattern: str, skip_dirs: frozenset[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # pruned in place: os.walk then never descends into site-packages (which can be huge)
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        out.extend(
            Path(dirpath, f) for f in filenames if fnmatch.fnmatch(f, pattern) and not f.startswith(".")
        )
    return out


def _list_corpus(entries: tuple[str, ...], pattern: str) -> list[tuple[str, Path, int]]:
    """(relative path, path, size in bytes) of every corpus file, sorted by relative path; nothing is read."""
    default = entries == ()
    roots = [default_corpus()] if default else [Path(e).expanduser() for e in entries]
    skip = SKIP_DIRS if default else frozenset({"__pycache__"})
    files: list[tuple[str, Path]] = []
    for i, root in enumerate(roots):
        prefix = "" if len(roots) == 1 else f"{i}-{root.name}/"
        if root.is_dir():
            files += [(prefix + p.relative_to(root).as_posix(), p) for p in _walk(root, pattern, skip)]
        elif root.is_file():
            files.append((prefix + root.name, root))
        else:
            raise DataError(f"task.corpus entry {str(root)!r} is neither a file nor a directory")
    out = []
    for rel, path in sorted(files):
        try:
            size = path.stat().st_size
        except OSError:
            continue  # a broken link is skipped, not fatal
        if size:
            out.append((rel, path, size))
    if not out:
        raise DataError(f"no files matching {pattern!r} with data in task.corpus {list(entries) or str(roots[0])}")
    return out


@functools.lru_cache(maxsize=8)
def load_corpus(entries: tuple[str, ...], pattern: str, max_bytes: int, take: str = "first",
                val_fraction: float = 0.05) -> tuple[tuple[tuple[str, bytes], ...], tuple[tuple[str, bytes], ...]]:
    """(training files, validation files), each as (relative path, raw bytes) sorted by path.

    Validation files are held out of the WHOLE corpus first (_held_out: by a stable hash of their paths), so
    they depend on the corpus and val_fraction alone, never on max_bytes, take or the split. Training files are
    then the others up to max_bytes in all, the last one cut: take "first" keeps the first by path, "spread"
    the files of every top-level directory in turn (one of each, then the second of each...), so a capped
    corpus keeps every kind of text (the noniid split gives each shard whole top-level directories).

    Cached per process: the trainer may build several tasks over one corpus.
    """
    listing = _list_corpus(entries, pattern)
    if len(listing) < 2:
        raise DataError(f"task.corpus has {len(listing)} file(s); lm needs >= 2 (training and validation)")
    held = _held_out([(rel, size) for rel, _, size in listing], val_fraction)
    val = tuple((rel, data) for (rel, path, _), h in zip(listing, held, strict=True) if h
                for data in [_read(path)] if data)
    train = [(rel, path) for (rel, path, _), h in zip(listing, held, strict=True) if not h]
    if take == "spread":
        train = _interleave_top_dirs(train)
    out, total = [], 0
    for rel, path in train:
        if total >= max_bytes:
            break
        data = _read(path)[: max_bytes - total]
        if data:
            out.append((rel, data))
            total += len(data)
    if not out or not val:
        raise DataError(f"task.corpus {list(entries) or str(default_corpus())}: no readable "
                        f"{'training' if not out else 'validation'} files matching {pattern!r}")
    return tuple(sorted(out)), val


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # an unreadable file (permissions) is skipped, not fatal


def _interleave_top_dirs(files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    columns = _by_top_dir(files)
    return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]


def _stable_unit(text: str) -> float:
    """A number in [0, 1) from a path: the same on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _held_out(files: Sequence[tuple[str, int]], fraction: float) -> list[bool]:
    """Validation files of (relative path, size): taken in the order of a stable hash of their path until they
    hold `fraction` of the bytes (so a corpus of a few uneven files still gets enough validation text); >= 1
    file stays for training."""
    order = sorted(range(len(files)), key=lambda i: _stable_unit(files[i][0]))
    goal = fraction * sum(size for _, size in files)
    held, got = [False] * len(files), 0
    for i in order[:-1]:
        held[i] = True
        got += files[i][1]
        if got >= goal:
            break
    return held


def _top_dir(rel: str) -> str:
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else "."


def _by_top_dir(files: Sequence[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
    """Files (relative path first) grouped by top-level directory, groups in name order, files in given order."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for f in files:
        groups.setdefault(_top_dir(f[0]), []).append(f)
    return [groups[g] for g in sorted(groups)]


# ---- the task -------------------------------------------------------------------------------------


class LMTask(Task):
    name = "lm"
    kind = "multiclass"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        settings = lm_settings(cfg)
        self.entries = tuple(str(Path(e).expanduser().resolve()) for e in settings.entries)
        self.pattern = settings.pattern
        self.val_fraction = settings.val_fraction
        self.max_bytes = settings.max_bytes
        self.seq_len = settings.seq_len
        self.take = settings.take
        train, val = load_corpus(self.entries, self.pattern, self.max_bytes, self.take, self.val_fraction)
        self.train_files, self.val_files = list(train), list(val)
        self._val = _concat(self.val_files)
        if len(self._val) < self.seq_len + 1:
            raise DataError(f"validation files hold {len(self._val)} bytes, fewer than task.seq_len + 1")
        self._shards: dict[tuple[int, int, str], tuple[list[str], np.ndarray]] = {}

    # ---- model / loss ---------------------------------------------------------------------------
    @classmethod
    def check_config(cls, task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
        settings = lm_settings(task_cfg)
        _check_context(gpt_config(model_cfg), settings.seq_len)

    def build_model(self, model_cfg: Mapping[str, Any]) -> nn.Module:
        c = gpt_config(model_cfg)
        _check_context(c, self.seq_len)
        return GPT(c)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.y.reshape(-1))

    def unigram(self) -> torch.Tensor:
        counts = np.zeros(VOCAB, dtype=np.float64)
        for _, data in self.train_files:
            counts += np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=VOCAB)
        return torch.from_numpy(counts / counts.sum()).float()

    # ---- data -----------------------------------------------------------------------------------
    def shard_files(self, shard: int, num_shards: int, split: str) -> list[str]:
        """Relative paths of the training files that `shard` of `num_shards` reads under `split`."""
        return self._shard(shard, num_shards, split)[0]

    def _shard(self, shard: int, num_shards: int, split: str) -> tuple[list[str], np.ndarray]:
        key = (0, 1, "same") if split == "same" else (shard, num_shards, split)  # "same": one shared copy
        if key not in self._shards:
            files = self._assign(num_shards, split)[key[0]]
            data = _concat(files)
            if len(data) < self.seq_len + 1:
                raise DataError(
                    f"shard {shard}/{num_shards} ({split}) holds {len(data)} bytes, "
                    f"fewer than task.seq_len + 1 = {self.seq_len + 1}"
                )
            self._shards[key] = ([rel for rel, _ in files], data)
        return self._shards[key]

    def _assign(self, num_shards: int, split: str) -> list[list[tuple[str, bytes]]]:
        files = self.train_files
        if split == "same":
            return [files] * num_shards
        # disjoint: single files; noniid: whole top-level directories, so shards see different kinds of text
        units = [[f] for f in files] if split == "disjoint" else _by_top_dir(files)
        if len(units) < num_shards:
            what = "training files" if split == "disjoint" else "top-level directories"
            raise ConfigError(
                f"split {split!r} needs at least {num_shards} {what} for {num_shards} shards; "
                f"the corpus has {len(units)}"
                + (f" (task.max_bytes = {self.max_bytes} keeps the first files by path: set task.take = "
                   f'"spread" to keep some of every directory)' if split == "noniid" and self.take == "first" else "")
            )
        owner = balanced_assignment(
            [sum(len(d) for _, d in u) for u in units], [u[0][0] for u in units], num_shards
        )
        out: list[list[tuple[str, bytes]]] = [[] for _ in range(num_shards)]
        for u, s in zip(units, owner, strict=True):
            out[s].extend(u)
        return [sorted(o) for o in out]

    def train_batches(
        self, shard: int, num_shards: int, *, split: str, batch_size: int, seed: int, start_step: int = 0
    ) -> Iterator[Batch]:
        check_shard_args(shard, num_shards, split, batch_size, seed, start_step)
        _, data = self._shard(shard, num_shards, split)
        return self._stream(data, shard, num_shards, split, batch_size, seed, start_step)

    def _stream(
        self, data: np.ndarray, shard: int, num_shards: int, split: str, batch_size: int, seed: int, step: int
    ) -> Iterator[Batch]:
        span = np.arange(self.seq_len + 1)
        while True:
            starts = step_rng(seed, shard, num_shards, split, step).integers(
                0, len(data) - self.seq_len, size=batch_size
            )
            yield _windows(data, starts, span)
            step += 1

    def val_batches(self, batch_size: int, max_batches: int) -> list[Batch]:
        """Evenly spaced windows over the held-out files: the same on every peer and every call."""
        for key, value in (("batch_size", batch_size), ("max_batches", max_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"val_batches: {key} must be an integer >= 1, got {value!r}")
        n = batch_size * max_batches
        starts = np.linspace(0, len(self._val) - self.seq_len - 1, n).astype(np.int64)
        span = np.arange(self.seq_len + 1)
        return [_windows(self._val, starts[i : i + batch_size], span) for i in range(0, n, batch_size)]

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "corpus": list(self.entries) or str(default_corpus()),
            "pattern": self.pattern,
            "train_files": len(self.train_files),
            "train_bytes": sum(len(d) for _, d in self.train_files),
            "val_files": len(self.val_files),
            "val_bytes": len(self._val),
            "seq_len": self.seq_len,
            "shards": {
                f"{s}/{k}/{sp}": {"files": len(f), "bytes": len(d)}
                for (s, k, sp), (f, d) in self._shards.items()
            },
        }


def _concat(files: list[tuple[str, bytes]]) -> np.ndarray:
    return np.frombuffer(b"".join(d for _, d in files), dtype=np.uint8)


def _windows(data: np.ndarray, starts: np.ndarray, span: np.ndarray) -> Batch:
    w = torch.from_numpy(data[starts[:, None] + span]).long()  # (B, T + 1)
    return Batch(x=w[:, :-1].contiguous(), y=w[:, 1:].contiguous())
