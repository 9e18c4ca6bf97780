"""Start and watch real `p2pcod peer` processes on 127.0.0.1 for tests; every process is cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pcod.trainer import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "peers" / "lm-tiny.toml"
# A very small model and corpus so that several peers share 2 cores; long step budgets: tests stop
# peers with SIGTERM once what they check has happened.
FAST = [
    "model.layers=1", "model.width=32", "model.heads=2", "model.context=32", "task.seq_len=32",
    "task.max_bytes=300000", "train.batch_size=8", "train.eval_batches=2", "train.eval_batch_size=8",
    "train.log_every=5", "train.eval_every=20", "train.warmup=0", "train.threads=1", "train.steps=100000",
    "train.checkpoint_every=20", "distill.burn_in=10", "exchange.reload_every=10", "exchange.ttl=8.0",
    "exchange.heartbeat=1.0",
]

# The same tiny peers as `[swarm.set.*]` tables of a simulator spec (tests that run p2pcod.sim).
TINY_SETS = {
    "task": {"seq_len": 32, "max_bytes": 300000},
    "model": {"layers": 1, "width": 32, "heads": 2, "context": 32},
    "train": {"batch_size": 8, "eval_batches": 2, "eval_batch_size": 8, "log_every": 1, "eval_every": 100,
              "warmup": 0},
    "distill": {"burn_in": 5},
    "exchange": {"reload_every": 5, "ttl": 8.0, "heartbeat": 1.0},
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a fixed --listen port, a group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_spec_sets(**changes: dict) -> str:
    """TINY_SETS as TOML `[swarm.set.<section>]` tables, with `changes` ({section: {key: value}}) applied."""
    out = []
    for section, keys in TINY_SETS.items():
        out.append(f"[swarm.set.{section}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in {**keys, **changes.get(section, {})}.items()]
    return "\n".join(out) + "\n"


class PeerProc:
    def __init__(self, run_dir: Path, name: str, swarm: str, extra: list[str] | None = None,
                 join: list[str] | None = None, resume: bool = False, shard: str = "0/1",
                 listen: str = "/ip4/127.0.0.1/tcp/0") -> None:
        self.run_dir, self.name = run_dir, name
        self._started_after = time.time()
        self.left_behind: list[int] = []
        cmd = [sys.executable, "-m", "p2pcod", "-v", "peer", "--config", str(RECIPE), "--name", name,
               "--swarm", swarm, "--run-dir", str(run_dir), "--listen", listen, "--shard", shard]
        for j in join or []:
            cmd += ["--join", j]
        for s in FAST + (extra or []):
            cmd += ["--set", s]
        if resume:
            cmd.append("--resume")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"stderr-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid

    # ---- what the peer wrote ------------------------------------------------------------------------
    def info(self) -> dict[str, Any] | None:
        path = self.run_dir / "peer.json"
        try:
            info = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info if info.get("time", 0) >= self._started_after else None  # not a previous run's

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def last(self) -> dict[str, Any]:
        rows = self.metrics()
        return rows[-1] if rows else {}

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- control --------------------------------------------------------------------------------------
    def wait_joined(self, timeout: float = 90.0) -> list[str]:
        info = wait_for(lambda: self.info() if self.alive() else _fail(self), timeout, f"{self.name} to join")
        return info["maddrs"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60.0, ctrl_c: bool = False) -> int:
        """SIGTERM the peer; ctrl_c: SIGINT its whole process group, as Ctrl+C in a terminal does."""
        if self.alive():
            if ctrl_c:
                os.killpg(self.pid, signal.SIGINT)
            else:
                self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            # a graceful exit must take its DHT process and p2p daemon with it
            self.left_behind = [pid for pid in group_members(self.pid) if group_alive(self.pid, grace=10.0)]
            return code
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (the peer and its DHT daemon processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()

    def stdout(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""


def _fail(peer: PeerProc):
    raise AssertionError(f"peer {peer.name} exited with {peer.proc.returncode}:\n{peer.stderr()[-3000:]}")


def read_jsonl(path: Path, missing_ok: bool = True) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file a process may be writing, or was killed writing: a cut line is skipped."""
    return [] if missing_ok and not path.exists() else read_metrics(path)


def sim_events(run_dir: Path) -> list[dict[str, Any]]:
    """A simulation's events.jsonl (written whole lines at a time by the simulator)."""
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def write_spec(tmp_path: Path, body: str, name: str = "exp") -> Path:
    """A simulator spec file from `body`, with RECIPE replaced by the tiny peers' recipe path."""
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body).replace("RECIPE", str(RECIPE)))
    return path


def eventually(cond: Callable[[], Any], timeout: float = 30.0, every: float = 0.3) -> bool:
    """True once `cond()` holds, checked every `every` s; False if it still does not after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            live.append(int(entry.name))
    return live


def group_alive(pgid: int, grace: float = 10.0) -> bool:
    """True if processes of the group are still alive after `grace` seconds."""
    deadline = time.monotonic() + grace
    while group_members(pgid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False
