"""Checkpoint codec: state_dict <-> bytes. Pure functions: no network, no pickle.

Blob layout (all integers little-endian)::

    MAGIC (8 bytes) | version u16 | header_len u32 | crc32(version, header_len, header) u32
    | crc32(frame) u32 | header (msgpack map) | one zstd frame (checksum on, content size written)

The frame crc catches flips that zstd's own checksum (of the *decoded* content) cannot: bits that
do not change the output. The zstd frame decompresses to the payload.

The header holds the tensor table, the model fingerprint, the caller's metadata and the payload size.
The payload is three sections, each region aligned to ALIGN bytes: the fp32 absmax scales of every
quantized tensor (as byte planes), then the tensors kept as they are (or as fp16/fp32), then the
int8 codes. Multi-byte values are little-endian.
Grouping like with like lets zstd's per-block Huffman tables fit each kind of data.

Float tensors with ndim >= 2 and at least `min_quant_numel` elements are quantized blockwise
over their flattened elements: scale = absmax / 127, q = round(x / scale) in [-127, 127]; the last
block may be partial. `decode` treats its input as hostile and raises only CodecError.
"""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from p2pcod.errors import CodecError

MAGIC = b"P2PCKPT\x00"
VERSION = 1
_PREFIX = struct.Struct("<HIII")  # version, header length, header crc32, frame crc32
PREFIX_SIZE = len(MAGIC) + _PREFIX.size
ALIGN = 64  # payload region alignment: typed views need it, vector loads like it
_CHUNK_ELEMS = 1 << 18  # (de)quantize in ~1 MiB fp32 chunks so temporaries stay in cache

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FLOATS = {"float32", "float16", "bfloat16", "float64"}
# encoding -> how the region stores elements (None: the tensor's own dtype)
ENCODINGS: dict[str, torch.dtype | None] = {"raw": None, "f32": torch.float32, "f16": torch.float16,
                                            "q8": torch.int8}
_TABLE_KEYS = {"name", "dtype", "shape", "enc", "offset", "nbytes"}
_Q8_KEYS = {"scales_offset", "scales_nbytes"}
_HEADER_KEYS = {"fingerprint", "meta", "block", "payload_size", "tensors"}
MAX_BLOCK = 1 << 20
_QUANT_MAX = 1.7e38  # larger fp32/fp64 |x| could make 127 * scale overflow fp32 on decode


def _quant_max(dtype: torch.dtype) -> float:
    """Largest |x| a quantized tensor of this dtype may hold (fp16/bf16: their whole range)."""
    return torch.finfo(dtype).max if dtype.itemsize == 2 else _QUANT_MAX


@dataclass(frozen=True)
class CodecOptions:
    block: int = 256  # elements per absmax block
    keep_dtype: str = "fp32"  # "fp32" or "fp16": how small / 1-D float tensors are stored
    min_quant_numel: int = 1024  # float tensors with fewer elements, or ndim <= 1, are kept
    level: int = 1  # zstd level: 1 gives the same ratio as 3 on int8 weights, faster
    threads: int = -1  # zstd worker threads (-1 = all cores)


@dataclass(frozen=True)
class Limits:
    """Everything decode() accepts at most (generous but finite)."""

    max_blob_bytes: int = 2 << 30
    max_decoded_bytes: int = 8 << 30
    max_tensors: int = 100_000
    max_tensor_numel: int = 2 << 30
    max_ndim: int = 8
    max_header_bytes: int = 16 << 20


def limits_for(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], slack: float = 1.25) -> Limits:
    """Limits that accept any blob of this architecture and little else: a peer receiving checkpoints of
    a 10 MB model has no reason to decompress gigabytes before the fingerprint check rejects them."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
        else model_or_state_dict
    tensors = [t for t in sd.values() if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    header = min(Limits.max_header_bytes, (1 << 20) + 1024 * len(tensors))
    decoded = int(nbytes * slack) + (1 << 20)  # int8 + scales (+ alignment) never exceeds fp32 by that much
    return Limits(
        max_blob_bytes=decoded + header + 64,
        max_decoded_bytes=decoded,
        max_tensors=max(1, len(tensors)),
        max_tensor_numel=max((t.numel() for t in tensors), default=1),
        max_header_bytes=header,
    )


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nblocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _region_nbytes(enc: str, dtype: torch.dtype, numel: int) -> int:
    stored = ENCODINGS[enc] or dtype
    return numel * stored.itemsize


# ---------------------------------------------------------------------------------------------
# fingerprint / digest


def fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of the sorted (name, shape, dtype) table: equal for same-architecture models."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) \
        else model_or_state_dict
    table = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"fingerprint: value of {name!r} is a {type(t).__name__}, not a tensor")
        table.append((str(name), [int(d) for d in t.shape], str(t.dtype).removeprefix("torch.")))
    return _table_fingerprint(table)


def _table_fingerprint(table: list[tuple[str, list[int], str]]) -> str:
    return hashlib.sha256(msgpack.packb(sorted(table), use_bin_type=True)).hexdigest()


def digest(blob: bytes | bytearray | memoryview) -> str:
    """sha256 hex of the whole blob: what peers announce and check after a fetch."""
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------
# encode


MIN_LEVEL = -(1 << 17)  # zstd's fastest (negative) level
MAX_LEVEL = 22


def check_options(o: CodecOptions, prefix: str = "CodecOptions") -> None:
    """CodecError unless encode() accepts these options; `prefix` names them (a recipe: "exchange")."""
    if isinstance(o.block, bool) or not (isinstance(o.block, int) and 1 <= o.block <= MAX_BLOCK):
        raise CodecError(f"{prefix}.block must be an int in [1, {MAX_BLOCK}], got {o.block!r}")
    if o.keep_dtype not in ("fp32", "fp16"):
        raise CodecError(f"{prefix}.keep_dtype must be 'fp32' or 'fp16', got {o.keep_dtype!r}")
    if isinstance(o.level, bool) or not (isinstance(o.level, int) and MIN_LEVEL <= o.level <= MAX_LEVEL):
        raise CodecError(f"{prefix}.level must be a zstd level, an int in [{MIN_LEVEL}, {MAX_LEVEL}] (1..22: faster "
                         f"to stronger; 0: zstd's default; negative: faster still), got {o.level!r}")
    if isinstance(o.threads, bool) or not isinstance(o.threads, int) or o.threads < -1:
        raise CodecError(f"{prefix}.threads must be -1 or >= 0, got {o.threads!r}")


def _check_meta(value: Any, path: str = "meta", depth: int = 0) -> None:
    """Plain msgpack types only, str keys: what goes in must come out equal."""
    if depth > 32:
        raise CodecError(f"{path}: nested too deeply")
    if value is None or isinstance(value, bool | float | str | bytes):
        return
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise CodecError(f"{path}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_meta(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"{path}: key {k!r} is not a str")
            _check_meta(v, f"{path}.{k}", depth + 1)
        return
    raise CodecError(f"{path}: {type(value).__name__} is not a plain msgpack type")


def _plan(name: Any, t: Any, o: CodecOptions) -> tuple[torch.Tensor, str, str]:
    """Validate one entry; return (cpu contiguous tensor, dtype name, encoding)."""
    if not isinstance(name, str):
        raise CodecError(f"state_dict key {name!r} is not a str")
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"value of {name!r} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.dtype not in _DTYPE_NAMES:
        raise CodecError(f"tensor {name!r}: unsupported dtype/layout {t.dtype}/{t.layout}")
    dname = _DTYPE_NAMES[t.dtype]
    try:
        t = t.detach().cpu().contiguous()
    except Exception as err:  # noqa: BLE001 - e.g. a meta-device tensor has no data to copy
        raise CodecError(f"tensor {name!r}: cannot be read on the CPU: {err}") from err
    if dname not in _FLOATS:
        return t, dname, "raw"
    if t.ndim >= 2 and t.numel() >= max(o.min_quant_numel, 1):
        return t, dname, "q8"  # non-finite values show up as non-finite block absmax
    if not bool(torch.isfinite(t).all()):
        raise CodecError(f"tensor {name!r} contains NaN or Inf")
    if dname in ("float16", "bfloat16") or (dname == "float32" and o.keep_dtype == "fp32"):
        return t, dname, "raw"
    return t, dname, "f16" if o.keep_dtype == "fp16" else "f32"


def _quantize_rows(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, name: str) -> None:
    """x (rows, block) float -> q (rows, block) int8 codes, s (rows,) fp32 scales; in chunks."""
    step = max(1, _CHUNK_ELEMS // x.shape[1])
    limit = _quant_max(x.dtype)
    for i in range(0, x.shape[0], step):
        xc = x[i:i + step]
        # amax + amin beat aminmax/abs().amax() ~5x here; both propagate NaN, so NaN/Inf show up below
        absmax = torch.maximum(xc.amax(1), xc.amin(1).neg()).float()
        if not bool((absmax <= limit).all()):  # False for NaN too
            raise CodecError(f"tensor {name!r} contains NaN or Inf, or values beyond +-{limit:g}")
        s[i:i + step] = absmax / 127
        # blocks so tiny that 127/absmax overflows (|x| < ~4e-37) are stored as zeros
        inv = torch.nan_to_num_(127.0 / absmax, nan=0.0, posinf=0.0)
        tmp = torch.mul(xc, inv[:, None])
        q[i:i + step].copy_(tmp.round_())


def encode(state_dict: Mapping[str, torch.Tensor], meta: Mapping | None = None,
           options: CodecOptions = CodecOptions()) -> bytes:
    """Serialise a state_dict (+ plain metadata) into a self-checking, compressed blob."""
    check_options(options)
    if not isinstance(state_dict, Mapping):
        raise CodecError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
        raise CodecError(f"meta must be a mapping, got {type(meta).__name__}")
    _check_meta(meta)
    plans = [(name, *_plan(name, t, options)) for name, t in state_dict.items()]
    block = options.block

    # lay out the three sections: scales, kept tensors, int8 codes
    table: list[dict[str, Any]] = []
    cursor = 0
    for name, t, dname, enc in plans:
        entry: dict[str, Any] = {"name": name, "dtype": dname, "shape": list(t.shape), "enc": enc}
        if enc == "q8":
            entry["scales_offset"] = cursor
            entry["scales_nbytes"] = 4 * _nblocks(t.numel(), block)
            cursor = _align(cursor + entry["scales_nbytes"])
        table.append(entry)
    for section in ("kept", "q8"):
        for entry, (_, t, _, enc) in zip(table, plans, strict=True):
            if (enc == "q8") == (section == "q8"):
                entry["offset"] = cursor
                entry["nbytes"] = _region_nbytes(enc, t.dtype, t.numel())
                cursor = _align(cursor + entry["nbytes"])
    payload_size = cursor

    buf = torch.from_numpy(np.empty(payload_size, np.uint8))  # numpy asks for huge pages
    for entry, (name, t, _, enc) in zip(table, plans, strict=True):
        _fill_regions(buf, entry, t, enc, block, name)
    _zero_gaps(buf, table)

    header = {"fingerprint": fingerprint(state_dict), "meta": dict(meta), "block": block,
              "payload_size": payload_size, "tensors": table}
    hbytes = msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<HI", VERSION, len(hbytes))
    crc = zlib.crc32(hbytes, zlib.crc32(prefix))
    # threads >= 1 always: zstd's multi-threaded output is the same for any worker count
    cctx = zstandard.ZstdCompressor(level=options.level, threads=options.threads or 1,
                                    write_checksum=True, write_content_size=True)
    frame = cctx.compress(buf.numpy().data)  # one-shot beats stream_writer by ~25% even with the join
    return b"".join([MAGIC, prefix, struct.pack("<II", crc, zlib.crc32(frame)), hbytes, frame])


def _fill_regions(buf: torch.Tensor, e: dict[str, Any], t: torch.Tensor, enc: str, block: int,
                  name: str) -> None:
    flat = t.reshape(-1)
    dst = buf[e["offset"]:e["offset"] + e["nbytes"]]
    if enc != "q8":
        stored = ENCODINGS[enc] or t.dtype
        if flat.numel():
            dst.view(stored).copy_(flat)
        if enc == "f16" and not bool(torch.isfinite(dst.view(torch.float16)).all()):
            raise CodecError(f"tensor {name!r} has values beyond the fp16 range; use keep_dtype='fp32'")
        return
    q = dst.view(torch.int8)
    s = torch.empty(e["scales_nbytes"] // 4)
    full = flat.numel() // block
    if full:
        _quantize_rows(flat[:full * block].view(full, block), q[:full * block].view(full, block),
                       s[:full], name)
    rest = flat.numel() - full * block
    if rest:
        _quantize_rows(flat[full * block:].view(1, rest), q[full * block:].view(1, rest), s[full:], name)
    # byte planes (all first bytes, then all second...): zstd then sees the near-constant exponents together
    planes = buf[e["scales_offset"]:e["scales_offset"] + e["scales_nbytes"]].view(4, -1)
    planes.copy_(s.view(torch.uint8).view(-1, 4).t())


def _zero_gaps(buf: torch.Tensor, table: list[dict[str, Any]]) -> None:
    """Zero the alignment padding so equal inputs give equal bytes."""
    for _, end in _regions(table):
        buf[end:min(_align(end), buf.numel())].zero_()


def _regions(table: list[dict[str, Any]]) -> list[tuple[int, int]]:
    out = [(e["offset"], e["offset"] + e["nbytes"]) for e in table]
    out += [(e["scales_offset"], e["scales_offset"] + e["scales_nbytes"]) for e in table if e["enc"] == "q8"]
    return out


# ---------------------------------------------------------------------------------------------
# decode: every check raises CodecError naming what is wrong


def _as_view(blob: Any) -> memoryview:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CodecError(f"blob must be bytes, bytearray or memoryview, got {type(blob).__name__}")
    return memoryview(blob).cast("B")


def _guarded(fn: Any, *args: Any) -> Any:
    """Run fn; anything but a CodecError (msgpack, zstd, numpy, torch...) becomes one."""
    try:
        return fn(*args)
    except CodecError:
        raise
    except Exception as err:  # noqa: BLE001 - hostile input: no other exception type may escape
        raise CodecError(f"undecodable blob: {type(err).__name__}: {err}") from err


def _read_header(view: memoryview, limits: Limits) -> tuple[dict[str, Any], int, int]:
    """Validated header, where the frame starts, and the frame's crc32."""
    n = len(view)
    if n > limits.max_blob_bytes:
        raise CodecError(f"blob of {n} bytes exceeds max_blob_bytes={limits.max_blob_bytes}")
    head = bytes(view[:PREFIX_SIZE])
    if not head.startswith(MAGIC[:n]) or (n >= len(MAGIC) and head[:len(MAGIC)] != MAGIC):
        raise CodecError(f"bad magic {head[:len(MAGIC)]!r}: not a p2pcod checkpoint")
    if n < PREFIX_SIZE:
        raise CodecError(f"truncated blob: {n} bytes, the fixed prefix alone is {PREFIX_SIZE}")
    version, hlen, crc, frame_crc = _PREFIX.unpack(head[len(MAGIC):])
    if version != VERSION:
        raise CodecError(f"unsupported format version {version} (this codec reads {VERSION})")
    if hlen > limits.max_header_bytes:
        raise CodecError(f"header of {hlen} bytes exceeds max_header_bytes={limits.max_header_bytes}")
    if PREFIX_SIZE + hlen > n:
        raise CodecError(f"truncated blob: header needs {PREFIX_SIZE + hlen} bytes, blob has {n}")
    hbytes = bytes(view[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if zlib.crc32(hbytes, zlib.crc32(head[len(MAGIC):len(MAGIC) + 6])) != crc:
        raise CodecError("header checksum mismatch: the header is corrupted")
    try:
        header = msgpack.unpackb(hbytes, raw=False, strict_map_key=True, use_list=True)
    except Exception as err:  # noqa: BLE001 - msgpack raises many types
        raise CodecError(f"header is not valid msgpack: {type(err).__name__}: {err}") from err
    return _check_header(header, limits), PREFIX_SIZE + hlen, frame_crc


def _int(value: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if type(value) is not int:
        raise CodecError(f"{what} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise CodecError(f"{what} = {value} out of range [{lo}, {hi}]")
    return value


def _keys(d: Any, expected: set[str], what: str) -> None:
    if not isinstance(d, dict):
        raise CodecError(f"{what} must be a map, got {type(d).__name__}")
    if missing := expected - d.keys():
        raise CodecError(f"{what}: missing field(s) {sorted(missing)}")
    if extra := d.keys() - expected:
        raise CodecError(f"{what}: unknown field(s) {sorted(map(str, extra))}")


def _check_header(h: Any, limits: Limits) -> dict[str, Any]:
    _keys(h, _HEADER_KEYS, "header")
    fp = h["fingerprint"]
    if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
        raise CodecError("header field 'fingerprint' must be 64 lowercase hex characters")
    if not isinstance(h["meta"], dict):
        raise CodecError(f"header field 'meta' must be a map, got {type(h['meta']).__name__}")
    block = _int(h["block"], "header field 'block'", 1, MAX_BLOCK)
    size = _int(h["payload_size"], "header field 'payload_size'")
    if size > limits.max_decoded_bytes:
        raise CodecError(f"declared payload size {size} exceeds max_decoded_bytes={limits.max_decoded_bytes}")
    tensors = h["tensors"]
    if not isinstance(tensors, list):
        raise CodecError(f"header field 'tensors' must be a list, got {type(tensors).__name__}")
    if len(tensors) > limits.max_tensors:
        raise CodecError(f"{len(tensors)} tensors exceeds max_tensors={limits.max_tensors}")
    names: set[str] = set()
    decoded = 0
    regions: list[tuple[int, int, str]] = []
    for i, e in enumerate(tensors):
        numel = _check_entry(e, i, block, limits)
        if e["name"] in names:
            raise CodecError(f"duplicate tensor name {e['name']!r} in the tensor table")
        names.add(e["name"])
        decoded += numel * DTYPES[e["dtype"]].itemsize
        if decoded > limits.max_decoded_bytes:
            raise CodecError(f"decoded tensors exceed max_decoded_bytes={limits.max_decoded_bytes}")
        regions.append((e["offset"], e["offset"] + e["nbytes"], e["name"]))
        if e["enc"] == "q8":
            regions.append((e["scales_offset"], e["scales_offset"] + e["scales_nbytes"], e["name"] + ":scales"))
    _check_regions(regions, size)
    table = [(e["name"], e["shape"], e["dtype"]) for e in tensors]
    if _table_fingerprint(table) != fp:
        raise CodecError("fingerprint in the header does not match its tensor table")
    return h


def _check_entry(e: Any, i: int, block: int, limits: Limits) -> int:
    """Validate tensor table entry i; return its element count."""
    what = f"tensor table entry {i}"
    if not isinstance(e, dict) or not e.keys() >= _TABLE_KEYS:
        _keys(e, _TABLE_KEYS, what)  # raises, naming what is missing
    name, dname, shape, enc = e["name"], e["dtype"], e["shape"], e["enc"]
    if not isinstance(name, str):
        raise CodecError(f"{what}: name must be a str, got {type(name).__name__}")
    what = f"tensor {name!r}"
    if not isinstance(dname, str) or dname not in DTYPES:
        raise CodecError(f"{what}: unknown dtype {dname!r}")
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise CodecError(f"{what}: unknown encoding {enc!r}")
    if enc != "raw" and dname not in _FLOATS:
        raise CodecError(f"{what}: encoding {enc!r} is invalid for dtype {dname}")
    _keys(e, _TABLE_KEYS | (_Q8_KEYS if enc == "q8" else set()), what)
    if not isinstance(shape, list):
        raise CodecError(f"{what}: shape must be a list, got {type(shape).__name__}")
    if len(shape) > limits.max_ndim:
        raise CodecError(f"{what}: {len(shape)} dims exceeds max_ndim={limits.max_ndim}")
    numel = 1
    for d in shape:
        if type(d) is not int:
            raise CodecError(f"{what}: shape holds a {type(d).__name__}, not an int")
        if d < 0:
            raise CodecError(f"{what}: negative dimension {d} in shape {shape}")
        numel *= d  # Python ints: no overflow, so the comparison below is exact
        if numel > limits.max_tensor_numel or d > limits.max_tensor_numel:
            raise CodecError(f"{what}: element count of shape {shape} exceeds "
                             f"max_tensor_numel={limits.max_tensor_numel}")
    expect = _region_nbytes(enc, DTYPES[dname], numel)
    for key, want in [("nbytes", expect)] + ([("scales_nbytes", 4 * _nblocks(numel, block))]
                                             if enc == "q8" else []):
        off = _int(e[key.replace("nbytes", "offset")], f"{what}: {key.replace('nbytes', 'offset')}")
        if off % ALIGN:
            raise CodecError(f"{what}: offset {off} is not aligned to {ALIGN}")
        if _int(e[key], f"{what}: {key}") != want:
            raise CodecError(f"{what}: {key}={e[key]} does not match shape/dtype/encoding (expected {want})")
    return numel


def _check_regions(regions: list[tuple[int, int, str]], size: int) -> None:
    """Regions must lie inside the payload, not overlap, and leave only alignment padding."""
    for start, end, label in regions:
        if end > size:
            raise CodecError(f"region of {label!r} [{start}, {end}) runs past the end of the payload ({size})")
    prev_end, prev = 0, "start of payload"
    for start, end, label in sorted(regions):
        if start < prev_end:
            raise CodecError(f"region of {label!r} overlaps {prev!r}")
        if start - prev_end >= ALIGN:
            raise CodecError(f"unused gap of {start - prev_end} bytes before {label!r} in the payload")
        prev_end, prev = max(prev_end, end), label
    if size - prev_end >= ALIGN:
        raise CodecError(f"payload size {size} leaves {size - prev_end} unused bytes after the last tensor")


def _decompress(frame: memoryview, size: int, crc: int) -> bytes:
    if len(frame) == 0:
        raise CodecError("truncated blob: the payload frame is missing")
    if zlib.crc32(frame) != crc:
        raise CodecError("payload frame checksum mismatch: the frame is corrupted or truncated")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as err:
        raise CodecError(f"truncated or corrupt zstd frame header: {err}") from err
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise CodecError("zstd frame does not declare its content size")
    if params.content_size != size:  # checked BEFORE decompressing: no decompression bombs
        raise CodecError(f"zstd frame declares content size {params.content_size}, header says {size}")
    if not params.has_checksum or params.dict_id:
        raise CodecError("zstd frame must have a content checksum and no dictionary")
    try:
        payload = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(
            frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise CodecError(f"corrupt or truncated payload: {err}") from err
    if len(payload) != size:
        raise CodecError(f"decompressed size {len(payload)} != declared {size}")
    return payload


def _alloc(numel: int, dtype: torch.dtype) -> torch.Tensor:
    # numpy allocations are madvise(HUGEPAGE)d: far fewer page faults than torch.empty on 100 MB
    return torch.from_numpy(np.empty(numel * dtype.itemsize, np.uint8)).view(dtype)


def _check_scales(s: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    # the slack covers fp32 rounding of absmax/127; with it, 127 * scale still fits the output dtype
    top = _quant_max(dtype) / 127 * (1 + 2**-16)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or (s.numel() and float(s.max()) > top):
        raise CodecError(f"tensor {name!r}: non-finite, negative or out-of-range scales")


def _build(payload: bytes, e: dict[str, Any], block: int) -> torch.Tensor:
    dtype, shape, enc, name = DTYPES[e["dtype"]], e["shape"], e["enc"], e["name"]
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    out = _alloc(numel, dtype)
    if enc != "q8":
        out.copy_(torch.frombuffer(payload, dtype=ENCODINGS[enc] or dtype, count=numel, offset=e["offset"]))
        if e["dtype"] in _FLOATS and not bool(torch.isfinite(out).all()):
            raise CodecError(f"tensor {name!r} contains NaN or Inf")
        return out.view(shape)
    q = torch.frombuffer(payload, dtype=torch.int8, count=numel, offset=e["offset"])
    planes = torch.frombuffer(payload, dtype=torch.uint8, count=e["scales_nbytes"], offset=e["scales_offset"])
    s = planes.view(4, -1).t().contiguous().view(torch.float32).view(-1)
    _check_scales(s, dtype, name)
    full = numel // block
    step = max(1, _CHUNK_ELEMS // block)
    for i in range(0, full, step):  # chunked: the fp32 temporaries of a cast stay in cache
        j = min(i + step, full)
        torch.mul(q[i * block:j * block].view(-1, block), s[i:j, None],
                  out=out[i * block:j * block].view(-1, block))
    if numel > full * block:
        torch.mul(q[full * block:], s[full], out=out[full * block:])
    return out.view(shape)


def peek(blob: bytes | bytearray | memoryview, limits: Limits = Limits()) -> dict:
    """The validated header, without decompressing the payload."""
    def _peek() -> dict:
        view = _as_view(blob)
        h, start, _ = _read_header(view, limits)
        return {"version": VERSION, "fingerprint": h["fingerprint"], "meta": h["meta"], "block": h["block"],
                "payload_size": h["payload_size"], "compressed_size": len(view) - start,
                "tensors": h["tensors"]}
    return _guarded(_peek)


def decode(blob: bytes | bytearray | memoryview, expect_fingerprint: str | None = None,
           limits: Limits = Limits()) -> tuple[dict[str, torch.Tensor], dict]:
    """Blob -> (state_dict, meta). Hostile input raises CodecError and nothing else."""
    return _guarded(_decode, blob, expect_fingerprint, limits)


def _decode(blob: Any, expect_fingerprint: str | None, limits: Limits) -> tuple[dict, dict]:
    view = _as_view(blob)
    h, start, frame_crc = _read_header(view, limits)
    if expect_fingerprint is not None and h["fingerprint"] != expect_fingerprint:
        raise CodecError(f"fingerprint mismatch: blob has {h['fingerprint'][:16]}..., "
                         f"expected {str(expect_fingerprint)[:16]}...")
    payload = _decompress(view[start:], h["payload_size"], frame_crc)
    with warnings.catch_warnings():  # frombuffer warns on read-only bytes; we only read them
        warnings.simplefilter("ignore", UserWarning)
        state = {e["name"]: _build(payload, e, h["block"]) for e in h["tensors"]}
    if expect_fingerprint is not None and fingerprint(state) != expect_fingerprint:
        raise CodecError("fingerprint mismatch: the decoded tensors do not match the expected model")
    return state, h["meta"]
