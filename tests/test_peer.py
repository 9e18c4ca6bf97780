"""Real `p2pcod peer` processes on 127.0.0.1: topologies, distillation, kill -9 and resume, own-loop API."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from peerproc import FAST, ROOT, PeerProc, wait_for

from p2pcod import checkpoint
from p2pcod.churn import churn_runs
from p2pcod.topology import TopologyConfig, neighbours

pytestmark = pytest.mark.slow
NAMES = ["p0", "p1", "p2"]


@pytest.fixture
def swarm_name():
    return f"t{uuid.uuid4().hex[:8]}"


def start_swarm(tmp_path, swarm, procs, topology: str) -> list[PeerProc]:
    extra = [f'exchange.topology="{topology}"']
    first = PeerProc(tmp_path / NAMES[0], NAMES[0], swarm, extra, shard="0/3")
    procs.append(first)
    boot = first.wait_joined()
    for i, name in enumerate(NAMES[1:], 1):
        procs.append(PeerProc(tmp_path / name, name, swarm, extra, join=boot, shard=f"{i}/3"))
    for p in procs[1:]:
        p.wait_joined()
    return list(procs)


def teachers_of(peer: PeerProc) -> set[str]:
    return set(peer.last().get("staleness", {}))


def distils_from_exactly(peer: PeerProc, expected: set[str]) -> bool:
    rows = peer.metrics()
    return bool(rows) and teachers_of(peer) == expected and rows[-1].get("distill_loss", 0) > 0


def test_ring_each_peer_learns_from_its_predecessor(tmp_path, swarm_name, procs):
    peers = start_swarm(tmp_path, swarm_name, procs, "ring")
    cfg = TopologyConfig.from_dict({"name": "ring"})
    expected = {p.name: set(neighbours(p.name, NAMES, 0, cfg)) for p in peers}
    assert all(len(v) == 1 for v in expected.values())
    for p in peers:
        wait_for(lambda p=p: distils_from_exactly(p, expected[p.name]), 120, f"{p.name} to distil from {expected}")
    wait_for(lambda: all(sum(1 for r in p.metrics() if "val_loss" in r) >= 3 for p in peers), 120, "evaluations")
    converged = {p.name: p.metrics() for p in peers}  # before anyone leaves
    for p in peers:
        assert p.terminate() == 0, p.stderr()[-2000:]
        assert p.left_behind == [], f"{p.name} left processes behind after a graceful exit"
    for p in peers:
        rows = p.metrics()
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        assert vals[-1] < vals[0], f"{p.name}: validation loss did not fall: {vals}"
        assert rows[-1]["bytes_in"] > 0 and rows[-1]["bytes_out"] > 0 and rows[-1].get("final")
        # a ring: once the swarm is complete, a peer only ever holds its predecessor as a teacher
        held = [set(r.get("staleness", {})) for r in converged[p.name]]
        first = held.index(expected[p.name])
        assert all(h == expected[p.name] for h in held[first:]), held
        assert (p.run_dir / "checkpoint.ckpt").exists()
    # each peer left its final validation predictions: `p2pcod churn` compares any two peer runs
    c = churn_runs(peers[0].run_dir, peers[1].run_dir)
    assert 0.0 < c < 1.0 and churn_runs(peers[0].run_dir, peers[0].run_dir) == 0.0


def test_ctrl_c_in_a_terminal_saves_leaves_and_exits_0(tmp_path, swarm_name, procs):
    """Ctrl+C signals the whole foreground process group: the peer, its DHT process and the p2p daemon."""
    peer = PeerProc(tmp_path / "p0", "p0", swarm_name, [])
    procs.append(peer)
    peer.wait_joined()
    wait_for(lambda: peer.last().get("step", 0) >= 25, 120, "p0 to train past its first checkpoint")
    assert peer.terminate(ctrl_c=True) == 0, peer.stderr()[-3000:]
    assert peer.left_behind == [], "Ctrl+C left processes behind"
    last = peer.last()
    assert last.get("final") and last["step"] >= 25
    ckpt = checkpoint.load(peer.run_dir / "checkpoint.ckpt")
    assert ckpt["step"] == last["step"], "the final checkpoint is not of the last step"


def test_full_topology_survives_kill_and_resume(tmp_path, swarm_name, procs):
    peers = start_swarm(tmp_path, swarm_name, procs, "full")
    for p in peers:
        others = set(NAMES) - {p.name}
        wait_for(lambda p=p, o=others: distils_from_exactly(p, o), 120, f"{p.name} to distil from {others}")
    boot = peers[0]
    old_id = boot.info()["peer_id"]
    wait_for(lambda: boot.last().get("step", 0) >= 40, 120, "a checkpoint of the bootstrap peer")
    boot.proc.kill()  # kill -9 the bootstrap peer (its DHT daemon dies with its process group below)
    boot.kill()
    steps_at_kill = {p.name: p.last()["step"] for p in peers[1:]}
    # the others keep training and drop the dead peer once its record expires (ttl 8 s)
    for p in peers[1:]:
        wait_for(lambda p=p: teachers_of(p) == set(NAMES) - {"p0", p.name}, 90, f"{p.name} to drop p0")
        assert p.last()["step"] > steps_at_kill[p.name]
        assert p.alive()
    # restart it with --resume, joining through a survivor: same identity, continues from its checkpoint
    restarted = PeerProc(boot.run_dir, "p0", swarm_name, ['exchange.topology="full"'],
                         join=peers[1].wait_joined(), resume=True, shard="0/3")
    procs.append(restarted)
    restarted.wait_joined()
    info = restarted.info()
    assert info["peer_id"] == old_id
    assert info["resumed_from"] is not None and info["resumed_from"] >= 40
    assert info["resumed_from"] % 20 == 0  # the last local checkpoint (checkpoint_every = 20)
    for p in peers[1:]:
        wait_for(lambda p=p: "p0" in teachers_of(p), 90, f"{p.name} to take p0 back as a teacher")
    wait_for(lambda: restarted.last().get("step", 0) > info["resumed_from"] + 10, 60, "p0 to train on")
    assert restarted.terminate() == 0
    for p in peers[1:]:
        assert p.terminate() == 0
        vals = [r["val_loss"] for r in p.metrics() if "val_loss" in r]
        assert len(vals) >= 3 and vals[-1] < vals[0], f"{p.name}: validation loss did not fall: {vals}"
        assert p.last()["bytes_in"] > 0 and p.last()["bytes_out"] > 0


def test_own_training_loop_joins_a_swarm(tmp_path, swarm_name, procs):
    peer = PeerProc(tmp_path / "p0", "p0", swarm_name, ['exchange.topology="full"'])
    procs.append(peer)
    boot = peer.wait_joined()
    # 1500 tiny steps take ~8 s: several fetch rounds, even on a loaded machine (150 took under 1 s)
    cmd = [sys.executable, str(ROOT / "examples" / "own_loop.py"), "--swarm", swarm_name, "--steps", "1500",
           "--run-dir", str(tmp_path / "own"), "--join", boot[0],
           "--listen", "/ip4/127.0.0.1/tcp/0"]
    for s in FAST:
        if not s.startswith("train.steps"):
            cmd += ["--set", s]
    cmd += ["--set", 'exchange.topology="full"']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stdout
    assert max(r["teachers"] for r in rows) == 1, out.stderr[-3000:]
    assert any(r["distill_loss"] > 0 for r in rows)
    assert rows[-1]["bytes_in"] > 0
    # and the peer distilled from the example's published checkpoints too
    wait_for(lambda: peer.last().get("fetch_ok", 0) > 0, 60, "the peer to fetch the example's checkpoint")
    assert peer.terminate() == 0
