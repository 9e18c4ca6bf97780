"""The CLI turns bad input into one `p2pcod: error: ...` line and exit code 2, never a traceback."""

import json
from pathlib import Path

import pytest
import torch

from p2pcod import codec
from p2pcod.cli import EXIT_ERROR, main

PEERS = Path(__file__).resolve().parent.parent / "peers"
TINY = [
    "model.layers=1", "model.width=32", "model.heads=2", "model.context=32", "task.seq_len=32",
    "train.batch_size=8", "train.eval_batches=2", "train.eval_batch_size=8", "train.log_every=2",
    "train.eval_every=2", "task.max_bytes=400000", "train.steps=2", "train.checkpoint_every=2",
]


def _train(run_dir: Path, *flags: str, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["train", "--config", str(PEERS / "lm-tiny.toml"), "--run-dir", str(run_dir), *flags]
    return args + [x for s in (*TINY, *sets) for x in ("--set", s)]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2pcod: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-model `p2pcod train` run."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(_train(run_dir, "--models", "2")) == 0
    return run_dir


@pytest.mark.parametrize("setting, fragment", [
    ("exchange.level=23", "exchange.level must be a zstd level"),
    ("exchange.block=0", "exchange.block must be an int in [1, "),
    ('exchange.topology="star"', "exchange.topology must be one of full, ring"),
    ("exchange.k=0", "exchange.k must be >= 1"),
    ('exchange.topology="edges"', "exchange.topology = 'edges' needs exchange.edges"),
])
def test_bad_exchange_keys_stop_even_a_single_model(tmp_path, capsys, setting, fragment):
    """--models 1 never reloads or publishes: the recipe itself must refuse these."""
    assert main(_train(tmp_path / "r", "--models", "1", sets=(setting,))) == EXIT_ERROR
    assert fragment in _error(capsys)
    assert not (tmp_path / "r" / "checkpoint.ckpt").exists()


def test_resume_with_other_models_count_or_mode(run, capsys):
    assert main(_train(run, "--models", "3", "--resume")) == EXIT_ERROR
    assert "holds 2 model(s), but --models 3 was asked: resume with --models 2" in _error(capsys)
    assert main(_train(run, "--models", "2", "--ensemble", "--resume")) == EXIT_ERROR
    assert "without --ensemble" in _error(capsys)
    assert json.loads((run / "recipe.json").read_text())["models"] == 2  # the run's record is untouched


def test_resume_after_a_model_change(run, capsys):
    assert main(_train(run, "--models", "2", "--resume", sets=("model.width=48",))) == EXIT_ERROR
    err = _error(capsys)
    assert "model.width: 32 -> 48" in err and "tok.weight [256, 32] vs [256, 48]" in err


def test_inspect_a_missing_file_or_junk(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.blob")]) == EXIT_ERROR
    assert "missing.blob does not exist" in _error(capsys)
    (tmp_path / "junk").write_bytes(b"hello world")
    assert main(["inspect", str(tmp_path / "junk")]) == EXIT_ERROR
    assert "neither an exchanged checkpoint blob nor a run's checkpoint.ckpt" in _error(capsys)
    (tmp_path / "cut.blob").write_bytes(codec.MAGIC + b"\x01")
    assert main(["inspect", str(tmp_path / "cut.blob")]) == EXIT_ERROR
    assert "cut.blob: " in _error(capsys)


def test_inspect_a_local_checkpoint(run, capsys):
    for target in (run / "checkpoint.ckpt", run):  # the file, or the run directory holding it
        assert main(["inspect", str(target)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert "local checkpoint" in out["format"] and "not an exchanged blob" in out["format"]
        assert out["models"] == 2 and out["step"] == 2 and out["mode"] == "codistill"
        assert out["model_config"]["width"] == 32 and out["parameters"] > 0


def test_inspect_an_exchanged_blob(tmp_path, capsys):
    blob = codec.encode({"w": torch.ones(4, 4)}, {"peer": "a", "step": 3})
    (tmp_path / "a.blob").write_bytes(blob)
    assert main(["inspect", str(tmp_path / "a.blob")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"] == {"peer": "a", "step": 3} and out["digest"] == codec.digest(blob)
