"""Fuzz what a peer reads from the network: checkpoint blobs (`codec.decode`) and peer records
(`PeerRecord.from_wire`, `parse_wire`, `dht.check_entry`, and the DHT-side `PeerRecordValidator`).

    .venv/bin/python benchmarks/fuzz.py --count 100000          # the long run (a few minutes)
    .venv/bin/python benchmarks/fuzz.py --count 2000 --seed 7   # another stream of inputs
    .venv/bin/python benchmarks/fuzz.py --seed 7 --replay 1234  # re-run input 1234 of that stream, verbose

Inputs come from generators (random bytes, bit flips, truncations, splices of valid blobs, header fields
replaced with wrong types / huge numbers / deep nesting, re-checksummed mutations that get past the crc
checks into msgpack, the tensor table and the payload, random records and model configs...). Input i of
a run is made by `random.Random(f"{seed}:{i}")`: any failure is reproducible from (seed, i).

Property: every call returns or raises the typed error of its layer (CodecError; RecordError; the
validator returns a bool); no call takes longer than --max-seconds (a SIGALRM turns a hang into a
failure); peak RSS stays under --max-rss-mb. Printed: count, failures, max time per input, peak RSS.
Exit status 1 when any input fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import random
import resource
import signal
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zstandard
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from p2pcod import codec
from p2pcod.errors import CodecError, RecordError
from p2pcod.swarm.dht import PeerRecordValidator, check_entry, peer_id_of_owner, peers_key
from p2pcod.swarm.records import PeerRecord, parse_wire, tombstone_wire

SWARM = "fuzz"
HUGE_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 63, 64, 65, 255, 256]
# fp32 bit patterns: NaN, +-Inf, max, -1, smallest denormal, -0, 1e38
F32_BITS = [0x7FC00000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xBF800000, 0x00000001, 0x80000000, 0x7E967699]
FLOATS = [0.0, -0.0, 1.5, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324, 3.4e38, 1e39]


# ---- the corpus: valid inputs to mutate ----------------------------------------------------------------
def _state_dicts() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"w": torch.randn(40, 33, generator=g) * 0.02, "b": torch.randn(33, generator=g), "i": torch.arange(6)},
        {"emb": torch.randn(64, 32, generator=g), "h": torch.randn(8, 8, generator=g).half(),
         "bf": torch.randn(48, 48, generator=g).bfloat16(), "mask": torch.rand(5, 3, generator=g) > 0.5,
         "s": torch.tensor(2.5), "empty": torch.empty(0, 4), "d": torch.randn(40, 40, generator=g).double()},
        {"only": torch.randn(3, generator=g)},
        {},
    ]


@dataclass
class Corpus:
    blobs: list[bytes]
    headers: list[tuple[dict, bytes]]  # (header, frame) of each blob
    payloads: list[bytes]
    subkeys: list[bytes]  # `[owner:ssh-rsa ...]` subkeys of real RSA keys
    owners: list[str]  # their peer ids
    records: list[dict]  # valid wire records (owners[i] for i < len(owners))
    validator: PeerRecordValidator = field(repr=False)
    key_id: bytes = b""

    @classmethod
    def build(cls) -> Corpus:
        blobs = [codec.encode(sd, {"peer": "p0", "step": 7, "model": {"width": 32}}) for sd in _state_dicts()]
        blobs.append(codec.encode(_state_dicts()[0], {}, codec.CodecOptions(block=64, keep_dtype="fp16")))
        headers = [split(b) for b in blobs]
        payloads = [zstandard.ZstdDecompressor().decompress(f) for _, f in headers]
        keys = [RSAPrivateKey() for _ in range(2)]
        subkeys = [RSASignatureValidator(k).local_public_key for k in keys]
        owners = [peer_id_of_owner(s) for s in subkeys]
        records = []
        for i, owner in enumerate(owners):
            base = dict(name=f"peer-{i}", peer_id=owner, step=120 * i, digest="", size=0, codec="p2pcod-int8/1",
                        task="lm", model_cfg={"layers": 2, "width": 64, "act": "gelu", "sizes": [1, [2, 3]]},
                        fingerprint="ab" * 32, time=1.7e9)
            records.append(PeerRecord(**base).to_wire())
            records.append(PeerRecord(**(base | {"digest": "0f" * 32, "size": 12345})).to_wire())
        validator = PeerRecordValidator(SWARM)
        return cls(blobs, headers, payloads, subkeys, owners, records, validator,
                   DHTID.generate(source=peers_key(SWARM)).to_bytes())


def split(blob: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack_from("<I", blob, len(codec.MAGIC) + 2)[0]
    header = msgpack.unpackb(blob[codec.PREFIX_SIZE:codec.PREFIX_SIZE + hlen], raw=False)
    return header, blob[codec.PREFIX_SIZE + hlen:]


def forge(hbytes: bytes, frame: bytes, version: int = codec.VERSION) -> bytes:
    """A blob around these header bytes and frame, with valid checksums (what a malicious peer sends)."""
    prefix = struct.pack("<HI", version, len(hbytes))
    crc = zlib.crc32(hbytes, zlib.crc32(prefix))
    return codec.MAGIC + prefix + struct.pack("<II", crc, zlib.crc32(frame)) + hbytes + frame


def refresh(blob: bytes | bytearray) -> bytes:
    """Recompute both checksums of a (mutated) blob whose prefix still parses; otherwise leave it."""
    blob = bytes(blob)
    if len(blob) < codec.PREFIX_SIZE:
        return blob
    version, hlen = struct.unpack_from("<HI", blob, len(codec.MAGIC))
    start = codec.PREFIX_SIZE + hlen
    if start > len(blob):
        return blob
    return codec.MAGIC + forge(blob[codec.PREFIX_SIZE:start], blob[start:], version)[len(codec.MAGIC):]


# ---- random values -------------------------------------------------------------------------------------
def deep_msgpack(depth: int, kind: str = "array") -> bytes:
    """Raw msgpack of `depth` nested one-element arrays (or maps): packb itself refuses to build these."""
    opener = b"\x91" if kind == "array" else b"\x81\xa1k"
    return opener * depth + b"\xc0"


def pack(value: Any, r: random.Random) -> bytes:
    """msgpack bytes of value; a deep nesting instead when msgpack cannot pack it (ints past 64 bits)."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return deep_msgpack(r.randrange(1, 3000))


def weird(r: random.Random, depth: int = 0) -> Any:
    """A value of a random msgpack type, biased to edge cases."""
    pick = r.randrange(14 if depth < 3 else 9)
    if pick == 0:
        return None
    if pick == 1:
        return r.choice([True, False])
    if pick == 2:
        return r.choice(HUGE_INTS) + r.choice([0, 0, 1, -1])
    if pick == 3:
        return r.randint(-(2**63), 2**64 - 1)
    if pick == 4:
        return r.choice(FLOATS)
    if pick == 5:
        return rand_str(r)
    if pick == 6:
        return r.randbytes(r.randrange(0, 40))
    if pick == 7:
        return r.choice(["", "float32", "q8", "raw", "f16", "int64", "x" * 70, "é", "\x00"])
    if pick == 8:
        return r.randrange(0, 1 << 20)
    if pick in (9, 10):
        return [weird(r, depth + 1) for _ in range(r.randrange(0, 5))]
    if pick == 11:
        return {rand_str(r): weird(r, depth + 1) for _ in range(r.randrange(0, 5))}
    if pick == 12:
        return [r.randrange(0, 1 << 33) for _ in range(r.randrange(0, 10))]
    return {"x": [[[[[[weird(r, 3)]]]]]]}


def rand_str(r: random.Random) -> str:
    n = r.choice([0, 1, 3, 8, 64, 65, 200, 1025, 5000])
    alphabet = r.choice(["abcdef0123456789", "ABCxyz._-", "!@#$% \n\t\\", "é漢\u202e\U0001f600", "1-9A-HJ-NP"])
    return "".join(r.choices(alphabet, k=n))


def rand_cfg(r: random.Random, depth: int = 0, budget: list[int] | None = None) -> Any:
    """A JSON-like model config, sometimes beyond the schema's bounds (depth, items, key length...)."""
    budget = [r.choice([20, 300])] if budget is None else budget
    budget[0] -= 1
    pick = r.randrange(8 if depth < 6 and budget[0] > 0 else 4)
    if pick == 0:
        return r.choice([None, True, 0, -5, 2**63, 1.5, float("nan"), float("inf")])
    if pick == 1:
        return rand_str(r)
    if pick == 2:
        return r.randbytes(3)
    if pick == 3:
        return r.randrange(1000)
    n = r.choice([0, 1, 3, 40, 300])
    if pick in (4, 5):
        return {r.choice(["k", "width", "", "x" * 65, rand_str(r)]): rand_cfg(r, depth + 1, budget) for _ in range(n)}
    return [rand_cfg(r, depth + 1, budget) for _ in range(n)]


# ---- generators: (rng, corpus) -> (target, payload) ----------------------------------------------------
Gen = Callable[[random.Random, Corpus], tuple[str, Any]]


def g_random_bytes(r: random.Random, c: Corpus) -> tuple[str, Any]:
    data = r.randbytes(r.choice([0, 1, 7, 8, 21, 24, 64, 300, 2000]))
    return "codec", (codec.MAGIC + data if r.random() < 0.5 else data)


def g_bit_flips(r: random.Random, c: Corpus) -> tuple[str, Any]:
    data = bytearray(r.choice(c.blobs))
    for _ in range(r.randint(1, 8)):
        pos = r.randrange(len(data))
        data[pos] ^= 1 << r.randrange(8)
    return "codec", bytes(refresh(data) if r.random() < 0.7 else data)


def g_truncate(r: random.Random, c: Corpus) -> tuple[str, Any]:
    blob = r.choice(c.blobs)
    cut = r.randrange(len(blob))
    return "codec", (refresh(blob[:cut]) if r.random() < 0.5 else blob[:cut])


def g_splice(r: random.Random, c: Corpus) -> tuple[str, Any]:
    a, b = r.choice(c.blobs), r.choice(c.blobs)
    data = a[:r.randrange(len(a) + 1)] + b[r.randrange(len(b) + 1):]
    if r.random() < 0.3:  # duplicate a chunk in place
        i = r.randrange(len(data) + 1)
        data = data[:i] + data[i:i + r.randrange(1, 64)] + data[i:]
    return "codec", (refresh(data) if r.random() < 0.7 else data)


def g_header_field(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """One or more header / tensor-table fields replaced (or added, or deleted); checksums valid."""
    header, frame = r.choice(c.headers)
    header = json_copy(header)
    for _ in range(r.randint(1, 3)):
        target = header
        tensors = [e for e in header.get("tensors") or [] if isinstance(e, dict)] \
            if isinstance(header.get("tensors"), list) else []
        if tensors and r.random() < 0.6:
            target = r.choice(tensors)
        key = r.choice(list(target) + ["extra", 1, ""])
        if r.random() < 0.1 and key in target:
            del target[key]
        elif isinstance(key, str):
            target[key] = weird(r)
        else:
            target = {key: 1} | target
    return "codec", forge(pack(header, r), frame)


def g_raw_header(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """The whole header replaced: random msgpack, deep nesting, truncated msgpack, non-map, huge lengths."""
    _, frame = r.choice(c.headers)
    pick = r.randrange(6)
    if pick == 0:
        hbytes = deep_msgpack(r.choice([10, 100, 1000, 5000, 100_000]), r.choice(["array", "map"]))
    elif pick == 1:
        hbytes = r.randbytes(r.randrange(0, 200))
    elif pick == 2:  # a container announcing far more elements than there are bytes
        head = r.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6"])
        hbytes = head + struct.pack(">I", r.choice([2**32 - 1, 2**31])) + b"\x00"
    elif pick == 3:
        hbytes = pack(weird(r), r) if r.random() < 0.9 else b""
    elif pick == 4:  # map with non-str keys / duplicate keys
        hbytes = b"\x82\x01\x02\x01\x03" if r.random() < 0.5 else b"\x82\xa1a\x01\xa1a\x02"
    else:
        valid = msgpack.packb(r.choice(c.headers)[0], use_bin_type=True)
        hbytes = valid[:r.randrange(len(valid))]
    return "codec", forge(hbytes, frame)


def g_payload(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """Valid header, payload bytes mutated (scales -> NaN/Inf/huge/negative, codes, kept tensors), re-framed."""
    i = r.randrange(len(c.headers))
    header, _ = c.headers[i]
    payload = bytearray(c.payloads[i])
    if payload:
        for _ in range(r.randint(1, 6)):
            pos = r.randrange(len(payload))
            if r.random() < 0.5 and pos + 4 <= len(payload):
                payload[pos:pos + 4] = struct.pack("<I", r.choice(F32_BITS))
            else:
                payload[pos] = r.randrange(256)
    if r.random() < 0.2:
        payload = payload[:r.randrange(len(payload) + 1)] if r.random() < 0.5 else payload + r.randbytes(64)
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(payload))
    return "codec", forge(msgpack.packb(header, use_bin_type=True), frame)


def g_frame(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """Valid header, odd zstd frames: no content size, no checksum, wrong size, bombs, skippable, two frames."""
    i = r.randrange(len(c.headers))
    header, frame = c.headers[i]
    payload = c.payloads[i]
    pick = r.randrange(6)
    if pick == 0:
        cctx = zstandard.ZstdCompressor(write_checksum=r.random() < 0.5, write_content_size=r.random() < 0.5)
        frame = cctx.compress(payload)
    elif pick == 1:  # a bomb: a tiny frame that declares and holds far more than the header says
        frame = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(r.choice([1 << 20, 8 << 20])))
    elif pick == 2:
        frame = frame + frame
    elif pick == 3:  # skippable frame in front
        frame = struct.pack("<II", 0x184D2A50, 4) + b"junk" + frame
    elif pick == 4:
        cobj = zstandard.ZstdCompressor(write_checksum=True).compressobj()
        frame = cobj.compress(payload) + cobj.flush()  # streamed: no content size
    else:
        frame = b""
    return "codec", forge(msgpack.packb(header, use_bin_type=True), frame)


def g_bomb_header(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """A self-consistent header declaring a big payload of zeros: bounded by Limits, decoded in full."""
    numel = r.choice([1 << 16, 1 << 20, 4 << 20])
    table = [{"name": "z", "dtype": "uint8", "shape": [numel], "enc": "raw", "offset": 0, "nbytes": numel}]
    fp = codec._table_fingerprint([("z", [numel], "uint8")])
    size = -(-numel // codec.ALIGN) * codec.ALIGN
    header = {"fingerprint": fp, "meta": {}, "block": 256, "payload_size": size, "tensors": table}
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(size))
    return "codec", forge(msgpack.packb(header, use_bin_type=True), frame)


def g_record_random(r: random.Random, c: Corpus) -> tuple[str, Any]:
    return "record", weird(r)


def g_record_field(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """A valid record with fields replaced by random values, deleted, or extra fields added."""
    wire = dict(r.choice(c.records))
    for _ in range(r.randint(1, 3)):
        key = r.choice(list(wire) + ["left", "extra", "v"])
        op = r.random()
        if op < 0.1:
            wire.pop(key, None)
        elif key == "model_cfg" or op < 0.3:
            wire[key] = rand_cfg(r)
        else:
            wire[key] = weird(r)
    return "record", wire


def g_tombstone(r: random.Random, c: Corpus) -> tuple[str, Any]:
    wire = tombstone_wire(r.choice(c.owners), 1.7e9)
    key = r.choice(list(wire) + ["extra"])
    if r.random() < 0.8:
        wire[key] = weird(r)
    if r.random() < 0.3:
        wire["left"] = r.choice([True, 1, "yes", None])
    return "record", wire


def g_record_bytes(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """Serialized records mutated at the byte level, then deserialized the way the DHT does it."""
    data = bytearray(MSGPackSerializer.dumps(r.choice(c.records)))
    for _ in range(r.choice([1, 1, 2, 4])):
        op = r.randrange(3)
        pos = r.randrange(len(data))
        if op == 0:
            data[pos] ^= 1 << r.randrange(8)
        elif op == 1:
            del data[pos:pos + r.randrange(1, 8)]
        else:
            data[pos:pos] = r.randbytes(r.randrange(1, 8))
        if not data:
            break
    return "wire", bytes(data)


def g_entry(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """check_entry(subkey, value): real owner keys, mutated keys, other peers' records, non-bytes subkeys."""
    i = r.randrange(len(c.subkeys))
    subkey: Any = c.subkeys[i]
    pick = r.randrange(6)
    if pick == 1:
        mutated = bytearray(subkey)
        mutated[r.randrange(len(mutated))] ^= 1 << r.randrange(8)
        subkey = bytes(mutated)
    elif pick == 2:
        subkey = r.choice([b"", b"[owner:ssh-rsa AAAA]", b"[owner:ssh-rsa " + b"A" * 5000 + b"]", weird(r),
                           b"[owner:ssh-rsa " + r.randbytes(30).hex().encode() + b"]"])
    elif pick == 3:
        subkey = subkey[:r.randrange(len(subkey))]
    owner = c.owners[i]
    value: Any = dict(r.choice(c.records))
    roll = r.random()
    if roll < 0.4:
        value["peer_id"] = owner
        if roll < 0.2:
            value[r.choice(list(value))] = weird(r)
    elif roll < 0.6:
        value = tombstone_wire(owner, 1.7e9)
    elif roll < 0.8:
        value = weird(r)
    return "entry", (subkey, value)


def g_validator(r: random.Random, c: Corpus) -> tuple[str, Any]:
    """A whole DHTRecord as a DHT node receives it: serialized subkey and value, possibly garbage."""
    _, (subkey, value) = g_entry(r, c)
    try:
        sub_b = MSGPackSerializer.dumps(subkey)
        val_b = MSGPackSerializer.dumps(value)
    except (TypeError, OverflowError, ValueError):
        sub_b, val_b = r.randbytes(20), r.randbytes(20)
    if r.random() < 0.3:
        val_b = g_record_bytes(r, c)[1]
    if r.random() < 0.1:
        val_b = deep_msgpack(r.choice([100, 10_000]))
    return "validator", DHTRecord(c.key_id, sub_b, val_b, 1.7e9)


GENERATORS: dict[str, Gen] = {
    "random_bytes": g_random_bytes, "bit_flips": g_bit_flips, "truncate": g_truncate, "splice": g_splice,
    "header_field": g_header_field, "raw_header": g_raw_header, "payload": g_payload, "frame": g_frame,
    "bomb_header": g_bomb_header, "record_random": g_record_random, "record_field": g_record_field,
    "tombstone": g_tombstone, "record_bytes": g_record_bytes, "entry": g_entry, "validator": g_validator,
}
# how often each generator is picked (the cheap bomb one rarely: each decodes up to 4 MB)
WEIGHTS = {"bomb_header": 0.2, "raw_header": 1.0, "random_bytes": 1.0}


def json_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


# ---- targets: run one input; raise FuzzFailure on a property violation -------------------------------
class FuzzFailure(AssertionError):
    pass


def run_codec(blob: bytes) -> str:
    try:
        state, meta = codec.decode(blob)
    except CodecError as err:
        return "CodecError: " + str(err)[:60]
    if not isinstance(meta, dict):
        raise FuzzFailure(f"decode returned meta of type {type(meta).__name__}")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FuzzFailure(f"decode returned a {type(t).__name__} for {name!r}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FuzzFailure(f"decode returned non-finite values in {name!r}")
    return "decoded"


def run_record(value: Any) -> str:
    outcomes = []
    for fn in (PeerRecord.from_wire, parse_wire):
        try:
            rec = fn(value)
        except RecordError as err:
            outcomes.append("RecordError: " + str(err)[:40])
            continue
        if rec is None:
            outcomes.append("tombstone")
            continue
        if not isinstance(rec, PeerRecord):
            raise FuzzFailure(f"{fn.__qualname__} returned a {type(rec).__name__}")
        if PeerRecord.from_wire(rec.to_wire()) != rec:
            raise FuzzFailure("an accepted record does not round-trip through to_wire/from_wire")
        outcomes.append("record")
    return outcomes[-1]  # parse_wire's: it also accepts tombstones


def run_wire(data: bytes) -> str:
    try:
        value = MSGPackSerializer.loads(data)
    except Exception:  # noqa: BLE001 - hivemind's deserializer is not ours; the validator wraps it
        return "undeserializable"
    return run_record(value)


def run_entry(args: tuple[Any, Any]) -> str:
    try:
        rec = check_entry(*args)
    except RecordError as err:
        return "RecordError: " + str(err)[:40]
    if rec is not None and not isinstance(rec, PeerRecord):
        raise FuzzFailure(f"check_entry returned a {type(rec).__name__}")
    if rec is not None and rec.peer_id != peer_id_of_owner(args[0]):
        raise FuzzFailure("check_entry accepted a record whose peer_id is not its signer's")
    return "tombstone" if rec is None else "record"


_VALIDATOR: list[PeerRecordValidator] = []


def run_validator(record: DHTRecord) -> str:
    if not _VALIDATOR:
        _VALIDATOR.append(PeerRecordValidator(SWARM))
    ok = _VALIDATOR[0].validate(record)
    if not isinstance(ok, bool):
        raise FuzzFailure(f"validate returned a {type(ok).__name__}")
    return f"valid={ok}"


TARGETS: dict[str, Callable[[Any], str]] = {
    "codec": run_codec, "record": run_record, "wire": run_wire, "entry": run_entry, "validator": run_validator,
}


# ---- the run -------------------------------------------------------------------------------------------
class _Hang(BaseException):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _Hang


@dataclass
class Result:
    count: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    max_s: float = 0.0
    max_input: str = ""
    per_generator: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "failures": len(self.failures), "max_s_per_input": round(self.max_s, 4),
                "slowest": self.max_input, "peak_rss_mb": round(self.peak_rss_mb, 1),
                "rss_before_mb": round(self.baseline_rss_mb, 1), "elapsed_s": round(self.elapsed_s, 1),
                "per_generator": dict(sorted(self.per_generator.items()))}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_input(seed: int, i: int, corpus: Corpus, only: list[str] | None = None) -> tuple[str, str, Any]:
    r = random.Random(f"{seed}:{i}")
    names = only or list(GENERATORS)
    gen = r.choices(names, weights=[WEIGHTS.get(n, 1.0) for n in names])[0]
    target, value = GENERATORS[gen](r, corpus)
    return gen, target, value


def run(count: int, seed: int = 0, corpus: Corpus | None = None, only: list[str] | None = None,
        max_seconds: float = 5.0, progress: Callable[[str], None] | None = None, start: int = 0) -> Result:
    """Fuzz `count` inputs (indices start..start+count-1); never raises for a bad input, records it."""
    corpus = corpus or Corpus.build()
    res = Result(baseline_rss_mb=peak_rss_mb())
    t_start = time.monotonic()
    use_alarm = hasattr(signal, "setitimer") and _main_thread()
    old = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    try:
        for i in range(start, start + count):
            try:
                gen, target, value = make_input(seed, i, corpus, only)
            except Exception as err:  # noqa: BLE001 - a bug of the fuzzer itself: report it, go on
                res.failures.append({"index": i, "seed": seed, "generator": "?", "target": "generator",
                                     "error": f"{type(err).__name__}: {str(err)[:200]}"})
                res.count += 1
                continue
            t0 = time.perf_counter()
            error = None
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, max_seconds)
                outcome = TARGETS[target](value)
            except _Hang:
                error, outcome = f"hang: no result within {max_seconds} s", "hang"
            except Exception as err:  # noqa: BLE001 - the point: any untyped error is a finding
                error, outcome = f"{type(err).__name__}: {str(err)[:200]}", "failure"
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.perf_counter() - t0
            if dt > res.max_s:
                res.max_s, res.max_input = dt, f"{gen} #{i}"
            if dt > max_seconds and error is None:
                error = f"took {dt:.2f} s > {max_seconds} s"
            res.count += 1
            res.per_generator[gen] += 1
            res.outcomes[f"{target}: {outcome.split(':')[0]}"] += 1
            if error:
                res.failures.append({"index": i, "seed": seed, "generator": gen, "target": target, "error": error})
            if progress and (i - start + 1) % 10_000 == 0:
                progress(f"{i - start + 1}/{count} inputs, {len(res.failures)} failures, "
                         f"max {res.max_s * 1e3:.1f} ms, peak RSS {peak_rss_mb():.0f} MB")
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    res.peak_rss_mb = peak_rss_mb()
    res.elapsed_s = time.monotonic() - t_start
    return res


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=sorted(GENERATORS), help="use only these generators")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="per-input time bound (a hang fails)")
    ap.add_argument("--max-rss-mb", type=float, default=2048.0, help="peak RSS bound (exceeding it fails)")
    ap.add_argument("--replay", type=int, help="run only input REPLAY of the stream and show it")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("hivemind").setLevel(logging.ERROR)  # "Unknown ExtType code" warnings on garbage
    corpus = Corpus.build()
    if args.replay is not None:
        gen, target, value = make_input(args.seed, args.replay, corpus, args.only)
        print(f"input {args.replay} (seed {args.seed}): generator {gen}, target {target}\n{value!r:.2000}")
        print("outcome:", TARGETS[target](value))
        return 0
    res = run(args.count, args.seed, corpus, args.only, args.max_seconds, progress=print)
    s = res.summary()
    rss_ok = res.peak_rss_mb <= args.max_rss_mb
    if args.json:
        print(json.dumps(s | {"outcomes": dict(res.outcomes)}))
    else:
        print(f"count {s['count']}  failures {s['failures']}  max time per input {res.max_s * 1e3:.1f} ms "
              f"({s['slowest']})  peak RSS {s['peak_rss_mb']} MB (before fuzzing {s['rss_before_mb']} MB)  "
              f"elapsed {s['elapsed_s']} s ({res.count / max(res.elapsed_s, 1e-9):.0f} inputs/s)")
        print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(res.outcomes.items())))
    for f in res.failures[:20]:
        print("FAIL", json.dumps(f))
    if not rss_ok:
        print(f"FAIL peak RSS {res.peak_rss_mb:.0f} MB > --max-rss-mb {args.max_rss_mb:.0f}")
    return 1 if res.failures or not rss_ok or math.isnan(res.max_s) else 0


if __name__ == "__main__":
    sys.exit(main())
