import os
import signal
import subprocess
import sys

import pytest
import torch

from p2pcod import checkpoint
from p2pcod.errors import CheckpointError


def _state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": checkpoint.rng_state(),
        "step": 7,
        "tuple": (1, "a"),
        "blob": b"\x00\x01",
        "half": torch.ones(3, dtype=torch.bfloat16),
    }


def test_round_trip_is_exact(tmp_path):
    state = _state()
    checkpoint.save(tmp_path / "c.ckpt", state)
    back = checkpoint.load(tmp_path / "c.ckpt")
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for idx, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(back["optimizer"]["state"][idx][k], v)
    assert back["step"] == 7 and back["tuple"] == (1, "a") and back["blob"] == b"\x00\x01"
    assert back["half"].dtype == torch.bfloat16
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])


def test_damage_is_detected(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"x": torch.arange(100)})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a p2pcod checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.ckpt")


def test_kill_during_save_keeps_previous(tmp_path):
    """A process killed while it rewrites a checkpoint leaves the previous one loadable."""
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"step": 1, "w": torch.zeros(10)})
    code = (
        "import torch, sys\n"
        "from p2pcod import checkpoint\n"
        "big = {'step': 2, 'w': torch.randn(20_000_000)}\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        f"    checkpoint.save({str(path)!r}, big)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(1.5)  # mid-way through one of the repeated 80 MB writes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    state = checkpoint.load(path)
    assert state["step"] in (1, 2)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "c.ckpt"]
    # the temp file of the killed write may remain, but it is never mistaken for the checkpoint
    assert all(p.name.endswith(".tmp") for p in leftovers)


def test_summary_of_both_layouts(tmp_path):
    """What `p2pcod inspect` shows: a peer's one-model state, a `p2pcod train` group's, anything else."""
    one = {**_state(), "seed": 3, "model_config": {"width": 8}, "optimizer_name": "adamw", "elapsed": 1.23456}
    checkpoint.save(tmp_path / "one.ckpt", one)
    assert checkpoint.is_checkpoint(tmp_path / "one.ckpt")
    s = checkpoint.summary(checkpoint.load(tmp_path / "one.ckpt"))
    assert s["run"].startswith("one model") and s["step"] == 7 and s["seed"] == 3
    assert s["model_config"] == {"width": 8} and s["optimizer"] == "adamw" and s["elapsed_s"] == 1.235
    assert s["parameters"] == 4 * 3 + 3 + 3 + 3 and s["tensors"] == 4

    group = {"mode": "codistill", "models": [one, one, one], "blobs": {"m0": [6, b"x"], "m1": [6, b"y"]},
             "bytes_exchanged": 10}
    s = checkpoint.summary(group)
    assert s["run"].startswith("p2pcod train") and s["models"] == 3 and s["step"] == 7
    assert s["mode"] == "codistill" and s["published"] == {"m0": 6, "m1": 6} and s["model_config"] == {"width": 8}
    old = {"models": [{"step": 2, "model": {}}], "blobs": {}}  # from before mode and model config were stored
    assert "unknown" in checkpoint.summary(old)["mode"] and "unknown" in checkpoint.summary(old)["model_config"]
    assert checkpoint.summary({"x": 1}) == {"run": "unknown layout", "keys": ["x"]}
    (tmp_path / "blob").write_bytes(b"P2PCKPT\x00rest")
    assert not checkpoint.is_checkpoint(tmp_path / "blob")
