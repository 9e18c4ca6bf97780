"""A peer that is a group of 2 data-parallel ranks versus a single-process peer, on this machine.

    .venv/bin/python benchmarks/group.py [--steps 200] [--world 1 2] [--set SECTION.KEY=VALUE ...]

For each group size W, on 127.0.0.1: peer `a` (a single process that trains 30 steps, publishes, then
only serves and fetches: its `--linger`) starts a swarm; peer `b` joins it, launched with
`python -m torch.distributed.run --nproc-per-node W -m p2pcod peer ...` (W = 1: a plain `p2pcod peer`),
and trains `--steps` steps, distilling from `a`. Reported per W:

- steps/s of b between its step-20 and last metrics lines (each step of a group of W reads W batches);
- b's exchange traffic: bytes in (a's one checkpoint) and out (a fetches each checkpoint b publishes),
  checkpoints fetched: what the swarm sees of b must not depend on W, as only rank 0 talks to the swarm;
- which processes have a swarm identity (RUN_DIR/identity: rank 0 only).

Prints one JSON line per W, then a table. Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "model.layers=1", "model.width=64", "model.heads=2", "model.context=64", "task.seq_len=64",
    "task.max_bytes=500000", "train.batch_size=16", "train.eval_batches=2", "train.eval_batch_size=16",
    "train.log_every=10", "train.eval_every=50", "train.warmup=0", "train.threads=1", "train.checkpoint_every=100",
    "distill.burn_in=10", "exchange.reload_every=25", "exchange.ttl=8.0", "exchange.heartbeat=1.0",
    'exchange.topology="full"',
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left (torchrun's workers have their own sessions:
    torchrun forwards the SIGTERM to them and waits)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def run_one(world: int, steps: int, work: Path, sets: list[str]) -> dict:
    swarm = f"bench{uuid.uuid4().hex[:6]}"
    peer = [sys.executable, "-m", "p2pcod", "peer", "--config", str(ROOT / "peers" / "lm-tiny.toml"), "--swarm", swarm,
            "--listen", "/ip4/127.0.0.1/tcp/0", "--device", "cpu"]
    extra = [a for s in SMALL + sets for a in ("--set", s)]
    a_dir, b_dir = work / f"w{world}-a", work / f"w{world}-b"
    a = start([*peer, "--name", "a", "--run-dir", str(a_dir), "--shard", "0/2", "--linger", "900", *extra,
               "--set", "train.steps=30"], work / f"w{world}-a.log")
    procs = [a]
    try:
        info = wait_for(lambda: read_json(a_dir / "peer.json"), 120, "a to join")
        wait_for(lambda: any(r.get("final") for r in rows(a_dir / "metrics.jsonl")), 300, "a to finish training")
        joins = [x for m in info["maddrs"] for x in ("--join", m)]
        b_args = ["--name", "b", "--run-dir", str(b_dir), "--shard", "1/2", *joins, *extra,
                  "--set", f"train.steps={steps}"]
        if world == 1:
            cmd = [*peer, *b_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--nnodes", "1",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "p2pcod", *peer[3:], *b_args]
        started = time.monotonic()
        b = start(cmd, work / f"w{world}-b.log")
        procs.append(b)
        code = b.wait(900)
        wall = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"peer b (world {world}) exited with {code}; see {work / f'w{world}-b.log'}")
        time.sleep(3.0)  # let a fetch b's last checkpoint
    finally:
        for p in procs:
            stop(p)
    b_rows = [r for r in rows(b_dir / "metrics.jsonl") if "train_loss" in r or r.get("final")]
    t20 = next(r for r in b_rows if r["step"] >= 20)
    last = b_rows[-1]
    rate = (last["step"] - t20["step"]) / max(last["time"] - t20["time"], 1e-9)
    vals = [r["val_loss"] for r in rows(b_dir / "metrics.jsonl") if "val_loss" in r]
    return {
        "world": world, "steps": last["step"], "wall_s": round(wall, 1), "steps_per_s": round(rate, 2),
        "batches_per_s": round(world * rate, 2), "val_loss": vals[-1], "b_bytes_in": last["bytes_in"],
        "b_bytes_out": last["bytes_out"], "b_fetched": last["fetch_ok"],
        "swarm_identities": sorted(str(p.relative_to(b_dir)) for p in b_dir.rglob("identity")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--keep", default=None, help="keep the run directories here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="p2pcod-group-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for world in args.world:
            res = run_one(world, args.steps, work, args.sets)
            print(json.dumps(res), flush=True)
            results.append(res)
    print(f"\n{'W':>2} {'steps/s':>8} {'batches/s':>9} {'val_loss':>8} {'bytes in':>9} {'bytes out':>9} {'fetched':>7}")
    for r in results:
        print(f"{r['world']:>2} {r['steps_per_s']:>8} {r['batches_per_s']:>9} {r['val_loss']:>8} {r['b_bytes_in']:>9} "
              f"{r['b_bytes_out']:>9} {r['b_fetched']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
