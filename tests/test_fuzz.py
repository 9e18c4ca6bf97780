"""Fuzzing of what peers read from the network, at CI size (the long run: benchmarks/fuzz.py --count 100000).

tests/test_codec.py already fuzzes decode with random bytes, raw mutations and single header fields; here:
the generators of benchmarks/fuzz.py (re-checksummed mutations that reach msgpack, the tensor table and the
payload; splices; whole headers replaced; odd zstd frames), and hypothesis-built peer records, wire bytes
and DHT entries. Property: only the typed error of each layer, or a valid result.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from hivemind.utils import MSGPackSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcod import codec
from p2pcod.errors import CodecError, RecordError
from p2pcod.swarm.dht import check_entry
from p2pcod.swarm.records import MAX_CFG_DEPTH, MAX_CFG_ITEMS, PeerRecord, parse_wire

ROOT = Path(__file__).resolve().parents[1]


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("p2pcod_bench_fuzz", ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def corpus():
    return fuzz.Corpus.build()


# ---- the harness itself ---------------------------------------------------------------------------------
def test_a_seeded_run_finds_nothing_and_reaches_deep(corpus):
    res = fuzz.run(800, seed=11, corpus=corpus, max_seconds=20.0)
    assert res.count == 800 and res.failures == [], res.failures[:5]
    assert set(res.per_generator) == set(fuzz.GENERATORS)  # every generator took part
    # the inputs get past the checksums: some decode in full, records are accepted and refused
    assert res.outcomes["codec: decoded"] >= 15 and res.outcomes["codec: CodecError"] >= 150
    for key in ("record: RecordError", "entry: record", "entry: RecordError", "validator: valid=True",
                "validator: valid=False", "wire: record"):
        assert res.outcomes[key] > 0, (key, dict(res.outcomes))
    assert 0 < res.max_s < 20.0 and res.peak_rss_mb > 0


def test_inputs_are_reproducible(corpus):
    a = fuzz.make_input(3, 42, corpus)
    b = fuzz.make_input(3, 42, corpus)
    assert a[0] == b[0] and repr(a[2]) == repr(b[2])


def test_the_harness_reports_an_untyped_error_and_a_hang(corpus, monkeypatch):
    def leaky(blob: bytes) -> str:
        if blob[:1] == b"P":
            raise IndexError("leaked")
        return "ok"

    monkeypatch.setitem(fuzz.TARGETS, "codec", leaky)
    res = fuzz.run(40, seed=1, corpus=corpus, only=["bit_flips"])
    assert len(res.failures) == 40 and all("IndexError: leaked" in f["error"] for f in res.failures)
    assert {f["generator"] for f in res.failures} == {"bit_flips"}

    def hang(_: object) -> str:
        while True:
            pass

    monkeypatch.setitem(fuzz.TARGETS, "codec", hang)
    res = fuzz.run(1, seed=1, corpus=corpus, only=["truncate"], max_seconds=0.3)
    assert [f["error"] for f in res.failures] == ["hang: no result within 0.3 s"]


def test_generator_bugs_are_failures_not_crashes(corpus, monkeypatch):
    monkeypatch.setitem(fuzz.GENERATORS, "truncate", lambda r, c: 1 / 0)
    res = fuzz.run(3, seed=0, corpus=corpus, only=["truncate"])
    assert len(res.failures) == 3 and res.failures[0]["target"] == "generator"


# ---- codec: every generator, hypothesis-driven streams ------------------------------------------------
CODEC_GENS = [n for n in fuzz.GENERATORS if n not in ("bomb_header",) and fuzz.GENERATORS[n].__name__ in (
    "g_random_bytes", "g_bit_flips", "g_truncate", "g_splice", "g_header_field", "g_raw_header", "g_payload",
    "g_frame")]


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from(CODEC_GENS), st.integers(0, 2**32))
def test_decode_of_generated_blobs_is_typed(corpus, gen, seed):
    import random

    target, blob = fuzz.GENERATORS[gen](random.Random(seed), corpus)
    assert target == "codec"
    fuzz.run_codec(blob)  # raises FuzzFailure (or anything untyped) on a violation


@settings(SETTINGS, max_examples=60)
@given(st.integers(0, len(codec.MAGIC) + 40), st.binary(min_size=1, max_size=64))
def test_refreshed_prefix_splices_are_typed(corpus, cut, tail):
    """Valid checksums around a prefix of a real blob plus arbitrary bytes: the deepest cheap inputs."""
    blob = corpus.blobs[0]
    data = fuzz.refresh(blob[:codec.PREFIX_SIZE + cut] + tail)
    try:
        codec.decode(data)
    except CodecError:
        return
    pytest.fail("a spliced blob decoded")  # its frame cannot match the original payload


def test_deep_nesting_header_is_a_codec_error(corpus):
    _, frame = corpus.headers[0]
    for depth in (100, 10_000, 200_000):
        for kind in ("array", "map"):
            with pytest.raises(CodecError):
                codec.decode(fuzz.forge(fuzz.deep_msgpack(depth, kind), frame))


def test_oversized_container_lengths_are_a_codec_error(corpus):
    _, frame = corpus.headers[0]
    for head in (b"\xdd", b"\xdf", b"\xdb", b"\xc6"):
        with pytest.raises(CodecError):
            codec.decode(fuzz.forge(head + b"\xff\xff\xff\xff\x00", frame))


# ---- records ------------------------------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=80),
                    st.binary(max_size=20))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                        st.dictionaries(st.text(max_size=70), inner, max_size=6)),
                       max_leaves=20)


def _cfg_ok(value, depth=0, count=None) -> bool:
    """Independent statement of the model_cfg schema (records.py): JSON-like, bounded depth/items/strings."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_CFG_ITEMS:
        return False
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 1024
    if depth >= MAX_CFG_DEPTH:
        return False
    if isinstance(value, list | tuple):
        return all(_cfg_ok(v, depth + 1, count) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and 1 <= len(k) <= 64 and _cfg_ok(v, depth + 1, count)
                   for k, v in value.items())
    return False


@settings(SETTINGS, max_examples=150)
@given(st.sampled_from(["name", "peer_id", "step", "digest", "size", "codec", "task", "model_cfg", "fingerprint",
                        "time", "v", "extra"]), JSONISH)
def test_record_field_replaced_by_any_value(corpus, key, value):
    wire = dict(corpus.records[1]) | {key: value}
    try:
        rec = PeerRecord.from_wire(wire)
    except RecordError:
        if key == "model_cfg" and isinstance(value, dict):
            assert not _cfg_ok(value)  # a valid config is never refused
        return
    assert key != "extra"
    assert PeerRecord.from_wire(rec.to_wire()) == rec
    if key == "model_cfg":
        assert _cfg_ok(value)


@settings(SETTINGS, max_examples=100)
@given(JSONISH)
def test_parse_wire_of_any_value_is_typed(corpus, value):
    try:
        rec = parse_wire(value)
    except RecordError:
        return
    assert rec is None or isinstance(rec, PeerRecord)


@settings(SETTINGS, max_examples=200)
@given(st.integers(0, 10_000), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.booleans())
def test_mutated_wire_bytes_are_typed(corpus, cut, flips, signed_by_owner):
    data = bytearray(MSGPackSerializer.dumps(corpus.records[0]))
    for pos, val in flips:
        data[pos % len(data)] = val
    data = bytes(data[:max(1, cut % (len(data) + 1))])
    try:
        value = MSGPackSerializer.loads(data)
    except Exception:  # noqa: BLE001 - hivemind's deserializer; the validator catches it
        return
    subkey = corpus.subkeys[0 if signed_by_owner else 1]
    try:
        rec = check_entry(subkey, value)
    except RecordError:
        return
    # accepted: then it is the owner's own record or tombstone, never another peer's
    assert signed_by_owner and (rec is None or rec.peer_id == corpus.owners[0])


@settings(SETTINGS, max_examples=80)
@given(st.one_of(st.binary(max_size=600), st.just(b"[owner:ssh-rsa AAAA]"), SCALARS), JSONISH)
def test_validator_never_raises(corpus, subkey, value):
    from hivemind.dht.validation import DHTRecord

    try:
        sub_b, val_b = MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value)
    except (TypeError, OverflowError, ValueError):
        return
    ok = corpus.validator.validate(DHTRecord(corpus.key_id, sub_b, val_b, 1.7e9))
    assert ok is False  # no real owner key: nothing may be stored
