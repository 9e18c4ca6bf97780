"""A peer that is a group: synchronous data parallelism (torch.distributed) inside one swarm peer.

    torchrun --nproc-per-node 2 -m p2pcod peer --config peers/lm-tiny.toml --name alice ...

Each rank is a process with the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it (or with WORLD_SIZE=1) the peer is a single process and nothing here talks.

- The student is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA): gradients are averaged
  every step, so every rank holds the same weights after every step.
- Data: rank r of a group of W that is shard s of K reads task shard s*W + r of K*W (its own slice of the
  peer's shard) with its own seed stream (the peer's seed + 100000 r), so no two ranks read the same batches.
- Rank 0 alone is the swarm member (DHT, serving, fetching: the Session) and writes the checkpoints; every
  rank loads the same checkpoint on --resume. Other ranks write their metrics to RUN_DIR/ranks/rank<r>/.
- Teachers: the Session's fetcher swaps teachers into rank 0's TeacherPool at any time. At every step
  boundary the group all-reduces (MAX) two numbers: a stop flag (SIGTERM on any rank stops the whole group
  at the same step) and rank 0's teacher version, which rank 0 bumps whenever its pool changed. On a new
  version rank 0 broadcasts the changed teachers' weights, steps and model configs, and the other ranks swap
  them into their own TeacherPool (and drop the ones rank 0 dropped): every rank distils from the same
  teacher versions at every step.
- P2PCOD_GROUP_DEBUG=1: every rank appends {"step", "digest" (sha256 of its weights), "teachers"
  ({name: step})} after every step to RUN_DIR/group-debug/rank<r>.jsonl (what the tests compare).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from p2pcod.errors import ConfigError
from p2pcod.teachers import TeacherError, TeacherPool

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
DEBUG_ENV = "P2PCOD_GROUP_DEBUG"
SEED_STRIDE = 100_000  # rank r's data seed: the peer's seed + r * SEED_STRIDE


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'cpu' | 'cuda' | 'auto' (cuda when present) -> the device this rank trains on."""
    if name not in DEVICES:
        raise ConfigError(f"--device {name!r} must be one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


@dataclass
class Group:
    """This process's place in its peer's group (rank 0 of 1 for a plain single-process peer)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str = "auto") -> Group:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; the process group is not joined yet (see init)."""
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        return cls(rank=rank, world_size=world, local_rank=local, device=resolve_device(device, local))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def init(self, timeout_s: float = 1800.0) -> None:
        """Join the process group (env:// rendezvous at MASTER_ADDR:MASTER_PORT). Rank 0 calls this only
        after its DHT node has forked."""
        if not self.distributed or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d of %d joined its group (%s)", self.rank, self.world_size, self.backend)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            # A released DistributedDataParallel wrapper lingers in reference cycles; freed only at interpreter
            # exit, its reducer aborts the process about 1 time in 4 with gloo ("terminate called without an
            # active exception", exit -6). Collect it while the group still exists.
            gc.collect()
            dist.destroy_process_group()

    # ---- what each rank trains on -----------------------------------------------------------------
    def data_shard(self, shard: int, num_shards: int) -> tuple[int, int]:
        """Rank r of W reads task shard shard*W + r of num_shards*W."""
        return shard * self.world_size + self.rank, num_shards * self.world_size

    def data_seed(self, peer_seed: int) -> int:
        return peer_seed + SEED_STRIDE * self.rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train through: DistributedDataParallel in a group, the model itself otherwise."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # ---- collectives ------------------------------------------------------------------------------
    def agree(self, stop: bool, version: int) -> tuple[bool, int]:
        """All-reduce MAX of (stop, version): anyone's stop stops all; rank 0's version is the largest."""
        if not self.distributed:
            return stop, version
        flags = torch.tensor([int(stop), version], dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), int(flags[1].item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled: only ever between the ranks of one's own group)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_root else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def _signature(pool: TeacherPool) -> dict[str, tuple[int, float]]:
    return {i.name: (i.step, i.received_at) for i in pool.info()}


class TeacherSync:
    """Keeps every rank's training TeacherPool equal to what rank 0's Session holds, at step boundaries.

    Rank 0's Session pool (`source`) is the fetcher's inbox and may change at any moment; the pools the
    ranks train with (`target`, one per rank, rank 0's included) change only in `step_boundary`, from
    the same broadcast, so all ranks use the same teachers during a step.
    """

    def __init__(self, group: Group, target: TeacherPool, source: TeacherPool | None = None) -> None:
        if group.is_root and source is None:
            raise ValueError("rank 0 needs the Session's pool as the source")
        self.group = group
        self.source = source
        self.target = target
        self.version = 0
        self.broadcasts = 0
        self._sent: dict[str, tuple[int, float]] = {}

    def step_boundary(self, stop: bool) -> bool:
        """Call on every rank before every step; returns the group's agreed stop flag."""
        changed = self.group.is_root and _signature(self.source) != self._sent
        if changed:
            self.version += 1
        stop, version = self.group.agree(stop, self.version if self.group.is_root else 0)
        if changed or (not self.group.is_root and version != self.version):
            self._exchange()
            self.version = version
        return stop

    def _exchange(self) -> None:
        payload = None
        if self.group.is_root:
            teachers = [  # plain data: broadcast_object_list pickles it
                {"name": c.info.name, "step": c.info.step, "model_cfg": dict(c.info.model_cfg),
                 "meta": dict(c.info.meta), "received_at": c.info.received_at, "state": c.state}
                for c in self.source.snapshot()
            ]
            current = {t["name"]: (t["step"], t["received_at"]) for t in teachers}
            changed = [t for t in teachers if self._sent.get(t["name"]) != current[t["name"]]]
            self._sent = current
            payload = {"names": sorted(current), "changed": changed}
        payload = self.group.broadcast(payload)
        self.broadcasts += 1
        self.target.retain(payload["names"])
        for t in payload["changed"]:
            try:
                self.target.swap(t["name"], t["state"], t["model_cfg"], t["step"], t["meta"])
            except TeacherError as err:  # rank 0's Session loaded it, so this should not happen; never fatal
                log.warning("rank %d could not load teacher %s: %s", self.group.rank, t["name"], err)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order (bitwise identity across ranks)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DebugLog:
    """With P2PCOD_GROUP_DEBUG=1: RUN_DIR/group-debug/rank<r>.jsonl, one line per step."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.enabled = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        self._file = None
        if self.enabled:
            path = run_dir / "group-debug" / f"rank{rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")

    def write(self, step: int, model: torch.nn.Module, pool: TeacherPool | None) -> None:
        if self._file is None:
            return
        teachers: Mapping[str, int] = {i.name: i.step for i in pool.info()} if pool is not None else {}
        record = {"step": step, "digest": weights_digest(model), "teachers": dict(teachers)}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
