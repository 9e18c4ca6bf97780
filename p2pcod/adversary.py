"""Hostile peers, for tests and for the simulator's hostile experiments (never for training).

They speak the real protocol (signed DHT records, the blob stream protocol) and break it on purpose:
- `Adversary`: a DHT member with a valid identity that announces whatever record and answers blob
  requests according to `mode` (serve / truncated / endless / stall), and can flood another peer's blob
  server with streams.
- `RecordForger`: a raw hivemind DHT node without p2pcod's record validator, that stores garbage or
  records claiming another peer's identity under its own signed subkey.
- Blob forgers: codec blobs with NaN / Inf weights or a decompression bomb, with valid checksums.
- `huge_config`: a well-formed model config of enormous size, announced with a small valid blob.
- `python -m p2pcod.adversary --config RECIPE --attack bomb,nan,flood ...`: an adversary process for
  `p2pcod simulate` (a `[[peer]]` with `role = "adversary"`): it builds the swarm's model from the recipe,
  so that its records look like an honest peer's, and cycles through its attacks (see ATTACKS), logging
  each to RUN_DIR/attacks.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import struct
import sys
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
from p2pcod.control import wait_while_held
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


def forge(header: Any, frame: bytes, version: int = codec.VERSION, raw_header: bytes | None = None) -> bytes:
    """A blob from a (tampered) header and zstd frame, with both crcs recomputed: only the content lies.
    `raw_header`: these bytes instead of the packed `header` (a header that is not even msgpack)."""
    hbytes = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<HI", version, len(hbytes))
    crc = zlib.crc32(hbytes, zlib.crc32(prefix))
    return codec.MAGIC + prefix + struct.pack("<II", crc, zlib.crc32(frame)) + hbytes + frame


def payload_of(blob: bytes) -> bytearray:
    return bytearray(zstandard.ZstdDecompressor().decompress(split(blob)[1]))


def frame_of(payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(payload))


def entry(header: dict, name: str) -> dict:
    return next(e for e in header["tensors"] if e["name"] == name)


def with_kept_value(blob: bytes, tensor: str, value: float, index: int = 2) -> bytes:
    """`blob` with element `index` of the kept float32 tensor `tensor` set to `value` (e.g. NaN)."""
    header, _ = split(blob)
    payload = payload_of(blob)
    struct.pack_into("<f", payload, entry(header, tensor)["offset"] + 4 * index, value)
    return forge(header, frame_of(payload))


def with_scale(blob: bytes, tensor: str, value: float, block: int = 0) -> bytes:
    """`blob` with the scale of one block of the quantized tensor `tensor` set to `value` (e.g. Inf)."""
    header, _ = split(blob)
    payload = payload_of(blob)
    e = entry(header, tensor)
    nblocks = e["scales_nbytes"] // 4
    for k, byte in enumerate(struct.pack("<f", value)):  # scales are stored as byte planes
        payload[e["scales_offset"] + k * nblocks + block] = byte
    return forge(header, frame_of(payload))


def bomb(blob: bytes, inflated: int = 16 << 20) -> bytes:
    """`blob`'s header with a frame of `inflated` zero bytes (a few KB compressed)."""
    header, _ = split(blob)
    return forge(header, frame_of(bytes(inflated)))


def huge_config(task: str, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A well-formed model config of the swarm's task, within the task's maxima (only building it tells how big it
    is), whose weights would take tens of GB: what the "huge-config" attack announces with a small valid blob."""
    cfg = dict(model_cfg)
    if task == "lm":  # 64 layers of width 4096: ~13e9 parameters, ~50 GB of fp32
        heads = cfg.get("heads")
        ok = isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1 and 4096 % heads == 0
        return {**cfg, "layers": 64, "width": 4096, "heads": heads if ok else 8}
    if task == "ctr":  # two hidden layers of 65536 units over 26 embeddings of 1024: ~6e9 parameters
        return {**cfg, "hidden": [65536, 65536], "embed_dim": 1024}
    # another task (the tests' toy models): every positive integer a million times larger
    return {k: v << 20 if isinstance(v, int) and not isinstance(v, bool) and v > 0 else v for k, v in cfg.items()}


# ---- a hostile peer ----------------------------------------------------------------------------------
class Adversary:
    """A swarm member with a real identity that announces any record and serves any bytes.

    mode: "serve" (the header, then exactly the bytes set by `offer`), "truncated" (the full size in the
    header, half the bytes, then it closes), "endless" (the header, the bytes, then zeros for ever),
    "stall" (the header and 1 KB, then silence).
    """

    def __init__(self, swarm: str, identity_dir: str | Path, initial_peers: list[str], name: str,
                 task: str = "toy", ttl: float = 10.0, host_maddrs: list[str] = LOCAL) -> None:
        self.swarm, self.name, self.task = swarm, name, task
        self.m = Membership(swarm, identity_dir=identity_dir, initial_peers=initial_peers, host_maddrs=host_maddrs,
                            ttl=ttl)
        self.peer_id = self.m.peer_id
        self.mode = "serve"
        self.served = b""
        self.requests = 0  # blob requests received
        self.opened = 0  # flood streams opened
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
              served: bytes | None = None, name: str | None = None, strict: bool = True) -> PeerRecord:
        """Announce a record for `blob` (its sha256 and size) and answer requests with `served` (default:
        the blob itself) in `mode`. strict: fail if the DHT did not take the record now (otherwise the
        heartbeat announces it again)."""
        assert mode in MODES, mode
        self.mode, self.served = mode, blob if served is None else served
        record = PeerRecord(name=name or self.name, peer_id=self.peer_id, step=step, digest=codec.digest(blob),
                            size=len(blob), codec=CODEC_ID, task=self.task, model_cfg=dict(model_cfg),
                            fingerprint=fingerprint, time=time.time())
        if not self.m.announce(record) and strict:
            raise AssertionError(f"the DHT did not take the record {record}")
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
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            # cancelled: the stream was closed under a stalled answer; ending quietly keeps asyncio's log clean
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

        opened = self.m.loop.run(all_(), timeout=60, what="flooding")
        self.opened += opened
        return opened

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

    def __init__(self, swarm: str, initial_peers: list[str], host_maddrs: list[str] = LOCAL) -> None:
        self.key = peers_key(swarm)
        self.signer = RSASignatureValidator(RSAPrivateKey())
        self.dht = hivemind.DHT(initial_peers=initial_peers, start=True, host_maddrs=host_maddrs,
                                record_validators=[self.signer])

    def store(self, value: Any, ttl: float = 60.0) -> bool:
        return bool(self.dht.store(self.key, value, get_dht_time() + ttl, subkey=self.signer.local_public_key))

    def close(self) -> None:
        self.dht.shutdown()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the adversary process of `p2pcod simulate` --------------------------------------------------------
# Blob attacks announce a record for the swarm's architecture; "huge-config" announces a small valid blob with an
# enormous model config (huge_config); the others attack the records or the servers.
BLOB_ATTACKS = ("digest", "truncated", "endless", "stall", "wrong-arch", "nan", "inf", "bomb")
# "idle" joins and does nothing: the control for the CPU an adversary process takes from a simulated swarm
ATTACKS = BLOB_ATTACKS + ("huge-config", "records", "impersonate", "flood", "idle")


def blob_attack(attack: str, valid: bytes) -> tuple[str, bytes, bytes | None]:
    """(serving mode, announced blob, served bytes or None = the announced blob) for a blob attack on
    `valid`, a codec blob of the swarm's architecture."""
    header, _ = split(valid)
    if attack == "digest":
        return "serve", valid, valid[:-1] + bytes([valid[-1] ^ 1])
    if attack in ("truncated", "endless", "stall"):
        return attack, valid, None  # the serving modes of Adversary
    if attack == "wrong-arch":  # a valid blob of another architecture (one tensor short), announced as ours
        state, meta = codec.decode(valid)
        return "serve", codec.encode(dict(list(state.items())[:-1]), meta), None
    if attack == "nan":
        kept = [e for e in header["tensors"] if e["enc"] == "raw" and e["dtype"] == "float32"]
        if kept:
            return "serve", with_kept_value(valid, kept[0]["name"], float("nan"), index=0), None
        attack = "inf"  # no fp32 tensor kept: poison a scale instead
    if attack == "inf":
        quantized = [e for e in header["tensors"] if e["enc"] == "q8"]
        return "serve", with_scale(valid, quantized[0]["name"], float("inf")), None
    if attack == "bomb":
        return "serve", bomb(valid, 256 << 20), None
    raise ValueError(f"not a blob attack: {attack!r}")


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def run_adversary(recipe: Any, *, name: str, swarm: str, run_dir: Path, join: list[str], listen: list[str],
                  attacks: list[str], every_s: float, stop: threading.Event, control: Path | None = None) -> None:
    """Join `swarm` as `name` and cycle through `attacks`, `every_s` seconds each, until `stop`."""
    from p2pcod.tasks import get_task  # the task builds the swarm's model (and its data, which we ignore)

    run_dir.mkdir(parents=True, exist_ok=True)
    # both DHT processes are forked before torch starts its thread pools (as in p2pcod.peer)
    adv = Adversary(swarm, run_dir / "identity", join, name, task="?", ttl=recipe.exchange.ttl, host_maddrs=listen)
    forger = RecordForger(swarm, join or adv.m.visible_maddrs(), host_maddrs=listen) if "records" in attacks else None
    log_file = (run_dir / "attacks.jsonl").open("a")
    try:
        task = get_task(recipe.task)
        adv.task = task.name
        model = task.build_model(recipe.model)
        state = model.state_dict()
        valid = codec.encode(state, {"peer": name}, recipe.exchange.codec_options())
        fingerprint, cfg = codec.fingerprint(state), dict(recipe.model)
        forged = {a: blob_attack(a, valid) for a in set(attacks) & set(BLOB_ATTACKS)}  # once: CPU is shared
        _write_json(run_dir / "peer.json", {"name": name, "swarm": swarm, "peer_id": adv.peer_id, "role": "adversary",
                                            "attacks": attacks, "maddrs": adv.m.visible_maddrs(), "time": time.time()})
        wait_while_held(control, stop)  # the simulator's start barrier: attack once the honest peers train
        t0, step = time.monotonic(), 10**6  # a step far ahead of everyone: always the freshest record
        for round_ in itertools.count():
            attack = attacks[round_ % len(attacks)]
            step += 1
            detail = ""
            try:  # a failed round (a DHT timeout under load) must not end the attack
                others = [r for r in adv.m.members() if r.peer_id != adv.peer_id]
                if attack in BLOB_ATTACKS:
                    mode, blob, served = forged[attack]
                    adv.offer(blob, step=step, model_cfg=cfg, fingerprint=fingerprint, mode=mode, served=served,
                              strict=False)
                elif attack == "huge-config":
                    adv.offer(valid, step=step, model_cfg=huge_config(task.name, cfg), fingerprint=fingerprint,
                              strict=False)
                elif attack == "impersonate" and others:  # an honest peer's name with a newer step
                    victim = others[round_ % len(others)].name
                    adv.offer(valid, step=step, model_cfg=cfg, fingerprint=fingerprint, name=victim, strict=False)
                    detail = victim
                elif attack == "records" and forger is not None:
                    victim = others[0].peer_id if others else adv.peer_id
                    garbage = [{"v": 1, "name": "forged", "peer_id": victim, "step": step, "digest": "", "size": 0,
                                "codec": CODEC_ID, "task": adv.task, "model_cfg": cfg, "fingerprint": fingerprint,
                                "time": time.time()}, {"v": 1, "name": 7}, [1, 2, 3], "junk"]
                    stored = sum(forger.store(g) for g in garbage)
                    detail = f"{stored} of {len(garbage)} stored"
            except Exception as err:  # noqa: BLE001 - logged, then the next round
                detail = f"round failed: {type(err).__name__}: {err}"
            log_file.write(json.dumps({"t": round(time.monotonic() - t0, 3), "attack": attack, "detail": detail,
                                       "requests": adv.requests, "flood_streams": adv.opened}) + "\n")
            log_file.flush()
            deadline = time.monotonic() + every_s
            while not stop.is_set() and time.monotonic() < deadline:
                if attack == "flood":
                    with contextlib.suppress(Exception):  # as above: the next wave tries again
                        for r in adv.m.members():
                            if r.peer_id != adv.peer_id:
                                adv.flood(r.peer_id, 12)
                    stop.wait(1.0)
                    adv.stop_flood()
                else:
                    stop.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if stop.is_set():
                break
    finally:
        log_file.write(json.dumps({"t": None, "attack": "end", "requests": adv.requests,
                                   "flood_streams": adv.opened}) + "\n")
        log_file.close()
        if forger is not None:
            forger.close()
        adv.close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging
    import signal

    from p2pcod.config import load_recipe
    from p2pcod.errors import P2pcodError

    ap = argparse.ArgumentParser(prog="python -m p2pcod.adversary", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the swarm's peer recipe (its model is what we forge)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--name", required=True)
    ap.add_argument("--swarm", required=True)
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--listen", action="append", default=[])
    ap.add_argument("--attack", required=True, help=f"comma-separated, cycled: {', '.join(ATTACKS)}")
    ap.add_argument("--every", type=float, default=20.0, help="seconds per attack")
    ap.add_argument("--control", type=Path, default=None, help="the simulator's control file (start barrier)")
    args, _unknown = ap.parse_known_args(argv)  # the simulator's peer flags (--shard, --linger...) are ignored
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if not attacks or bad or not args.every > 0:
        print(f"adversary: --attack must list some of {', '.join(ATTACKS)} (got {args.attack!r}) and --every "
              f"must be > 0", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        recipe = load_recipe(args.config, args.set)
        run_adversary(recipe, name=args.name, swarm=args.swarm, run_dir=args.run_dir, join=args.join,
                      listen=args.listen or LOCAL, attacks=attacks, every_s=args.every, stop=stop,
                      control=args.control)
    except P2pcodError as err:
        print(f"adversary: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
