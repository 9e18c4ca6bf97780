import threading
import time
from collections.abc import Mapping

import pytest
import torch

from p2pcod import distill
from p2pcod.distill import DistillConfig
from p2pcod.teachers import TeacherError, TeacherPool


class MLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)


def _real(m: torch.nn.Module) -> bool:
    """Built with storage, not on the meta device (where the pool first vets every config)."""
    return not any(t.is_meta for t in m.state_dict().values())


class Builder:
    """build_model for the pool that records what it built (for real; `meta` counts the meta builds)."""

    def __init__(self) -> None:
        self.built: list[torch.nn.Module] = []
        self.meta = 0

    def __call__(self, cfg: Mapping) -> torch.nn.Module:
        if cfg.get("kind") == "split":
            m = SplitConst()
        else:
            m = MLP(cfg["d_in"], cfg["hidden"], cfg["classes"], cfg.get("dropout", 0.0))
        if _real(m):
            self.built.append(m)
        else:
            self.meta += 1
        return m


CFG = {"d_in": 4, "hidden": 8, "classes": 3}


def _weights(cfg=CFG, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(cfg["d_in"], cfg["hidden"], cfg["classes"]).state_dict()


FP32 = DistillConfig(teacher_precision="fp32")  # teachers exactly as loaded: these tests compare their weights


def _pool(**kw) -> tuple[TeacherPool, Builder]:
    b = Builder()
    return TeacherPool(b, kw.pop("cfg", FP32), kw.pop("kind", "multiclass"), **kw), b


def test_empty_pool_predicts_none():
    pool, _ = _pool()
    assert pool.predict(torch.zeros(2, 4)) is None
    assert len(pool) == 0 and pool.names() == [] and pool.logits(torch.zeros(2, 4)) == []


def test_predict_is_mean_of_teacher_probabilities():
    pool, _ = _pool()
    sds = {"b": _weights(seed=1), "a": _weights(seed=2)}
    for i, (name, sd) in enumerate(sds.items()):
        pool.swap(name, sd, CFG, step=10 * i)
    x = torch.randn(5, 4)
    manual = []
    for name in ("a", "b"):
        m = MLP(**CFG)
        m.load_state_dict(sds[name])
        manual.append(torch.softmax(m(x), dim=-1))
    expected = (manual[0] + manual[1]) / 2
    got = pool.predict(x)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert torch.allclose(got, expected.detach(), atol=1e-6)
    assert pool.names() == ["a", "b"]
    assert [t.shape for t in pool.logits(x)] == [(5, 3), (5, 3)]
    # the target can be used in the student's loss and backward (no inference-mode tensors)
    student = MLP(**CFG)
    distill.loss(student(x), got, DistillConfig(), "multiclass", step=0).backward()
    assert student.net[0].weight.grad is not None


def test_pool_copies_weights_and_freezes_teachers():
    pool, b = _pool()
    sd = _weights()
    pool.swap("a", sd, {**CFG, "dropout": 0.5}, step=1)
    x = torch.randn(6, 4)
    first = pool.predict(x)
    assert torch.equal(first, pool.predict(x))  # eval mode: dropout off, deterministic
    module = b.built[-1]
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    sd["net.0.weight"].add_(1.0)  # caller's tensors are not aliased
    assert torch.equal(first, pool.predict(x))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda sd: {**sd, "net.0.weight": torch.zeros(8, 5)}, "size mismatch"),
        (lambda sd: {k: v for k, v in sd.items() if k != "net.3.bias"}, "net.3.bias"),
        (lambda sd: {**sd, "extra.weight": torch.zeros(1)}, "extra.weight"),
        (lambda sd: {**sd, "net.3.bias": torch.tensor([0.0, float("nan"), 0.0])}, "net.3.bias.*non-finite"),
        (lambda sd: {**sd, "net.0.bias": torch.full((8,), float("inf"))}, "net.0.bias.*non-finite"),
        (lambda sd: {**sd, "net.0.bias": [0.0] * 8}, "not a tensor"),
    ],
)
def test_failing_swap_keeps_the_old_teacher(bad, match):
    pool, _ = _pool()
    pool.swap("a", _weights(seed=0), CFG, step=5)
    pool.swap("a", _weights(seed=1), CFG, step=6)  # the old module now is a standby to be reused
    x = torch.randn(3, 4)
    before = pool.predict(x)
    with pytest.raises(TeacherError, match=match):
        pool.swap("a", bad(_weights(seed=2)), CFG, step=7)
    assert torch.equal(pool.predict(x), before)
    assert pool.info()[0].step == 6
    pool.swap("a", _weights(seed=3), CFG, step=8)  # and the pool still works afterwards
    assert not torch.equal(pool.predict(x), before)


def test_bad_model_config_raises_teacher_error():
    pool, _ = _pool()
    with pytest.raises(TeacherError, match="'x'.*config"):
        pool.swap("x", _weights(), {"d_in": 4}, step=0)
    assert len(pool) == 0


def test_a_config_is_vetted_on_meta_before_a_module_is_built():
    """A config whose model does not have the state dict's names and shapes (say, one announcing an enormous model
    with a small checkpoint) is refused after a build on the meta device, which allocates nothing."""
    pool, b = _pool()
    huge = {**CFG, "hidden": 1 << 22, "d_in": 1 << 12}  # 16e9 weights: 64 GB if it were ever built for real
    with pytest.raises(TeacherError, match="'a'.*does not fit the model of its config.*size mismatch for net.0.weight"):
        pool.swap("a", _weights(), huge, step=1)
    assert b.built == [] and b.meta == 1 and len(pool) == 0
    with pytest.raises(TeacherError, match="missing keys.*net.3.bias.*unexpected keys.*extra"):
        pool.swap("a", {**{k: v for k, v in _weights().items() if k != "net.3.bias"}, "extra": torch.zeros(1)}, CFG,
                  step=1)
    assert b.built == []
    pool.swap("a", _weights(), CFG, step=2)  # a fitting state dict: vetted on meta, then built once for real
    assert len(b.built) == 1 and b.meta == 3 and pool.names() == ["a"]
    meta = pool.meta_model(huge)
    assert meta.net[0].weight.shape == (1 << 22, 1 << 12) and meta.net[0].weight.is_meta
    with pytest.raises(TeacherError, match="announced model config: building the model from its config failed"):
        pool.meta_model({"d_in": 4})


def test_module_reuse_when_config_unchanged():
    pool, b = _pool()
    x = torch.randn(3, 4)
    for i in range(5):
        pool.swap("a", _weights(seed=i), CFG, step=i)
        m = MLP(**CFG)
        m.load_state_dict(_weights(seed=i))
        assert torch.allclose(pool.predict(x), torch.softmax(m(x), dim=-1), atol=1e-6)
    assert len(b.built) == 2  # active + standby, alternating
    pool.swap("a", _weights({**CFG, "hidden": 16}), {**CFG, "hidden": 16}, step=9)
    assert len(b.built) == 3  # a new config needs a new module


def test_teachers_of_different_sizes_coexist():
    pool, _ = _pool()
    small, big = {**CFG, "hidden": 2}, {**CFG, "hidden": 32}
    pool.swap("small", _weights(small), small, step=1)
    pool.swap("big", _weights(big), big, step=2)
    out = pool.predict(torch.randn(7, 4))
    assert out.shape == (7, 3)
    assert torch.allclose(out.sum(-1), torch.ones(7))
    assert {i.name: i.model_cfg["hidden"] for i in pool.info()} == {"big": 32, "small": 2}


def test_max_teachers_evicts_stalest_other():
    pool, _ = _pool(max_teachers=2)
    pool.swap("a", _weights(), CFG, step=10)
    pool.swap("b", _weights(), CFG, step=5)
    pool.swap("b", _weights(), CFG, step=6)  # an update of a present teacher evicts nobody
    assert pool.names() == ["a", "b"]
    pool.swap("c", _weights(), CFG, step=1)  # c is stalest, but the newcomer stays: b goes
    assert pool.names() == ["a", "c"]
    assert pool.staleness(12) == {"a": 2, "c": 11}


def test_remove_retain_info():
    pool, _ = _pool()
    for n in ("a", "b", "c"):
        pool.swap(n, _weights(), CFG, step=3, meta={"digest": n * 4})
    assert pool.remove("b") and not pool.remove("b")
    assert pool.retain(["a", "zzz"]) == ["c"]
    (info,) = pool.info()
    assert (info.name, info.step, info.meta, info.model_cfg) == ("a", 3, {"digest": "aaaa"}, CFG)
    assert info.received_at <= time.time()


def test_dtype_and_tuple_input():
    class Pair(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x):
            dense, ids = x
            return self.lin(dense).squeeze(-1) + ids.float()

    pool = TeacherPool(lambda cfg: Pair(), DistillConfig(), "binary", dtype=torch.float64)
    torch.manual_seed(0)
    sd = Pair().state_dict()
    pool.swap("p", sd, {}, step=0)
    dense, ids = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    out = pool.predict((dense, ids))
    ref = Pair()
    ref.load_state_dict(sd)
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert torch.allclose(out, torch.sigmoid(ref.lin(dense).squeeze(-1)), atol=1e-6)


class SplitConst(torch.nn.Module):
    """Output a.bias + b.bias, read with a pause between: a half-loaded module gives a wrong sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(1, 1)
        self.b = torch.nn.Linear(1, 1)

    def forward(self, x):
        first = self.a.bias.clone()
        time.sleep(0.0002)
        return x[:, :1] * 0 + first + self.b.bias


def _split_sd(total: float, v: float) -> dict[str, torch.Tensor]:
    z = torch.zeros(1, 1)
    return {"a.weight": z, "a.bias": torch.tensor([v]), "b.weight": z, "b.bias": torch.tensor([total - v])}


def test_concurrent_swap_and_predict():
    pool, b = _pool(cfg=DistillConfig(psi="mse", teacher_precision="fp32"), kind="binary")
    split = {"kind": "split"}
    pool.swap("a", _split_sd(1.0, 0.0), split, step=0)
    pool.swap("b", _split_sd(3.0, 0.0), split, step=0)
    stop, errors, swaps = threading.Event(), [], [0]

    def fetcher():
        try:
            i = 0
            while not stop.is_set():
                i += 1
                pool.swap("a" if i % 2 else "b", _split_sd(1.0 if i % 2 else 3.0, float(i)), split, step=i)
                pool.swap("c", _split_sd(100.0, 0.0), split, step=i)  # c comes and goes
                pool.remove("c")
                swaps[0] = i
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    t = threading.Thread(target=fetcher)
    t.start()
    seen = set()
    x = torch.zeros(2, 1)
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            out = pool.predict(x)
            # exactly {a, b} (mean 2) or {a, b, c} (mean 104/3): never a torn or partial set
            value = round(out[0, 0].item(), 4)
            assert value in (2.0, round(104 / 3, 4)), value
            seen.add(value)
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive() and errors == []
    assert 2.0 in seen
    assert swaps[0] > 20 and len(b.built) < 3 * swaps[0]  # it really swapped, reusing modules


def test_predict_leaves_out_bad_teachers(caplog):
    pool, _ = _pool()
    good = _weights(seed=0)
    pool.swap("good", good, CFG, step=1)
    wide = {**CFG, "d_in": 5}  # cannot run on 4 features
    pool.swap("wide", _weights(wide), wide, step=1)
    huge = {k: torch.full_like(v, 3e38) for k, v in _weights(seed=1).items()}  # finite, but overflows
    pool.swap("huge", huge, CFG, step=1)
    x = torch.randn(3, 4)
    ref = MLP(**CFG)
    ref.load_state_dict(good)
    for _ in range(3):
        assert torch.allclose(pool.predict(x), torch.softmax(ref(x), dim=-1), atol=1e-6)
    assert pool.skipped() == {"huge": 3, "wide": 3}
    assert sum("wide" in r.getMessage() for r in caplog.records) == 1  # warned once per checkpoint
    assert pool.predict(x, expect_shape=(3, 5)) is None  # every teacher left out: train without
    with pytest.raises(TeacherError, match="'wide'"):
        pool.logits(x)  # diagnostics see the raw failure


def test_snapshot_copies_every_teacher_with_its_info():
    pool, _ = _pool()
    pool.swap("b", _weights(seed=1), CFG, step=7, meta={"digest": "x"})
    pool.swap("a", _weights(seed=2), CFG, step=3)
    x = torch.randn(5, 4)
    before = pool.predict(x)
    copies = pool.snapshot()
    assert [(c.info.name, c.info.step) for c in copies] == [("a", 3), ("b", 7)]
    assert copies[1].info.meta == {"digest": "x"} and copies[1].info.model_cfg == CFG
    for c, seed in zip(copies, (2, 1), strict=True):
        assert c.state.keys() == _weights().keys()
        assert all(torch.equal(c.state[k], v) for k, v in _weights(seed=seed).items())
        assert {t.device.type for t in c.state.values()} == {"cpu"}
        c.state["net.0.weight"].add_(1.0)  # the caller owns the copy: the pool's teachers do not change
    assert torch.equal(pool.predict(x), before)
    assert _pool()[0].snapshot() == []


class _Hooked(MLP):
    """An MLP that runs `on_copy` (once) in the middle of its state_dict(): a swap racing a snapshot."""

    on_copy = None

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        hook, self.on_copy = self.on_copy, None
        if hook is not None:
            hook()
        return sd


def test_snapshot_is_not_reloaded_by_a_concurrent_swap():
    """Two swaps while the module being copied is read: without the busy mark the second would reload that very
    module (it became the standby) and the copy would hold step 4's weights under step 2's info."""
    built: list[_Hooked] = []
    def build(cfg):
        m = _Hooked(**cfg)
        if _real(m):
            built.append(m)
        return m

    pool = TeacherPool(build, FP32, "multiclass")
    for step in (1, 2):
        pool.swap("a", _weights(seed=step), CFG, step=step)
    copied = built[-1]
    assert pool.info()[0].step == 2

    def race() -> None:
        pool.swap("a", _weights(seed=3), CFG, step=3)
        pool.swap("a", _weights(seed=4), CFG, step=4)

    copied.on_copy = race
    (copy_,) = pool.snapshot()
    assert copy_.info.step == 2
    assert all(torch.equal(copy_.state[k], v) for k, v in _weights(seed=2).items())
    assert pool.info()[0].step == 4 and len(built) == 3  # the busy module was left alone: a fresh one was built
    (after,) = pool.snapshot()
    assert after.info.step == 4 and all(torch.equal(after.state[k], v) for k, v in _weights(seed=4).items())


# ---- cheaper teachers: a draw of them, and their precision ----------------------------------------------------


def test_predict_runs_only_the_drawn_teachers():
    pool, _ = _pool()
    for i, name in enumerate(("a", "b", "c")):
        pool.swap(name, _weights(seed=i), CFG, step=i)
    x = torch.randn(5, 4)
    only_b = pool.predict(x, only=["b"])
    assert torch.allclose(only_b, torch.softmax(pool.logits(x)[1], -1), atol=1e-6)
    assert torch.allclose(pool.predict(x, only=["a", "gone"]), torch.softmax(pool.logits(x)[0], -1), atol=1e-6)
    assert pool.predict(x, only=["gone"]) is None and pool.predict(x, only=[]) is None


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cheaper_teachers_stay_close_to_fp32(precision):
    fp32, _ = _pool()
    cheap, _ = _pool(cfg=DistillConfig(teacher_precision=precision))
    big = {"d_in": 4, "hidden": 64, "classes": 3}
    for pool in (fp32, cheap):
        pool.swap("a", _weights(big, seed=1), big, step=1)
    x = torch.randn(256, 4)
    exact, got = fp32.predict(x), cheap.predict(x)
    assert got.dtype == torch.float32 and not torch.equal(got, exact)  # it really ran in another precision
    assert (got - exact).abs().max() < 0.02
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95
    slot = cheap._active["a"]
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in slot.module.parameters())
    else:  # int8 Linear layers in the copy that runs; the module keeps fp32 weights (snapshot, reuse)
        assert "quantized" in type(slot.runner.net[0]).__module__
        assert all(p.dtype == torch.float32 for p in slot.module.parameters())
        assert torch.equal(cheap.snapshot()[0].state["net.0.weight"], _weights(big, seed=1)["net.0.weight"])


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from p2pcod import teachers

    monkeypatch.setattr(teachers, "_cpu_bf16_native", lambda: True)
    assert teachers.teacher_precision("auto", "cpu") == (torch.bfloat16, False)
    monkeypatch.setattr(teachers, "_cpu_bf16_native", lambda: False)
    assert teachers.teacher_precision("auto", "cpu") == (None, False)
    assert teachers.teacher_precision("fp32", "cpu") == (None, False)
    assert teachers.teacher_precision("int8", "cpu") == (None, True)
    assert teachers.teacher_precision("int8", "meta") == (torch.bfloat16, False)  # int8 kernels are CPU only
