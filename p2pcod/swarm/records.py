"""Peer records: what each peer announces in the DHT. Pure: no network, no torch.

A record travels as a small msgpack-able dict (`to_wire`); `from_wire` accepts only values that match
the schema exactly (no type coercion, bounded sizes) and raises RecordError naming the bad field.
A peer leaving the swarm overwrites its record with a *tombstone* (see `tombstone_wire`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from p2pcod.errors import RecordError

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024  # serialized size limit, checked by the DHT validator
MAX_BLOB_SIZE = 1 << 40  # sanity bound on an announced size; the fetcher applies its own, smaller one
MAX_CFG_DEPTH = 4
MAX_CFG_ITEMS = 256
MAX_STR = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PEER_ID_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")  # base58 alphabet
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{0,128}")
_CODEC_RE = re.compile(r"[A-Za-z0-9._/+-]{1,64}")

_FIELDS = ("name", "peer_id", "step", "digest", "size", "codec", "task", "model_cfg", "fingerprint", "time")


@dataclass(frozen=True)
class PeerRecord:
    name: str  # human name, 1..64 chars [A-Za-z0-9._-]
    peer_id: str  # libp2p peer id (base58) the blob is served from
    step: int  # training step of the served checkpoint (>= 0)
    digest: str  # sha256 hex of the served blob ("" when nothing served yet)
    size: int  # blob size in bytes (0 when nothing served)
    codec: str  # codec id, e.g. "p2pcod-int8/1"
    task: str  # task name, e.g. "lm"
    model_cfg: dict = field(hash=False)  # JSON-like model config (str keys, nested lists/dicts allowed)
    fingerprint: str  # hex model fingerprint
    time: float  # announce time (seconds since the epoch, as DHT time)

    def __post_init__(self) -> None:
        _check_str("name", self.name, _NAME_RE)
        _check_str("peer_id", self.peer_id, _PEER_ID_RE)
        _check_int("step", self.step, 0, 2**63 - 1)
        if self.digest != "":
            _check_str("digest", self.digest, _DIGEST_RE, "64 lowercase hex chars or empty")
        _check_int("size", self.size, 0, MAX_BLOB_SIZE)
        if (self.digest == "") != (self.size == 0):
            raise RecordError(
                f"record field 'size' is {self.size} but 'digest' is {self.digest!r}: "
                "both empty (nothing served) or both set"
            )
        _check_str("codec", self.codec, _CODEC_RE)
        _check_str("task", self.task, _NAME_RE)
        _check_str("fingerprint", self.fingerprint, _HEX_RE, "lowercase hex, at most 128 chars")
        if (
            isinstance(self.time, bool)
            or not isinstance(self.time, (int, float))
            or not math.isfinite(self.time)
            or self.time < 0
        ):
            raise RecordError(f"record field 'time' must be a finite number >= 0, got {self.time!r}")
        object.__setattr__(self, "time", float(self.time))
        if not isinstance(self.model_cfg, dict):
            raise RecordError(f"record field 'model_cfg' must be a dict, got {type(self.model_cfg).__name__}")
        object.__setattr__(self, "model_cfg", _check_cfg(self.model_cfg, "model_cfg", 0, [0]))

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able dict stored in the DHT."""
        wire = {"v": RECORD_VERSION}
        wire.update({k: getattr(self, k) for k in _FIELDS})
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> PeerRecord:
        """Parse a value read from the DHT; RecordError naming the problem when it is not a valid record."""
        if not isinstance(value, dict):
            raise RecordError(f"peer record must be a dict, got {type(value).__name__}")
        _check_version(value)
        if is_tombstone(value):
            raise RecordError("peer record is a tombstone (the peer left)")
        missing = [k for k in _FIELDS if k not in value]
        if missing:
            raise RecordError(f"peer record lacks field(s) {missing}")
        unknown = sorted(str(k) for k in value if k not in _FIELDS and k != "v")
        if unknown:
            raise RecordError(f"peer record has unknown field(s) {unknown[:8]}")
        return cls(**{k: value[k] for k in _FIELDS})


def tombstone_wire(peer_id: str, time: float) -> dict[str, Any]:
    """What a leaving peer stores over its record (the DHT keeps the newest value; it cannot delete)."""
    _check_str("peer_id", peer_id, _PEER_ID_RE)
    return {"v": RECORD_VERSION, "left": True, "peer_id": peer_id, "time": float(time)}


def is_tombstone(value: Any) -> bool:
    return isinstance(value, dict) and value.get("left") is True


def parse_wire(value: Any) -> PeerRecord | None:
    """A PeerRecord, None for a well-formed tombstone, RecordError for anything else."""
    if is_tombstone(value):
        _check_version(value)
        if set(value) != {"v", "left", "peer_id", "time"}:
            raise RecordError(f"tombstone has unexpected fields {sorted(map(str, value))[:8]}")
        _check_str("peer_id", value["peer_id"], _PEER_ID_RE)
        if not isinstance(value["time"], float) or not math.isfinite(value["time"]):
            raise RecordError("tombstone field 'time' must be a finite float")
        return None
    return PeerRecord.from_wire(value)


def wire_peer_id(value: Any) -> str | None:
    """The peer id a (record or tombstone) wire value claims, without validating the rest."""
    return value.get("peer_id") if isinstance(value, dict) and isinstance(value.get("peer_id"), str) else None


# ---- checks ---------------------------------------------------------------------------------------
def _check_version(value: dict) -> None:
    v = value.get("v")
    if type(v) is not int or v != RECORD_VERSION:
        raise RecordError(f"peer record field 'v' (format version) is {v!r}, expected {RECORD_VERSION}")


def _check_str(name: str, value: Any, pattern: re.Pattern, what: str | None = None) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = repr(value)[:80]
        raise RecordError(f"record field {name!r} is {shown}: expected {what or pattern.pattern}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise RecordError(f"record field {name!r} must be an int in [{lo}, {hi}], got {repr(value)[:40]}")


def _check_cfg(value: Any, path: str, depth: int, count: list[int]) -> Any:
    """Validate a JSON-like value; returns it with tuples turned into lists (msgpack may give either)."""
    count[0] += 1
    if count[0] > MAX_CFG_ITEMS:
        raise RecordError(f"record field 'model_cfg' has more than {MAX_CFG_ITEMS} items")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(f"record field {path} is {value}: numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STR:
            raise RecordError(f"record field {path} is a string longer than {MAX_STR}")
        return value
    if depth >= MAX_CFG_DEPTH:
        raise RecordError(f"record field {path} nests deeper than {MAX_CFG_DEPTH}")
    if isinstance(value, (list, tuple)):
        return [_check_cfg(v, f"{path}[{i}]", depth + 1, count) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not 1 <= len(k) <= 64:
                raise RecordError(
                    f"record field {path} has a key {repr(k)[:40]}: keys must be str, 1..64 chars"
                )
            out[k] = _check_cfg(v, f"{path}.{k}", depth + 1, count)
        return out
    raise RecordError(f"record field {path} has a value of type {type(value).__name__}")
