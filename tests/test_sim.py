"""The simulator: spec validation, process orchestration (against a fake peer), faults, clean-up.

The fake peer speaks the `p2pcod peer` command line and file protocol (peer.json, metrics.jsonl,
checkpoint, --resume, --control, SIGTERM) in a few lines, with a child process standing in for the DHT
daemon, so orchestration is tested in seconds. Tests marked `slow` run real peers (they need the tasks).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from peerproc import group_alive, write_spec
from peerproc import sim_events as events

from p2pcod import sim
from p2pcod.errors import ConfigError
from p2pcod.report import load_run
from p2pcod.simspec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

FAKE_PEER = textwrap.dedent('''
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
    t, x = raw["train"], raw.get("exchange", {})
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    # stands in for the DHT process / p2pd daemon: the simulator must kill it with the group
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    ckpt = run / "checkpoint.ckpt"
    def save(path, obj):  # atomic, as the real checkpoint writer: a SIGKILL must not leave half a file
        (path.parent / (path.name + ".tmp")).write_text(json.dumps(obj))
        os.replace(path.parent / (path.name + ".tmp"), path)
    step, resumed = 0, None
    if args.resume and ckpt.exists():
        step = resumed = json.loads(ckpt.read_text())["step"]
    info = {"name": args.name, "swarm": args.swarm, "peer_id": "fake" + args.name, "resumed_from": resumed,
            "maddrs": ["/ip4/127.0.0.1/tcp/1/p2p/fake" + args.name], "time": time.time(), "params": 1000,
            "join": args.join, "threads": t.get("threads"), "topology": x.get("topology")}
    (run / "peer.json").write_text(json.dumps(info))
    metrics = (run / "metrics.jsonl").open("a")
    start = time.time()
    def log(val, **extra):
        row = {"step": step, "time": time.time() - start, "train_loss": 1.0, "teachers": 1,
               "staleness": {"x": 3}, "bytes_in": 100 * step, "bytes_out": 200 * step}
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
    end = time.time() + args.linger
    while time.time() < end and not stop:
        time.sleep(0.05)
    child.kill()
''')


@pytest.fixture()
def fake_peer(tmp_path: Path) -> list[str]:
    path = tmp_path / "fake_peer.py"
    path.write_text(FAKE_PEER)
    return [sys.executable, str(path)]


BASIC = """
[swarm]
recipe = "RECIPE"
peers = 3
topology = "ring"
steps = 40
threads = 1
[swarm.set.train]
log_every = 5
eval_every = 10
checkpoint_every = 10
"""


def assert_no_processes(simulation: sim.Simulation | None, run_dir: Path) -> None:
    found = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert found == [], f"processes left behind: {found}"
    for pgid in simulation.pgids if simulation else []:
        assert not group_alive(pgid), f"process group {pgid} still has members"


# ---- spec validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ("[swarm]\nbogus = 1", "unknown key swarm.bogus"),
    ("[[fault]]\nkind = 'kill'\npeer = 7\nat_step = 5", "fault[0].peer = 7 but the swarm has 3 peers"),
    ("[[fault]]\nkind = 'kill'\npeer = 1\nat_step = 500", "fault[0].at_step = 500 is outside"),
    ("[[fault]]\nkind = 'explode'\npeer = 1\nat_step = 5", "fault[0].kind = 'explode'"),
    ("[[fault]]\nkind = 'restart'\npeer = 1\nafter_s = 1", "restart of peer 1 without an earlier kill"),
    ("[[fault]]\nkind = 'cut'\npeer = 1\nat_step = 5", "a cut needs a duration"),
    ("[[fault]]\nkind = 'kill'\npeer = 1\nat_step = 5\nat_s = 3", "needs exactly one of"),
    ("[[fault]]\nkind = 'join'\npeer = 0\nat_s = 3", "peer 0 bootstraps"),
    ("[[fault]]\nkind = 'kill'\npeer = 1\nat_step = 5\nwhen = 3", "unknown key fault[0].when"),
    ("[[peer]]\nindex = 3", "peer[0].index = 3 but the swarm has 3 peers"),
    ("[[peer]]\nindex = 1\nname = 'bad name'", "peer[1].name"),
    ("[[peer]]\nindex = 1\nset = {train = {stepz = 3}}", "unknown key train.stepz"),
    ("[[peer]]\nindex = 1\nset = {nonsense = {a = 3}}", "peer[1].set.nonsense"),
    ("[[peer]]\nindex = 1\nupload_mbit = -1.0", "peer[1].upload_mbit"),
    ("[[peer]]\nindex = 1\nrecipe = 'peers/nope.toml'", "peer[1].recipe = 'peers/nope.toml': no such file"),
    ("[[peer]]\nindex = 1\nset = {task = {poison = 'evil'}}", "task.poison must be one of"),
    ("[[peer]]\nindex = 1\nset = {model = {widht = 96}}", "peer p1: unknown key model.widht (known keys of model:"),
    ("[[peer]]\nindex = 2\nset = {model = {width = 30}}", "model.width (30) must be divisible by model.heads (4)"),
    ("[swarm.set.model]\nlayers = 100000", "model.layers = 100000 exceeds the maximum 256"),
    ("[[peer]]\nindex = 1\nset = {task = {seq_len = 4096}}", "model.context (64) must be >= task.seq_len (4096)"),
])
def test_bad_spec_names_the_key_and_starts_nothing(tmp_path, monkeypatch, extra, message):
    body = BASIC.replace("[swarm]", extra, 1) if extra.startswith("[swarm]") else BASIC + extra
    spec = write_spec(tmp_path, body)
    started = []
    monkeypatch.setattr(sim.subprocess, "Popen", lambda *a, **k: started.append(a))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        sim.run_simulation(spec, run_dir, progress=lambda s: None)
    assert message in str(err.value)
    assert started == [] and not run_dir.exists()


def test_spec_bad_topology_and_split(tmp_path):
    with pytest.raises(ConfigError, match="topology"):
        load_spec(write_spec(tmp_path, BASIC.replace('"ring"', '"star"')))
    with pytest.raises(ConfigError, match="train.split"):
        load_spec(write_spec(tmp_path, BASIC.replace('topology = "ring"', 'split = "sideways"')))


def test_spec_defaults_threads_and_per_peer_overrides(tmp_path):
    body = BASIC.replace("threads = 1\n", "upload_mbit = 2\n") + textwrap.dedent("""
        [[peer]]
        index = 2
        name = "wide"
        download_mbit = 1.5
        latency_ms = 40
        set = { model = { width = 96 } }
    """)
    spec = load_spec(write_spec(tmp_path, body), cores=8)
    assert spec.threads == 2  # 8 cores // 3 peers
    assert [p.name for p in spec.peers] == ["p0", "p1", "wide"]
    wide = spec.peers[2].recipe_cfg
    assert wide.model["width"] == 96 and wide.exchange.download_mbit == 1.5 and wide.exchange.latency_ms == 40
    assert wide.exchange.upload_mbit == 2.0 and spec.peers[0].recipe_cfg.exchange.download_mbit == 0.0
    assert spec.peers[0].recipe_cfg.model["width"] == 64
    assert all(p.recipe_cfg.train.steps == 40 and p.recipe_cfg.exchange.topology == "ring" for p in spec.peers)
    assert all(p.recipe_cfg.train.threads == 2 for p in spec.peers)
    assert spec.alone().peers[2].recipe_cfg.exchange.topology == "none"


def test_the_alone_comparison_of_an_edges_spec_drops_the_edges(tmp_path):
    body = BASIC.replace('topology = "ring"', 'topology = "edges"\ncompare_alone = true') + textwrap.dedent("""
        [swarm.set.exchange]
        edges = [["p0", "p1"], ["p1", "p2"]]
    """)
    spec = load_spec(write_spec(tmp_path, body))
    assert spec.peers[0].recipe_cfg.exchange.edges
    alone = spec.alone()
    assert all(p.recipe_cfg.exchange.topology == "none" and not p.recipe_cfg.exchange.edges for p in alone.peers)
    assert all("exchange.edges=[]" in p.overrides for p in alone.peers)  # what the alone peers are started with


def test_shipped_topologies_are_valid():
    specs = sorted((ROOT / "topologies").glob("*.toml"))
    names = {p.stem for p in specs}
    assert {"independent-4", "full-2", "ring-4", "full-4", "exponential-8", "faults-4", "hetero-3",
            "federated-4", "demo-3"} <= names
    for path in specs:
        spec = load_spec(path, cores=2)
        assert spec.threads >= 1 and spec.steps > 0
    fed = load_spec(ROOT / "topologies" / "federated-4.toml")
    assert fed.compare_alone
    assert all(p.recipe_cfg.exchange.upload_mbit == 1.0 == p.recipe_cfg.exchange.download_mbit for p in fed.peers)
    assert all(p.recipe_cfg.train.split == "noniid" for p in fed.peers)
    kinds = {f.kind for f in load_spec(ROOT / "topologies" / "faults-4.toml").faults}
    assert kinds == {"kill", "restart", "join", "cut"}
    assert [p.group_size for p in load_spec(ROOT / "topologies" / "group-3.toml").peers] == [1, 2, 1]


def test_parse_spec_rejects_missing_swarm(tmp_path):
    with pytest.raises(ConfigError, match=r"\[swarm\]"):
        parse_spec({"peer": []}, tmp_path / "x.toml")


# ---- orchestration with the fake peer ------------------------------------------------------------
def test_three_peers_run_to_the_end_with_metrics_and_report(tmp_path, fake_peer):
    lines: list[str] = []
    run_dir = tmp_path / "run"
    out = sim.run_simulation(write_spec(tmp_path, BASIC), run_dir, progress=lines.append, peer_command=fake_peer)
    assert out == run_dir
    ev = events(run_dir)
    assert [e["peer"] for e in ev if e["event"] == "start"] == ["p0", "p1", "p2"]
    assert ev[-1] == {**ev[-1], "event": "sim_end", "reason": "steps"}
    go = next(e for e in ev if e["event"] == "go")  # the start barrier: nobody trained ahead of the others
    assert go["held"] == {"p0": 0, "p1": 0, "p2": 0}  # held by their control files before their first step
    clocks = [e for e in ev if e["event"] == "clock"]
    assert sorted(e["peer"] for e in clocks) == ["p0", "p1", "p2"]
    assert all(0 <= e["origin_t"] <= go["t"] for e in clocks)  # each metrics clock started before the go
    for name in ("p0", "p1", "p2"):
        info = json.loads((run_dir / "peers" / name / "peer.json").read_text())
        assert info["threads"] == 1 and info["topology"] == "ring"
        if name != "p0":
            assert info["join"] == ["/ip4/127.0.0.1/tcp/1/p2p/fakep0"]  # joined the bootstrap peer
        rows = [json.loads(x) for x in (run_dir / "peers" / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["final"] and rows[-1]["step"] == 40
        assert (run_dir / "peers" / name / "peer.log").exists()
    # one progress line per peer per evaluation (steps 0, 10, 20, 30, 40; the final repeat is not shown)
    assert sum(" p1 " in x and " val " in x for x in lines) == 5
    assert (run_dir / "spec.toml").exists()
    for png in ("loss.png", "bytes.png", "staleness.png"):
        assert (run_dir / png).stat().st_size > 10_000
    summary = (run_dir / "summary.md").read_text()
    assert "| p2 | 40 |" in summary
    simulation_pgids = [e["pid"] for e in ev if e["event"] == "start"]
    assert not any(group_alive(pgid) for pgid in simulation_pgids)
    assert_no_processes(None, run_dir)


def test_faults_kill_restart_join_cut(tmp_path, fake_peer):
    spec = load_spec(write_spec(tmp_path, BASIC.replace("steps = 40", "steps = 60") + textwrap.dedent("""
        [[fault]]
        kind = "kill"
        peer = 1
        at_step = 25
        [[fault]]
        kind = "restart"
        peer = 1
        after_s = 0.5
        [[fault]]
        kind = "join"
        peer = 2
        at_step = 15
        [[fault]]
        kind = "cut"
        peer = 0
        at_step = 20
        duration_s = 0.6
    """)))
    run_dir = tmp_path / "run"
    simulation = sim.Simulation(spec, run_dir, progress=lambda s: None, peer_command=fake_peer, poll_s=0.1)
    assert simulation.run() == "steps"
    ev = events(run_dir)
    by = {k: [e for e in ev if e["event"] == k] for k in ("start", "kill", "restart", "cut", "heal", "joined")}
    kill, restart = by["kill"][0], by["restart"][0]
    assert kill["peer"] == restart["peer"] == "p1" and kill["step"] >= 25
    assert restart["pid"] != kill["pid"] and restart["t"] >= kill["t"] + 0.5
    rows = [json.loads(x) for x in (run_dir / "peers/p1/metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if "resumed_from" in r]
    # from its last checkpoint (every 10 steps); the kill may land between a step's metrics line and its save
    assert len(resumed) == 1 and resumed[0]["resumed_from"] % 10 == 0
    assert kill["step"] - 10 <= resumed[0]["resumed_from"] <= kill["step"] + 5
    assert rows[-1]["final"] and rows[-1]["step"] == 60
    rejoined = [e for e in by["joined"] if e["peer"] == "p1"]
    assert rejoined[-1]["resumed_from"] == resumed[0]["resumed_from"]
    late = next(e for e in by["start"] if e["peer"] == "p2")
    assert late["late"] and late["t"] > by["start"][0]["t"]
    p0_steps_at_join = [r["step"] for r in load_run(run_dir).peers["p0"].rows]
    assert max(p0_steps_at_join) == 60
    assert by["cut"][0]["peer"] == "p0" and by["heal"][0]["t"] >= by["cut"][0]["t"] + 0.6
    p0 = [json.loads(x) for x in (run_dir / "peers/p0/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("cut") for r in p0) and not p0[-1].get("cut")  # the control file took effect, then expired
    from p2pcod.report import write_report

    summary = write_report(run_dir).read_text()
    assert f"resumed at step {resumed[0]['resumed_from']} from its checkpoint" in summary
    assert "**p2** joined late" in summary and "**p0** cut off" in summary
    assert_no_processes(simulation, run_dir)


def test_budget_stops_every_peer_and_its_children(tmp_path, fake_peer):
    spec = load_spec(write_spec(tmp_path, BASIC.replace("steps = 40", "steps = 5000\nbudget_s = 2.0")))
    run_dir = tmp_path / "run"
    simulation = sim.Simulation(spec, run_dir, progress=lambda s: None, peer_command=fake_peer, poll_s=0.1)
    t0 = time.monotonic()
    assert simulation.run() == "budget"
    assert time.monotonic() - t0 < 20
    stops = [e for e in events(run_dir) if e["event"] == "stop"]
    assert len(stops) == 3 and all(e["rc"] == 0 for e in stops)  # SIGTERM: the peers saved and left
    for name in ("p0", "p1", "p2"):
        last = json.loads((run_dir / "peers" / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["final"] and 0 < last["step"] < 5000
    assert_no_processes(simulation, run_dir)


def test_stop_event_and_exceptions_leave_nothing(tmp_path, fake_peer):
    spec = load_spec(write_spec(tmp_path, BASIC.replace("steps = 40", "steps = 5000")))
    run_dir = tmp_path / "run"
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if sum(" val " in x for x in lines) >= 4:
            raise RuntimeError("boom")  # an error inside the loop must still stop every peer

    simulation = sim.Simulation(spec, run_dir, progress=progress, peer_command=fake_peer, poll_s=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        simulation.run()
    assert events(run_dir)[-1]["event"] == "sim_end"
    assert_no_processes(simulation, run_dir)
    assert sim._LIVE == set()


def test_sigterm_to_the_simulator_stops_cleanly(tmp_path, fake_peer):
    spec = write_spec(tmp_path, BASIC.replace("steps = 40", "steps = 5000"))
    run_dir = tmp_path / "run"
    code = (f"import sys; from p2pcod.sim import run_simulation; "
            f"run_simulation({str(spec)!r}, {str(run_dir)!r}, peer_command={fake_peer!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (run_dir / "peers/p2/metrics.jsonl").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert events(run_dir)[-1]["reason"] == "stopped"
    assert (run_dir / "summary.md").exists()
    assert_no_processes(None, run_dir)


def test_a_crashing_peer_is_reported(tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys; print('no such task: boom', file=sys.stderr); sys.exit(3)\n")
    spec = load_spec(write_spec(tmp_path, BASIC))
    simulation = sim.Simulation(spec, tmp_path / "run", progress=lambda s: None,
                                peer_command=[sys.executable, str(crash)], poll_s=0.05)
    with pytest.raises(sim.SwarmError, match="no such task: boom"):
        simulation.run()
    assert_no_processes(simulation, tmp_path / "run")


# ---- real peers -----------------------------------------------------------------------------------
REAL = """
[swarm]
recipe = "RECIPE"
peers = 3
topology = "ring"
steps = 120
threads = 1
budget_s = 400
[swarm.set.train]
log_every = 1
eval_every = 40
checkpoint_every = 10
[swarm.set.exchange]
reload_every = 5
[swarm.set.distill]
burn_in = 5
[[peer]]
index = 0
set = { train = { batch_size = 128 } }  # slower steps: p0 trains long enough to receive p2's capped uploads
[[peer]]
index = 2
upload_mbit = 0.2
set = { train = { batch_size = 128 } }  # slower steps: p2 publishes long enough for several capped uploads
[[fault]]
kind = "kill"
peer = 1
at_step = 20
[[fault]]
kind = "restart"
peer = 1
after_s = 1
"""


def _real_peers_available() -> bool:
    try:
        from p2pcod.tasks import get_task  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _real_peers_available(), reason="p2pcod.tasks is not there yet")
def test_real_peers_kill_restart_and_rate_cap(tmp_path):
    """Three real `p2pcod peer` processes: p1 is SIGKILLed and resumes; p2's uploads are capped at 0.2 Mbit/s."""
    run_dir = tmp_path / "run"
    spec = load_spec(write_spec(tmp_path, REAL))
    simulation = sim.Simulation(spec, run_dir, progress=lambda s: None)
    try:
        assert simulation.run() == "steps"
    finally:
        assert_no_processes(simulation, run_dir)
    ev = events(run_dir)
    kill = next(e for e in ev if e["event"] == "kill")
    restart = next(e for e in ev if e["event"] == "restart")
    assert kill["peer"] == restart["peer"] == "p1" and kill["pid"] != restart["pid"]
    run = load_run(run_dir)
    p1 = run.peers["p1"].rows
    resumed = [r["resumed_from"] for r in p1 if "resumed_from" in r]
    # the last checkpoint (every 10 steps) before the kill; the one of the step the kill saw may not be written
    assert len(resumed) == 1 and resumed[0] % 10 == 0 and kill["step"] - 10 <= resumed[0] <= kill["step"] + 10
    ids = [e["peer_id"] for e in ev if e["event"] == "joined" and e["peer"] == "p1"]
    assert len(ids) == 2 and ids[0] == ids[1]  # same identity after the restart
    for name, peer in run.peers.items():
        assert peer.rows[-1].get("final") and peer.final_step == 120, name
    assert any(r.get("teachers") for r in run.peers["p0"].rows)  # p0 learns from p2 in the ring
    # p2's only downloader (p0) fetches back to back: each blob lands when the token bucket allows it
    rows = run.peers["p2"].rows
    jumps = [(r["time"], r["bytes_out"]) for prev, r in zip(rows, rows[1:], strict=False)
             if r.get("bytes_out", 0) > prev.get("bytes_out", 0)]
    assert len(jumps) >= 2, jumps  # at least one whole back-to-back transfer between two completions
    (t0, b0), (t1, b1) = jumps[0], jumps[-1]
    rate_mbit = (b1 - b0) / (t1 - t0) * 8 / 1e6
    assert rate_mbit == pytest.approx(0.2, rel=0.2), jumps
    from p2pcod.report import write_report

    summary = write_report(run_dir).read_text()
    assert "**p1** killed (SIGKILL)" in summary and f"resumed at step {resumed[0]}" in summary
