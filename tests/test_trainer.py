"""The trainer and the in-process group: Algorithm 1, metrics, checkpoints, resume, churn."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pcod import checkpoint, codec
from p2pcod.churn import churn, churn_runs, mean_and_half_range
from p2pcod.cli import main
from p2pcod.config import load_recipe
from p2pcod.errors import CheckpointError, ConfigError, DataError
from p2pcod.local import LocalGroup
from p2pcod.trainer import read_metrics

PEERS = Path(__file__).resolve().parent.parent / "peers"
TINY = [
    "model.layers=1", "model.width=32", "model.heads=2", "model.context=32", "task.seq_len=32",
    "train.batch_size=8", "train.eval_batches=2", "train.eval_batch_size=8", "train.log_every=2",
    "train.eval_every=4", "train.warmup=0", "task.max_bytes=400000",
]


def tiny(*extra: str):
    return load_recipe(PEERS / "lm-tiny.toml", TINY + list(extra))


def test_burn_in_then_distillation(tmp_path):
    recipe = tiny("train.steps=12", "distill.burn_in=6", "exchange.reload_every=4", "train.checkpoint_every=100")
    group = LocalGroup(recipe, tmp_path, models=2)
    distill_losses, teachers = [], []
    while group.step < 12:
        outs = [tr.train_step() for tr in group.trainers]
        if group.step % 4 == 0:
            group.publish()
            group.refresh_teachers()
        distill_losses.append([o["distill_loss"] for o in outs])
        teachers.append([o["teachers"] for o in outs])
    group.close()
    # steps 0..5 are burn-in: no distillation term at all
    assert all(d == 0.0 for row in distill_losses[:6] for d in row)
    # from step 6 on, each model holds the other as its teacher (published at step 4) and distils
    assert all(d > 0.0 for row in distill_losses[6:] for d in row)
    assert all(t == 1 for row in teachers[6:] for t in row)
    for tr in group.trainers:
        assert tr.teachers.names() == [n for n in group.names if n != tr.run_dir.name]


def test_single_model_is_plain_training(tmp_path):
    group = LocalGroup(tiny("train.steps=8", "distill.burn_in=0"), tmp_path, models=1)
    summary = group.run()
    group.close()
    rows = read_metrics(tmp_path / "m0" / "metrics.jsonl")
    assert rows and all(r.get("distill_loss", 0.0) == 0.0 for r in rows)
    assert summary["bytes_exchanged"] == 0
    assert (tmp_path / "predictions.npy").exists()


def test_teachers_go_through_the_codec(tmp_path):
    group = LocalGroup(tiny("train.steps=4"), tmp_path, models=2)
    group.publish()
    step, blob = group.blobs["m1"]
    state, meta = codec.decode(blob)
    assert meta["peer"] == "m1" and meta["task"] == "lm"
    group.refresh_teachers()
    teacher = group.trainers[0].teachers
    assert teacher.names() == ["m1"]
    # the teacher holds the int8 round trip of m1, not m1's exact fp32 weights
    x = group.val[0].x
    with torch.no_grad():
        exact = torch.softmax(group.trainers[1].model(x), -1)
    approx = teacher.predict(x)
    assert approx is not None and not torch.equal(approx, exact)
    assert torch.allclose(approx, exact, atol=0.05)
    group.close()


@pytest.mark.parametrize("models", [2, 3])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, models):
    """Interrupted at a checkpoint and resumed, the run continues exactly as the uninterrupted one (with 3 models
    each holds 2 teachers and runs 1 a step: the resumed run continues the same draws)."""
    args = ("train.steps=16", "train.checkpoint_every=6", "exchange.reload_every=4", "distill.burn_in=2",
            "exchange.topology=full", "distill.teachers_per_step=1")
    full = LocalGroup(tiny(*args), tmp_path / "full", models=models)
    full.run()
    full.close()

    part = LocalGroup(tiny(*args[1:], "train.steps=6"), tmp_path / "part", models=models)
    part.run()  # stops at step 6, checkpoint written
    part.close()
    resumed = LocalGroup(tiny(*args), tmp_path / "part", models=models)
    assert resumed.resume() and resumed.step == 6
    resumed.run()
    resumed.close()
    for a, b in zip(full.trainers, resumed.trainers, strict=True):
        for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
            assert torch.allclose(va, vb, atol=1e-6), k
    np.testing.assert_allclose(np.load(tmp_path / "full" / "predictions.npy"),
                               np.load(tmp_path / "part" / "predictions.npy"), atol=1e-5)


def test_ensemble_is_evaluated_on_the_average(tmp_path):
    group = LocalGroup(tiny("train.steps=4"), tmp_path, models=2, mode="ensemble")
    summary = group.run()
    group.close()
    assert all(tr.teachers is None for tr in group.trainers)
    ens = summary["ensemble_val_loss"]
    # the loss of the averaged prediction is never worse than the mean of the members' losses (convexity)
    assert ens <= float(np.mean(summary["val_loss"])) + 1e-6
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert any("ensemble_val_loss" in r for r in rows)


def test_validation_loss_falls_with_codistillation(tmp_path):
    group = LocalGroup(tiny("train.steps=40", "distill.burn_in=8", "exchange.reload_every=8"), tmp_path, models=2)
    group.run()
    group.close()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 40
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5


def test_churn_metric_on_known_inputs(tmp_path):
    assert churn(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.5, 0.6])) == pytest.approx((0.1 + 0 + 0.3) / 3)
    a = np.array([[0.5, 0.5], [1.0, 0.0]])
    b = np.array([[0.25, 0.75], [1.0, 0.0]])
    assert churn(a, b) == pytest.approx(0.125)  # total variation: (0.25 + 0) / 2
    assert churn(a, a) == 0.0
    with pytest.raises(DataError, match="shape"):
        churn(np.zeros(3), np.zeros(4))
    assert mean_and_half_range([0.02, 0.03, 0.04]) == pytest.approx((0.03, 0.01))
    for name, preds in (("a", [0.1, 0.2]), ("b", [0.3, 0.2])):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "predictions.npy", np.array(preds))
    assert churn_runs(tmp_path / "a", tmp_path / "b") == pytest.approx(0.1)
    with pytest.raises(DataError, match="does not exist"):
        churn_runs(tmp_path / "a", tmp_path / "missing")


def test_cli_train_resume_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(PEERS / "lm-tiny.toml"), "--models", "2", "--run-dir", str(run)]
    sets = [x for s in TINY + ["train.steps=6", "train.checkpoint_every=3"] for x in ("--set", s)]
    assert main(args + sets) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 6 and len(out["val_loss"]) == 2
    assert main(args + sets) == 2  # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert main(args + sets[:-2] + ["--set", "train.steps=9", "--set", "train.checkpoint_every=3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 9
    assert main(["train", "--config", str(PEERS / "lm-tiny.toml"), "--set", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def _saved_group(run_dir, models=2, mode="codistill", *extra):
    group = LocalGroup(tiny("train.steps=2", "train.checkpoint_every=2", *extra), run_dir, models=models, mode=mode)
    group.run()
    group.close()
    return group


def test_resume_refuses_another_group_by_name(tmp_path):
    """--resume with another --models, mode or model: a CheckpointError that says which, before any weight loads."""
    _saved_group(tmp_path)
    before = (tmp_path / "recipe.json").read_text()
    cases = [
        (dict(models=3), "holds 2 model\\(s\\), but --models 3"),
        (dict(models=2, mode="ensemble"), "codistill run: resume it without --ensemble"),
        (dict(models=2, extra=("model.width=48",)),
         "model m0: .*model.width: 32 -> 48.*shape \\(checkpoint vs recipe\\): "),
        (dict(models=2, extra=("model.heads=4",)), "model.heads: 2 -> 4"),  # same shapes, another model all the same
        (dict(models=2, extra=('train.optimizer="sgd"',)), "train.optimizer = 'adamw', the recipe now says 'sgd'"),
    ]
    for kw, match in cases:
        group = LocalGroup(tiny("train.steps=4", *kw.get("extra", ())), tmp_path, models=kw["models"],
                           mode=kw.get("mode", "codistill"))
        with pytest.raises(CheckpointError, match=match):
            group.resume()
        group.close()
    assert (tmp_path / "recipe.json").read_text() == before  # the refused resumes left the run's record alone
    again = LocalGroup(tiny("train.steps=4"), tmp_path, models=2)
    assert again.resume() and again.step == 2
    again.close()


def test_trainer_resume_names_the_tensors_of_an_old_checkpoint(tmp_path):
    """A peer's checkpoint (one Trainer) of another model; also one written before the model config was stored."""
    from p2pcod.tasks import get_task
    from p2pcod.trainer import Trainer

    recipe = tiny("train.steps=2")
    task = get_task(recipe.task)
    tr = Trainer(recipe, task, shard=0, num_shards=1, run_dir=tmp_path)
    tr.train_step()
    state = tr.state()
    del state["model_config"], state["optimizer_name"]  # as written before they were stored
    checkpoint.save(tr.checkpoint_path, state)
    tr.close()
    wider = tiny("train.steps=2", "model.width=48")
    other = Trainer(wider, get_task(wider.task), shard=0, num_shards=1, run_dir=tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint.ckpt: .*tensors do not fit.*\\[.*32.*\\] vs \\[.*48.*\\]"):
        other.resume()
    other.close()
    same = Trainer(recipe, task, shard=0, num_shards=1, run_dir=tmp_path)
    assert same.resume() == {} and same.step == 1
    same.close()


def test_topology_none_trains_independent_models(tmp_path):
    recipe = tiny("train.steps=4", "exchange.reload_every=2", "distill.burn_in=0", 'exchange.topology="none"')
    group = LocalGroup(recipe, tmp_path, models=2)
    summary = group.run()
    group.close()
    assert all(tr.teachers is None for tr in group.trainers) and summary["bytes_exchanged"] == 0
    assert all(r.get("distill_loss", 0.0) == 0.0 for r in read_metrics(tmp_path / "m0" / "metrics.jsonl"))


def test_topology_edges_over_the_model_names(tmp_path):
    edges = 'exchange.edges=[["m0", "m1"], ["m0", "m2"]]'
    group = LocalGroup(tiny("train.steps=4", 'exchange.topology="edges"', edges), tmp_path, models=3)
    group.publish()
    group.refresh_teachers()
    assert [tr.teachers.names() for tr in group.trainers] == [[], ["m0"], ["m0"]]
    group.close()
    with pytest.raises(ConfigError, match="exchange.edges names 'p1', but the models of `p2pcod train --models 2`"):
        LocalGroup(tiny('exchange.topology="edges"', 'exchange.edges=[["p1", "m0"]]'), tmp_path / "x", models=2)


# ---- what a step with teachers costs ------------------------------------------------------------------------


def _trainer_with_teachers(tmp_path, name: str, n: int, *sets: str):
    from p2pcod.tasks import get_task
    from p2pcod.teachers import TeacherPool
    from p2pcod.trainer import Trainer

    recipe = tiny("train.steps=50", "distill.burn_in=0", *sets)
    task = get_task(recipe.task)
    pool = TeacherPool(task.build_model, recipe.distill, task.kind)
    for i in range(n):
        torch.manual_seed(50 + i)
        # weights x 8: confident teachers whose predictions differ from example to example
        state = {k: v * 8 if v.is_floating_point() else v
                 for k, v in task.build_model(recipe.model).state_dict().items()}
        pool.swap(f"t{i}", state, recipe.model, step=0)
    return Trainer(recipe, task, shard=0, num_shards=1, run_dir=tmp_path / name, teachers=pool, seed=5)


def test_teacher_passes_per_step_are_bounded_whatever_is_held(tmp_path):
    one = _trainer_with_teachers(tmp_path, "k1", 3, "distill.teachers_per_step=1")
    every = _trainer_with_teachers(tmp_path, "all", 3, "distill.teachers_per_step=0")
    outs = [(one.train_step(), every.train_step()) for _ in range(6)]
    assert all(a["teacher_passes"] == 1 and a["teachers"] == 3 for a, _ in outs)
    assert all(b["teacher_passes"] == 3 and b["teachers"] == 3 for _, b in outs)
    line = one.log()
    assert line["teacher_passes"] == 1 and line["distill"]["teachers_per_step"] == 1
    assert "distill" not in one.log()  # the settings once per run, the passes on every line
    one.close()
    every.close()


def test_distillation_runs_on_the_first_fraction_of_the_batch(tmp_path):
    from p2pcod import distill

    tr = _trainer_with_teachers(tmp_path, "f", 2, "distill.batch_fraction=0.3", "distill.teachers_per_step=0",
                                "distill.psi=\"mse\"",  # ψ that differs from example to example
                                "distill.teacher_precision=\"fp32\"")
    batch = tr._peek_batch()  # the batch the next step trains on (8 examples: ceil(0.3 * 8) = 3 distil)
    with torch.no_grad():
        logits = tr.model(batch.x)
        target = tr.teachers.predict(batch.x[:3])
        want = distill.psi(logits[:3], target, tr.recipe.distill, "multiclass")
        whole = distill.psi(logits, tr.teachers.predict(batch.x), tr.recipe.distill, "multiclass")
    out = tr.train_step()
    assert out["distill_loss"] == pytest.approx(float(want), rel=1e-5)
    assert abs(out["distill_loss"] - float(whole)) > 1e-3 * float(whole)  # not the whole batch's ψ
    tr.close()


def test_prefetched_teacher_targets_give_the_same_numbers(tmp_path):
    plain = _trainer_with_teachers(tmp_path, "sync", 3, "distill.prefetch=false")
    ahead = _trainer_with_teachers(tmp_path, "prefetch", 3, "distill.prefetch=true")
    a = [plain.train_step()["distill_loss"] for _ in range(8)]
    b = [ahead.train_step()["distill_loss"] for _ in range(8)]
    assert ahead.distill._pool is not None  # the worker really ran
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for va, vb in zip(plain.model.state_dict().values(), ahead.model.state_dict().values(), strict=True):
        assert torch.allclose(va, vb, atol=1e-5)
    plain.close()
    ahead.close()


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_weights(tmp_path, caplog):
    tr = _trainer_with_teachers(tmp_path, "nan", 1)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    real_loss = tr.task.loss
    tr.task.loss = lambda logits, batch: real_loss(logits, batch) * float("nan")  # one poisoned step
    with caplog.at_level("WARNING"):
        out = tr.train_step()
    assert tr.skipped_steps == 1 and tr.step == 1 and "step skipped" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    tr.task.loss = real_loss
    tr.train_step()
    assert tr.skipped_steps == 1 and all(torch.isfinite(v).all() for v in tr.model.state_dict().values())
    assert not all(torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())  # the next step trained
    assert tr.log()["skipped_steps"] == 1 and out["train_loss"] != out["train_loss"]  # NaN reported as it was
    tr.close()
