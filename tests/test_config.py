import re
from pathlib import Path

import pytest

from p2pcod.config import ExchangeConfig, Recipe, TrainConfig, apply_overrides, load_recipe
from p2pcod.errors import ConfigError

PEERS = Path(__file__).resolve().parent.parent / "peers"


@pytest.mark.parametrize("recipe", sorted(PEERS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    r = load_recipe(recipe)
    assert r.task_name in ("lm", "ctr")
    assert r.train.steps > r.distill.burn_in >= 0
    assert Recipe.from_dict(r.to_dict(), source=r.source) == r == r.replace()


def test_overrides_are_toml_values():
    r = load_recipe(PEERS / "lm-tiny.toml", ["train.steps=7", "train.lr=0.5", "exchange.topology=full"])
    assert (r.train.steps, r.train.lr, r.exchange.topology) == (7, 0.5, "full")
    raw = {}
    apply_overrides(raw, ['model.hidden=[3, 4]', 'task.corpus="/x y"'])
    assert raw == {"model": {"hidden": [3, 4]}, "task": {"corpus": "/x y"}}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=-1", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ('train.optimizer="lamb"', "train.optimizer"),
        ('train.split="odd"', "train.split"),
        ("exchange.reload_every=0", "exchange.reload_every"),
        ("exchange.heartbeat=100", "exchange.heartbeat"),
        ("exchange.ban_after=0", "exchange.ban_after"),
        ("exchange.max_streams_per_peer=0", "exchange.max_streams_per_peer"),
        ("exchange.max_streams_per_peer=1.5", "exchange.max_streams_per_peer"),
        ('exchange.topology="star"', "exchange.topology must be one of full, ring"),
        ("exchange.k=0", "exchange.k must be >= 1"),
        ("exchange.topology_seed=-1", "exchange.topology_seed"),
        ('exchange.topology="edges"', "exchange.topology = 'edges' needs exchange.edges"),
        ('exchange.edges=[["a", "b"]]', "exchange.edges is only used with exchange.topology = 'edges'"),
        ('exchange.edges=[["a", "a"]]', "exchange.edges entry"),
        ("exchange.level=23", "exchange.level must be a zstd level, an int in [-131072, 22]"),
        ("exchange.level=1.5", "exchange.level"),
        ("exchange.block=0", "exchange.block must be an int in [1, 1048576]"),
        ("exchange.block=2000000", "exchange.block"),
        ('exchange.keep_dtype="bf16"', "exchange.keep_dtype must be 'fp32' or 'fp16'"),
        ("distill.alpha=-1", "alpha"),
        ("distill.gamma=1", "gamma"),
        ("bogus.key=1", "bogus"),
        ("nodot=1", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_recipe(PEERS / "lm-tiny.toml", [override])


@pytest.mark.parametrize(
    "recipe, override, fragment",
    [
        ("lm-tiny", "model.widht=96", "unknown key model.widht (known keys of model: context, dropout, heads"),
        ("lm-tiny", "model.width=30", "model.width (30) must be divisible by model.heads (4)"),
        ("lm-tiny", "model.heads=0", "model.heads must be an integer >= 1"),
        ("lm-tiny", 'model.layers="2"', "model.layers must be an integer"),
        ("lm-tiny", "model.layers=1000", "model.layers = 1000 exceeds the maximum 256"),
        ("lm-tiny", "model.width=131072", "model.width = 131072 exceeds the maximum 65536"),
        ("lm-tiny", "model.context=2097152", "model.context = 2097152 exceeds the maximum 1048576"),
        ("lm-tiny", "model.mlp_ratio=100000.0", "model.mlp_ratio: mlp_ratio * width"),
        ("lm-tiny", "model.context=1048576;model.width=2048", "model.context: context * width = 1048576 * 2048"),
        ("lm-tiny", "model.dropout=1.5", "model.dropout"),
        ("lm-tiny", "task.seq_len=128", "model.context (64) must be >= task.seq_len (128)"),
        ("lm-tiny", "task.colour=1", "unknown key task.colour (known keys of task: corpus"),
        ("lm-tiny", "task.val_fraction=0", "task.val_fraction must be > 0"),
        ("lm-tiny", 'task.poison="evil"', "task.poison must be one of"),
        ("lm-tiny", 'task.name="vision"', "unknown task.name 'vision'"),
        ("ctr-small", "model.width=8", "unknown key model.width (known keys of model: embed_dim, hidden)"),
        ("ctr-small", "model.hidden=[8, 0]", "model.hidden must be a list of positive integers"),
        ("ctr-small", "model.hidden=[100000]", "model.hidden: a layer of 100000 units exceeds the maximum 65536"),
        ("ctr-small", "model.embed_dim=8192", "model.embed_dim = 8192 exceeds the maximum 4096"),
        ("ctr-small", "model.hash_buckets=10", "model.hash_buckets: hash_buckets is a task key"),
        ("ctr-small", "task.hash_buckets=20000000", "model.embed_dim: 26 columns * task.hash_buckets * embed_dim"),
        ("ctr-small", "task.skip_bad_lines=1", "task.skip_bad_lines must be true or false"),
    ],
)
def test_task_and_model_keys_are_checked_when_the_recipe_loads(recipe, override, fragment):
    """[task] and [model] are checked by the task, statically, as the recipe loads: `p2pcod train` and `p2pcod peer`
    fail before they read data or build a model, naming the key."""
    with pytest.raises(ConfigError) as err:
        load_recipe(PEERS / f"{recipe}.toml", override.split(";"))
    assert fragment in str(err.value) and f"{recipe}.toml" in str(err.value)


def test_the_static_task_check_reads_no_data(tmp_path):
    """Data paths are not opened by the check (that is the task's job when it is built): a recipe naming data that
    is not there yet loads."""
    lm = load_recipe(PEERS / "lm-tiny.toml", [f'task.corpus="{tmp_path / "later"}"', "model.width=96", "model.heads=6"])
    assert lm.model["width"] == 96
    ctr = load_recipe(PEERS / "ctr-small.toml", [f'task.data="{tmp_path / "later.tsv"}"', "model.hidden=[]"])
    assert ctr.model["hidden"] == []
    with pytest.raises(ConfigError, match="model.widht"):  # replace() checks too
        lm.replace(model={"widht": 3})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    no_task = tmp_path / "no_task.toml"
    no_task.write_text("[train]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="task.name"):
        load_recipe(no_task)


def test_defaults_are_valid():
    assert TrainConfig().steps > 0
    assert ExchangeConfig().reload_every == 50


def test_exchange_keys_follow_the_codec_and_topology_rules():
    """The recipe accepts exactly what the codec and the topology accept, and hands them on unchanged."""
    from p2pcod import codec

    ex = ExchangeConfig(topology="edges", edges=(("a", "b"), ("b", "c")), level=codec.MAX_LEVEL, block=codec.MAX_BLOCK)
    assert ex.topology_config().edges == (("a", "b"), ("b", "c"))
    codec.check_options(ex.codec_options())
    assert ExchangeConfig(level=codec.MIN_LEVEL).codec_options().level == codec.MIN_LEVEL  # zstd's fast levels
    assert ExchangeConfig(topology="random-k", k=1).topology_config().k == 1
    for bad in ({"level": codec.MAX_LEVEL + 1}, {"block": codec.MAX_BLOCK + 1}, {"k": 0}, {"topology": "mesh"}):
        with pytest.raises(ConfigError, match="exchange\\."):
            ExchangeConfig(**bad)
