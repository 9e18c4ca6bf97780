"""task.poison: a peer whose training targets are corrupted while its validation data stays honest."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pcod.errors import ConfigError
from p2pcod.simspec import load_spec
from p2pcod.tasks import POISONS, PoisonedTask, get_task, poison_of
from p2pcod.tasks.base import Task

TINY_GPT = {"layers": 1, "width": 32, "heads": 2, "context": 32}
LM = {"name": "lm", "seq_len": 32, "max_bytes": 400_000}
CTR = {"name": "ctr", "synthetic_rows": 4_000, "hash_buckets": 200}


@pytest.fixture(scope="module")
def lm():
    return get_task(LM)


@pytest.fixture(scope="module")
def ctr():
    return get_task(CTR)


def _poisoned(clean: Task, poison: str) -> PoisonedTask:
    return PoisonedTask(clean, poison)


def _take(task, n, **kw):
    args = {"split": "disjoint", "batch_size": 8, "seed": 3, **kw}
    it = task.train_batches(1, 3, **args)
    return [next(it) for _ in range(n)]


def _xs(b):
    return b.x if isinstance(b.x, tuple) else (b.x,)


def _same_x(a, b):
    return all(torch.equal(u, v) for u, v in zip(_xs(a), _xs(b), strict=True))


# ---- configuration -------------------------------------------------------------------------------


def test_get_task_poison_key(lm):
    assert not isinstance(lm, PoisonedTask)
    assert not isinstance(get_task({**LM, "poison": "none"}), PoisonedTask)
    for poison in POISONS[1:]:
        task = get_task({**LM, "poison": poison})
        assert isinstance(task, PoisonedTask) and task.poison == poison
        assert (task.name, task.kind) == ("lm", "multiclass")
        assert task.describe()["poison"] == poison
        assert "poison" not in task.cfg  # the inner task never sees the key
        # task-specific helpers are the inner task's
        assert task.shard_files(0, 2, "disjoint") == lm.shard_files(0, 2, "disjoint")
    assert get_task({**CTR, "poison": "permute-labels"}).kind == "binary"


@pytest.mark.parametrize("value", ["flip", "", "None", 1, True, None])
def test_unknown_poison_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"task\.poison"):
        get_task({**LM, "poison": value})


def test_poison_of_checks_without_building():
    assert poison_of({"name": "lm"}) == "none"
    assert poison_of({"name": "nope", "poison": "shuffle-labels"}) == "shuffle-labels"
    with pytest.raises(ConfigError, match=r"task\.poison .*shuffle-labels"):
        poison_of({"name": "lm", "poison": "shuffle"})


@pytest.mark.parametrize(("variant", "topology", "aggregate"),
                         [("mean", "full", "mean"), ("median", "full", "median"), ("none", "none", "mean")])
def test_poisoned_specs_poison_exactly_one_non_distilling_peer(variant, topology, aggregate):
    spec = load_spec(Path(__file__).parent.parent / "topologies" / f"poisoned-5-{variant}.toml", cores=2)
    assert len(spec.peers) == 5 and spec.topology == topology
    poisons = [poison_of(p.recipe_cfg.task) for p in spec.peers]
    assert poisons == ["none"] * 4 + ["permute-labels"]
    for p in spec.peers:
        assert p.recipe_cfg.distill.aggregate == aggregate
        assert p.recipe_cfg.distill.alpha == (0.0 if p.index == 4 else 1.0)
        assert p.recipe_cfg.task["max_bytes"] == 1_000_000
        assert p.recipe_cfg.exchange.reload_every == 25 and p.recipe_cfg.distill.burn_in == 50


def test_poisoned_task_rejects_none(lm):
    with pytest.raises(ConfigError, match=r"task\.poison"):
        PoisonedTask(lm, "none")


# ---- batches: the same inputs, corrupted targets --------------------------------------------------


@pytest.mark.parametrize("poison", POISONS[1:])
def test_lm_batches_differ_from_clean_exactly_in_y(lm, poison):
    task = _poisoned(lm, poison)
    clean, bad = _take(lm, 4), _take(task, 4)
    for c, b in zip(clean, bad, strict=True):
        assert _same_x(c, b)
        assert b.y.shape == c.y.shape and b.y.dtype == c.y.dtype
        assert int(b.y.min()) >= 0 and int(b.y.max()) < 256
        differ = (b.y != c.y).float().mean().item()
        if poison == "shuffle-labels":
            # every example gets another example's whole target row; none keeps its own
            rows = {tuple(r.tolist()) for r in c.y}
            assert all(tuple(r.tolist()) in rows for r in b.y)
            assert not any(torch.equal(b.y[i], c.y[i]) for i in range(len(c.y)))
            assert sorted(map(tuple, b.y.tolist())) == sorted(map(tuple, c.y.tolist()))
            assert differ > 0.5
        elif poison == "random-labels":
            assert differ > 0.9  # a random byte equals the true one ~1/256 of the time
        else:
            mapping = task.class_map()
            assert torch.equal(b.y, mapping[c.y])
            assert differ == 1.0  # a derangement: no byte maps to itself
    # validation stays honest
    for c, b in zip(lm.val_batches(8, 2), task.val_batches(8, 2), strict=True):
        assert _same_x(c, b) and torch.equal(c.y, b.y)


def test_permutation_is_a_fixed_derangement_of_the_bytes(lm):
    m1, m2 = _poisoned(lm, "permute-labels").class_map(), _poisoned(lm, "permute-labels").class_map()
    assert torch.equal(m1, m2)
    assert sorted(m1.tolist()) == list(range(256))
    assert not bool((m1 == torch.arange(256)).any())


@pytest.mark.parametrize("poison", ["shuffle-labels", "random-labels"])
def test_poisoned_stream_is_deterministic_and_resumes(lm, poison):
    task = _poisoned(lm, poison)
    full = _take(task, 5)
    again = _take(task, 5)
    resumed = _take(task, 2, start_step=3)
    assert all(torch.equal(a.y, b.y) for a, b in zip(full, again, strict=True))
    assert all(_same_x(a, b) and torch.equal(a.y, b.y) for a, b in zip(full[3:], resumed, strict=True))
    # different steps and different seeds get different corruption
    assert not torch.equal(full[0].y, full[1].y)
    other = _take(task, 1, seed=4)[0]
    assert not torch.equal(other.y, full[0].y)


@pytest.mark.parametrize("poison", POISONS[1:])
def test_ctr_batches_differ_from_clean_exactly_in_y(ctr, poison):
    task = _poisoned(ctr, poison)
    clean = _take(ctr, 6, batch_size=64)
    bad = _take(task, 6, batch_size=64)
    changed = 0
    for c, b in zip(clean, bad, strict=True):
        assert _same_x(c, b)
        assert b.y.shape == c.y.shape and b.y.dtype == c.y.dtype
        assert set(b.y.unique().tolist()) <= {0.0, 1.0}
        if poison == "shuffle-labels":
            assert float(b.y.sum()) == float(c.y.sum())  # the same labels, moved between examples
        elif poison == "permute-labels":
            assert torch.equal(b.y, 1 - c.y)
        changed += int((b.y != c.y).sum())
    assert changed > 0.1 * 6 * 64


# ---- a poisoned model learns garbage --------------------------------------------------------------


def _val_loss(task, model, val):
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(task.loss(model(b.x), b)) for b in val]))


def _train(task, steps, val):
    torch.manual_seed(0)
    model = task.build_model(TINY_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = task.train_batches(0, 1, split="same", batch_size=16, seed=1)
    model.train()
    for _ in range(steps):
        b = next(batches)
        loss = task.loss(model(b.x), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _val_loss(task, model, val)


def test_poisoned_models_validation_loss_stays_high(lm):
    val = lm.val_batches(16, 2)
    uniform = math.log(256)
    clean = _train(lm, 40, val)
    permuted = _train(_poisoned(lm, "permute-labels"), 40, val)
    random = _train(_poisoned(lm, "random-labels"), 40, val)
    assert clean < 3.4  # the honest model learns (from ln 256 = 5.55; ~2.9 here)
    assert permuted > uniform + 0.5  # confidently wrong: worse than knowing nothing (~6.6 here)
    assert random > uniform - 0.3  # learns nothing about the text (~5.55 here)
    assert min(permuted, random) > clean + 2.0
