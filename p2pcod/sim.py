"""The local multi-process simulator: N real `p2pcod peer` processes on 127.0.0.1, from a spec.

    p2pcod simulate topologies/ring-4.toml [--run-dir DIR]

Spec (TOML; validated in full by p2pcod/simspec.py before any process starts):

    [swarm]
    recipe = "peers/lm-tiny.toml"   # peer recipe (relative to the working directory or the spec)
    peers = 4                       # N
    topology = "ring"               # exchange.topology: full ring ring-bi k-ring exponential random-k none edges
    k = 2                           # exchange.k (k-ring, random-k)
    split = "disjoint"              # train.split: disjoint | same | noniid
    steps = 200                     # train.steps of every peer (default: the recipe's)
    budget_s = 0                    # wall-clock budget in seconds; 0 = until every peer is done
    threads = 0                     # torch threads per peer (per rank); 0 = max(1, cores // all ranks)
    upload_mbit = 0                 # caps for every peer (Mbit/s, 0 = none) and added latency per transfer
    download_mbit = 0
    latency_ms = 0
    compare_alone = false           # then run the same peers with topology "none" into RUN_DIR/alone
    compare_clean = false           # then run the honest peers without the adversaries into RUN_DIR/clean
    baseline = "runs/..."           # or: an existing run directory the report compares against
    sync_start = true               # hold each initial peer once it has joined (its control file), until all have
    [swarm.set.train]               # recipe overrides for every peer (any section: train, model, ...)
    eval_every = 20

    [[peer]]                        # optional, per peer (heterogeneous swarms, per-peer caps)
    index = 2                       # which peer (0..N-1); name defaults to p<index>
    name = "big"
    group_size = 2                  # ranks (processes) of this peer, default 1 (also a [swarm] default)
    recipe = "peers/lm-small.toml"
    upload_mbit = 1.0
    set = { model = { width = 96 } }
    # role = "adversary"            # a hostile peer (p2pcod/adversary.py) instead of a trainer: it joins
    # attacks = ["bomb", "flood"]   #   with the swarm's recipe and cycles through these attacks,
    # attack_every_s = 20           #   this long each; it gets no data shard and is never waited for

    [[fault]]                       # optional fault schedule, applied in order
    kind = "kill"                   # kill (SIGKILL, the whole process group) | restart (--resume, same
    peer = 1                        #   run dir and identity) | join (starts late) | cut (partition)
    at_step = 60                    # this peer's step (join: the most advanced peer's step), or
    # at_s = 30                     #   seconds since the start; restart: at_s or after_s (after the kill)
    # duration_s = 20               # cut: how long the peer is cut off (via its --control file)

Run directory (default runs/<spec stem>-<timestamp>): spec.toml (a copy), events.jsonl (every start,
kill, restart, cut, exit with time, pid and step; kill, cut, heal and joined also carry `swarm_steps`, the
last step of every running peer, which shows who kept training through a fault), peers/<name>/ (the
peer's own run dir: metrics.jsonl, peer.json, checkpoint, identity/, control.json, peer.log with its stdout
and stderr; a group's rank r > 0 logs to ranks/rank<r>/), then the report
(p2pcod/report.py). Every peer runs in its own process group; at the end, on Ctrl+C/SIGTERM and on any
error, each gets SIGTERM (it saves and leaves), then SIGKILL for the group; an atexit hook does the same.

A peer with group_size N > 1 is N processes (each in its own process group) started with torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT per incarnation); rank 0 is the
swarm member whose files the simulator reads. Faults and the stop act on every rank (restart: every rank with
--resume), and a rank that dies ends its group: the other ranks are killed and the exit is reported.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from p2pcod.control import write_control
from p2pcod.errors import SwarmError
from p2pcod.simspec import FaultSpec, PeerSpec, SimSpec, load_spec

PEER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "p2pcod", "peer")
RANK_EXIT_GRACE_S = 3.0  # at the stop, how long a finished group's ranks may take to exit on their own
ADVERSARY_COMMAND: tuple[str, ...] = (sys.executable, "-m", "p2pcod.adversary")
LISTEN = "/ip4/127.0.0.1/tcp/0"
LINGER_S = 900.0  # finished peers keep serving until the simulator stops them (bounded, for orphans)
POLL_S = 0.5

_LIVE: set[subprocess.Popen] = set()  # every peer process not yet reaped: the atexit safety net


def _kill_all_live() -> None:
    for proc in list(_LIVE):
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _LIVE.discard(proc)


atexit.register(_kill_all_live)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class PeerState:
    """One peer across its incarnations (a restart is a new process on the same run dir)."""

    spec: PeerSpec
    run_dir: Path
    proc: subprocess.Popen | None = None
    log: IO[str] | None = None
    incarnation: int = 0
    started_unix: float = 0.0
    joined: bool = False  # peer.json of this incarnation seen
    maddrs: list[str] = field(default_factory=list)
    offset: int = 0  # bytes of metrics.jsonl already read
    partial: str = ""
    last_step: int = 0
    last_row: dict[str, Any] = field(default_factory=dict)
    shown: int = -1  # step of the last progress line shown
    origin: float | None = None  # sim time at which this incarnation's metrics clock read 0 (an upper bound)
    finished: bool = False
    killed_at: float | None = None  # sim time of the kill awaiting a restart
    ended: bool = False  # exited for good (or killed with no restart pending)
    pgids: list[int] = field(default_factory=list)
    ranks: list[subprocess.Popen] = field(default_factory=list)  # a group's ranks 1..N-1 (rank 0 is `proc`)
    rank_logs: list[IO[str]] = field(default_factory=list)
    failed_rank: int = 0  # the rank whose exit ended the group

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def procs(self) -> list[subprocess.Popen]:
        """Every rank process of the current incarnation, rank 0 (the swarm member) first."""
        return ([self.proc] if self.proc is not None else []) + self.ranks

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Simulation:
    """Runs one spec to completion in `run_dir`. `peer_command` can be swapped for a fake in tests."""

    def __init__(
        self,
        spec: SimSpec,
        run_dir: str | Path,
        *,
        progress: Callable[[str], None] = print,
        stop: threading.Event | None = None,
        peer_command: Sequence[str] = PEER_COMMAND,
        poll_s: float = POLL_S,
    ) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop = stop or threading.Event()
        self.peer_command = list(peer_command)
        self.poll_s = poll_s
        self.swarm = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        self.peers = [PeerState(p, self.run_dir / "peers" / p.name) for p in spec.peers]
        self.pending: list[FaultSpec] = list(spec.faults)
        self.heal_at: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._holding = False
        self._events: IO[str] | None = None

    # ---- public ---------------------------------------------------------------------------------
    @property
    def pgids(self) -> list[int]:
        """Every process group this simulation started (for leak checks)."""
        return [g for p in self.peers for g in p.pgids]

    def run(self) -> str:
        """Start, supervise and stop the peers; returns why it ended (steps, budget, stopped)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.spec.path.is_file():
            shutil.copyfile(self.spec.path, self.run_dir / "spec.toml")
        self._events = (self.run_dir / "events.jsonl").open("a")
        reason = "error"
        try:
            self._event("sim_start", swarm=self.swarm, spec=self.spec.name, peers=len(self.peers),
                        threads=self.spec.threads, topology=self.spec.topology, steps=self.spec.steps,
                        budget_s=self.spec.budget_s, names=[p.name for p in self.peers])
            reason = self._supervise()
        finally:
            self._stop_all()
            self._event("sim_end", reason=reason)
            self._events.close()
        return reason

    # ---- supervision ----------------------------------------------------------------------------
    def _supervise(self) -> str:
        late = self.spec.late_peers
        initial = [p for p in self.peers if p.spec.index not in late]
        self._holding = self.spec.sync_start and len(initial) > 1
        self._start(initial[0])
        if not self._wait_joined(initial[:1]):
            return "stopped"
        for peer in initial[1:]:
            self._start(peer)
        if self._holding:
            if not self._wait_joined(initial):
                return "stopped"
            self._holding = False
            for peer in initial:  # every initial peer has joined: all start training together
                write_control(peer.run_dir / "control.json", hold=False)
            self._event("go", held={p.name: p.last_step for p in initial})
            self.progress(f"{self._stamp()} all {len(initial)} peers joined: training starts")
        while True:
            self._poll()
            if self.stop.is_set():
                return "stopped"
            if self.spec.budget_s and self.elapsed >= self.spec.budget_s:
                return "budget"
            if self._done():
                return "steps"
            self._fire_faults()
            time.sleep(self.poll_s)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _wait_joined(self, peers: list[PeerState]) -> bool:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while not all(p.joined for p in peers):
            self._poll()
            if self.stop.is_set():
                return False
            for peer in peers:
                if not peer.running:
                    who, rc, log = _failure(peer)
                    raise SwarmError(f"{who} exited with code {rc} before joining; its log {log} ends with:\n"
                                     f"{_tail(log)}")
                if time.monotonic() > deadline and not peer.joined:
                    raise SwarmError(f"peer {peer.name} did not write {peer.run_dir / 'peer.json'} within "
                                     f"{self.spec.startup_timeout_s:.0f} s (swarm.startup_timeout_s)")
            time.sleep(0.05)
        return True

    def _done(self) -> bool:
        if any(f.kind in ("join", "restart") for f in self.pending):
            return False
        return all(p.finished or p.ended for p in self.peers if p.spec.honest)  # adversaries never finish

    def _poll(self) -> None:
        for peer in self.peers:
            if peer.proc is None:
                continue
            if not peer.joined:
                self._check_joined(peer)
            self._read_metrics(peer)
            rank, rc = _exited(peer)
            if rc is not None and not peer.ended and peer.killed_at is None:
                peer.ended = True
                peer.failed_rank = rank
                codes = [p.poll() for p in peer.procs]  # before the kill: which ranks had exited, how
                _kill_ranks(peer)  # every rank, its DHT process and daemon, if left behind: one dead rank ends a group
                unexpected = not peer.finished or rank > 0
                self._event("exit", peer, rc=rc, unexpected=unexpected, rank=rank if peer.ranks else None,
                            ranks_rc=codes if peer.ranks else None)
                if unexpected:
                    who, _, log = _failure(peer)
                    self.progress(f"{self._stamp()} {peer.name:<8} EXITED with code {rc} at step "
                                  f"{peer.last_step}{f' ({who}: the whole group is stopped)' if rank else ''}; "
                                  f"log tail:\n{_tail(log)}")
        for name, until in list(self.heal_at.items()):
            if self.elapsed >= until:
                del self.heal_at[name]
                peer = next(p for p in self.peers if p.name == name)
                self._event("heal", peer, swarm_steps=self._steps())
                self.progress(f"{self._stamp()} {name:<8} partition over")

    def _check_joined(self, peer: PeerState) -> None:
        path = peer.run_dir / "peer.json"
        try:
            info = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return
        if float(info.get("time", 0)) < peer.started_unix - 1.0:
            return  # the previous incarnation's
        peer.joined = True  # held at the start barrier by its control file (see _start) until every peer joined
        peer.maddrs = [str(a) for a in info.get("maddrs", [])]
        self._event("joined", peer, peer_id=info.get("peer_id"), peer_unix=info.get("time"),
                    resumed_from=info.get("resumed_from"), params=info.get("params"), swarm_steps=self._steps(),
                    group_size=info.get("group_size"))

    def _read_metrics(self, peer: PeerState, quiet: bool = False) -> None:
        path = peer.run_dir / "metrics.jsonl"
        try:
            with path.open("rb") as f:
                f.seek(peer.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        peer.offset += len(chunk)
        text = peer.partial + chunk.decode("utf-8", errors="replace")
        *lines, peer.partial = text.split("\n")
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or "step" not in row:
                continue
            peer.last_step, peer.last_row = int(row["step"]), row
            if isinstance(row.get("time"), int | float):  # seen no earlier than written: keep the tightest bound
                seen = self.elapsed - float(row["time"])
                peer.origin = seen if peer.origin is None else min(peer.origin, seen)
            if "val_loss" in row and not quiet and not (row.get("final") and peer.shown == row["step"]):
                peer.shown = int(row["step"])
                self.progress(self._progress_line(peer, row))
            if row.get("final") and not peer.finished:
                peer.finished = True
                self._event("finished", peer)

    def _progress_line(self, peer: PeerState, row: dict[str, Any]) -> str:
        extra = " (resumed)" if "resumed_from" in row else " (final)" if row.get("final") else ""
        return (f"{self._stamp()} {peer.name:<8} step {row['step']:>6}  val {row['val_loss']:.4f}  "
                f"teachers {row.get('teachers', 0)}  in {_mb(row.get('bytes_in', 0))}  "
                f"out {_mb(row.get('bytes_out', 0))}{extra}")

    # ---- faults ---------------------------------------------------------------------------------
    def _fire_faults(self) -> None:
        for fault in list(self.pending):
            peer = self.peers[fault.peer]
            if self._due(fault, peer):
                self.pending.remove(fault)
                getattr(self, f"_fault_{fault.kind}")(fault, peer)

    def _due(self, f: FaultSpec, peer: PeerState) -> bool:
        now = self.elapsed
        if f.kind == "restart":
            if peer.killed_at is None:
                return False
            return now >= (f.at_s if f.at_s is not None else peer.killed_at + (f.after_s or 0.0))
        if f.kind == "join":
            if f.at_s is not None:
                return now >= f.at_s
            return max(p.last_step for p in self.peers) >= (f.at_step or 0)
        if not peer.running or not peer.joined:  # kill / cut act on a live peer
            return False
        return now >= f.at_s if f.at_s is not None else peer.last_step >= (f.at_step or 0)

    def _fault_kill(self, f: FaultSpec, peer: PeerState) -> None:
        pid = peer.proc.pid
        _kill_ranks(peer)  # a group: every rank
        peer.killed_at = self.elapsed
        self._event("kill", peer, fault=f.index, swarm_steps=self._steps(), pids=_pids(peer))
        self.progress(f"{self._stamp()} {peer.name:<8} KILLED (SIGKILL) at step {peer.last_step}, pid {pid}")
        if not any(g.kind == "restart" and g.peer == f.peer for g in self.pending):
            peer.ended = True

    def _fault_restart(self, f: FaultSpec, peer: PeerState) -> None:
        peer.killed_at = None
        self._start(peer, resume=True, fault=f.index)

    def _fault_join(self, f: FaultSpec, peer: PeerState) -> None:
        self._start(peer, fault=f.index)

    def _fault_cut(self, f: FaultSpec, peer: PeerState) -> None:
        until = time.time() + f.duration_s
        write_control(peer.run_dir / "control.json", cut_off_until=until)
        self.heal_at[peer.name] = self.elapsed + f.duration_s
        self._event("cut", peer, fault=f.index, duration_s=f.duration_s, until_unix=until, swarm_steps=self._steps())
        self.progress(f"{self._stamp()} {peer.name:<8} CUT OFF for {f.duration_s:.0f} s at step {peer.last_step}")

    def _steps(self) -> dict[str, int]:
        """The last logged step of every peer now running (fault events carry it: who kept training)."""
        for peer in self.peers:
            if peer.proc is not None:
                self._read_metrics(peer)
        return {p.name: p.last_step for p in self.peers if p.running}

    # ---- processes ------------------------------------------------------------------------------
    def _command(self, peer: PeerState, resume: bool) -> list[str]:
        spec = peer.spec
        common = [
            "--config", str(spec.recipe), "--name", spec.name, "--swarm", self.swarm, "--run-dir", str(peer.run_dir),
            "--listen", LISTEN, "--control", str(peer.run_dir / "control.json"),
        ]
        if not spec.honest:
            cmd = [*ADVERSARY_COMMAND, *common, "--attack", ",".join(spec.attacks), "--every", str(spec.attack_every_s)]
        else:
            honest = self.spec.honest_peers  # the data is split among the honest peers only
            cmd = [*self.peer_command, *common, "--shard", f"{honest.index(spec)}/{len(honest)}",
                   "--linger", str(LINGER_S)]
        for other in self.peers:
            if other is not peer and other.running and other.joined:
                cmd += [a for m in other.maddrs[:1] for a in ("--join", m)]
        if resume:
            cmd.append("--resume")
        for item in spec.overrides:
            cmd += ["--set", item]
        return cmd

    def _close_clock(self, peer: PeerState) -> None:
        """Record where the incarnation's metrics clock sits on the simulation clock (the report's wall time)."""
        if peer.origin is not None:
            self._event("clock", peer, incarnation=peer.incarnation, origin_t=round(peer.origin, 3))
            peer.origin = None

    def _start(self, peer: PeerState, resume: bool = False, fault: int | None = None) -> None:
        peer.run_dir.mkdir(parents=True, exist_ok=True)
        self._read_metrics(peer, quiet=True)
        self._close_clock(peer)
        cmd = self._command(peer, resume)
        threads = str(self.spec.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        if peer.log is None:
            peer.log = (peer.run_dir / "peer.log").open("a")
        peer.log.write(f"\n==== p2pcod sim: incarnation {peer.incarnation + 1}: {' '.join(cmd)}\n")
        peer.log.flush()
        peer.started_unix = time.time()
        # the start barrier: the peer joins, serves and fetches, but trains only once hold is false
        write_control(peer.run_dir / "control.json", hold=self._holding)
        procs = self._spawn(peer, cmd, env)
        peer.proc, peer.ranks = procs[0], procs[1:]
        peer.incarnation += 1
        peer.joined = peer.finished = peer.ended = False
        peer.failed_rank = 0
        kind = "restart" if resume else "start"
        late = fault is not None and not resume
        hostile = {} if peer.spec.honest else {"role": peer.spec.role, "attacks": list(peer.spec.attacks)}
        self._event(kind, peer, incarnation=peer.incarnation, late=late, fault=fault,
                    joins=cmd.count("--join"), pids=_pids(peer), **hostile)
        self.progress(f"{self._stamp()} {peer.name:<8} {kind.upper()}{' (late join)' if late else ''} "
                      f"pid {peer.proc.pid}" + (f" (group of {len(procs)})" if peer.ranks else "")
                      + (f" from step {peer.last_step}" if resume else "")
                      + (f" ADVERSARY: {', '.join(peer.spec.attacks)}" if hostile else ""))

    def _spawn(self, peer: PeerState, cmd: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
        """Rank 0 (a single peer's only process), then a group's other ranks, each in its own process group.

        A group's ranks get the environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
        a free MASTER_PORT for each incarnation); rank r > 0 logs to RUN_DIR/peers/<name>/ranks/rank<r>/peer.log.
        """
        size = peer.spec.group_size
        for old in peer.rank_logs:
            old.close()
        peer.rank_logs = []
        master = {"WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        procs: list[subprocess.Popen] = []
        for rank in range(size):
            log = peer.log
            if rank > 0:
                path = peer.run_dir / "ranks" / f"rank{rank}" / "peer.log"
                path.parent.mkdir(parents=True, exist_ok=True)
                log = path.open("a")
                peer.rank_logs.append(log)
                log.write(f"\n==== p2pcod sim: incarnation {peer.incarnation + 1}, rank {rank}\n")
                log.flush()
            rank_env = {**env, **master, "RANK": str(rank), "LOCAL_RANK": str(rank)} if size > 1 else env
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=rank_env, start_new_session=True)
            _LIVE.add(proc)
            peer.pgids.append(proc.pid)
            procs.append(proc)
        return procs

    def _stop_all(self) -> None:
        """SIGTERM every live peer (it saves and leaves), wait, then SIGKILL every group we made."""
        live = [p for p in self.peers if p.running]
        for peer in live:
            if peer.finished:  # a finished group's other ranks are exiting by themselves: a SIGTERM landing
                for proc in peer.ranks:  # while Python shuts down kills it (-15), so let them finish first
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=RANK_EXIT_GRACE_S)
            for proc in peer.procs:  # a group: every rank (they agree to stop after the same step)
                _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.spec.stop_timeout_s
        for peer in live:
            for proc in peer.procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for peer in self.peers:
            for pgid in peer.pgids:
                _killpg(pgid, signal.SIGKILL)
            for proc in peer.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # reap a rank that was still running (e.g. its rank 0 died since the poll)
                _LIVE.discard(proc)
            self._read_metrics(peer, quiet=True)  # the last rows, for events; no printing while stopping
            self._close_clock(peer)
            if peer in live:
                self._event("stop", peer, rc=peer.proc.returncode,
                            ranks_rc=[p.returncode for p in peer.ranks] if peer.ranks else None)
            if peer.log is not None:
                peer.log.close()
                peer.log = None
            for log in peer.rank_logs:
                log.close()
            peer.rank_logs = []

    # ---- events ---------------------------------------------------------------------------------
    def _event(self, event: str, peer: PeerState | None = None, **fields: Any) -> None:
        record: dict[str, Any] = {"t": round(self.elapsed, 3), "unix": round(time.time(), 3), "event": event}
        if peer is not None:
            record.update(peer=peer.name, pid=peer.proc.pid if peer.proc else None, step=peer.last_step)
        record.update({k: v for k, v in fields.items() if v is not None})
        if self._events is not None:
            self._events.write(json.dumps(record) + "\n")
            self._events.flush()

    def _stamp(self) -> str:
        return f"[{self.elapsed:7.1f}s]"


def run_simulation(
    spec_path: str | Path,
    run_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    peer_command: Sequence[str] = PEER_COMMAND,
    report: bool = True,
) -> Path:
    """Validate the spec, run it (and its alone-comparison when asked), write the report; returns the run dir."""
    spec = load_spec(spec_path)
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "events.jsonl").exists():
        raise SwarmError(f"{run_dir} already holds a simulation: choose another --run-dir")
    stop = stop or threading.Event()
    with _signals_set(stop):
        progress(f"simulating {spec.name}: {len(spec.peers)} peers, topology {spec.topology}, "
                 f"{spec.threads} thread(s) each -> {run_dir}")
        reason = Simulation(spec, run_dir, progress=progress, stop=stop, peer_command=peer_command).run()
        progress(f"{spec.name}: ended ({reason})")
        baseline = spec.baseline
        if spec.compare_alone and not stop.is_set():
            alone_dir = run_dir / "alone"
            progress(f"now the same peers alone (topology none) -> {alone_dir}")
            Simulation(spec.alone(), alone_dir, progress=progress, stop=stop, peer_command=peer_command).run()
            baseline = alone_dir
        if spec.compare_clean and not stop.is_set():
            clean_dir = run_dir / "clean"
            progress(f"now the same honest peers without the adversaries -> {clean_dir}")
            Simulation(spec.clean(), clean_dir, progress=progress, stop=stop, peer_command=peer_command).run()
            baseline = clean_dir
    if report:
        from p2pcod.report import write_report

        if baseline is not None and baseline.parent == run_dir and baseline.name in ("alone", "clean"):
            write_report(baseline)
        summary = write_report(run_dir, baseline=baseline)
        progress(f"report: {summary}")
    return run_dir


class _signals_set:
    """SIGINT/SIGTERM set `stop` (peers are stopped cleanly and the report written); a second one raises."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _signal(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a group's MASTER_PORT: rank 0's rendezvous store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exited(peer: PeerState) -> tuple[int, int | None]:
    """(rank, exit code) of the rank that ended the peer, or (0, None) while it runs. Rank 0's exit ends it;
    another rank ends its group only with a failure: after the group agreed to stop, ranks > 0 exit 0 first."""
    if peer.proc is None:
        return 0, None
    rc = peer.proc.poll()
    if rc is not None:
        return 0, rc
    for rank, proc in enumerate(peer.ranks, 1):
        rc = proc.poll()
        if rc is not None and rc != 0:
            return rank, rc
    return 0, None


def _kill_ranks(peer: PeerState) -> None:
    """SIGKILL the process group of every rank of the current incarnation (DHT process and daemon too) and reap."""
    for proc in peer.procs:
        _killpg(proc.pid, signal.SIGKILL)
    for proc in peer.procs:
        proc.wait()
        _LIVE.discard(proc)


def _pids(peer: PeerState) -> list[int] | None:
    """Every rank's pid, for the events of a group (None for a single process: its pid is the event's)."""
    return [p.pid for p in peer.procs] if peer.ranks else None


def _failure(peer: PeerState) -> tuple[str, int | None, Path]:
    """Who ended the peer, with which exit code, and its log."""
    if peer.failed_rank == 0 or peer.failed_rank > len(peer.ranks):
        return f"peer {peer.name}", peer.proc.returncode if peer.proc else None, peer.run_dir / "peer.log"
    rank = peer.failed_rank
    return (f"rank {rank} of peer {peer.name}", peer.ranks[rank - 1].returncode,
            peer.run_dir / "ranks" / f"rank{rank}" / "peer.log")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"
