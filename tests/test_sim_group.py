"""Peers that are groups under the simulator: `group_size` in a spec, N rank processes per peer, faults on groups.

The fake rank speaks the `p2pcod peer` command line and file protocol like tests/test_sim.py's fake peer, plus
the group's: it reads torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT), rank 0 waits for every rank
before it "joins" (the rendezvous), ranks > 0 leave once rank 0 has finished, and every rank has a child
process standing in for what a rank starts (rank 0's DHT process and daemon) that must die with it. The slow
test runs a real group of two ranks next to a real single peer.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from peerproc import RECIPE, group_alive, group_members, read_jsonl, tiny_spec_sets, write_spec
from peerproc import sim_events as events

from p2pcod import sim
from p2pcod.errors import ConfigError, SwarmError
from p2pcod.report import load_run
from p2pcod.simspec import load_spec, parse_spec

FAKE_RANK = textwrap.dedent('''
    import argparse, json, os, signal, subprocess, sys, time, tomllib
    from pathlib import Path
    from p2pcod.config import apply_overrides

    ap = argparse.ArgumentParser()
    for flag in ("--config", "--name", "--swarm", "--run-dir", "--shard", "--control"):
        ap.add_argument(flag)
    for flag in ("--join", "--listen", "--set"):
        ap.add_argument(flag, action="append", default=[])
    ap.add_argument("--linger", type=float, default=0.0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    raw = tomllib.loads(Path(args.config).read_text())
    apply_overrides(raw, args.set)
    t = raw["train"]
    run = Path(args.run_dir)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    begun = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

    def note(**fields):
        with (run / "ranks.jsonl").open("a") as f:
            f.write(json.dumps({"rank": rank, "pid": os.getpid(), "t": time.time(), **fields}) + "\\n")

    def rank0_step():
        try:
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        except (FileNotFoundError, ValueError):
            return None, False
        rows = [r for r in rows if r["time"] >= 0 and r.get("unix", 0) >= begun - 1]
        return (rows[-1]["step"], bool(rows[-1].get("final"))) if rows else (None, False)

    run.mkdir(parents=True, exist_ok=True)
    note(world=world, port=os.environ.get("MASTER_PORT"), child=child.pid, omp=os.environ.get("OMP_NUM_THREADS"),
         resume=args.resume, sets=args.set)
    crash = os.environ.get("FAKE_CRASH_AT_STEP")
    if rank > 0:
        if crash == "0":
            print(f"rank {rank}: crashing before the rendezvous", file=sys.stderr, flush=True)
            sys.exit(3)
        (run / f"rank{rank}.tmp").write_text(str(begun))  # atomically: rank 0 may be reading it right now
        os.replace(run / f"rank{rank}.tmp", run / f"rank{rank}.ready")
        while not stop:
            step, final = rank0_step()
            if final:
                break
            if crash and step is not None and step >= int(crash):
                print(f"rank {rank}: crashing at step {step}", file=sys.stderr, flush=True)
                sys.exit(3)
            time.sleep(0.03)
        note(exit="sigterm" if stop else "done")
        child.kill()
        sys.exit(0)
    # rank 0: the rendezvous with the other ranks of this incarnation, then the swarm member of test_sim's fake
    while any(not (run / f"rank{r}.ready").exists() or float((run / f"rank{r}.ready").read_text()) < begun - 5
              for r in range(1, world)):
        time.sleep(0.03)
    ckpt = run / "checkpoint.ckpt"
    def save(path, obj):  # atomic, as the real checkpoint writer: a SIGKILL must not leave half a file
        (path.parent / (path.name + ".tmp")).write_text(json.dumps(obj))
        os.replace(path.parent / (path.name + ".tmp"), path)
    step, resumed = 0, None
    if args.resume and ckpt.exists():
        step = resumed = json.loads(ckpt.read_text())["step"]
    info = {"name": args.name, "peer_id": "fake" + args.name, "resumed_from": resumed, "time": time.time(),
            "maddrs": ["/ip4/127.0.0.1/tcp/1/p2p/fake" + args.name], "params": 1000, "group_size": world}
    (run / "peer.json").write_text(json.dumps(info))
    metrics = (run / "metrics.jsonl").open("a")
    start = time.time()
    def log(val, **extra):
        row = {"step": step, "time": time.time() - start, "unix": time.time(), "train_loss": 1.0, "teachers": 1}
        if val:
            row["val_loss"] = 5.0 / (1 + step / 10)
        cut = Path(args.control)
        if cut.exists() and json.loads(cut.read_text()).get("cut_off_until", 0) > time.time():
            row["cut"], row["teachers"] = True, 0
        metrics.write(json.dumps({**row, **extra}) + "\\n")
        metrics.flush()
    control = Path(args.control)
    while not stop and control.exists() and json.loads(control.read_text()).get("hold"):  # the start barrier
        time.sleep(0.02)
    log(True, **({"resumed_from": resumed} if resumed is not None else {}))
    while step < t["steps"] and not stop:
        time.sleep(0.03)
        step += 1
        if step % t["log_every"] == 0 or step == t["steps"]:
            log(step % t["eval_every"] == 0)
        if step % t["checkpoint_every"] == 0:
            save(ckpt, {"step": step})
    save(ckpt, {"step": step})
    log(True, final=True)
    note(exit="sigterm" if stop else "done")
    end = time.time() + args.linger
    while time.time() < end and not stop:
        time.sleep(0.05)
    child.kill()
''')

BASIC = """
[swarm]
recipe = "RECIPE"
peers = 2
topology = "full"
steps = 60
threads = 1
[swarm.set.train]
log_every = 5
eval_every = 10
checkpoint_every = 10
[[peer]]
index = 1
name = "grp"
group_size = 2
"""


@pytest.fixture()
def fake_rank(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake_rank.py"
    path.write_text(FAKE_RANK)
    return [sys.executable, str(path)]


def notes(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "peers" / name / "ranks.jsonl").read_text().splitlines()]


def assert_all_gone(simulation: sim.Simulation) -> None:
    assert simulation.pgids, "no process groups recorded"
    leftovers = [g for g in simulation.pgids if group_alive(g)]
    assert leftovers == [], f"process groups left behind: {leftovers}"
    assert sim._LIVE == set()


# ---- spec -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ("group_size = 0", "peer[1].group_size = 0: a peer runs as 1 to 16 rank processes"),
    ("group_size = -2", "peer[1].group_size = -2"),
    ("group_size = 17", "peer[1].group_size = 17"),
    ("group_size = 2.0", "peer[1].group_size must be an integer"),
    ("group_size = true", "peer[1].group_size must be an integer"),
    ("group_size = '2'", "peer[1].group_size must be an integer"),
])
def test_bad_group_size_names_the_key(tmp_path, extra, message):
    body = BASIC.replace("group_size = 2", extra)
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, body))
    assert message in str(err.value)


def test_group_size_defaults_swarm_level_and_threads(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASIC.replace("threads = 1\n", "")), cores=8)
    assert [p.group_size for p in spec.peers] == [1, 2]
    assert spec.threads == 2  # 8 cores // 3 rank processes in all
    assert all(p.recipe_cfg.train.threads == 2 for p in spec.peers)
    assert [p.group_size for p in spec.alone().peers] == [1, 2]  # the comparison run keeps the groups
    swarm_default = BASIC.replace("threads = 1\n", "group_size = 3\n")
    spec = load_spec(write_spec(tmp_path, swarm_default), cores=16)
    assert [p.group_size for p in spec.peers] == [3, 2] and spec.threads == 3  # the peer's own key wins
    with pytest.raises(ConfigError, match="swarm.group_size = 0"):
        load_spec(write_spec(tmp_path, BASIC.replace("threads = 1\n", "group_size = 0\n")))
    with pytest.raises(ConfigError, match="swarm.group_size must be an integer"):
        load_spec(write_spec(tmp_path, BASIC.replace("threads = 1\n", "group_size = 'two'\n")))


def test_combinations_that_cannot_work_are_rejected(tmp_path, monkeypatch):
    many = BASIC.replace("peers = 2", "peers = 40").replace("threads = 1\n", "threads = 1\ngroup_size = 2\n")
    with pytest.raises(ConfigError, match="the peers run as 80 rank processes in all; at most 64"):
        load_spec(write_spec(tmp_path, many))
    # on a machine with GPUs the ranks run with --device auto, one GPU each (NCCL): a group needs that many
    from p2pcod import simspec

    monkeypatch.setattr(simspec, "_cuda_devices", lambda: 1)
    with pytest.raises(ConfigError, match=r"peer\[1\].group_size = 2: .* 1 GPU\(s\) are visible"):
        load_spec(write_spec(tmp_path, BASIC))
    monkeypatch.setattr(simspec, "_cuda_devices", lambda: 2)
    assert load_spec(write_spec(tmp_path, BASIC)).peers[1].group_size == 2
    calls = []
    monkeypatch.setattr(simspec, "_cuda_devices", lambda: calls.append(1) or 1)
    load_spec(write_spec(tmp_path, BASIC.replace("group_size = 2", "group_size = 1")))
    assert calls == []  # no group, no question asked (no torch import)
    with pytest.raises(ConfigError, match="unknown key peer"):
        parse_spec({"swarm": {"peers": 1, "recipe": str(RECIPE)}, "peer": [{"index": 0, "groupsize": 2}]},
                   tmp_path / "x.toml")


# ---- orchestration with fake ranks ----------------------------------------------------------------------
def test_group_ranks_start_with_torchrun_env_and_die_together_on_kill(tmp_path, fake_rank):
    spec = load_spec(write_spec(tmp_path, BASIC + "upload_mbit = 0.5\n" + textwrap.dedent("""
        [[fault]]
        kind = "cut"
        peer = 1
        at_step = 10
        duration_s = 0.6
        [[fault]]
        kind = "kill"
        peer = 1
        at_step = 25
        [[fault]]
        kind = "restart"
        peer = 1
        after_s = 0.5
    """)))
    run_dir = tmp_path / "run"
    at_kill: list[list[int]] = []
    holder: list[sim.Simulation] = []

    def progress(line: str) -> None:
        if "KILLED" in line:  # the kill has returned: every rank of the group and its child must be gone now
            group = holder[0].peers[1]
            at_kill.append([pid for pgid in group.pgids for pid in group_members(pgid)])
            at_kill.append([p.pid for p in holder[0].peers[0].procs if p.poll() is None])

    simulation = sim.Simulation(spec, run_dir, progress=progress, peer_command=fake_rank, poll_s=0.1)
    holder.append(simulation)
    try:
        assert simulation.run() == "steps"
    finally:
        assert_all_gone(simulation)
    assert at_kill and at_kill[0] == [] and len(at_kill[1]) == 1  # the group is gone; p0 lives on
    ev = events(run_dir)
    starts = [e for e in ev if e["event"] in ("start", "restart") and e["peer"] == "grp"]
    assert [e["event"] for e in starts] == ["start", "restart"]
    assert all(len(e["pids"]) == 2 and e["pid"] == e["pids"][0] for e in starts)
    kill = next(e for e in ev if e["event"] == "kill")
    assert kill["peer"] == "grp" and kill["pids"] == starts[0]["pids"] and kill["step"] >= 25
    assert sorted(simulation.pgids) == sorted([next(e["pid"] for e in ev if e["event"] == "start"
                                                    and e["peer"] == "p0")] + starts[0]["pids"] + starts[1]["pids"])
    assert [e.get("group_size") for e in ev if e["event"] == "joined"] == [1, 2, 2], "\n".join(map(str, ev))
    # torchrun's environment: one world of 2 per incarnation, its own MASTER_PORT, threads per rank
    lives = [[n for n in notes(run_dir, "grp") if "world" in n and n["pid"] in e["pids"]] for e in starts]
    for life, e in zip(lives, starts, strict=True):
        assert sorted(n["rank"] for n in life) == [0, 1] and {n["world"] for n in life} == {2}
        assert len({n["port"] for n in life}) == 1 and int(life[0]["port"]) > 0
        assert {n["omp"] for n in life} == {"1"} and {n["resume"] for n in life} == {e["event"] == "restart"}
        # the same recipe for every rank: the caps take effect in rank 0, the only one with a Session
        assert all("exchange.upload_mbit=0.5" in n["sets"] for n in life)
    p0_env = [n for n in notes(run_dir, "p0") if "world" in n]
    assert p0_env[0]["world"] == 1 and p0_env[0]["port"] is None  # a single peer gets no group environment
    # the first incarnation died by SIGKILL (no exit note); the second ended as a group: rank 1 after rank 0
    exits = {(n["pid"], n["exit"]) for n in notes(run_dir, "grp") if "exit" in n}
    assert {pid for pid, _ in exits} == set(starts[1]["pids"])
    # rank 0 is the swarm member: cut via its control file, resumed from its checkpoint, read for the report
    rows = load_run(run_dir).peers["grp"].rows
    assert any(r.get("cut") for r in rows)
    resumed = [r["resumed_from"] for r in rows if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and kill["step"] - 10 <= resumed[0] <= kill["step"]
    assert rows[-1]["final"] and rows[-1]["step"] == 60
    assert (run_dir / "peers/grp/ranks/rank1/peer.log").read_text().count("==== p2pcod sim: incarnation") == 2
    stop = next(e for e in ev if e["event"] == "stop" and e["peer"] == "grp")
    assert stop["rc"] == 0 and stop["ranks_rc"] == [0]
    assert not [e for e in ev if e["event"] == "exit"]


def test_sigterm_stops_every_rank_of_a_held_group(tmp_path, fake_rank):
    """A budget stop: every rank gets SIGTERM (the fake notes it) and exits 0; a group of 3 this time."""
    body = BASIC.replace("steps = 60", "steps = 5000\nbudget_s = 2.0").replace("group_size = 2", "group_size = 3")
    simulation = sim.Simulation(load_spec(write_spec(tmp_path, body)), tmp_path / "run", progress=lambda s: None,
                                peer_command=fake_rank, poll_s=0.1)
    try:
        assert simulation.run() == "budget"
    finally:
        assert_all_gone(simulation)
    ev = events(tmp_path / "run")
    go = next(e for e in ev if e["event"] == "go")
    assert go["held"] == {"p0": 0, "grp": 0}
    stop = next(e for e in ev if e["event"] == "stop" and e["peer"] == "grp")
    assert stop["rc"] == 0 and stop["ranks_rc"] == [0, 0]
    exits = sorted((n["rank"], n["exit"]) for n in notes(tmp_path / "run", "grp") if "exit" in n)
    assert exits == [(0, "sigterm"), (1, "sigterm"), (2, "sigterm")]
    assert len(simulation.pgids) == 4


def test_a_dead_rank_ends_its_group_and_is_reported(tmp_path, fake_rank, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH_AT_STEP", "20")  # rank 1 exits with code 3 once rank 0 logged step 20
    lines: list[str] = []
    simulation = sim.Simulation(load_spec(write_spec(tmp_path, BASIC)), tmp_path / "run", progress=lines.append,
                                peer_command=fake_rank, poll_s=0.1)
    try:
        assert simulation.run() == "steps"  # p0 trains to the end without the group
    finally:
        assert_all_gone(simulation)
    ev = events(tmp_path / "run")
    (exit_,) = [e for e in ev if e["event"] == "exit"]
    assert exit_["peer"] == "grp" and exit_["rank"] == 1 and exit_["rc"] == 3 and exit_["unexpected"]
    assert exit_["ranks_rc"][1] == 3
    assert any("rank 1 of peer grp: the whole group is stopped" in x and "crashing at step" in x for x in lines)
    rows = load_run(tmp_path / "run").peers
    assert not rows["grp"].rows[-1].get("final") and rows["grp"].final_step < 60  # rank 0 was killed with it
    assert rows["p0"].rows[-1]["final"] and rows["p0"].final_step == 60


def test_a_rank_that_dies_before_the_rendezvous_fails_the_start(tmp_path, fake_rank, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH_AT_STEP", "0")
    simulation = sim.Simulation(load_spec(write_spec(tmp_path, BASIC)), tmp_path / "run", progress=lambda s: None,
                                peer_command=fake_rank, poll_s=0.1)
    try:
        with pytest.raises(SwarmError, match="rank 1 of peer grp exited with code 3 before joining(.|\n)*"
                                             "crashing before the rendezvous"):
            simulation.run()
    finally:
        assert_all_gone(simulation)


# ---- real peers ---------------------------------------------------------------------------------------
CHECKPOINT_EVERY = 10
DEADLINE_S = 240  # the run's budget if the properties never show (the test then says what is missing)
REAL = f"""
[swarm]
recipe = "{RECIPE}"
peers = 2
topology = "full"
steps = 100000
threads = 1
budget_s = {DEADLINE_S}
startup_timeout_s = 120
stop_timeout_s = 30
{tiny_spec_sets(train={"checkpoint_every": CHECKPOINT_EVERY})}
[[peer]]
index = 1
name = "grp"
group_size = 2
[[fault]]
kind = "kill"
peer = 1
at_step = 40
[[fault]]
kind = "restart"
peer = 1
after_s = 0.5
"""


def _missing(run_dir: Path) -> str | None:
    """What the run has not shown yet (None: everything the test checks has happened)."""
    try:
        ev = events(run_dir)
    except FileNotFoundError:
        return "no events yet"
    back = [e for e in ev if e["event"] == "joined" and e["peer"] == "grp" and e.get("resumed_from") is not None]
    if not back:
        return "the group has not come back from its kill"
    rows = read_jsonl(run_dir / "peers/grp/metrics.jsonl")
    resumed = back[0]["resumed_from"]
    after = [r for r in rows if r["step"] > resumed and "p0" in (r.get("staleness") or {})]
    if not rows or rows[-1]["step"] < resumed + 15 or not after:
        return "the group has not trained 15 steps with p0 as a teacher since its restart"
    if not any("grp" in (r.get("staleness") or {}) for r in read_jsonl(run_dir / "peers/p0/metrics.jsonl")):
        return "p0 has not had the group as a teacher"
    return None


def _real_peers_available() -> bool:
    try:
        from p2pcod.tasks import get_task  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _real_peers_available(), reason="p2pcod.tasks is not there")
def test_real_group_is_killed_restarted_and_distils_from_a_single_peer(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PCOD_GROUP_DEBUG", "1")  # every rank logs the digest of its weights after every step
    spec_path = tmp_path / "group.toml"
    spec_path.write_text(REAL)
    run_dir = tmp_path / "run"
    stop = threading.Event()
    simulation = sim.Simulation(load_spec(spec_path), run_dir, progress=lambda s: None, poll_s=0.2, stop=stop)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["reason"] = simulation.run()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=target, name="group-sim", daemon=True)
    thread.start()
    try:
        while thread.is_alive() and _missing(run_dir) is not None:
            time.sleep(0.5)
    finally:
        stop.set()  # SIGTERM to every rank of every peer, then SIGKILL for every process group
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert_all_gone(simulation)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    assert outcome["reason"] == "stopped", _missing(run_dir)
    ev = events(run_dir)
    assert len(simulation.pgids) == 1 + 2 + 2  # p0, and both ranks of both lives of the group
    kill = next(e for e in ev if e["event"] == "kill")
    restart = next(e for e in ev if e["event"] == "restart")
    assert kill["peer"] == restart["peer"] == "grp" and len(kill["pids"]) == len(restart["pids"]) == 2
    assert set(kill["pids"]).isdisjoint(restart["pids"])
    joins = [e for e in ev if e["event"] == "joined" and e["peer"] == "grp"]
    assert len(joins) == 2 and joins[0]["peer_id"] == joins[1]["peer_id"] and {e["group_size"] for e in joins} == {2}
    assert [e["peer"] for e in ev if e["event"] == "exit"] == []  # no rank died on its own
    # resumed from rank 0's last checkpoint: at most checkpoint_every steps lost
    resumed = joins[1]["resumed_from"]
    assert resumed % CHECKPOINT_EVERY == 0 and 0 <= kill["step"] - resumed <= CHECKPOINT_EVERY, (kill, resumed)
    rows = read_jsonl(run_dir / "peers/grp/metrics.jsonl")
    first = next(r for r in rows if "resumed_from" in r)
    assert first["step"] == first["resumed_from"] == resumed
    # the group (rank 0, the swarm member) fetched p0's checkpoints and distilled from them
    taught = [r for r in rows if r["step"] > resumed and "p0" in (r.get("staleness") or {})]
    assert taught and taught[-1]["fetch_ok"] >= 1 and taught[-1]["bytes_in"] > 0
    assert any(r.get("distill_loss", 0) > 0 for r in taught)
    assert any("grp" in (r.get("staleness") or {}) for r in read_jsonl(run_dir / "peers/p0/metrics.jsonl"))
    # rank 1 trained in both lives, in step with rank 0 (same weights, same teachers) after the restart
    rank1 = read_jsonl(run_dir / "peers/grp/ranks/rank1/metrics.jsonl")
    assert rank1 and {r["rank"] for r in rank1} == {1} and max(r["step"] for r in rank1) > resumed + 10
    debug = [{r["step"]: r for r in read_jsonl(run_dir / f"peers/grp/group-debug/rank{k}.jsonl")} for k in (0, 1)]
    after = sorted(s for s in set(debug[0]) & set(debug[1]) if s > resumed)
    assert len(after) >= 10
    for s in after:
        assert debug[0][s]["digest"] == debug[1][s]["digest"] and debug[0][s]["teachers"] == debug[1][s]["teachers"]
    assert any(debug[0][s]["teachers"] for s in after)
    # SIGTERM to both ranks: the group stopped after one step, saved, and left with code 0
    stop_ev = next(e for e in ev if e["event"] == "stop" and e["peer"] == "grp")
    assert stop_ev["rc"] == 0 and stop_ev["ranks_rc"] == [0], stop_ev
    assert rows[-1].get("final") and max(debug[0]) == max(debug[1])
