"""The run report: numbers on known synthetic curves, fault stories, plots, the run layouts it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pcod.errors import DataError
from p2pcod.report import (
    PeerRun,
    RunData,
    allreduce_bytes_per_step,
    choose_target,
    equal_time_losses,
    load_run,
    peer_table,
    steps_to_target,
    summary_markdown,
    time_to_target,
    write_report,
)

VAL_A = [4.0, 3.0, 2.5, 2.0, 1.8, 1.7]  # steps 0, 10, ..., 50
VAL_BASE = [4.0, 3.5, 3.0, 2.6, 2.3, 2.2]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plain_rows(vals: list[float], teachers: int = 1) -> list[dict]:
    return [{"step": 10 * i, "time": 5.0 * i, "val_loss": v, "teachers": teachers, "staleness": {"x": 4},
             "bytes_out": 1000 * 10 * i, "bytes_in": 500 * 10 * i} for i, v in enumerate(vals)]


def make_sim_run(root: Path, with_faults: bool = True) -> Path:
    run = root / "run"
    write_jsonl(run / "peers/a/metrics.jsonl", plain_rows(VAL_A))
    (run / "peers/a/peer.json").write_text(json.dumps({"params": 1000}))
    # b: killed after step 30 was logged, restarted, resumed from its step-20 checkpoint (counters restart)
    first = [{"step": s, "time": 0.5 * s, "val_loss": v, "bytes_out": 1000 * s, "teachers": 1}
             for s, v in ((0, 4.0), (10, 3.2), (20, 2.6), (30, 2.4))]
    second = [{"step": 20, "time": 12.0, "val_loss": 2.6, "resumed_from": 20, "bytes_out": 0}] + [
        {"step": s, "time": 12.0 + 0.5 * (s - 20), "val_loss": v, "bytes_out": 1000 * (s - 20), "teachers": 1}
        for s, v in ((30, 2.3), (40, 2.1), (50, 1.9))]
    last = {"step": 50, "time": 27.0, "final": True, "bytes_out": 30000}
    write_jsonl(run / "peers/b/metrics.jsonl", first + second + [last])
    (run / "peers/b/peer.json").write_text(json.dumps({"params": 1000, "group_size": 2}))
    events = [
        {"t": 0, "unix": 1000.0, "event": "sim_start", "spec": "x", "names": ["a", "b"], "topology": "full",
         "steps": 50, "threads": 1},
        {"t": 1, "unix": 1001.0, "event": "joined", "peer": "a", "peer_unix": 1001.0},
        {"t": 1, "unix": 1001.0, "event": "joined", "peer": "b", "peer_unix": 1001.0},
    ]
    if with_faults:
        events += [
            {"t": 20.0, "unix": 1020.0, "event": "kill", "peer": "b", "pid": 11, "step": 30},
            {"t": 25.0, "unix": 1025.0, "event": "restart", "peer": "b", "pid": 12, "step": 30},
            {"t": 27.0, "unix": 1027.0, "event": "joined", "peer": "b", "peer_unix": 1027.0, "resumed_from": 20},
            {"t": 5.0, "unix": 1005.0, "event": "cut", "peer": "a", "step": 10, "duration_s": 6.0},
        ]
    events.append({"t": 40, "unix": 1040.0, "event": "sim_end", "reason": "steps"})
    write_jsonl(run / "events.jsonl", events)
    return run


def make_baseline(root: Path) -> Path:
    base = root / "base"
    for name in ("a", "b"):
        write_jsonl(base / f"peers/{name}/metrics.jsonl", plain_rows(VAL_BASE, teachers=0))
    return base


def test_steps_to_target_on_known_curves():
    curve = [(0, 4.0), (10, 3.0), (20, 2.5), (30, 2.0)]
    assert steps_to_target(curve, 2.5) == 20  # at or below
    assert steps_to_target(curve, 2.4) == 30
    assert steps_to_target(curve, 1.0) is None
    assert allreduce_bytes_per_step(1000, 4) == pytest.approx(2 * 3 / 4 * 4 * 1000)


def timed_run(name: str, **peers: list[tuple[float, float]]) -> RunData:
    """A run whose peers evaluated at the given (wall time, val loss) points, a train-only row between each."""
    runs = {}
    for peer, points in peers.items():
        rows = [r for i, (_, v) in enumerate(points) for r in ({"step": 10 * i, "val_loss": v}, {"step": 10 * i + 5})]
        wall = [x for w, _ in points for x in (w, w + 1.0)]
        runs[peer] = PeerRun(peer, rows, wall=wall)
    return RunData(Path(name), runs)


def test_time_to_target_and_the_mean_curve_over_wall_time():
    assert time_to_target([(20.0, 1.0), (0.0, 3.0), (10.0, 2.0)], 2.0) == 10.0  # at or below, in time order
    assert time_to_target([(0.0, 3.0), (10.0, 2.0)], 1.5) is None
    # x evaluates at 0, 10, 20 s; y at 5, 15 s: from 5 s (both evaluated) each counts with its latest loss
    run = timed_run("run", x=[(0.0, 3.0), (10.0, 2.0), (20.0, 1.0)], y=[(5.0, 4.0), (15.0, 2.0)], z=[])
    assert run.peers["x"].val_times() == [(0.0, 3.0), (10.0, 2.0), (20.0, 1.0)]
    assert run.mean_time_curve() == [(5.0, 3.5), (10.0, 3.0), (15.0, 2.0), (20.0, 1.5)]  # exact in binary
    assert time_to_target(run.mean_time_curve(), 2.5) == 15.0
    assert time_to_target(run.peers["y"].val_times(), 2.5) == 15.0
    # equal time: T = 20 s, the earlier last evaluation; the baseline's latest by then is 2.5 (at 8 s), not 1.0
    base = timed_run("base", w=[(0.0, 3.0), (8.0, 2.5), (30.0, 1.0)])
    assert equal_time_losses(run, base) == pytest.approx((20.0, 1.5, 2.5))
    assert equal_time_losses(base, run) == pytest.approx((20.0, 2.5, 1.5))
    assert equal_time_losses(run, timed_run("empty", w=[])) is None


def test_restarts_are_stitched(tmp_path):
    run = load_run(make_sim_run(tmp_path))
    b = run.peers["b"]
    assert len(b.incarnations()) == 2
    assert dict(b.val_curve())[30] == 2.3  # the later value of a repeated step
    assert b.total_bytes("bytes_out")[-1] == 60000  # 30 kB before the kill + 30 kB after
    assert b.wall[b.incarnations()[1][0]] == pytest.approx(27.0)  # the resumed row, on the simulation clock
    assert b.wall[3] == pytest.approx(1.0 + 15.0)
    rows = {r["peer"]: r for r in peer_table(run)}
    assert rows["a"]["sent_per_step"] == 1000 and rows["a"]["ratio"] == pytest.approx(0.25)
    assert rows["b"]["sent_per_step"] == 1200 and rows["b"]["ratio"] == pytest.approx(0.30)
    assert rows["b"]["final"] == 1.9 and rows["a"]["best"] == 1.7


def test_clock_events_place_rows_on_the_simulation_clock(tmp_path):
    run_dir = make_sim_run(tmp_path)
    with (run_dir / "events.jsonl").open("a") as f:
        for origin in (2.0, 14.0):  # b's two processes; their metrics clocks read 0 at t=2 s and t=14 s
            f.write(json.dumps({"t": 41, "event": "clock", "peer": "b", "origin_t": origin}) + "\n")
    b = load_run(run_dir).peers["b"]
    assert b.wall[:4] == pytest.approx([2.0, 7.0, 12.0, 17.0])
    assert b.wall[4] == pytest.approx(14.0 + 12.0)  # the resumed clock goes on from the checkpoint's time
    assert load_run(run_dir).peers["a"].wall[1] == pytest.approx(1.0 + 5.0)  # no clock event: peer.json time


def test_report_against_a_baseline(tmp_path):
    run_dir = make_sim_run(tmp_path)
    summary = write_report(run_dir, baseline=make_baseline(tmp_path)).read_text()
    for png in ("loss.png", "bytes.png", "staleness.png"):
        assert (run_dir / png).stat().st_size > 20_000
    # target = the baseline's best mean validation loss, 2.2; a reaches it at 30, b at 40, the mean at 30
    assert "Target validation loss **2.2000** (the best mean validation loss of the baseline base)" in summary
    # on the wall clock a (origin 1 s) reaches it at 16 s; b at its step 40, 37 s (its restart cost it 11 s);
    # the mean at 16 s (a 2.0, b 2.4); the baseline's peers (no events: their own clock) all at 25 s
    assert "| a | 30 | 16.0 | 50 | 25.0 |" in summary and "| b | 40 | 37.0 | 50 | 25.0 |" in summary
    assert "| **mean of peers** | 30 | 16.0 | 50 | 25.0 |" in summary
    assert "Speed-up in steps: 1.67x." in summary
    assert "Speed-up in wall-clock time: 1.56x." in summary
    # at 25 s, the baseline's end: a's latest is 1.8 (21 s) and b's 2.4 (16 s; its restarted process logs at 27 s)
    assert ("At equal wall-clock time (25.0 s, the shorter run's last evaluation; each peer's latest validation "
            "loss by then, averaged over peers), this run's peers averaged val 2.1000 against 2.2000 for the "
            "baseline: ahead by 0.1000.") in summary
    assert "| a | 50 | 2.0 | 2.0 | 1.7000 | 1.7000 | 2.2000 | -22.7% | 0.05 | 0.03 | 1.00 | 4.00x |" in summary
    # b: 60 steps in 30 s of its two processes (the restart gap and the repeated steps 20-30 excluded)
    assert ("| b (group of 2) | 50 | 2.0 | 2.0 | 1.9000 | 1.9000 | 2.2000 | -13.6% | 0.06 | 0.00 | 1.20 | 3.33x |"
            in summary)
    assert "2·(N−1)/N · 4·params = 4.0 kB per step per peer" in summary
    assert ("**b** killed (SIGKILL) at step 30; restarted at t=25.0s (same run dir and identity), resumed at "
            "step 20 from its checkpoint, lost 10 steps, finished at step 50") in summary
    assert "During the 7 s outage the other peers kept training: a step 30->50" in summary
    assert "**a** cut off for 6 s at step 10: it kept training (step 0 -> 20)" in summary


def test_a_run_behind_its_baseline_and_targets_not_reached(tmp_path):
    # the roles swapped: the baseline's peers are this run, the codistilled run the baseline
    run, base = load_run(make_baseline(tmp_path)), load_run(make_sim_run(tmp_path))
    target, why = choose_target(run, base, None)
    assert target == pytest.approx(1.8)  # the codistilled mean at step 50 (and at 42 s): never reached here
    summary = summary_markdown(run, base, target, why)
    assert "## Steps and time to the target loss" in summary
    assert "| a | not reached | not reached | 50 | 26.0 |" in summary
    assert "| b | not reached | not reached | not reached | not reached |" in summary
    assert "| **mean of peers** | not reached | not reached | 50 | 42.0 |" in summary
    assert "Speed-up" not in summary
    assert "this run's peers averaged val 2.2000 against 2.1000 for the baseline: behind by 0.1000." in summary
    summary = summary_markdown(run, timed_run("silent", a=[]), 2.5, "given")
    assert "No equal-time comparison: a run has no validation loss on its wall clock." in summary
    assert "| **mean of peers** | 40 | 20.0 | not reached | not reached |" in summary


def test_a_simulations_own_comparison_run_is_the_default_baseline(tmp_path):
    run_dir = make_sim_run(tmp_path, with_faults=False)
    make_baseline(tmp_path).rename(run_dir / "alone")
    summary = write_report(run_dir).read_text()
    assert f"Baseline: `{run_dir / 'alone'}`" in summary
    assert "| a | 50 | 2.0 | 2.0 | 1.7000 | 1.7000 | 2.2000 | -22.7% |" in summary


def test_report_without_baseline_states_its_target(tmp_path):
    summary = write_report(make_sim_run(tmp_path, with_faults=False)).read_text()
    assert "Target validation loss **1.9000** (no baseline: the loosest level every peer reached" in summary
    assert "| a | 40 | 21.0 | - | - |" in summary
    assert "None scheduled" in summary
    assert "Speed-up" not in summary and "equal wall-clock" not in summary
    assert "change |" not in summary  # no baseline column


def test_report_reads_train_and_peer_run_dirs(tmp_path):
    train = tmp_path / "train"
    for i in range(2):
        write_jsonl(train / f"m{i}/metrics.jsonl", plain_rows(VAL_A))
    write_jsonl(train / "metrics.jsonl", plain_rows(VAL_A))  # the group's line, not a peer
    run = load_run(train)
    assert run.kind == "train" and list(run.peers) == ["m0", "m1"]
    assert "| m1 | 50 | 2.0 | 1.7000 |" in write_report(train, target=2.5).read_text()
    single = tmp_path / "alice"
    write_jsonl(single / "metrics.jsonl", plain_rows(VAL_A))
    assert list(load_run(single).peers) == ["alice"]
    assert "| alice | 20 | 10.0 | - | - |" in write_report(single, target=2.5).read_text()


def test_report_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "nope")
