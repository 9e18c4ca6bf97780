"""Blob transfer between real hivemind peers on 127.0.0.1: round trip, every refusal, stalls, limits."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
from hivemind.p2p import P2P, PeerID

from p2pcod.errors import SwarmError
from p2pcod.swarm.aio import LoopThread
from p2pcod.swarm.dht import Membership
from p2pcod.swarm.transfer import (
    OK,
    REQUEST_LEN,
    REQUEST_PREFIX,
    BlobMismatch,
    BlobNotServed,
    BlobTooLarge,
    PeerBusy,
    PeerGone,
    TokenBucket,
    Transfer,
    TransferTimeout,
    protocol_name,
)

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
SWARM = "t-xfer"
MB = 1 << 20


class Pair:
    def __init__(self, tmp: os.PathLike) -> None:
        self.a = Membership(SWARM, identity_dir=f"{tmp}/a", host_maddrs=LOCAL)
        self.b = Membership(
            SWARM, identity_dir=f"{tmp}/b", host_maddrs=LOCAL, initial_peers=self.a.visible_maddrs()
        )
        self.ta = Transfer(self.a, max_concurrent_uploads=2)
        self.tb = Transfer(self.b)
        self.blob = os.urandom(3 * MB + 17)
        self.digest = hashlib.sha256(self.blob).hexdigest()
        self.ta.publish(self.blob, self.digest)

    def close(self) -> None:
        for t in (self.ta, self.tb):
            t.close()
        self.a.shutdown()
        self.b.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    p = None
    try:
        p = Pair(tmp_path_factory.mktemp("xfer"))
        yield p
    finally:
        if p is not None:
            p.close()


class RawPeer:
    """A peer written directly on hivemind's P2P (no p2pcod checks): a misbehaving server or client."""

    def __init__(self, *connect_to: Membership) -> None:
        self.loop = LoopThread("raw-peer")
        # connected to every peer it will call: a peer it only knows through the daemon's routing table may not
        # be found yet ("failed to find any peer in table")
        initial = [a for m in connect_to for a in m.visible_maddrs()]
        self.p2p: P2P = self.loop.run(P2P.create(initial_peers=initial, host_maddrs=LOCAL), 30)
        self.peer_id = self.p2p.peer_id.to_base58()
        self.mode = "stall"
        self.payload = b""
        self.loop.run(self.p2p.add_binary_stream_handler(protocol_name(SWARM), self._serve), 10)

    async def _serve(self, info, reader, writer) -> None:
        try:
            await reader.readexactly(REQUEST_LEN)
            if self.mode == "stall":
                await asyncio.sleep(3600)
            if self.mode == "stall-mid":  # the header and a few bytes, then silence
                writer.write(OK + len(self.payload).to_bytes(8, "big") + self.payload[:1000])
                await writer.drain()
                await asyncio.sleep(3600)
            if self.mode == "cut":  # the header promises the whole blob; half of it comes, then the stream closes
                writer.write(OK + len(self.payload).to_bytes(8, "big") + self.payload[: len(self.payload) // 2])
                await writer.drain()
                return
            size = len(self.payload) - (1 if self.mode == "extra" else 0)
            writer.write(OK + size.to_bytes(8, "big") + self.payload)
            await writer.drain()
        finally:
            writer.close()

    def open_and_ignore(self, peer_id: str, digest: str) -> asyncio.StreamWriter:
        """Request a blob, then never read the answer (a client that stops reading)."""

        async def go():
            _, _, writer = await self.p2p.call_binary_stream_handler(
                PeerID.from_base58(peer_id), protocol_name(SWARM)
            )
            writer.write(REQUEST_PREFIX + digest.encode())
            await writer.drain()
            return writer

        return self.loop.run(go(), 10)

    def close(self) -> None:
        try:
            self.loop.run(self.p2p.shutdown(), 10)
        finally:
            self.loop.stop()


@pytest.fixture
def raw(pair) -> Iterator[RawPeer]:
    r = RawPeer(pair.a, pair.b)
    try:
        yield r
    finally:
        r.close()


def test_round_trip_counts_bytes(pair):
    in0, out0 = pair.tb.stats["bytes_in"], pair.ta.stats["bytes_out"]
    got = pair.tb.fetch(pair.a.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB)
    assert got == pair.blob
    assert pair.tb.stats["bytes_in"] - in0 == len(pair.blob)
    assert pair.ta.stats["bytes_out"] - out0 == len(pair.blob)
    assert pair.tb.stats["fetches_ok"] >= 1


def test_refusals_are_typed(pair):
    fails = pair.tb.stats["fetch_failures"]
    other = hashlib.sha256(b"not served").hexdigest()
    with pytest.raises(BlobNotServed):
        pair.tb.fetch(pair.a.peer_id, other, len(pair.blob), max_bytes=10 * MB)
    for size in (len(pair.blob) - 1, len(pair.blob) + 1):  # the record's size is wrong: stop at the header
        in0 = pair.tb.stats["bytes_in"]
        with pytest.raises(BlobMismatch, match="record says"):
            pair.tb.fetch(pair.a.peer_id, pair.digest, size, max_bytes=10 * MB)
        assert pair.tb.stats["bytes_in"] == in0
    served0 = pair.ta.stats["not_found"] + pair.ta.stats["uploads"] + pair.ta.stats["upload_failures"]
    with pytest.raises(BlobTooLarge, match="over the limit"):  # refused before connecting
        pair.tb.fetch(pair.a.peer_id, pair.digest, len(pair.blob), max_bytes=len(pair.blob) - 1)
    assert pair.ta.stats["not_found"] + pair.ta.stats["uploads"] + pair.ta.stats["upload_failures"] == served0
    with pytest.raises(SwarmError):
        pair.tb.fetch("not-a-peer-id", pair.digest, len(pair.blob), max_bytes=10 * MB)
    with pytest.raises(SwarmError, match="digest"):
        pair.tb.fetch(pair.a.peer_id, "XYZ", len(pair.blob), max_bytes=10 * MB)
    assert pair.tb.stats["fetch_failures"] == fails + 6
    with pytest.raises(SwarmError, match="sha256"):
        pair.ta.publish(pair.blob, other)


def test_previous_blob_served_until_replaced(pair):
    blobs = [os.urandom(1000 + i) for i in range(3)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for b, d in zip(blobs, digests, strict=True):
        pair.ta.publish(b, d)
    try:
        assert pair.tb.fetch(pair.a.peer_id, digests[1], 1001, max_bytes=MB) == blobs[1]
        assert pair.tb.fetch(pair.a.peer_id, digests[2], 1002, max_bytes=MB) == blobs[2]
        with pytest.raises(BlobNotServed):
            pair.tb.fetch(pair.a.peer_id, digests[0], 1000, max_bytes=MB)
    finally:
        pair.ta.publish(pair.blob, pair.digest)


def test_hostile_server_stall_garbage_extra(pair, raw):
    raw.mode = "stall"
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=1.5)
    assert 1.4 < time.monotonic() - t0 < 5.0

    raw.mode, raw.payload = "garbage", os.urandom(len(pair.blob))
    with pytest.raises(BlobMismatch, match="sha256"):
        pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=10)

    raw.mode, raw.payload = "extra", pair.blob + b"!"  # the header says the right size, the stream says more
    with pytest.raises(BlobMismatch, match="more than"):
        pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=10)

    raw.mode, raw.payload = "short", pair.blob[:1000]  # the header lies the other way
    with pytest.raises(BlobMismatch, match="record says"):
        pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=10)


@pytest.mark.parametrize("mode", ["stall", "stall-mid"])
def test_a_stalled_download_fails_long_before_the_total_timeout(pair, raw, mode):
    raw.mode, raw.payload = mode, pair.blob
    pair.tb.stall_timeout = 1.0
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="stalled: nothing for 1 s at byte"):
            pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=60)
        assert time.monotonic() - t0 < 20  # not the 60 s bound
    finally:
        pair.tb.stall_timeout = 15.0


def test_a_slow_capped_upload_is_not_a_stall(pair):
    """An upload cap sends small chunks: at 64 kB/s, bytes arrive far more often than a 1 s stall timeout."""
    pair.ta.upload_bucket = TokenBucket(64e3)
    pair.tb.stall_timeout = 1.0
    blob = os.urandom(200_000)
    digest = hashlib.sha256(blob).hexdigest()
    pair.ta.publish(blob, digest)
    try:
        t0 = time.monotonic()
        assert pair.tb.fetch(pair.a.peer_id, digest, len(blob), max_bytes=10 * MB, timeout=60) == blob
        assert time.monotonic() - t0 >= 1.5  # (200 kB - the 64 kB burst) at 64 kB/s: the cap did apply
    finally:
        pair.ta.upload_bucket = TokenBucket(None)
        pair.tb.stall_timeout = 15.0
        pair.ta.publish(pair.blob, pair.digest)


def test_download_rate_limit(pair):
    pair.tb.download_bucket = TokenBucket(2e6)  # 2 MB/s on a 4 MiB blob: at least ~1.6 s
    blob = os.urandom(4 * MB)
    digest = hashlib.sha256(blob).hexdigest()
    pair.ta.publish(blob, digest)
    try:
        t0 = time.monotonic()
        assert pair.tb.fetch(pair.a.peer_id, digest, len(blob), max_bytes=10 * MB, timeout=30) == blob
        assert time.monotonic() - t0 >= 1.6
    finally:
        pair.tb.download_bucket = TokenBucket(None)
        pair.ta.publish(pair.blob, pair.digest)


def test_upload_slots_bounded_and_freed(pair, raw):
    """Clients that request and never read hold at most max_concurrent_uploads slots, and not forever."""
    pair.ta.upload_bucket = TokenBucket(100_000)  # slow uploads: the slots stay busy
    pair.ta.upload_timeout = 2.0
    failures0 = pair.ta.stats["upload_failures"]
    try:
        t_hogs = time.monotonic()
        hogs = [raw.open_and_ignore(pair.a.peer_id, pair.digest) for _ in range(2)]
        time.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(PeerBusy):
            pair.tb.fetch(pair.a.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=5)
        assert time.monotonic() - t0 < 1.5  # refused quickly, not queued
        assert pair.ta.stats["uploads_refused"] >= 1
        # the hogs' uploads are cut off after upload_timeout, which frees their slots
        deadline = time.monotonic() + 6
        while pair.ta.stats["upload_failures"] < failures0 + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pair.ta.stats["upload_failures"] == failures0 + 2
        assert time.monotonic() - t_hogs > 1.5
        pair.ta.upload_bucket = TokenBucket(None)
        assert pair.tb.fetch(pair.a.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB) == pair.blob
        del hogs
    finally:
        pair.ta.upload_bucket = TokenBucket(None)
        pair.ta.upload_timeout = 600.0


def test_a_server_that_cuts_the_stream_and_still_answers_sent_a_bad_blob(pair, raw):
    """Half the blob, then the stream closes, from a peer that answers a fresh request: it cut us (an offence)."""
    raw.mode, raw.payload = "cut", pair.blob
    with pytest.raises(BlobMismatch, match=r"sent \d+ of the \d+ bytes") as caught:
        pair.tb.fetch(raw.peer_id, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=20)
    assert not isinstance(caught.value, PeerGone)


def test_an_unknown_peer_is_unreachable_not_offending(pair):
    nobody = "QmStxopftxCy9zc5gbbkLPFvjVqX74JHPp9R2CwEWq5pU9"
    with pytest.raises(PeerGone, match=f"cannot open a blob stream to {nobody}"):
        pair.tb.fetch(nobody, pair.digest, len(pair.blob), max_bytes=10 * MB, timeout=20)


def test_a_peer_stopping_mid_upload_logs_no_error_and_is_gone_to_the_downloader(tmp_path, caplog):
    """What a stopping peer does (Transfer.close: the handler goes, running uploads are cut) logs no asyncio ERROR
    on its side, and the downloader's failure is PeerGone (the peer went away), not a bad checkpoint."""
    caplog.set_level(logging.INFO)
    p = Pair(tmp_path)
    try:
        p.ta.upload_bucket = TokenBucket(256e3)  # 3 MB at 256 kB/s: ~12 s, cut after the first bytes
        failed: list[BaseException] = []

        def fetch() -> None:
            try:
                p.tb.fetch(p.a.peer_id, p.digest, len(p.blob), max_bytes=10 * MB, timeout=60)
            except Exception as err:  # noqa: BLE001 - checked below
                failed.append(err)

        downloader = threading.Thread(target=fetch)
        downloader.start()
        deadline = time.monotonic() + 20
        while p.tb.stats["bytes_in"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.tb.stats["bytes_in"] > 0, "the upload did not start"
        p.ta.close()
        downloader.join(40)
        assert not downloader.is_alive()
        assert len(failed) == 1 and isinstance(failed[0], PeerGone), failed
        assert "went away" in str(failed[0])
    finally:
        p.close()
    alarming = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert alarming == []


def test_token_bucket_arithmetic():
    bucket = TokenBucket(1000.0, burst=500)
    assert bucket.reserve(500) == 0.0  # the burst is there at once
    assert bucket.reserve(1000) == pytest.approx(1.0, abs=0.05)  # then the rate: debt / rate
    assert TokenBucket(None).reserve(10**12) == 0.0 and TokenBucket(0).unlimited
    with pytest.raises(ValueError):
        TokenBucket(-1)
