"""Tests of p2pcod.codec: round-trip accuracy, determinism, fingerprints, and hostile input."""

from __future__ import annotations

import copy
import math
import struct

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcod import codec
from p2pcod.adversary import entry, forge, frame_of, payload_of, split
from p2pcod.codec import CodecOptions, Limits
from p2pcod.errors import CodecError


def make_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 33, generator=g) * 0.02,  # 1320 elements: the last block is partial
        "big": torch.randn(8, 16, 20, generator=g),  # 3-D, 2560 elements
        "zero": torch.zeros(32, 64),  # all-zero blocks
        "half": torch.randn(64, 32, generator=g).half(),
        "bf": torch.randn(48, 48, generator=g).bfloat16(),
        "f64": torch.randn(40, 40, generator=g, dtype=torch.float64),
        "bias": torch.randn(33, generator=g),  # 1-D: kept
        "small": torch.randn(4, 5, generator=g),  # below min_quant_numel: kept
        "half_bias": torch.randn(7, generator=g).half(),
        "steps": torch.arange(-5, 5),
        "bytes": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "mask": torch.rand(6, 3, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 7),
    }


META = {"peer": "alice", "step": 1200, "task": "lm", "lr": 3e-4, "ok": True, "none": None,
        "model": {"layers": 2, "width": 64, "sizes": [1, 2, 3]}, "raw": b"\x00\x01"}


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return make_sd()


@pytest.fixture(scope="module")
def blob(sd: dict[str, torch.Tensor]) -> bytes:
    return codec.encode(sd, META)


# ---- forging (p2pcod/adversary.py rebuilds blobs from a tampered header / payload with valid checksums)


def tampered(blob: bytes, edit) -> bytes:
    header, frame = split(blob)
    header = copy.deepcopy(header)
    edit(header)
    return forge(header, frame)


# ---- round trip ---------------------------------------------------------------------------------


def block_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: its block's absmax / 254, the quantization error bound."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    absmax = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block).abs().amax(1)
    return absmax.repeat_interleave(block)[:flat.numel()] / 254


@pytest.mark.parametrize("block", [256, 7, 1000])
def test_quantized_error_within_half_step(sd: dict[str, torch.Tensor], block: int) -> None:
    out, _ = codec.decode(codec.encode(sd, options=CodecOptions(block=block)))
    for name in ("w", "big", "zero", "half", "bf", "f64"):
        x, y = sd[name], out[name]
        assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous() and y.device.type == "cpu"
        err = (x.double() - y.double()).abs().reshape(-1)
        eps = torch.finfo(x.dtype).eps * x.double().abs().reshape(-1)  # rounding back to fp16/bf16
        assert bool((err <= block_bound(x, block).double() * (1 + 1e-5) + eps + 1e-12).all()), name
    assert bool((out["zero"] == 0).all())


def test_kept_tensors_are_bit_exact(sd: dict[str, torch.Tensor], blob: bytes) -> None:
    out, _ = codec.decode(blob)
    assert list(out) == list(sd)
    for name in ("bias", "small", "half_bias", "steps", "bytes", "mask", "scalar", "empty"):
        assert out[name].dtype == sd[name].dtype and out[name].shape == sd[name].shape, name
        assert torch.equal(out[name], sd[name]), name
    encs = {e["name"]: e["enc"] for e in codec.peek(blob)["tensors"]}
    assert encs["w"] == "q8" and encs["bias"] == "raw" and encs["small"] == "raw" and encs["mask"] == "raw"


def test_extreme_values_round_trip_finite() -> None:
    sd = {"h": torch.full((64, 64), 65504.0).half(), "bf": torch.full((64, 64), -3.3e38).bfloat16(),
          "f": torch.full((64, 64), 1.69e38), "tiny": torch.full((64, 64), 1e-40)}
    out, _ = codec.decode(codec.encode(sd))
    assert torch.equal(out["h"], sd["h"]) and torch.equal(out["bf"], sd["bf"])
    assert torch.allclose(out["f"], sd["f"], rtol=1e-6) and bool((out["tiny"].abs() <= 1e-40).all())


def test_keep_fp16_stores_small_floats_in_fp16(sd: dict[str, torch.Tensor]) -> None:
    b16 = codec.encode(sd, options=CodecOptions(keep_dtype="fp16"))
    out, _ = codec.decode(b16)
    assert out["bias"].dtype == torch.float32
    assert torch.equal(out["bias"], sd["bias"].half().float())
    assert len(b16) < len(codec.encode(sd))
    with pytest.raises(CodecError, match="'huge' has values beyond the fp16 range"):
        codec.encode({"huge": torch.tensor([1e6])}, options=CodecOptions(keep_dtype="fp16"))


def test_metadata_round_trips_exactly(blob: bytes) -> None:
    assert codec.decode(blob)[1] == META
    assert codec.peek(blob)["meta"] == META


def test_encode_is_deterministic(sd: dict[str, torch.Tensor], blob: bytes) -> None:
    assert codec.encode(make_sd(), META) == blob
    # the multi-threaded zstd format must not depend on the worker count
    assert codec.encode(sd, META, CodecOptions(threads=1)) == codec.encode(sd, META, CodecOptions(threads=3))


def test_level_changes_bytes_not_content(sd: dict[str, torch.Tensor], blob: bytes) -> None:
    other = codec.encode(sd, META, CodecOptions(level=1))
    a, b = codec.decode(blob)[0], codec.decode(other)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fingerprint_tracks_names_shapes_dtypes_not_values(sd: dict[str, torch.Tensor]) -> None:
    fp = codec.fingerprint(sd)
    assert len(fp) == 64 and fp == codec.fingerprint(make_sd(seed=1))  # different values
    assert fp == codec.fingerprint(dict(reversed(list(sd.items()))))  # order does not matter
    renamed = dict(sd)
    renamed["w2"] = renamed.pop("w")
    reshaped = {**sd, "w": sd["w"].reshape(33, 40)}
    retyped = {**sd, "w": sd["w"].double()}
    assert len({fp, codec.fingerprint(renamed), codec.fingerprint(reshaped), codec.fingerprint(retyped)}) == 4
    model = torch.nn.Linear(3, 2)
    assert codec.fingerprint(model) == codec.fingerprint(model.state_dict())


def test_decode_checks_expected_fingerprint(sd: dict[str, torch.Tensor], blob: bytes) -> None:
    out, _ = codec.decode(blob, expect_fingerprint=codec.fingerprint(sd))
    assert codec.fingerprint(out) == codec.fingerprint(sd)
    with pytest.raises(CodecError, match="fingerprint mismatch"):
        codec.decode(blob, expect_fingerprint=codec.fingerprint({"x": torch.zeros(1)}))


def test_digest_and_peek(blob: bytes) -> None:
    assert codec.digest(blob) == codec.digest(bytearray(blob)) and len(codec.digest(blob)) == 64
    h = codec.peek(blob)
    assert h["version"] == codec.VERSION and h["fingerprint"] == codec.fingerprint(make_sd())
    assert h["compressed_size"] < h["payload_size"] and len(h["tensors"]) == len(make_sd())


def test_compression_on_normal_weights() -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(256, 256, generator=g) * 0.02 for i in range(4)}
    ratio = sum(t.numel() * 4 for t in sd.values()) / len(codec.encode(sd))
    assert ratio > 4.1  # int8 + fp32 scales alone give 3.94x; zstd's entropy coding adds the rest


# ---- encode refuses what it cannot represent ----------------------------------------------------------


@pytest.mark.parametrize(("sd", "fragment"), [
    ({"w": torch.full((64, 64), float("nan"))}, "'w' contains NaN or Inf"),
    ({"w": torch.cat([torch.zeros(4000), torch.tensor([float("inf")])]).view(1, -1)}, "'w' contains NaN"),
    ({"b": torch.tensor([1.0, float("-inf")])}, "'b' contains NaN or Inf"),
    ({"w": torch.full((64, 64), 3e38)}, "'w' contains NaN or Inf, or values beyond"),
    ({"x": [1.0, 2.0]}, "'x' is a list, not a tensor"),
    ({3: torch.zeros(2)}, "key 3 is not a str"),
    ({"c": torch.zeros(4, dtype=torch.complex64)}, "'c': unsupported dtype"),
    ({"m": torch.zeros(4, device="meta")}, "'m': cannot be read on the CPU"),
])
def test_encode_refuses(sd: dict, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        codec.encode(sd)


@pytest.mark.parametrize(("meta", "fragment"), [
    ({"t": torch.zeros(1)}, "meta.t: Tensor is not a plain msgpack type"),
    ({1: "a"}, "key 1 is not a str"),
    ({"big": 1 << 70}, "does not fit in 64 bits"),
    ([1, 2], "meta must be a mapping"),
])
def test_encode_refuses_bad_meta(meta: object, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        codec.encode({"b": torch.zeros(2)}, meta)  # type: ignore[arg-type]


def test_encode_refuses_bad_options() -> None:
    with pytest.raises(CodecError, match="block"):
        codec.encode({"b": torch.zeros(2)}, options=CodecOptions(block=0))
    with pytest.raises(CodecError, match="keep_dtype"):
        codec.encode({"b": torch.zeros(2)}, options=CodecOptions(keep_dtype="int8"))


# ---- decode treats its input as hostile ---------------------------------------------------------------


def test_container_level_errors(blob: bytes) -> None:
    cases = [
        (b"NOTACKPT" + blob[8:], "bad magic"),
        (blob[:5], "truncated"),
        (blob[:12], "truncated"),
        (blob[:codec.PREFIX_SIZE + 10], "truncated blob: header needs"),
        (blob[:len(blob) - 20], "frame checksum mismatch"),
        (blob + b"\x00", "frame checksum mismatch"),  # trailing bytes after the frame
        (forge(*split(blob), version=2), "unsupported format version 2"),
        (forge(None, split(blob)[1], raw_header=b"\xc1\xff\x00"), "header is not valid msgpack"),
        (forge([1, 2], split(blob)[1]), "header must be a map"),
        (split(blob)[1], "bad magic"),
        ("not bytes", "blob must be bytes"),
    ]
    for data, fragment in cases:
        with pytest.raises(CodecError, match=fragment):
            codec.decode(data)  # type: ignore[arg-type]
    hdr = bytearray(blob)
    hdr[codec.PREFIX_SIZE + 3] ^= 0x10
    with pytest.raises(CodecError, match="header checksum mismatch"):
        codec.decode(bytes(hdr))
    assert isinstance(codec.decode(memoryview(blob))[0], dict)


def test_every_single_bit_flip_is_caught() -> None:
    small = codec.encode({"w": torch.randn(32, 64) * 0.02, "b": torch.randn(5)}, {"step": 1})
    for pos in range(len(small)):
        for bit in (0, 3, 7):
            bad = bytearray(small)
            bad[pos] ^= 1 << bit
            with pytest.raises(CodecError):
                codec.decode(bytes(bad))


def _set(path: tuple, value: object):
    def edit(h: dict) -> None:
        target = entry(h, path[0]) if len(path) == 2 else h
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize(("edit", "fragment"), [
    (_set(("w", "offset"), 10**12), "past the end of the payload"),
    (_set(("w", "offset"), 0), "overlaps"),
    (_set(("w", "offset"), 3), "not aligned"),
    (_set(("w", "nbytes"), 5), "nbytes=5 does not match"),
    (_set(("w", "scales_nbytes"), 8), "scales_nbytes=8 does not match"),
    (_set(("w", "shape"), [40, -33]), "negative dimension"),
    (_set(("w", "shape"), [1 << 40, 1 << 40]), "exceeds max_tensor_numel"),
    (_set(("w", "shape"), [2] * 64), "64 dims exceeds max_ndim"),
    (_set(("w", "shape"), "40x33"), "shape must be a list"),
    (_set(("w", "shape"), [40, "33"]), "shape holds a str"),
    (_set(("w", "shape"), [40, True]), "shape holds a bool"),
    (_set(("w", "dtype"), "float128"), "unknown dtype 'float128'"),
    (_set(("w", "enc"), "q4"), "unknown encoding 'q4'"),
    (_set(("steps", "enc"), "q8"), "encoding 'q8' is invalid for dtype int64"),
    (_set(("w", "name"), "bias"), "duplicate tensor name 'bias'"),
    (_set(("w", "name"), 7), "name must be a str"),
    (_set(("w", "extra"), 1), "unknown field"),
    (_set(("payload_size",), 1 << 40), "exceeds max_decoded_bytes"),
    (_set(("payload_size",), 10**7), "unused bytes after the last tensor"),
    (_set(("payload_size",), "big"), "payload_size' must be an int"),
    (_set(("block",), 0), "'block' = 0 out of range"),
    (_set(("tensors",), {}), "'tensors' must be a list"),
    (_set(("meta",), [1]), "'meta' must be a map"),
    (_set(("fingerprint",), "ab"), "64 lowercase hex"),
    (_set(("fingerprint",), "0" * 64), "does not match its tensor table"),
    (lambda h: h.pop("meta"), "missing field"),
])
def test_tampered_header_fields(blob: bytes, edit, fragment: str) -> None:
    bad = tampered(blob, edit)
    with pytest.raises(CodecError, match=fragment):
        codec.decode(bad)
    with pytest.raises(CodecError, match=fragment):
        codec.peek(bad)


def test_limits_are_enforced(blob: bytes) -> None:
    for limits, fragment in [
        (Limits(max_blob_bytes=100), "exceeds max_blob_bytes"),
        (Limits(max_header_bytes=64), "exceeds max_header_bytes"),
        (Limits(max_tensors=3), "exceeds max_tensors"),
        (Limits(max_tensor_numel=1000), "exceeds max_tensor_numel"),
        (Limits(max_ndim=2), "exceeds max_ndim"),
        (Limits(max_decoded_bytes=20_000), "max_decoded_bytes=20000"),
    ]:
        with pytest.raises(CodecError, match=fragment):
            codec.decode(blob, limits=limits)


def test_decompression_bomb_is_refused_before_decompressing(blob: bytes) -> None:
    header, _ = split(blob)
    # a 1 GiB frame of zeros compresses to ~32 KB; the header claims the real payload size
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1 << 24))
    with pytest.raises(CodecError, match="declares content size 16777216, header says"):
        codec.decode(forge(header, bomb))
    no_size = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compress(bytes(10))
    with pytest.raises(CodecError, match="does not declare its content size"):
        codec.decode(forge(header, no_size))
    payload = payload_of(blob)
    unchecked = zstandard.ZstdCompressor(write_checksum=False).compress(bytes(payload))
    with pytest.raises(CodecError, match="content checksum"):
        codec.decode(forge(header, unchecked))
    good = frame_of(payload)
    assert codec.decode(forge(header, good))[1] == META  # the forging itself is sound
    # past the frame crc (forged to match), zstd's own checks still hold
    for frame in (good + b"\x00", good[:-5], good[:-len(good) // 2]):
        with pytest.raises(CodecError, match="corrupt or truncated payload"):
            codec.decode(forge(header, frame))


@pytest.mark.parametrize(("value", "name"), [(float("nan"), "w"), (float("inf"), "w"), (-1.0, "w"),
                                             (1e37, "half")])
def test_bad_scales_are_refused(blob: bytes, value: float, name: str) -> None:
    header, _ = split(blob)
    payload = payload_of(blob)
    e = entry(header, name)
    nblocks = e["scales_nbytes"] // 4
    for k, byte in enumerate(struct.pack("<f", value)):  # scales are stored as byte planes
        payload[e["scales_offset"] + k * nblocks + 1] = byte  # the second block's scale
    with pytest.raises(CodecError, match=f"tensor '{name}': non-finite, negative or out-of-range scales"):
        codec.decode(forge(header, frame_of(payload)))


def test_non_finite_kept_weights_are_refused(blob: bytes) -> None:
    header, _ = split(blob)
    payload = payload_of(blob)
    struct.pack_into("<f", payload, entry(header, "bias")["offset"] + 8, float("nan"))
    with pytest.raises(CodecError, match="tensor 'bias' contains NaN or Inf"):
        codec.decode(forge(header, frame_of(payload)))


# ---- property: nothing but CodecError, whatever the bytes ------------------------------------------------

SMALL = codec.encode({"w": torch.randn(16, 80) * 0.02, "b": torch.randn(4), "i": torch.arange(3)},
                     {"step": 5})
INT64 = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack can carry
WEIRD = st.one_of(st.none(), st.booleans(), INT64, st.integers(-3, 5000), st.floats(), st.text(max_size=8),
                  st.binary(max_size=8), st.lists(st.one_of(INT64, st.integers(-2, 64)), max_size=10),
                  st.dictionaries(st.text(max_size=3), INT64, max_size=2))


def _check_outcome(data: bytes) -> None:
    try:
        state, meta = codec.decode(data, limits=Limits(max_decoded_bytes=1 << 24))
    except CodecError:
        return
    assert isinstance(meta, dict)
    for t in state.values():
        assert isinstance(t, torch.Tensor)
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    _check_outcome(data)
    _check_outcome(codec.MAGIC + data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, len(SMALL) - 1),
                          st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_blobs_raise_only_codec_error(ops: list[tuple[str, int, int]]) -> None:
    data = bytearray(SMALL)
    for op, pos, val in ops:
        pos = min(pos, max(len(data) - 1, 0))
        if op == "flip" and data:
            data[pos] ^= 1 << (val % 8)
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes([val])
    _check_outcome(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["w", "b", "i"]),
       st.sampled_from(["name", "dtype", "shape", "enc", "offset", "nbytes", "scales_offset", "scales_nbytes"]),
       WEIRD, st.sampled_from([None, "block", "payload_size", "fingerprint", "meta", "tensors"]), WEIRD)
def test_tampered_headers_raise_only_codec_error(name: str, key: str, value: object, top: str | None,
                                                 top_value: object) -> None:
    def edit(h: dict) -> None:
        entry(h, name)[key] = value
        if top is not None:
            h[top] = top_value
    _check_outcome(tampered(SMALL, edit))


def test_shape_product_is_not_trusted_blindly() -> None:
    # dims that each pass the limit but whose product would overflow int64
    bad = tampered(SMALL, _set(("w", "shape"), [1 << 31, 1 << 31, 1 << 31]))
    with pytest.raises(CodecError, match="exceeds max_tensor_numel"):
        codec.decode(bad, limits=Limits(max_tensor_numel=1 << 62))
    assert math.prod([1 << 31] * 3) > (1 << 62)


def test_limits_for_accept_the_architecture_and_refuse_larger_ones() -> None:
    sd = make_sd()
    limits = codec.limits_for(sd)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert nbytes < limits.max_decoded_bytes <= 1.25 * nbytes + (1 << 20)
    assert limits.max_tensors == len(sd) and limits.max_tensor_numel == max(t.numel() for t in sd.values())
    for opts in (CodecOptions(), CodecOptions(block=32, keep_dtype="fp16"), CodecOptions(min_quant_numel=1 << 30)):
        blob = codec.encode(sd, {}, opts)  # every encoding of this architecture fits, down to all-fp32
        assert len(blob) <= limits.max_blob_bytes
        out, _ = codec.decode(blob, expect_fingerprint=codec.fingerprint(sd), limits=limits)
        assert out.keys() == sd.keys()
    bigger = {**sd, "extra.weight": torch.randn(4096, 1024)}  # 16 MB more than the limits allow
    with pytest.raises(CodecError, match="max_decoded_bytes|max_tensors|max_tensor_numel|max_blob_bytes"):
        codec.decode(codec.encode(bigger, {}), limits=limits)


def test_fingerprint_and_limits_of_a_meta_model_are_those_of_the_real_one() -> None:
    """The fetcher vets an announced model config on the meta device (no storage): same fingerprint, same limits."""
    from p2pcod.tasks.lm import GPT, GPTConfig

    c = GPTConfig(layers=2, width=32, heads=4, context=16)
    real = GPT(c)
    with torch.device("meta"):
        meta = GPT(c)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert codec.fingerprint(meta) == codec.fingerprint(real) == codec.fingerprint(real.state_dict())
    assert codec.limits_for(meta) == codec.limits_for(real)
    with torch.device("meta"):  # 64 layers of width 4096: ~50 GB if it had storage
        huge = GPT(GPTConfig(layers=64, width=4096, heads=8, context=1024))
    limits = codec.limits_for(huge)
    assert limits.max_decoded_bytes > 50e9 and limits.max_tensor_numel == 4 * 4096 * 4096
