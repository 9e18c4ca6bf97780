"""Peer-to-peer checkpoint blobs over libp2p streams (the daemon of the peer's hivemind DHT node).

Wire protocol `/p2pcod/<swarm>/blob/1`, one blob per stream:
    client -> server   b"P2PCOD-GET1 " + 64 lowercase hex chars (sha256 of the wanted blob)
    server -> client   1 status byte; if OK: 8-byte big-endian size, then the blob; then the stream closes.
The client trusts nothing: it refuses an announced size above its limit before connecting, stops as soon
as the size header or the byte count disagrees with the signed record, bounds the whole fetch by a
timeout and checks the sha256. A stream that ends or breaks early is followed by one fresh request: a peer that
answers it cut the stream itself (a bad blob), one that does not went away (PeerGone: unreachable, not an offence).
The server bounds the request, its concurrent uploads, the streams one
remote peer may hold open at once and each upload's duration, so that a flood or a client that stops
reading cannot hold it forever nor crowd out the other peers; a peer that keeps offending (excess streams,
malformed or missing requests) is banned from the server for a while. Closing cuts running uploads quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from hivemind.p2p import PeerID

from p2pcod.errors import SwarmError
from p2pcod.swarm.dht import Membership

log = logging.getLogger(__name__)

REQUEST_PREFIX = b"P2PCOD-GET1 "
REQUEST_LEN = len(REQUEST_PREFIX) + 64
OK, NOT_FOUND, BUSY, BAD_REQUEST = b"\x00", b"\x01", b"\x02", b"\x03"
_STATUS_TEXT = {
    NOT_FOUND: "does not serve",
    BUSY: "is busy (too many uploads) and refused",
    BAD_REQUEST: "rejected our request for",
}
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_HANDSHAKES = 64  # connections still sending their request; more are refused at once
MAX_STREAMS_PER_PEER = 4  # open blob streams (request or upload) from one remote peer; more are refused
STALL_TIMEOUT = 15.0  # a fetch fails when the server sends nothing for this long (its total bound is longer)
SERVE_BAN_AFTER = 16  # offences (excess streams, bad or missing requests) within OFFENCE_WINDOW before a ban
SERVE_BAN_FOR = 300.0  # seconds a banned peer's streams are cut without an answer
OFFENCE_WINDOW = 60.0
PROBE_TIMEOUT = 5.0  # s a peer has to answer a fresh request after cutting a stream (else it went away)
_MAX_TRACKED = 10_000  # remote peers with offence or ban records kept at most (bounded memory)


class TransferError(SwarmError):
    """A blob fetch failed; subclasses say why."""


class BlobTooLarge(TransferError):
    """The announced size exceeds the caller's limit (refused before connecting)."""


class BlobNotServed(TransferError):
    """The peer does not serve that digest (any more)."""


class PeerBusy(TransferError):
    """The peer is at its upload limit: not an offence, try later."""


class BlobMismatch(TransferError):
    """Size or sha256 of what arrived differs from the record."""


class BlobTruncated(BlobMismatch):
    """The stream ended before the announced size, and the peer still answers: it cut the blob short."""


class StreamCut(TransferError):
    """The stream closed or broke before an answer, and the peer still answers: it cut the stream itself."""


class PeerGone(TransferError):
    """The peer cannot be reached, or went away mid-transfer (its stream ended and it answers no more):
    not misbehaviour."""


class TransferTimeout(TransferError):
    """The fetch did not complete within its timeout (stalled or too slow a peer)."""


def protocol_name(swarm: str) -> str:
    return f"/p2pcod/{swarm}/blob/1"


class TokenBucket:
    """A bytes/s limiter; rate None or 0 means unlimited.

    Thread-safe and asyncio-friendly: `reserve(n)` takes n tokens under a lock (the balance may go
    negative, so a chunk larger than the burst still passes) and returns how long the caller must wait;
    `consume` sleeps that long, `aconsume` awaits it. Concurrent users share the rate fairly in call order.
    """

    def __init__(self, rate: float | None, burst: int | None = None) -> None:
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be >= 0 or None, got {rate}")
        self.rate = float(rate or 0.0)
        self.burst = float(burst if burst is not None else max(64 * 1024, self.rate / 10))
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, n: int) -> float:
        if self.unlimited:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)

    def consume(self, n: int) -> None:
        delay = self.reserve(n)
        if delay > 0:
            time.sleep(delay)

    async def aconsume(self, n: int) -> None:
        delay = self.reserve(n)
        if delay > 0:
            await asyncio.sleep(delay)


class Transfer:
    """Serves my latest blob (and the one before, so a fetcher with a slightly old record still gets it)
    and fetches others' blobs, over the libp2p daemon of `membership`. Synchronous and thread-safe."""

    def __init__(
        self,
        membership: Membership,
        *,
        upload_rate: float | None = None,
        download_rate: float | None = None,
        chunk_size: int = 1 << 20,
        max_concurrent_uploads: int = 4,
        request_timeout: float = 10.0,
        upload_stall_timeout: float = 30.0,
        upload_timeout: float = 600.0,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        ban_after: int = SERVE_BAN_AFTER,
        ban_for: float = SERVE_BAN_FOR,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        if chunk_size < 1024 or max_concurrent_uploads < 1 or max_streams_per_peer < 1 or ban_after < 1:
            raise ValueError("chunk_size must be >= 1024, max_concurrent_uploads, max_streams_per_peer and "
                             "ban_after >= 1")
        self.membership = membership
        self.name = protocol_name(membership.swarm)
        self.chunk_size = int(chunk_size)
        self.max_concurrent_uploads = int(max_concurrent_uploads)
        self.request_timeout = request_timeout
        self.upload_stall_timeout = upload_stall_timeout
        self.upload_timeout = upload_timeout
        self.max_streams_per_peer = int(max_streams_per_peer)
        self.ban_after = int(ban_after)
        self.stall_timeout = float(stall_timeout)
        self.ban_for = float(ban_for)
        self.upload_bucket = TokenBucket(upload_rate)
        self.download_bucket = TokenBucket(download_rate)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "bytes_in",
                "bytes_out",
                "fetches_ok",
                "fetch_failures",
                "uploads",
                "upload_failures",
                "uploads_refused",
                "not_found",
                "bad_requests",
                "flood_refused",
                "banned",
                "banned_refused",
            ),
            0,
        )
        self._stats_lock = threading.Lock()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()  # digest -> blob; the newest last, at most 2
        self._blobs_lock = threading.Lock()
        self._uploading = 0  # loop-thread only
        self._handshaking = 0  # loop-thread only
        self._per_peer: dict[str, int] = {}  # remote peer id -> its open streams; loop-thread only
        self._flood_warned: set[str] = set()  # loop-thread only
        self._offences: dict[str, list[float]] = {}  # remote peer -> times of its recent offences; loop only
        self._banned: dict[str, float] = {}  # remote peer -> monotonic time its ban ends; loop-thread only
        self._tasks: set[asyncio.Task] = set()  # loop-thread only
        self._closed = False
        # While this returns True every upload is cut at once (the simulator's partitions use it).
        self.paused: Callable[[], bool] = lambda: False
        self._loop = membership.loop
        self._p2p = membership.p2p()
        self._loop.run(
            self._p2p.add_binary_stream_handler(self.name, self._handle),
            timeout=30.0,
            what="registering the blob handler",
        )

    # ---- serving ----------------------------------------------------------------------------------
    def publish(self, blob: bytes, digest: str) -> None:
        """Serve `blob` from now on (and keep serving the previous one: records lag a little)."""
        blob = bytes(blob)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise SwarmError(
                f"publish: digest {digest[:16]}... is not the sha256 of the {len(blob)}-byte blob"
            )
        with self._blobs_lock:
            self._blobs.pop(digest, None)
            self._blobs[digest] = blob
            while len(self._blobs) > 2:
                self._blobs.popitem(last=False)

    def serving(self) -> list[str]:
        """Digests served now, oldest first."""
        with self._blobs_lock:
            return list(self._blobs)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        ok = False
        peer = str(getattr(info, "peer_id", "?"))
        if self.is_banned(peer):
            self._count("banned_refused")
            self._tasks.discard(task)
            writer.transport.abort()  # no answer: a banned peer gets nothing to work with
            return
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        try:
            if self._per_peer[peer] > self.max_streams_per_peer:
                # one peer flooding us must not take the handshake and upload slots of all the others
                self._count("flood_refused")
                if peer not in self._flood_warned and len(self._flood_warned) < _MAX_TRACKED:
                    self._flood_warned.add(peer)
                    log.warning("peer %s opened more than %d blob streams at once; refusing the excess",
                                peer, self.max_streams_per_peer)
                self._offence(peer, f"more than {self.max_streams_per_peer} blob streams at once")
                await self._reply(writer, BUSY)
                return
            digest = await self._read_request(reader, writer, peer)
            if digest is None:
                return
            if self.paused():
                self._count("uploads_refused")
                return  # the finally clause aborts the stream: to the client this peer is unreachable
            with self._blobs_lock:
                blob = self._blobs.get(digest)
            if blob is None:
                self._count("not_found")
                await self._reply(writer, NOT_FOUND)
                return
            if self._uploading >= self.max_concurrent_uploads:
                self._count("uploads_refused")
                await self._reply(writer, BUSY)
                return
            self._uploading += 1
            try:
                await asyncio.wait_for(self._send(blob, writer), self.upload_timeout)
                ok = True
                self._count("uploads")
            finally:
                self._uploading -= 1
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as err:
            self._count("upload_failures")
            log.info("upload to %s failed: %s", getattr(info, "peer_id", "?"), type(err).__name__)
        except asyncio.CancelledError:
            # close() (this peer stopping) cuts running uploads. Ending the task normally is deliberate: asyncio's
            # stream server logs a cancelled handler task as an ERROR with a traceback. The stream is aborted below.
            log.debug("upload to %s cut: this peer is stopping", peer)
        finally:
            self._tasks.discard(task)
            left = self._per_peer.get(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)
            if ok:
                writer.close()
            else:
                writer.transport.abort()  # do not wait to flush to a client that stopped reading

    def is_banned(self, peer: str) -> bool:
        """Whether our blob server refuses `peer` now (loop thread)."""
        until = self._banned.get(peer)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._banned[peer]
        return False

    def _offence(self, peer: str, what: str) -> None:
        """Count one offence of `peer` against our server; `ban_after` within OFFENCE_WINDOW s ban it."""
        now = time.monotonic()
        recent = [t for t in self._offences.get(peer, ()) if now - t < OFFENCE_WINDOW]
        recent.append(now)
        if len(recent) < self.ban_after:
            if peer in self._offences or len(self._offences) < _MAX_TRACKED:
                self._offences[peer] = recent
            return
        self._offences.pop(peer, None)
        if len(self._banned) >= _MAX_TRACKED:  # drop expired bans first; at worst the oldest ban
            self._banned = {p: u for p, u in self._banned.items() if u > now} or self._banned
            if len(self._banned) >= _MAX_TRACKED:
                self._banned.pop(next(iter(self._banned)))
        self._banned[peer] = now + self.ban_for
        self._count("banned")
        log.warning("banning peer %s from our blob server for %.0f s after %d offences in %.0f s (last: %s)",
                    peer, self.ban_for, len(recent), OFFENCE_WINDOW, what)

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> str | None:
        if self._handshaking >= MAX_HANDSHAKES:
            self._count("uploads_refused")
            await self._reply(writer, BUSY)
            return None
        self._handshaking += 1
        try:
            request = await asyncio.wait_for(reader.readexactly(REQUEST_LEN), self.request_timeout)
        except asyncio.TimeoutError:
            self._offence(peer, f"sent no request within {self.request_timeout:.0f} s")
            raise
        finally:
            self._handshaking -= 1
        digest = request[len(REQUEST_PREFIX) :].decode("ascii", "replace")
        if not request.startswith(REQUEST_PREFIX) or not _DIGEST_RE.fullmatch(digest):
            self._count("bad_requests")
            self._offence(peer, "a malformed request")
            await self._reply(writer, BAD_REQUEST)
            return None
        return digest

    async def _reply(self, writer: asyncio.StreamWriter, status: bytes) -> None:
        writer.write(status)
        await asyncio.wait_for(writer.drain(), self.upload_stall_timeout)

    async def _send(self, blob: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(OK + len(blob).to_bytes(8, "big"))
        view = memoryview(blob)
        step = self.chunk_size
        if not self.upload_bucket.unlimited:  # small chunks keep bytes flowing: a slow upload is no stall
            step = min(step, max(16 * 1024, int(self.upload_bucket.rate / 4)))
        for offset in range(0, len(blob), step):
            chunk = view[offset : offset + step]
            await self.upload_bucket.aconsume(len(chunk))
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), self.upload_stall_timeout)
            self._count("bytes_out", len(chunk))
        await asyncio.wait_for(writer.drain(), self.upload_stall_timeout)

    # ---- fetching ---------------------------------------------------------------------------------
    def fetch(
        self, peer_id: str, digest: str, expected_size: int, *, max_bytes: int, timeout: float = 60.0
    ) -> bytes:
        """Fetch the blob `digest` of `expected_size` bytes from `peer_id`; TransferError (a SwarmError) on
        any failure, PeerGone when the peer is unreachable or went away. The download is bounded by `timeout`
        (download rate limit included), plus PROBE_TIMEOUT to ask the peer after a cut stream."""
        try:
            self._check_args(peer_id, digest, expected_size, max_bytes, timeout)
            peer = PeerID.from_base58(peer_id)
            blob = self._loop.run(
                self._fetch_bounded(peer, digest, expected_size, timeout),
                timeout=timeout + PROBE_TIMEOUT + 5.0,
                what=f"fetching {digest[:12]} from {peer_id}",
            )
        except SwarmError:
            self._count("fetch_failures")
            raise
        except Exception as err:  # e.g. an unparsable peer id: still a typed error for the caller
            self._count("fetch_failures")
            raise TransferError(f"fetch from {peer_id!r} failed: {type(err).__name__}: {err}") from err
        self._count("fetches_ok")
        return blob

    def _check_args(
        self, peer_id: str, digest: str, expected_size: int, max_bytes: int, timeout: float
    ) -> None:
        if self._closed:
            raise TransferError("transfer is closed")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise TransferError(f"digest {digest!r:.80} is not 64 lowercase hex chars")
        if type(expected_size) is not int or expected_size <= 0:
            raise TransferError(f"expected_size must be a positive int, got {expected_size!r}")
        if expected_size > max_bytes:
            raise BlobTooLarge(
                f"blob {digest[:12]} from {peer_id} is announced as {expected_size} bytes, "
                f"over the limit of {max_bytes}"
            )
        if not timeout > 0:
            raise TransferError(f"timeout must be > 0, got {timeout}")

    async def _fetch_bounded(self, peer: PeerID, digest: str, size: int, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(peer, digest, size), timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"fetching {digest[:12]} from {peer} took longer than {timeout:.1f} s"
            ) from None
        except (StreamCut, BlobTruncated) as err:  # outside the download's bound: the probe has its own
            if await self._answers(peer, digest):
                raise  # it is there and serving: it cut the stream itself
            raise PeerGone(f"{err}; it answers no more: the peer went away") from None

    async def _fetch(self, peer: PeerID, digest: str, size: int) -> bytes:
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(peer, self.name)
        except Exception as err:  # noqa: BLE001 - p2pd reports unreachable peers in several ways
            raise PeerGone(f"cannot open a blob stream to {peer}: {type(err).__name__}: {err}") from err
        try:
            writer.write(REQUEST_PREFIX + digest.encode("ascii"))
            await writer.drain()
            return await self._receive(reader, peer, digest, size)
        except asyncio.IncompleteReadError as err:
            raise StreamCut(f"{peer} closed the stream early ({len(err.partial)} header bytes)") from None
        except (ConnectionError, OSError) as err:
            raise StreamCut(f"stream from {peer} broke: {type(err).__name__}: {err}") from None
        finally:
            writer.transport.abort()

    async def _answers(self, peer: PeerID, digest: str) -> bool:
        """Whether `peer` answers a fresh request for `digest` (any status byte) within PROBE_TIMEOUT."""
        try:
            return await asyncio.wait_for(self._status_of(peer, digest), PROBE_TIMEOUT)
        except Exception:  # noqa: BLE001 - no stream, a broken one or no answer in time: it is not there
            return False

    async def _status_of(self, peer: PeerID, digest: str) -> bool:
        _, reader, writer = await self._p2p.call_binary_stream_handler(peer, self.name)
        try:
            writer.write(REQUEST_PREFIX + digest.encode("ascii"))
            await writer.drain()
            return len(await reader.readexactly(1)) == 1
        finally:
            writer.transport.abort()  # the status is all we wanted

    async def _stalls(self, read: Any, peer: PeerID, digest: str, got: int, size: int) -> Any:
        """`read` (an awaitable), failing if the peer sends nothing for `stall_timeout` s."""
        try:
            return await asyncio.wait_for(read, self.stall_timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"peer {peer} stalled: nothing for {self.stall_timeout:.0f} s at byte {got} of {size} of blob "
                f"{digest[:12]}"
            ) from None

    async def _receive(self, reader: asyncio.StreamReader, peer: PeerID, digest: str, size: int) -> bytes:
        status = await self._stalls(reader.readexactly(1), peer, digest, 0, size)
        if status != OK:
            cls = {NOT_FOUND: BlobNotServed, BUSY: PeerBusy}.get(status, TransferError)
            raise cls(
                f"peer {peer} {_STATUS_TEXT.get(status, 'sent an unknown status for')} blob {digest[:12]}"
            )
        announced = int.from_bytes(await self._stalls(reader.readexactly(8), peer, digest, 0, size), "big")
        if announced != size:
            raise BlobMismatch(
                f"peer {peer} is sending {announced} bytes for blob {digest[:12]}; its record says {size}"
            )
        buf = bytearray(size)
        view = memoryview(buf)
        sha = hashlib.sha256()
        got = 0
        while got < size:
            chunk = await self._stalls(reader.read(min(self.chunk_size, size - got)), peer, digest, got, size)
            if not chunk:
                raise BlobTruncated(f"peer {peer} sent {got} of the {size} bytes of blob {digest[:12]}")
            self._count("bytes_in", len(chunk))
            await self.download_bucket.aconsume(len(chunk))
            view[got : got + len(chunk)] = chunk
            sha.update(chunk)
            got += len(chunk)
        if await reader.read(1):
            raise BlobMismatch(f"peer {peer} sent more than the {size} bytes of blob {digest[:12]}")
        if sha.hexdigest() != digest:
            raise BlobMismatch(f"blob from {peer} has sha256 {sha.hexdigest()[:12]}, not {digest[:12]}")
        return bytes(buf)

    # ---- misc -------------------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def close(self) -> None:
        """Stop serving (running uploads are cancelled). Idempotent; the Membership stays up."""
        if self._closed:
            return
        self._closed = True
        with self._blobs_lock:
            self._blobs.clear()
        with contextlib.suppress(Exception):  # best effort: the daemon may already be gone
            self._loop.run(self._close(), timeout=10.0, what="closing the blob handler")

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self._p2p.remove_binary_stream_handler(self.name)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
