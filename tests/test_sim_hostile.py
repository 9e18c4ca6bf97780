"""A simulated swarm with an adversary process (p2pcod/adversary.py): two honest lm-tiny peers and one peer
that floods their blob servers, serves decompression bombs and NaN weights, forges records and claims an
honest peer's name. The honest peers must finish, learn only from each other, log and ban the offender,
and the report must say so; spec validation of the adversary keys is checked first (no process started).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from peerproc import RECIPE, group_alive, tiny_spec_sets

from p2pcod import sim
from p2pcod.errors import ConfigError
from p2pcod.simspec import load_spec

STEPS = 1200
ATTACKS = ["bomb", "flood", "nan", "records", "impersonate"]

SETS = tiny_spec_sets(train={"log_every": 5, "eval_every": 50, "checkpoint_every": 50},
                      exchange={"fetch_timeout": 5.0, "ban_after": 2})
SPEC = f"""
[swarm]
recipe = "{RECIPE}"
peers = 3
topology = "full"
steps = {STEPS}
threads = 1
budget_s = 240
startup_timeout_s = 90
stop_timeout_s = 20
compare_clean = COMPARE
{SETS}
[[peer]]
index = 1
name = "mallory"
role = "adversary"
attacks = {json.dumps(ATTACKS)}
attack_every_s = 1.5
"""


def write_spec(tmp_path: Path, text: str, compare: bool = False) -> Path:
    path = tmp_path / "hostile.toml"
    path.write_text(textwrap.dedent(text.replace("COMPARE", "true" if compare else "false")))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (('role = "adversary"', 'role = "rogue"'), "peer[1].role = 'rogue'"),
        (('attacks = ', 'attacks = ["meteor"] #'), "'meteor' is not one of"),
        (('attack_every_s = 1.5', 'attack_every_s = 0'), "attack_every_s = 0.0 must be"),
        (('index = 1\nname = "mallory"', 'index = 0\nname = "mallory"'), "peer[0] bootstraps the swarm"),
        (('role = "adversary"', 'role = "honest"'), "peer[1].attack_every_s only applies to role"),
    ],
)
def test_adversary_keys_are_validated(tmp_path, edit, message):
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, SPEC.replace(*edit)))
    assert message in str(err.value)


def test_compare_clean_needs_an_adversary_and_drops_it(tmp_path):
    spec = load_spec(write_spec(tmp_path, SPEC, compare=True))
    assert [(p.name, p.role) for p in spec.peers] == [("p0", "honest"), ("mallory", "adversary"), ("p2", "honest")]
    clean = spec.clean()
    assert [(p.index, p.name, p.role) for p in clean.peers] == [(0, "p0", "honest"), (1, "p2", "honest")]
    assert [p.name for p in spec.alone().peers] == ["p0", "p2"]
    no_adversary = SPEC.replace('role = "adversary"', 'role = "honest"').split("attacks =")[0]
    with pytest.raises(ConfigError, match="compare_clean = true needs"):
        load_spec(write_spec(tmp_path, no_adversary, compare=True))


def _rows(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "peers" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_honest_peers_train_through_an_adversary(tmp_path):
    run_dir = tmp_path / "run"
    simulation = sim.Simulation(load_spec(write_spec(tmp_path, SPEC)), run_dir, progress=lambda s: None, poll_s=0.2)
    try:
        reason = simulation.run()
    finally:
        leftovers = [g for g in simulation.pgids if group_alive(g)]
        assert leftovers == [], f"process groups left behind: {leftovers}"
    assert reason == "steps"
    attacks = [json.loads(line) for line in (run_dir / "peers" / "mallory" / "attacks.jsonl").read_text().splitlines()]
    assert {a["attack"] for a in attacks} >= set(ATTACKS[:2])  # it attacked (more rounds if the peers were slow)
    assert attacks[-1]["attack"] == "end" and attacks[-1]["requests"] >= 1 and attacks[-1]["flood_streams"] >= 1
    for name, other in (("p0", "p2"), ("p2", "p0")):
        rows = _rows(run_dir, name)
        last = rows[-1]
        assert last["final"] and last["step"] == STEPS
        loaded = {n for r in rows for n in (r.get("staleness") or {})}
        assert loaded == {other}, f"{name} loaded teachers {loaded}"  # the honest one, never mallory
        assert last["fetch_failed"] >= 1  # mallory's bad checkpoints were tried and refused ...
        assert last["fetch_bans"] >= 1  # ... and it was banned (ban_after = 2)
    assert sum(_rows(run_dir, n)[-1]["streams_refused"] for n in ("p0", "p2")) >= 1  # the flood hit a cap
    from p2pcod.report import write_report

    summary = write_report(run_dir).read_text()
    assert "## Adversaries" in summary and "**mallory** (bomb, flood" in summary
    assert "| p0 | none |" in summary and "| p2 | none |" in summary
