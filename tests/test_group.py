"""A peer that is a group of 2 data-parallel ranks (gloo on CPU) in a swarm with a single-process peer.

The ranks are started the way torchrun starts them (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the
environment, `python -m p2pcod peer ...` each), each in its own process group so that a test can kill -9
it and everything it started. P2PCOD_GROUP_DEBUG=1 makes every rank write the sha256 of its weights and
its teachers after every step to RUN_DIR/group-debug/rank<r>.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from peerproc import FAST, RECIPE, ROOT, PeerProc, free_port, wait_for

from p2pcod.config import load_recipe
from p2pcod.errors import ConfigError
from p2pcod.group import Group, TeacherSync, resolve_device, weights_digest
from p2pcod.tasks import get_task
from p2pcod.teachers import TeacherPool

pytestmark = pytest.mark.slow
TOPOLOGY = ['exchange.topology="full"']


class RankProc(PeerProc):
    """One rank of the group peer `name`: a PeerProc started with torchrun's environment."""

    def __init__(self, run_dir: Path, name: str, swarm: str, rank: int, port: int, extra: list[str],
                 join: list[str], resume: bool, shard: str) -> None:
        self.run_dir, self.name, self.rank = run_dir, f"{name}.rank{rank}", rank
        self._started_after = time.time()
        self.left_behind: list[int] = []
        cmd = [sys.executable, "-m", "p2pcod", "-v", "peer", "--config", str(RECIPE), "--name", name,
               "--swarm", swarm, "--run-dir", str(run_dir), "--listen", "/ip4/127.0.0.1/tcp/0", "--shard", shard,
               "--device", "cpu"]
        for j in join:
            cmd += ["--join", j]
        for s in FAST + extra:
            cmd += ["--set", s]
        if resume:
            cmd.append("--resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"stderr-rank{rank}-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "P2PCOD_GROUP_DEBUG": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid


def start_group(run_dir: Path, swarm: str, join: list[str], procs: list, resume: bool = False) -> list[RankProc]:
    port = free_port()
    ranks = [RankProc(run_dir, "g", swarm, r, port, extra=[*TOPOLOGY, "distill.burn_in=5"], join=join,
                      resume=resume, shard="1/2") for r in (0, 1)]
    procs.extend(ranks)
    return ranks


def debug_rows(run_dir: Path, rank: int) -> dict[int, dict]:
    """The latest debug record of each step (a resumed run re-does the steps after its checkpoint)."""
    path = run_dir / "group-debug" / f"rank{rank}.jsonl"
    rows: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed rank
                continue
            rows[row["step"]] = row
    return rows


def assert_ranks_agree(run_dir: Path) -> tuple[int, int]:
    """Every step both ranks logged: same weights, same teachers. Returns (steps compared, steps with teachers)."""
    r0, r1 = debug_rows(run_dir, 0), debug_rows(run_dir, 1)
    common = sorted(set(r0) & set(r1))
    assert len(common) >= 10, (len(r0), len(r1))
    for step in common:
        assert r0[step]["digest"] == r1[step]["digest"], f"ranks' weights differ after step {step}"
        assert r0[step]["teachers"] == r1[step]["teachers"], f"ranks used other teachers at step {step}"
    return len(common), sum(1 for s in common if r0[s]["teachers"])


def test_group_of_two_trains_in_step_with_the_same_teachers_and_resumes(tmp_path, procs):
    swarm = f"g{uuid.uuid4().hex[:8]}"
    single = PeerProc(tmp_path / "p0", "p0", swarm, TOPOLOGY, shard="0/2")
    procs.append(single)
    boot = single.wait_joined()
    gdir = tmp_path / "g"
    rank0, rank1 = start_group(gdir, swarm, boot, procs)
    info = wait_for(lambda: rank0.info() if rank0.alive() and rank1.alive() else _dead(rank0, rank1), 120, "join")
    assert info["group_size"] == 2 and info["name"] == "g"
    # the single peer and the group distil from each other
    wait_for(lambda: _alive(rank0, rank1) and rank0.last().get("distill_loss", 0) > 0
             and rank0.last().get("staleness", {}).keys() == {"p0"}, 120, "the group to distil from p0")
    wait_for(lambda: "g" in single.last().get("staleness", {}), 90, "p0 to distil from the group")
    wait_for(lambda: _alive(rank0, rank1) and rank0.last().get("step", 0) >= 45, 120, "a checkpoint at step 40")
    compared, with_teachers = assert_ranks_agree(gdir)
    assert with_teachers > 0, "no step distilled from a teacher"
    wait_for(lambda: _alive(rank0, rank1) and rank0.last().get("bytes_out", 0) > 0, 60, "rank 0 to log p0's fetch")
    assert rank0.last()["bytes_in"] > 0
    rank_rows = [json.loads(line) for line in (gdir / "ranks" / "rank1" / "metrics.jsonl").read_text().splitlines()]
    assert rank_rows and all(r["rank"] == 1 for r in rank_rows)
    assert not (gdir / "ranks" / "rank1" / "checkpoint.ckpt").exists()

    # kill -9 the whole group, then resume it: both ranks load rank 0's last checkpoint and stay in step
    for r in (rank0, rank1):
        r.proc.kill()
        r.kill()
    rank0, rank1 = start_group(gdir, swarm, boot, procs, resume=True)
    info = wait_for(lambda: rank0.info() if _alive(rank0, rank1) else None, 120, "the group to rejoin")
    resumed = info["resumed_from"]
    assert resumed is not None and resumed >= 40 and resumed % 20 == 0
    wait_for(lambda: _alive(rank0, rank1) and rank0.last().get("step", 0) >= resumed + 15, 120, "training on")
    assert rank0.terminate() == 0, rank0.stderr()[-2000:]  # SIGTERM to rank 0 alone stops the whole group
    assert rank1.proc.wait(60) == 0, rank1.stderr()[-2000:]
    assert rank0.left_behind == [], "rank 0 left its DHT processes behind"
    after = {s: r for s, r in debug_rows(gdir, 0).items() if s > resumed}
    assert len(after) >= 15
    compared, _ = assert_ranks_agree(gdir)
    assert max(debug_rows(gdir, 0)) == max(debug_rows(gdir, 1))  # both stopped after the same step
    vals = [r["val_loss"] for r in rank0.metrics() if "val_loss" in r]
    assert vals[-1] < vals[0], f"the group's validation loss did not fall: {vals}"
    assert rank0.metrics()[-1].get("final")
    assert single.terminate() == 0


def _alive(*ranks: PeerProc) -> bool:
    return all(r.alive() for r in ranks) or _dead(*ranks)


def _dead(*ranks: PeerProc):
    dead = [r for r in ranks if not r.alive()]
    raise AssertionError("; ".join(f"{r.name} exited with {r.proc.returncode}:\n{r.stderr()[-2000:]}" for r in dead))


# ---- in-process units (no second process) ---------------------------------------------------------------

def test_group_from_environment_and_data_slices(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    single = Group.from_env("cpu")
    assert (single.rank, single.world_size, single.distributed, single.is_root) == (0, 1, False, True)
    assert single.data_shard(1, 3) == (1, 3) and single.data_seed(7) == 7
    model = torch.nn.Linear(2, 2)
    assert single.wrap(model) is model
    assert single.agree(True, 5) == (True, 5)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    g = Group.from_env("cpu")
    assert (g.rank, g.world_size, g.local_rank, g.backend) == (3, 4, 3, "gloo")
    # rank r of a group of W that is shard s of K reads shard s*W + r of K*W: distinct, covering slices
    slices = {Group(rank=r, world_size=4).data_shard(s, 3) for s in range(3) for r in range(4)}
    assert slices == {(i, 12) for i in range(12)}
    assert len({Group(rank=r, world_size=4).data_seed(3) for r in range(4)}) == 4
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError):
        Group.from_env("cpu")


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError):
            resolve_device("cuda")


def test_teacher_sync_copies_only_at_step_boundaries():
    """Rank 0's training pool follows the Session's pool at boundaries only (no process group: world of 1)."""
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "peers" / "lm-tiny.toml",
                         ["model.layers=1", "model.width=16", "model.heads=2", "task.max_bytes=100000",
                          'distill.teacher_precision="fp32"'])  # the weights as sent, to compare them bitwise
    task = get_task(recipe.task)
    make = lambda: TeacherPool(task.build_model, recipe.distill, task.kind)  # noqa: E731
    source, target = make(), make()
    sync = TeacherSync(Group(), target, source=source)
    teacher = task.build_model(recipe.model)
    source.swap("a", teacher.state_dict(), recipe.model, step=10)
    assert len(target) == 0  # not before the boundary
    assert sync.step_boundary(False) is False
    assert target.names() == ["a"] and target.info()[0].step == 10
    held = next(iter(target._active.values())).module
    assert weights_digest(held) == weights_digest(teacher)
    assert sync.version == 1 and sync.step_boundary(True) is True and sync.version == 1  # nothing new
    source.remove("a")
    sync.step_boundary(False)
    assert len(target) == 0 and sync.version == 2


def test_weights_digest_is_bitwise():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(4.0))  # a 0-d buffer
    same = torch.nn.Linear(3, 2)
    same.register_buffer("count", torch.tensor(4.0))
    same.load_state_dict(model.state_dict())
    assert weights_digest(model) == weights_digest(same)
    with torch.no_grad():
        same.weight[0, 0] = torch.nextafter(same.weight[0, 0], torch.tensor(10.0))  # one ulp
    assert weights_digest(model) != weights_digest(same)


def test_trainer_metrics_path_and_device(tmp_path):
    from p2pcod.trainer import Trainer

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "peers" / "lm-tiny.toml",
                         ["model.layers=1", "model.width=16", "model.heads=2", "task.max_bytes=100000",
                          "train.eval_batches=1", "train.eval_batch_size=4", "train.batch_size=4"])
    task = get_task(recipe.task)
    path = tmp_path / "ranks" / "rank1" / "metrics.jsonl"
    trainer = Trainer(recipe, task, shard=3, num_shards=4, run_dir=tmp_path, device="cpu", metrics_path=path)
    try:
        wrapped = torch.nn.Sequential(trainer.model)  # a wrapper applied from outside, as DDP is
        trainer.train_model = wrapped
        before = weights_digest(trainer.model)
        trainer.train_step()
        assert weights_digest(trainer.model) != before  # training through the wrapper moves the model
        trainer.log()
    finally:
        trainer.close()
    assert json.loads(path.read_text().splitlines()[-1])["step"] == 1
    assert not (tmp_path / "metrics.jsonl").exists()
