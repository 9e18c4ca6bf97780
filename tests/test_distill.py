import math

import pytest
import torch

from p2pcod import distill
from p2pcod.distill import DistillConfig, ShapeError
from p2pcod.errors import ConfigError


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
P = [[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]]


def _ce(s, p, t=1.0):
    rows = [
        -sum(pi * li for pi, li in zip(pr, _log_softmax([v / t for v in sr]), strict=True))
        for sr, pr in zip(s, p, strict=True)
    ]
    return t * t * sum(rows) / len(rows)


def _entropy_term(p):  # mean over rows of Σ p log p (0 log 0 = 0)
    return sum(sum(pi * math.log(pi) for pi in pr if pi > 0) for pr in p) / len(p)


# ------------------------------------------------------------------------------------------- psi values


def test_ce_multiclass_matches_hand_formula():
    got = distill.psi(torch.tensor(S), torch.tensor(P), DistillConfig(psi="ce"), "multiclass")
    assert got.shape == ()
    assert got.item() == pytest.approx(_ce(S, P), rel=1e-6)


def test_kl_is_ce_minus_target_entropy_and_zero_at_target():
    got = distill.psi(torch.tensor(S), torch.tensor(P), DistillConfig(psi="kl"), "multiclass")
    assert got.item() == pytest.approx(_ce(S, P) + _entropy_term(P), rel=1e-6)
    # a student that predicts the target exactly has KL 0 (target has a 0 entry: no NaN)
    student = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    zero = distill.psi(student, torch.tensor([[0.2, 0.3, 0.5]]), DistillConfig(psi="kl"), "multiclass")
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_mse_sums_classes_and_means_examples():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    got = distill.psi(s, t, DistillConfig(psi="mse", temperature=3.0), "multiclass")
    assert got.item() == pytest.approx((1 + 4 + 4 + 9) / 2)  # temperature ignored by mse
    b = distill.psi(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), DistillConfig(psi="mse"), "binary")
    assert b.item() == pytest.approx((1 + 4) / 2)


def test_binary_ce_and_kl():
    s, p = [0.0, 2.0, -3.0], [0.3, 0.9, 0.0]
    expected = (
        -sum(
            pi * math.log(_sigmoid(si)) + (1 - pi) * math.log(1 - _sigmoid(si))
            for si, pi in zip(s, p, strict=True)
        )
        / 3
    )
    got = distill.psi(torch.tensor(s), torch.tensor(p), DistillConfig(psi="ce"), "binary")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    ent = sum(pi * math.log(pi) + (1 - pi) * math.log(1 - pi) for pi in p if 0 < pi < 1) / 3
    kl = distill.psi(torch.tensor(s), torch.tensor(p), DistillConfig(psi="kl"), "binary")
    assert kl.item() == pytest.approx(expected + ent, rel=1e-5)


def test_temperature_softens_and_scales_by_t_squared():
    cfg = DistillConfig(psi="ce", temperature=2.0)
    got = distill.psi(torch.tensor(S), torch.tensor(P), cfg, "multiclass")
    assert got.item() == pytest.approx(_ce(S, P, t=2.0), rel=1e-6)
    assert got.item() != pytest.approx(_ce(S, P), rel=1e-3)
    # the aggregated target is softmax(teacher / T)
    teacher = torch.tensor([[2.0, 0.0, -2.0]])
    tgt = distill.aggregate([teacher], cfg, "multiclass")
    assert tgt[0].tolist() == pytest.approx(_softmax([1.0, 0.0, -1.0]), rel=1e-6)
    b = distill.psi(torch.tensor([4.0]), torch.tensor([0.5]), DistillConfig(temperature=4.0), "binary")
    assert b.item() == pytest.approx(16 * -(0.5 * math.log(_sigmoid(1)) + 0.5 * math.log(1 - _sigmoid(1))))


def test_temperature_keeps_gradient_size():
    # Hinton et al.: for large T the T²-scaled gradient tends to (s - t_logits)/C, independent of T
    grads = []
    for temp in (10.0, 20.0):
        s = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
        cfg = DistillConfig(temperature=temp)
        tgt = distill.aggregate([torch.tensor([[0.0, 0.5, 0.0]])], cfg, "multiclass")
        distill.psi(s, tgt, cfg, "multiclass").backward()
        grads.append(s.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-3)
    assert grads[0].abs().max() > 0.1


def test_sequence_shaped_logits_average_over_every_position():
    s = torch.randn(2, 5, 7)
    t = torch.softmax(torch.randn(2, 5, 7), dim=-1)
    cfg = DistillConfig()
    got = distill.psi(s, t, cfg, "multiclass")
    flat = distill.psi(s.reshape(10, 7), t.reshape(10, 7), cfg, "multiclass")
    assert got.item() == pytest.approx(flat.item(), rel=1e-6)


def test_stable_for_huge_logits_and_low_precision_student():
    s = torch.tensor([[1000.0, -1000.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    for name in distill.PSIS:
        v = distill.psi(s, t, DistillConfig(psi=name), "multiclass")
        assert torch.isfinite(v)
    assert distill.psi(s, t, DistillConfig(), "multiclass").item() == pytest.approx(2000.0)
    bf = distill.psi(torch.tensor(S, dtype=torch.bfloat16), torch.tensor(P), DistillConfig(), "multiclass")
    assert bf.dtype == torch.float32
    assert torch.isfinite(distill.psi(torch.tensor([500.0]), torch.tensor([0.0]), DistillConfig(), "binary"))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        distill.psi(torch.zeros(2, 3), torch.zeros(2, 4), DistillConfig(), "multiclass")
    with pytest.raises(ValueError):  # ShapeError is also a ValueError
        distill.loss(torch.zeros(4), torch.zeros(4, 1), DistillConfig(), "binary", step=0)
    with pytest.raises(ShapeError, match="teacher 1"):
        distill.aggregate([torch.zeros(2, 3), torch.zeros(2, 5)], DistillConfig(), "multiclass")
    with pytest.raises(ConfigError, match="kind"):
        distill.psi(torch.zeros(2, 3), torch.zeros(2, 3), DistillConfig(), "regression")


# ------------------------------------------------------------------------------------------- aggregation


def test_mean_aggregate_is_mean_probability():
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    got = distill.aggregate([a, b], DistillConfig(), "multiclass")
    expected = [(x + y) / 2 for x, y in zip(_softmax([2, 0, 0]), _softmax([0, 0, 3]), strict=True)]
    assert got[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert not got.requires_grad
    binary = distill.aggregate([torch.tensor([0.0]), torch.tensor([2.0])], DistillConfig(), "binary")
    assert binary.item() == pytest.approx((0.5 + _sigmoid(2.0)) / 2)
    logits = distill.aggregate([a, b], DistillConfig(psi="mse"), "multiclass")
    assert logits[0].tolist() == pytest.approx([1.0, 0.0, 1.5])


def test_aggregate_does_not_touch_teacher_logits():
    t = torch.tensor([[1.0, 2.0]])
    out = distill.aggregate([t], DistillConfig(psi="mse"), "multiclass")
    out += 1
    assert t.tolist() == [[1.0, 2.0]]


def _honest_and_poisoned() -> list[torch.Tensor]:
    honest = [torch.tensor([[4.0 + 0.1 * i, 0.0, 0.0]]) for i in range(4)]
    return honest + [torch.tensor([[-20.0, 20.0, 0.0]])]


@pytest.mark.parametrize("how", ["median", "trimmed"])
def test_robust_aggregates_ignore_a_poisoned_teacher(how):
    teachers = _honest_and_poisoned()
    honest_p0 = sum(_softmax([4.0 + 0.1 * i, 0, 0])[0] for i in range(4)) / 4
    mean = distill.aggregate(teachers, DistillConfig(aggregate="mean"), "multiclass")
    robust = distill.aggregate(teachers, DistillConfig(aggregate=how), "multiclass")
    assert abs(mean[0, 0].item() - honest_p0) > 0.15  # the poisoned teacher drags the mean
    assert abs(robust[0, 0].item() - honest_p0) < 0.02
    assert robust.sum(dim=-1).item() == pytest.approx(1.0)  # renormalised
    logits = distill.aggregate(teachers, DistillConfig(psi="mse", aggregate=how), "multiclass")
    assert abs(logits[0, 1].item()) < 0.5  # mean logit would be 4.0


def test_median_and_trim_fallbacks():
    t = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 10.0)]
    cfg = DistillConfig(psi="mse", aggregate="median")
    assert distill.aggregate(t, cfg, "binary").item() == pytest.approx(1.5)  # even count: mid average
    trimmed = DistillConfig(psi="mse", aggregate="trimmed", trim=0.25)
    assert distill.aggregate(t, trimmed, "binary").item() == pytest.approx(1.5)  # cuts 0 and 10
    # too few teachers to cut: never cut everything
    assert distill.aggregate(t[:2], trimmed, "binary").item() == pytest.approx(0.5)
    heavy = DistillConfig(psi="mse", aggregate="trimmed", trim=0.49)
    assert distill.aggregate(t[:3], heavy, "binary").item() == pytest.approx(1.0)
    assert distill.aggregate(t[:1], heavy, "binary").item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------- schedule


def test_gradient_flows_only_into_the_student():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    target = distill.aggregate([teacher(x)], DistillConfig(), "multiclass")
    assert not target.requires_grad
    value = distill.loss(student(x), target, DistillConfig(), "multiclass", step=0)
    value.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None
    # a target that requires grad is detached inside psi
    tgt = torch.softmax(torch.randn(8, 3), dim=-1).requires_grad_(True)
    distill.psi(student(x), tgt, DistillConfig(), "multiclass").backward()
    assert tgt.grad is None


def test_burn_in_and_alpha():
    cfg = DistillConfig(alpha=0.5, burn_in=10)
    s, t = torch.tensor(S, requires_grad=True), torch.tensor(P)
    assert distill.weight(9, cfg) == 0.0 and distill.weight(10, cfg) == 0.5
    before = distill.loss(s, t, cfg, "multiclass", step=9)
    assert before.item() == 0.0 and not before.requires_grad
    after = distill.loss(s, t, cfg, "multiclass", step=10)
    assert after.item() == pytest.approx(0.5 * _ce(S, P), rel=1e-6)
    assert after.requires_grad


def test_no_teacher_gives_zero_term():
    z = distill.loss(torch.zeros(3, 2, requires_grad=True), None, DistillConfig(), "multiclass", step=100)
    assert z.shape == () and z.item() == 0.0 and not z.requires_grad
    z0 = distill.loss(torch.tensor(S), torch.tensor(P), DistillConfig(alpha=0.0), "multiclass", step=5)
    assert z0.item() == 0.0


# ------------------------------------------------------------------------------------------- smoothing


def test_uniform_target():
    like = torch.tensor(S)
    cfg = DistillConfig(target="uniform")
    tgt = distill.smoothing_target(like, cfg, "multiclass", None)
    assert tgt.shape == like.shape and torch.allclose(tgt, torch.full_like(like, 1 / 3))
    v = distill.psi(like, tgt, cfg, "multiclass").item()
    assert v == pytest.approx(_ce(S, [[1 / 3] * 3] * 2), rel=1e-6)
    b = distill.smoothing_target(torch.zeros(5), cfg, "binary", None)
    assert torch.allclose(b, torch.full((5,), 0.5))
    m = distill.smoothing_target(like, DistillConfig(psi="mse", target="uniform"), "multiclass", None)
    assert torch.equal(m, torch.zeros_like(like))


def test_unigram_target():
    like = torch.tensor(S)
    counts = torch.tensor([2.0, 6.0, 0.0])  # normalised to [0.25, 0.75, 0]
    cfg = DistillConfig(target="unigram")
    tgt = distill.smoothing_target(like, cfg, "multiclass", counts)
    assert tgt[1].tolist() == pytest.approx([0.25, 0.75, 0.0])
    assert torch.isfinite(distill.psi(like, tgt, DistillConfig(psi="kl", target="unigram"), "multiclass"))
    mse = distill.smoothing_target(like, DistillConfig(psi="mse", target="unigram"), "multiclass", counts)
    assert mse[0].sum().item() == pytest.approx(0.0, abs=1e-4)  # centred log prior
    assert mse[0, 1] - mse[0, 0] == pytest.approx(math.log(3.0), rel=1e-5)
    b = distill.smoothing_target(torch.zeros(4), cfg, "binary", torch.tensor(0.2))
    assert torch.allclose(b, torch.full((4,), 0.2))
    b2 = distill.smoothing_target(torch.zeros(4), cfg, "binary", torch.tensor([3.0, 1.0]))
    assert torch.allclose(b2, torch.full((4,), 0.25))
    with pytest.raises(ConfigError, match="unigram"):
        distill.smoothing_target(like, cfg, "multiclass", None)
    with pytest.raises(ShapeError):
        distill.smoothing_target(like, cfg, "multiclass", torch.ones(4))
    with pytest.raises(ConfigError, match="teachers"):
        distill.smoothing_target(like, DistillConfig(), "multiclass", counts)


# ------------------------------------------------------------------------------------------- config


def test_config_from_dict_and_errors():
    cfg = DistillConfig.from_dict({"psi": "kl", "alpha": 2, "burn_in": 100, "aggregate": "trimmed"})
    assert cfg == DistillConfig(psi="kl", alpha=2, burn_in=100, aggregate="trimmed")
    with pytest.raises(ConfigError, match="'alhpa'"):
        DistillConfig.from_dict({"alhpa": 1.0})
    bad = [
        ("psi", "l2"),
        ("alpha", -1.0),
        ("alpha", float("nan")),
        ("temperature", 0),
        ("burn_in", 1.5),
        ("burn_in", -1),
        ("trim", 0.5),
        ("aggregate", "max"),
        ("target", "labels"),
        ("alpha", "1"),
    ]
    for key, value in bad:
        with pytest.raises(ConfigError, match=key) as err:
            DistillConfig.from_dict({key: value})
        assert repr(value) in str(err.value)


# ---- the cost bounds: teachers per step, batch fraction ------------------------------------------------------


def test_cost_keys_are_checked_naming_the_key():
    bad_values = [("teachers_per_step", -1), ("teachers_per_step", True), ("batch_fraction", 0),
                  ("batch_fraction", 1.5), ("teacher_precision", "fp16"), ("prefetch", "yes")]
    for key, value in bad_values:
        bad = {key: value}
        with pytest.raises(ConfigError, match=f"distill.{key}"):
            DistillConfig.from_dict(bad)
    assert DistillConfig(teachers_per_step=0, batch_fraction=1.0, teacher_precision="fp32").exact
    assert not DistillConfig().exact


def test_rows_is_the_ceiling_of_the_fraction():
    assert [distill.rows(16, DistillConfig(batch_fraction=f)) for f in (0.25, 0.3, 1.0, 0.01)] == [4, 5, 16, 1]
    x = (torch.arange(10).reshape(5, 2), torch.arange(5))
    dense, cats = distill.take_rows(x, 2)
    assert dense.shape == (2, 2) and cats.tolist() == [0, 1]
    with pytest.raises(distill.ShapeError):
        distill.take_rows({"x": 1}, 2)


def test_teacher_draws_are_seeded_uniform_and_cover_everyone():
    names = ["a", "b", "c", "d"]
    cfg = DistillConfig(teachers_per_step=2)
    draws = [distill.draw_teachers(names, cfg, seed=7, step=s) for s in range(4000)]
    assert draws == [distill.draw_teachers(names, cfg, seed=7, step=s) for s in range(4000)]  # resume: same draws
    assert draws != [distill.draw_teachers(names, cfg, seed=8, step=s) for s in range(4000)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= set(names) for d in draws)
    counts = {n: sum(n in d for d in draws) for n in names}
    assert all(abs(c / 4000 - 0.5) < 0.03 for c in counts.values()), counts  # each teacher in half the draws
    # all teachers: k = 0, k >= held, and the non-linear aggregates (median, trimmed) whatever k is
    assert distill.draw_teachers(names, DistillConfig(teachers_per_step=0), 7, 3) == names
    assert distill.draw_teachers(names[:2], cfg, 7, 3) == names[:2]
    assert distill.draw_teachers(names, DistillConfig(teachers_per_step=1, aggregate="median"), 7, 3) == names


@pytest.mark.parametrize("psi", ["ce", "kl", "mse"])
def test_a_draw_of_teachers_is_unbiased_for_the_gradient(psi):
    """E over draws of ∇ψ(mean of k drawn teachers) = ∇ψ(mean of all): exactly over every k-subset, and within a
    stated tolerance over 3000 seeded draws (the draws a trainer makes)."""
    import itertools

    torch.manual_seed(0)
    teachers = [torch.randn(6, 5) * 2 for _ in range(4)]
    names = ["t0", "t1", "t2", "t3"]
    cfg = DistillConfig(psi=psi, temperature=2.0, teachers_per_step=2)
    student = torch.randn(6, 5)

    def grad(chosen):
        s = student.clone().requires_grad_(True)
        distill.psi(s, distill.aggregate([teachers[names.index(n)] for n in chosen], cfg, "multiclass"),
                    cfg, "multiclass").backward()
        return s.grad

    full = grad(names)
    subsets = list(itertools.combinations(names, 2))
    exact = sum(grad(c) for c in subsets) / len(subsets)
    assert torch.allclose(exact, full, atol=1e-6)
    sampled = sum(grad(distill.draw_teachers(names, cfg, 3, s)) for s in range(3000)) / 3000
    assert (sampled - full).abs().max() < 0.05 * full.abs().max()
    # and a single draw is not the full mean: the test would fail for a biased or constant draw
    assert not torch.allclose(grad(["t0", "t1"]), full, atol=1e-3)
