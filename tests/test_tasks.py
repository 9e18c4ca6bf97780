"""Tasks: the lm corpus and its shards, the GPT, the Criteo-format reader, the synthetic generator, ctr."""

import numpy as np
import pytest
import torch

from p2pcod.errors import ConfigError, DataError
from p2pcod.tasks import get_task
from p2pcod.tasks.ctr import N_CAT, N_INT, parse_ctr, read_ctr
from p2pcod.tasks.lm import default_corpus
from p2pcod.tasks.synth_ctr import synthetic_ctr, write_synthetic_ctr

TINY_GPT = {"layers": 1, "width": 32, "heads": 2, "context": 32}


@pytest.fixture(scope="module")
def lm():
    return get_task({"name": "lm", "seq_len": 32})


@pytest.fixture(scope="module")
def ctr():
    return get_task({"name": "ctr", "synthetic_rows": 30_000, "hash_buckets": 500})


def _tree(root, layout):
    for rel, text in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _same(a, b):
    xa, xb = (a.x if isinstance(a.x, tuple) else (a.x,)), (b.x if isinstance(b.x, tuple) else (b.x,))
    return all(torch.equal(u, v) for u, v in zip(xa, xb, strict=True)) and torch.equal(a.y, b.y)


def _val_loss(task, model, val):
    model.eval()
    with torch.no_grad():
        return float(np.mean([float(task.loss(model(b.x), b)) for b in val]))


def _fit(task, model, steps, opt, batch_size, val, split="disjoint"):
    before = _val_loss(task, model, val)
    model.train()
    batches = task.train_batches(0, 2, split=split, batch_size=batch_size, seed=1)
    for _ in range(steps):
        b = next(batches)
        loss = task.loss(model(b.x), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, _val_loss(task, model, val)


# ---- lm -------------------------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib_sources(lm):
    d = lm.describe()
    assert d["corpus"] == str(default_corpus()) and d["train_bytes"] > 1_000_000 and d["val_files"] >= 1
    rels = [rel for rel, _ in lm.train_files + lm.val_files]
    assert len(rels) == len(set(rels))  # no file twice
    assert all(r.endswith(".py") for r in rels)
    assert not any(part in ("site-packages", "test", "tests") for r in rels for part in r.split("/")[:-1])
    assert "json/decoder.py" in rels or "json/__init__.py" in rels


@pytest.mark.parametrize("k", [1, 3, 7])
def test_lm_disjoint_shards_partition_the_training_files(lm, k):
    shards = [set(lm.shard_files(i, k, "disjoint")) for i in range(k)]
    assert all(shards)  # every shard gets data
    assert sum(len(s) for s in shards) == len(set().union(*shards))  # pairwise disjoint
    assert set().union(*shards) == {rel for rel, _ in lm.train_files}  # and together cover all
    val = {rel for rel, _ in lm.val_files}
    assert not val & set().union(*shards)
    sizes = dict(lm.train_files)
    loads = [sum(len(sizes[f]) for f in s) for s in shards]
    assert max(loads) < 1.2 * min(loads)  # balanced by size


def test_lm_same_and_noniid_splits(lm):
    train = {rel for rel, _ in lm.train_files}
    assert set(lm.shard_files(1, 3, "same")) == train
    top = lambda rel: rel.split("/")[0] if "/" in rel else "."
    dirs = [{top(f) for f in lm.shard_files(i, 3, "noniid")} for i in range(3)]
    assert all(dirs) and not (dirs[0] & dirs[1] or dirs[0] & dirs[2] or dirs[1] & dirs[2])
    assert set().union(*(lm.shard_files(i, 3, "noniid") for i in range(3))) == train


def test_lm_batches_shapes_shift_determinism_and_resume(lm):
    it = lm.train_batches(1, 3, split="disjoint", batch_size=5, seed=7)
    full = [next(it) for _ in range(6)]
    b = full[0]
    assert b.x.shape == (5, 32) and b.y.shape == (5, 32) and b.x.dtype == b.y.dtype == torch.int64
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])  # y is x shifted by one byte
    assert not _same(full[0], full[1])
    again = lm.train_batches(1, 3, split="disjoint", batch_size=5, seed=7)
    assert all(_same(a, next(again)) for a in full)
    resumed = lm.train_batches(1, 3, split="disjoint", batch_size=5, seed=7, start_step=4)
    assert _same(next(resumed), full[4]) and _same(next(resumed), full[5])
    other = next(lm.train_batches(1, 3, split="disjoint", batch_size=5, seed=8))
    assert not _same(other, full[0])
    # the windows come from the shard's own files: every window is a substring of the shard's text
    text = b"".join(d for rel, d in lm.train_files if rel in set(lm.shard_files(1, 3, "disjoint")))
    assert all(bytes(w.tolist()) in text for w in b.x[:2].to(torch.uint8))


def test_lm_validation_is_fixed_and_held_out(lm):
    v1, v2 = lm.val_batches(4, 3), get_task({"name": "lm", "seq_len": 32}).val_batches(4, 3)
    assert len(v1) == 3 and all(_same(a, b) for a, b in zip(v1, v2, strict=True))
    val_text = b"".join(d for _, d in lm.val_files)
    assert all(bytes(w.tolist()) in val_text for w in v1[0].x.to(torch.uint8))


def test_lm_small_tree_and_file_list(tmp_path):
    root = _tree(tmp_path / "c", {f"{d}/f{i}.txt": f"{d}{i} " * 200 for d in "abcd" for i in range(3)})
    task = get_task({"name": "lm", "corpus": str(root), "seq_len": 16, "val_fraction": 0.1})
    assert len(task.train_files) + len(task.val_files) == 12
    groups = [{f.split("/")[0] for f in task.shard_files(i, 2, "noniid")} for i in range(2)]
    assert groups[0] and groups[1] and not groups[0] & groups[1]
    with pytest.raises(ConfigError, match="12|11|10|training files"):
        task.train_batches(0, 40, split="disjoint", batch_size=2, seed=0)
    listed = get_task({"name": "lm", "corpus": [str(root / "a"), str(root / "b" / "f0.txt")], "seq_len": 16})
    assert len(listed.train_files) + len(listed.val_files) == 4
    capped = get_task({"name": "lm", "corpus": str(root), "seq_len": 16, "max_bytes": 2000})
    assert sum(len(d) for _, d in capped.train_files) == 2000  # the cap is on training text only


def test_lm_validation_depends_on_the_corpus_and_val_fraction_alone(tmp_path):
    """The held-out files are chosen from the whole corpus before any cap: the same for every max_bytes, take and
    split, and never among the training files."""
    root = _tree(tmp_path / "c", {f"{d}/f{i}.txt": f"{d}{i} " * (50 + 20 * i) for d in "abcdef" for i in range(5)})
    base = {"name": "lm", "corpus": str(root), "seq_len": 16, "val_fraction": 0.1}
    whole = get_task(base)
    val = whole.val_files
    assert val and sum(len(d) for _, d in val) >= 0.1 * sum(len(d) for _, d in whole.train_files + val)
    for extra in ({"max_bytes": 1500}, {"max_bytes": 1500, "take": "spread"}, {"max_bytes": 400}):
        task = get_task({**base, **extra})
        assert task.val_files == val, extra
        assert not {r for r, _ in task.train_files} & {r for r, _ in val}
        assert sum(len(d) for _, d in task.train_files) == extra["max_bytes"]
        batches = task.val_batches(4, 2)
        assert all(_same(a, b) for a, b in zip(batches, whole.val_batches(4, 2), strict=True))
    assert whole.describe()["val_files"] == len(val) and whole.describe()["val_bytes"] == sum(len(d) for _, d in val)
    other = get_task({**base, "val_fraction": 0.3})
    assert len(other.val_files) > len(val)


def test_lm_capped_corpus_first_files_or_spread_over_directories(tmp_path):
    """take = "first" keeps the first files by path; "spread" keeps some of every top-level directory."""
    root = _tree(tmp_path / "c", {f"{d}/f{i}.txt": f"{d}{i} " * 100 for d in "abcdef" for i in range(4)})
    cfg = {"name": "lm", "corpus": str(root), "seq_len": 16, "val_fraction": 0.01, "max_bytes": 2400}

    def dirs(task):
        return {rel.split("/")[0] for rel, _ in task.train_files}

    first = get_task(cfg)
    assert dirs(first) == {"a", "b"}  # 8 files of 300 bytes: all of a/, all of b/
    with pytest.raises(ConfigError, match='set task.take = "spread"'):
        first.train_batches(0, 4, split="noniid", batch_size=2, seed=0)
    spread = get_task({**cfg, "take": "spread"})
    assert dirs(spread) == set("abcdef")
    assert sum(len(d) for _, d in spread.train_files) == 2400
    assert spread.train_files == sorted(spread.train_files)
    shards = [{f.split("/")[0] for f in spread.shard_files(i, 4, "noniid")} for i in range(4)]
    assert all(shards) and sum(map(len, shards)) == len(set().union(*shards))  # whole directories each


def test_lm_shard_arguments_checked(lm):
    for kwargs, key in [
        ({"shard": 3, "num_shards": 3}, "shard"),
        ({"shard": 0, "num_shards": 0}, "num_shards"),
        ({"shard": 0, "num_shards": 2, "split": "random"}, "split"),
    ]:
        args = {"split": "disjoint", "batch_size": 2, "seed": 0, **kwargs}
        with pytest.raises(ConfigError, match=key):
            lm.train_batches(args.pop("shard"), args.pop("num_shards"), **args)


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"corpus": 3}, "corpus"),
        ({"vocab": 300}, "vocab"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"take": "middle"}, "task.take must be one of first, spread"),
    ],
)
def test_lm_bad_task_config(cfg, key):
    with pytest.raises(ConfigError, match=key):
        get_task({"name": "lm", **cfg})


def test_lm_missing_corpus_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope"):
        get_task({"name": "lm", "corpus": str(tmp_path / "nope")})


@pytest.mark.parametrize(
    "change, key",
    [
        ({"width": 33}, "heads"),
        ({"layers": 0}, "layers"),
        ({"context": 16}, "context"),
        ({"depth": 2}, "depth"),
        ({"dropout": 1.0}, "dropout"),
        ({"heads": True}, "heads"),
        ({"layers": 10**7}, "model.layers = 10000000 exceeds the maximum 256"),  # refused before a module is built
        ({"width": 1 << 20}, "model.width = 1048576 exceeds the maximum 65536"),
    ],
)
def test_lm_bad_model_config(lm, change, key):
    with pytest.raises(ConfigError, match=key):
        lm.build_model({**TINY_GPT, **change})


def test_gpt_shapes_init_and_determinism(lm):
    torch.manual_seed(3)
    m = lm.build_model(TINY_GPT)
    torch.manual_seed(3)
    m2 = lm.build_model({**TINY_GPT, "context": 64})  # a longer context still reads the task's windows
    x = lm.val_batches(2, 1)[0].x
    logits = m(x)
    assert logits.shape == (2, 32, 256)
    assert lm.flat_logits(logits).shape == (64, 256)
    assert m2(x).shape == (2, 32, 256)
    torch.manual_seed(3)
    again = lm.build_model(TINY_GPT)
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert abs(float(m.tok.weight.detach().std()) - 0.02) < 0.003  # GPT-2 init
    # causal: changing a later byte does not change earlier predictions
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    assert torch.allclose(m(x2)[:, :-1], logits[:, :-1], atol=1e-6)
    u = lm.unigram()
    assert u.shape == (256,) and abs(float(u.sum()) - 1) < 1e-5 and int(u.argmax()) == ord(" ")


def test_lm_training_lowers_validation_loss(lm):
    torch.manual_seed(0)
    model = lm.build_model(TINY_GPT)
    val = lm.val_batches(16, 2)
    before, after = _fit(lm, model, 40, torch.optim.Adam(model.parameters(), lr=3e-3), 16, val)
    assert before > 5.0  # about ln(256) at init
    assert after < before - 1.5


# ---- ctr: the format, the generator -------------------------------------------------------------


def test_synthetic_file_round_trips_through_the_reader(tmp_path):
    path = write_synthetic_ctr(tmp_path / "s.tsv", 3000, seed=4)
    lines = path.read_text().splitlines()
    assert len(lines) == 3000 and all(line.count("\t") == 39 for line in lines)
    cols = [line.split("\t") for line in lines[:200]]
    assert all(len(c[14]) in (0, 8) and all(len(v) in (0, 8) for v in c[14:]) for c in cols)
    rows = read_ctr(path)
    mem = synthetic_ctr(3000, seed=4)
    assert len(rows) == 3000
    for key in ("label", "ints", "int_missing", "cats", "cat_missing"):
        assert np.array_equal(getattr(rows, key), getattr(mem, key)), key
    assert set(np.unique(rows.label)) == {0, 1} and 0.15 < rows.label.mean() < 0.35
    assert rows.ints.shape == (3000, N_INT) and rows.cats.shape == (3000, N_CAT)
    assert 0.01 < rows.int_missing.mean() < 0.5 and 0.005 < rows.cat_missing.mean() < 0.5
    assert rows.ints.min() < 0  # negative integers occur, as in Criteo's I2
    assert not np.array_equal(synthetic_ctr(300, seed=5).cats, mem.cats[:300])


def test_reader_parses_exact_values():
    line = (
        b"1\t5\t-2\t\t0\t1\t2\t3\t4\t5\t6\t7\t8\t123456789012\t"
        + b"\t".join([b"0000000a", b"FFFFFFFF", b""] + [b"deadbeef"] * 23)
        + b"\r\n"
    )
    rows = parse_ctr(line + b"0" + b"\t" * 39)  # second line: everything missing, no final newline
    assert len(rows) == 2 and rows.label.tolist() == [1, 0]
    assert rows.ints[0, :4].tolist() == [5, -2, 0, 0] and rows.ints[0, 12] == 123456789012
    assert rows.int_missing[0].tolist() == [False, False, True] + [False] * 10
    assert rows.cats[0, :4].tolist() == [10, 0xFFFFFFFF, 0, 0xDEADBEEF] and rows.cat_missing[0, 2]
    assert rows.cat_missing[1].all() and rows.int_missing[1].all() and (rows.ints[1] == 0).all()


def test_malformed_lines_name_the_line(tmp_path):
    path = write_synthetic_ctr(tmp_path / "s.tsv", 50, seed=1)
    lines = path.read_text().splitlines()
    bad = [*lines[:6], "\t".join(lines[6].split("\t")[:-1]), *lines[7:]]  # line 7: 39 columns
    (tmp_path / "cols.tsv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match=r"cols\.tsv:7: expected 40"):
        read_ctr(tmp_path / "cols.tsv")
    fields = lines[2].split("\t")
    fields[3] = "12x"
    (tmp_path / "int.tsv").write_text("\n".join([*lines[:2], "\t".join(fields), *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"int\.tsv:3: column I3"):
        read_ctr(tmp_path / "int.tsv")
    (tmp_path / "label.tsv").write_text("\n".join([*lines[:4], "2" + lines[4][1:], *lines[5:]]) + "\n")
    with pytest.raises(DataError, match=r"label\.tsv:5: column label"):
        read_ctr(tmp_path / "label.tsv")
    skipped = read_ctr(tmp_path / "cols.tsv", skip_bad_lines=True)
    assert len(skipped) == 49 and skipped.skipped == 1
    assert len(read_ctr(path, max_rows=20)) == 20


# ---- ctr: the task ------------------------------------------------------------------------------


def test_ctr_shards(ctr):
    n = ctr.describe()["train_rows"]
    for split in ("disjoint", "noniid"):
        parts = [ctr.shard_rows(i, 3, split) for i in range(3)]
        joined = np.concatenate(parts)
        assert len(joined) == len(np.unique(joined)) == n, split  # disjoint, and together all rows
    labels = ctr._labels
    rates = [labels[ctr.shard_rows(i, 3, "noniid")].mean() for i in range(3)]
    assert rates[0] + 0.05 < rates[1] < rates[2] - 0.05  # label skew
    assert len(ctr.shard_rows(2, 3, "same")) == n


def test_ctr_batches_and_resume(ctr):
    it = ctr.train_batches(0, 2, split="disjoint", batch_size=6, seed=2)
    full = [next(it) for _ in range(5)]
    dense, cats = full[0].x
    assert dense.shape == (6, N_INT) and dense.dtype == torch.float32 and cats.shape == (6, N_CAT)
    assert cats.dtype == torch.int64 and 0 <= int(cats.min()) and int(cats.max()) < 500
    assert full[0].y.shape == (6,) and set(full[0].y.tolist()) <= {0.0, 1.0}
    resumed = ctr.train_batches(0, 2, split="disjoint", batch_size=6, seed=2, start_step=3)
    assert _same(next(resumed), full[3]) and not _same(full[3], full[4])
    v = ctr.val_batches(100, 3)
    assert len(v) == 3 and all(_same(a, b) for a, b in zip(v, ctr.val_batches(100, 3), strict=True))
    assert 0.15 < float(ctr.unigram()) < 0.35 and ctr.unigram().dim() == 0


def test_ctr_model_config(ctr):
    with pytest.raises(ConfigError, match="hash_buckets"):
        ctr.build_model({"hidden": [8], "hash_buckets": 10})
    with pytest.raises(ConfigError, match="hidden"):
        ctr.build_model({"hidden": [8, 0]})
    with pytest.raises(ConfigError, match="width"):
        ctr.build_model({"width": 8})
    with pytest.raises(ConfigError, match="model.hidden has 1000 layers, more than the maximum 64"):
        ctr.build_model({"hidden": [1] * 1000})
    model = ctr.build_model({"hidden": [], "embed_dim": 2})  # no hidden layer: logistic regression
    assert model(ctr.val_batches(4, 1)[0].x).shape == (4,)


def test_ctr_training_lowers_validation_bce(ctr):
    torch.manual_seed(0)
    model = ctr.build_model({"hidden": [32, 16], "embed_dim": 4})
    val = ctr.val_batches(400, 3)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.03)
    before, after = _fit(ctr, model, 60, opt, 128, val, split="same")
    y, p = torch.cat([b.y for b in val]), ctr.unigram()
    base_rate = float(torch.nn.functional.binary_cross_entropy(p.expand_as(y), y))  # predicting the prior
    assert after < before - 0.1 and after < base_rate - 0.01


def test_ctr_data_file_and_val_file(tmp_path):
    write_synthetic_ctr(tmp_path / "train.tsv", 400, seed=1)
    write_synthetic_ctr(tmp_path / "val.tsv", 100, seed=2)
    task = get_task(
        {
            "name": "ctr",
            "data": str(tmp_path / "train.tsv"),
            "val_data": str(tmp_path / "val.tsv"),
            "hash_buckets": 64,
        }
    )
    assert task.describe()["train_rows"] == 400 and task.describe()["val_rows"] == 100
    capped = get_task(
        {"name": "ctr", "data": str(tmp_path / "train.tsv"), "max_rows": 200, "hash_buckets": 64}
    )
    assert capped.describe()["train_rows"] == 180  # the last 10% held out
    with pytest.raises(DataError, match="missing.tsv"):
        get_task({"name": "ctr", "data": str(tmp_path / "missing.tsv")})


# ---- get_task -----------------------------------------------------------------------------------


def test_get_task_rejects_unknown_names_and_keys():
    with pytest.raises(ConfigError, match="'vision'.*lm, ctr"):
        get_task({"name": "vision"})
    with pytest.raises(ConfigError, match="task.name"):
        get_task({"seq_len": 3})
    with pytest.raises(ConfigError, match="task.colour"):
        get_task({"name": "ctr", "colour": 1})
    with pytest.raises(ConfigError, match="task.hash_buckets"):
        get_task({"name": "ctr", "hash_buckets": 1})
