"""The run report: numbers on known synthetic curves, fault stories, plots, the run layouts it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pcod.errors import DataError
from p2pcod.report import (
    allreduce_bytes_per_step,
    load_run,
    peer_table,
    steps_to_target,
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
    assert "| a | 30 | 50 |" in summary and "| b | 40 | 50 |" in summary
    assert "| **mean of peers** | 30 | 50 |" in summary
    assert "Speed-up in steps: 1.67x." in summary
    assert "| a | 50 | 2.0 | 2.0 | 1.7000 | 1.7000 | 2.2000 | -22.7% | 0.05 | 0.03 | 1.00 | 4.00x |" in summary
    # b: 60 steps in 30 s of its two processes (the restart gap and the repeated steps 20-30 excluded)
    assert ("| b (group of 2) | 50 | 2.0 | 2.0 | 1.9000 | 1.9000 | 2.2000 | -13.6% | 0.06 | 0.00 | 1.20 | 3.33x |"
            in summary)
    assert "2·(N−1)/N · 4·params = 4.0 kB per step per peer" in summary
    assert ("**b** killed (SIGKILL) at step 30; restarted at t=25.0s (same run dir and identity), resumed at "
            "step 20 from its checkpoint, lost 10 steps, finished at step 50") in summary
    assert "During the 7 s outage the other peers kept training: a step 30->50" in summary
    assert "**a** cut off for 6 s at step 10: it kept training (step 0 -> 20)" in summary


def test_a_simulations_own_comparison_run_is_the_default_baseline(tmp_path):
    run_dir = make_sim_run(tmp_path, with_faults=False)
    make_baseline(tmp_path).rename(run_dir / "alone")
    summary = write_report(run_dir).read_text()
    assert f"Baseline: `{run_dir / 'alone'}`" in summary
    assert "| a | 50 | 2.0 | 2.0 | 1.7000 | 1.7000 | 2.2000 | -22.7% |" in summary


def test_report_without_baseline_states_its_target(tmp_path):
    summary = write_report(make_sim_run(tmp_path, with_faults=False)).read_text()
    assert "Target validation loss **1.9000** (no baseline: the loosest level every peer reached" in summary
    assert "| a | 40 | - |" in summary and "| b | 50 | - |" in summary
    assert "None scheduled" in summary
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
    assert "| alice | 20 | - |" in write_report(single, target=2.5).read_text()


def test_report_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "nope")
