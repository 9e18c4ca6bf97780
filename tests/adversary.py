"""Hostile peers for tests: they speak the real protocol (signed DHT records, the blob stream protocol)
and break it on purpose, one way at a time.

- `Adversary`: a DHT member with a valid identity that announces whatever record and answers blob
  requests according to `mode` (serve / truncated / endless / stall), and can flood another peer's blob
  server with streams.
- `RecordForger`: a raw hivemind DHT node without p2pcod's record validator, that stores garbage or
  records claiming another peer's identity under its own signed subkey.
- Blob forgers: codec blobs with NaN / Inf weights or a decompression bomb, with valid checksums.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hivemind
import msgpack
import torch
import zstandard
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from p2pcod import codec
from p2pcod.session import CODEC_ID
from p2pcod.swarm.dht import Membership, peers_key
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import OK, REQUEST_PREFIX, protocol_name

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
MODES = ("serve", "truncated", "endless", "stall")


# ---- blob forgers ------------------------------------------------------------------------------------
def split(blob: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack_from("<I", blob, len(codec.MAGIC) + 2)[0]
    header = msgpack.unpackb(blob[codec.PREFIX_SIZE : codec.PREFIX_SIZE + hlen], raw=False)
    return header, blob[codec.PREFIX_SIZE + hlen :]


def forge(header: dict, frame: bytes) -> bytes:
    """A blob from a (tampered) header and zstd frame, with both crcs recomputed: only the content lies."""
    hbytes = msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<HI", codec.VERSION, len(hbytes))
    crc = zlib.crc32(hbytes, zlib.crc32(prefix))
    return codec.MAGIC + prefix + struct.pack("<II", crc, zlib.crc32(frame)) + hbytes + frame


def _payload(blob: bytes) -> bytearray:
    return bytearray(zstandard.ZstdDecompressor().decompress(split(blob)[1]))


def _frame(payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(payload))


def _entry(header: dict, name: str) -> dict:
    return next(e for e in header["tensors"] if e["name"] == name)


def with_kept_value(blob: bytes, tensor: str, value: float, index: int = 2) -> bytes:
    """`blob` with element `index` of the kept float32 tensor `tensor` set to `value` (e.g. NaN)."""
    header, _ = split(blob)
    payload = _payload(blob)
    struct.pack_into("<f", payload, _entry(header, tensor)["offset"] + 4 * index, value)
    return forge(header, _frame(payload))


def with_scale(blob: bytes, tensor: str, value: float, block: int = 0) -> bytes:
    """`blob` with the scale of one block of the quantized tensor `tensor` set to `value` (e.g. Inf)."""
    header, _ = split(blob)
    payload = _payload(blob)
    e = _entry(header, tensor)
    nblocks = e["scales_nbytes"] // 4
    for k, byte in enumerate(struct.pack("<f", value)):  # scales are stored as byte planes
        payload[e["scales_offset"] + k * nblocks + block] = byte
    return forge(header, _frame(payload))


def bomb(blob: bytes, inflated: int = 16 << 20) -> bytes:
    """`blob`'s header with a frame of `inflated` zero bytes (a few KB compressed)."""
    header, _ = split(blob)
    return forge(header, _frame(bytes(inflated)))


# ---- a hostile peer ----------------------------------------------------------------------------------
class Adversary:
    """A swarm member with a real identity that announces any record and serves any bytes.

    mode: "serve" (the header, then exactly the bytes set by `offer`), "truncated" (the full size in the
    header, half the bytes, then it closes), "endless" (the header, the bytes, then zeros for ever),
    "stall" (the header and 1 KB, then silence).
    """

    def __init__(self, swarm: str, identity_dir: str | Path, initial_peers: list[str], name: str,
                 task: str = "toy", ttl: float = 10.0) -> None:
        self.swarm, self.name, self.task = swarm, name, task
        self.m = Membership(swarm, identity_dir=identity_dir, initial_peers=initial_peers, host_maddrs=LOCAL,
                            ttl=ttl)
        self.peer_id = self.m.peer_id
        self.mode = "serve"
        self.served = b""
        self.requests = 0  # blob requests received
        self._tasks: set[asyncio.Task] = set()
        self._streams: list[Any] = []  # writers of flood streams
        self.record: PeerRecord | None = None  # re-announced every `heartbeat` s, so that it never expires
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(min(2.0, ttl / 4),), daemon=True)
        self._beat.start()
        self._p2p = self.m.p2p()
        self.m.loop.run(self._p2p.add_binary_stream_handler(protocol_name(swarm), self._serve), timeout=30,
                        what="registering the adversary's handler")

    def offer(self, blob: bytes, *, step: int, model_cfg: Mapping, fingerprint: str, mode: str = "serve",
              served: bytes | None = None, name: str | None = None) -> PeerRecord:
        """Announce a record for `blob` (its sha256 and size) and answer requests with `served` (default:
        the blob itself) in `mode`."""
        assert mode in MODES, mode
        self.mode, self.served = mode, blob if served is None else served
        record = PeerRecord(name=name or self.name, peer_id=self.peer_id, step=step, digest=codec.digest(blob),
                            size=len(blob), codec=CODEC_ID, task=self.task, model_cfg=dict(model_cfg),
                            fingerprint=fingerprint, time=time.time())
        assert self.m.announce(record)
        self.record = record
        return record

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            record = self.record
            if record is not None:
                with contextlib.suppress(Exception):  # the next beat retries
                    self.m.announce(dataclasses.replace(record, time=time.time()))

    async def _serve(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await reader.readexactly(len(REQUEST_PREFIX) + 64)
            self.requests += 1
            blob, mode = self.served, self.mode
            writer.write(OK + len(blob).to_bytes(8, "big"))
            if mode == "truncated":
                writer.write(blob[: len(blob) // 2])
            elif mode == "stall":
                writer.write(blob[:1024])
                await writer.drain()
                await asyncio.sleep(3600)
            else:
                writer.write(blob)
            await writer.drain()
            if mode == "endless":
                zeros = bytes(64 * 1024)
                while True:  # until the client hangs up (or we are closed)
                    writer.write(zeros)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    # ---- flooding another peer's blob server -----------------------------------------------------------
    def flood(self, peer_id: str, n: int, digest: str | None = None) -> int:
        """Open `n` blob streams to `peer_id` and keep them: silent ones (no request) when `digest` is None,
        otherwise requests for `digest` whose answers are never read. Returns how many opened."""

        async def one() -> bool:
            try:
                _, _, writer = await asyncio.wait_for(
                    self._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), protocol_name(self.swarm)),
                    10)
                if digest is not None:
                    writer.write(REQUEST_PREFIX + digest.encode())
                    await writer.drain()
            except (asyncio.TimeoutError, ConnectionError, OSError, Exception):  # noqa: BLE001 - count only
                return False
            self._streams.append(writer)
            return True

        async def all_() -> int:
            return sum(await asyncio.gather(*(one() for _ in range(n))))

        return self.m.loop.run(all_(), timeout=60, what="flooding")

    def stop_flood(self) -> None:
        async def go() -> None:
            for w in self._streams:
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._streams.clear()

        with contextlib.suppress(Exception):
            self.m.loop.run(go(), timeout=10, what="closing flood streams")

    def close(self) -> None:
        self._stop.set()
        self._beat.join(10)
        self.stop_flood()

        async def go() -> None:
            with contextlib.suppress(Exception):
                await self._p2p.remove_binary_stream_handler(protocol_name(self.swarm))
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.m.loop.run(go(), timeout=10, what="closing the adversary")
        with contextlib.suppress(Exception):
            self.m.leave()
        self.m.shutdown()


class RecordForger:
    """A raw hivemind DHT node (signature validator only, no p2pcod schema check) storing any value in the
    swarm's peers dictionary under its own signed subkey: garbage, or records with another peer's id."""

    def __init__(self, swarm: str, initial_peers: list[str]) -> None:
        self.key = peers_key(swarm)
        self.signer = RSASignatureValidator(RSAPrivateKey())
        self.dht = hivemind.DHT(initial_peers=initial_peers, start=True, host_maddrs=LOCAL,
                                record_validators=[self.signer])

    def store(self, value: Any, ttl: float = 60.0) -> bool:
        return bool(self.dht.store(self.key, value, get_dht_time() + ttl, subkey=self.signer.local_public_key))

    def close(self) -> None:
        self.dht.shutdown()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
