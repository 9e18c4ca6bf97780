"""Local checkpoints: exact (lossless) and pickle-free, written atomically.

A checkpoint is any tree of dicts, lists, tuples, numbers, strings, bytes and tensors (a model's and an
optimizer's state dicts, RNG states, the step). Tensors are stored as raw bytes plus dtype and shape in
a msgpack document. A write goes to a temporary file that is fsync'ed and then renamed over the old
one, so a process killed mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from p2pcod.errors import CheckpointError

MAGIC = b"P2PCODCK"
VERSION = 1
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"

_DTYPES = {
    str(dt): dt
    for dt in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16,
        torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    )
}


def _pack(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        return {_TENSOR: str(t.dtype), "shape": list(t.shape), "data": raw.numpy().tobytes()}
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            dtype = _DTYPES[obj[_TENSOR]]
            np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
            arr = np.frombuffer(obj["data"], dtype=np_dtype).reshape(obj["shape"]).copy()
            t = torch.from_numpy(arr)
            return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
        if _TUPLE in obj:
            return tuple(_unpack(v) for v in obj[_TUPLE])
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    return obj


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = msgpack.packb(_pack(state), use_bin_type=True)
    header = MAGIC + VERSION.to_bytes(2, "little") + hashlib.sha256(body).digest()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`; CheckpointError if it is missing or damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    head = len(MAGIC) + 2 + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a p2pcod checkpoint")
    version = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 2], "little")
    if version != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {version}")
    body = memoryview(data)[head:]
    if hashlib.sha256(body).digest() != data[len(MAGIC) + 2 : head]:
        raise CheckpointError(f"{path} is damaged (checksum mismatch)")
    try:
        return _unpack(msgpack.unpackb(body, raw=False, strict_map_key=False))
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None


def is_checkpoint(path: str | Path) -> bool:
    """Whether the file starts like a checkpoint of this module (not, say, an exchanged codec blob)."""
    with Path(path).open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """What `p2pcod inspect` shows of a loaded checkpoint: no tensors, only what identifies the run.

    Two layouts are known: a Trainer's (one model: `p2pcod peer`) and a LocalGroup's (`p2pcod train`: a
    list of Trainer states under "models", the last published blobs under "blobs").
    """
    if isinstance(state.get("models"), list):
        models = [m for m in state["models"] if isinstance(m, dict)]
        first = models[0] if models else {}
        blobs = state.get("blobs") if isinstance(state.get("blobs"), dict) else {}
        return {
            "run": "p2pcod train (M models in one process)",
            "mode": state.get("mode", "unknown (written before the mode was stored)"),
            "models": len(state["models"]),
            "step": first.get("step"),
            "model_config": first.get("model_config", "unknown (written before the model config was stored)"),
            "optimizer": first.get("optimizer_name"),
            "parameters": _numel(first.get("model")),
            "published": {str(n): v[0] for n, v in blobs.items() if isinstance(v, list | tuple) and v},
            "bytes_exchanged": state.get("bytes_exchanged"),
        }
    if isinstance(state.get("model"), dict) and "step" in state:
        return {
            "run": "one model (p2pcod peer)",
            "step": state.get("step"),
            "seed": state.get("seed"),
            "elapsed_s": round(float(state.get("elapsed", 0.0)), 3),
            "model_config": state.get("model_config", "unknown (written before the model config was stored)"),
            "optimizer": state.get("optimizer_name"),
            "parameters": _numel(state["model"]),
            "tensors": sum(isinstance(t, torch.Tensor) for t in state["model"].values()),
            "extra": state.get("extra"),
        }
    return {"run": "unknown layout", "keys": sorted(map(str, state))}


def _numel(model: Any) -> int | None:
    if not isinstance(model, dict):
        return None
    return sum(t.numel() for t in model.values() if isinstance(t, torch.Tensor))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
