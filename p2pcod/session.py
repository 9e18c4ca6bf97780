"""Codistillation for any PyTorch training loop: join a swarm, get teachers' predictions, publish.

    session = p2pcod.session.Session.join(
        swarm="demo", name="alice", model=model, model_cfg=cfg, task="lm",
        build_model=task.build_model, kind="multiclass", identity_dir="runs/alice",
        initial_peers=["/ip4/10.0.0.5/tcp/31337/p2p/12D3Koo..."])
    for step, (x, y) in enumerate(loader):
        logits = model(x)
        loss = task_loss(logits, y) + session.distill_loss(logits, x, step)
        ...
        session.step(step + 1)      # publishes a checkpoint every exchange.reload_every steps
    session.close()

Threads: the DHT runs in its own (forked) process; a heartbeat thread refreshes this peer's record,
a publisher thread encodes checkpoints off the training thread, and the Fetcher keeps the
TeacherPool filled from this peer's neighbours. Nothing here ever blocks a training step for long:
step() only copies the weights when a checkpoint is due.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from p2pcod import codec
from p2pcod.config import ExchangeConfig
from p2pcod.distill import DistillConfig
from p2pcod.distill_term import DistillTerm
from p2pcod.errors import SwarmError
from p2pcod.fetcher import Fetcher, FetchPolicy
from p2pcod.swarm.dht import Membership
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import Transfer
from p2pcod.teachers import TeacherPool

log = logging.getLogger(__name__)

CODEC_ID = "p2pcod-int8/1"
MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s


class Session:
    """One peer's membership in a swarm, for the model it trains."""

    def __init__(
        self,
        *,
        membership: Membership,
        name: str,
        model: torch.nn.Module,
        model_cfg: Mapping[str, Any],
        task: str,
        build_model: Callable[[Mapping], torch.nn.Module],
        kind: str,
        distill_cfg: DistillConfig,
        exchange: ExchangeConfig,
        start_step: int = 0,
        teachers: TeacherPool | None = None,
    ) -> None:
        self.membership = membership
        self.name = name
        self.model = model
        self.model_cfg = dict(model_cfg)
        self.task = task
        self.kind = kind
        self.distill_cfg = distill_cfg
        self.exchange = exchange
        self.fingerprint = codec.fingerprint(model)
        self.transfer = Transfer(
            membership,
            upload_rate=exchange.upload_mbit * MBIT or None,
            download_rate=exchange.download_mbit * MBIT or None,
            max_streams_per_peer=exchange.max_streams_per_peer,
            ban_for=exchange.ban_for,
            stall_timeout=exchange.stall_timeout,
        )
        # the pool the fetcher fills; a caller that trains with it may build it first and pass it in
        self.teachers = teachers if teachers is not None else TeacherPool(
            build_model, distill_cfg, kind, max_teachers=exchange.max_teachers or None
        )
        self._term = DistillTerm(distill_cfg, kind, self.teachers)
        self._seed = zlib.crc32(name.encode())  # teacher draws differ from peer to peer, and repeat on a restart
        self._step = start_step
        self._published: tuple[int, str, int] = (0, "", 0)  # (step, digest, size)
        self._lock = threading.Lock()
        self._pending: dict[str, torch.Tensor] | None = None
        self._pending_step = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.fetcher = Fetcher(
            me=name,
            task=task,
            teachers=self.teachers,
            members=self.members,
            fetch_blob=self._fetch_blob,
            topology=exchange.topology_config(),
            reload_every=exchange.reload_every,
            my_step=lambda: self._step,
            paused=self.cut_off,
            # the limits of each fetch and decode follow the model config its record announces (neighbours may
            # run other model sizes), within max_blob_mb: see Fetcher.limits_for
            policy=FetchPolicy(
                max_bytes=int(exchange.max_blob_mb * 2**20),
                timeout=exchange.fetch_timeout,
                min_rate=min(exchange.min_fetch_mbit, exchange.download_mbit or exchange.min_fetch_mbit) * MBIT,
                ban_after=exchange.ban_after,
                ban_for=exchange.ban_for,
            ),
        )
        self._threads = [
            threading.Thread(target=self._heartbeat_loop, name="p2pcod-heartbeat", daemon=True),
            threading.Thread(target=self._publish_loop, name="p2pcod-publisher", daemon=True),
        ]
        self._closed = False
        self._cut_off_until = 0.0
        self.transfer.paused = self.cut_off

    @classmethod
    def join(
        cls,
        *,
        swarm: str,
        name: str,
        identity_dir: str | Path,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        exchange: ExchangeConfig | None = None,
        distill_cfg: DistillConfig | None = None,
        **kwargs: Any,
    ) -> Session:
        """Start a DHT node, join the swarm through `initial_peers` (none: start a new swarm), and go."""
        exchange = exchange or ExchangeConfig()
        membership = Membership(
            swarm, identity_dir=identity_dir, initial_peers=initial_peers, host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs, ttl=exchange.ttl,
        )
        try:
            session = cls(membership=membership, name=name, exchange=exchange,
                          distill_cfg=distill_cfg or DistillConfig(), **kwargs)
        except BaseException:
            membership.shutdown()
            raise
        session.start()
        return session

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.announce()
        for t in self._threads:
            t.start()
        self.fetcher.start()

    def close(self, leave: bool = True) -> None:
        """Stop the threads, leave the swarm (best effort) and shut the DHT node down."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self.fetcher.stop()
        for t in self._threads:
            t.join(timeout=30)
        if leave:
            try:
                self.membership.leave()
            except Exception as err:  # noqa: BLE001 - leaving is best effort
                log.warning("could not leave the swarm cleanly: %s", err)
        self.transfer.close()
        self.membership.shutdown()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what a training loop calls -------------------------------------------------------------
    def predict(self, x: Any) -> torch.Tensor | None:
        """The teachers' aggregated prediction for this batch, or None while no teacher is held."""
        return self.teachers.predict(x)

    def distill_loss(self, student_logits: torch.Tensor, x: Any, step: int) -> torch.Tensor:
        """α·ψ(teachers, student) for this batch (zero during burn-in or without teachers), at the cost the
        [distill] settings bound: teachers_per_step teachers on the batch's first batch_fraction of examples."""
        return self._term.loss(student_logits, x, step, self._seed).loss

    def step(self, step: int, force: bool = False) -> None:
        """Tell the swarm the training step; every `reload_every` steps the weights are published."""
        self._step = step
        if force or (step > 0 and step % self.exchange.reload_every == 0):
            snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            with self._lock:
                self._pending, self._pending_step = snapshot, step
            self._wake.set()

    def publish_now(self, step: int) -> None:
        """Encode and publish synchronously (used at shutdown so the last weights are served)."""
        self._step = step
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._publish(state, step)

    # ---- background work ------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                state, step, self._pending = self._pending, self._pending_step, None
            if state is not None:
                try:
                    self._publish(state, step)
                except Exception:  # noqa: BLE001 - never let publishing kill the peer; log it
                    log.exception("publishing the checkpoint of step %d failed", step)

    def _publish(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        meta = {"peer": self.name, "step": step, "task": self.task, "model": self.model_cfg}
        blob = codec.encode(state, meta, self.exchange.codec_options())
        digest = codec.digest(blob)
        self.transfer.publish(blob, digest)
        self._published = (step, digest, len(blob))
        self.announce()
        log.info("published step %d: %d bytes, digest %s", step, len(blob), digest[:12])

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.exchange.heartbeat):
            try:
                self.announce()
            except Exception as err:  # noqa: BLE001 - the next beat retries
                log.warning("heartbeat failed: %s", err)

    def record(self) -> PeerRecord:
        step, digest, size = self._published
        return PeerRecord(
            name=self.name, peer_id=self.membership.peer_id, step=step, digest=digest, size=size,
            codec=CODEC_ID, task=self.task, model_cfg=self.model_cfg, fingerprint=self.fingerprint,
            time=time.time(),
        )

    def announce(self) -> None:
        self.membership.announce(self.record())

    def members(self) -> list[PeerRecord]:
        return self.membership.members()

    def _fetch_blob(self, peer_id: str, digest: str, size: int, max_bytes: int, timeout: float) -> bytes:
        if self.cut_off():  # the fetcher pauses while cut off; this catches a fetch already under way
            raise SwarmError("this peer is cut off from the swarm (simulated partition)")
        if self.exchange.latency_ms:
            time.sleep(self.exchange.latency_ms / 1000)
        return self.transfer.fetch(peer_id, digest, size, max_bytes=max_bytes, timeout=timeout)

    def cut_off(self) -> bool:
        """True while a simulated partition is in force (see `set_cut_off`)."""
        return time.time() < self._cut_off_until

    @property
    def cut_off_until(self) -> float:
        return self._cut_off_until

    def set_cut_off(self, until: float) -> None:
        """Cut this peer off (no fetching, no serving) until the given unix time."""
        self._cut_off_until = until

    # ---- observability --------------------------------------------------------------------------
    def visible_maddrs(self) -> list[str]:
        return self.membership.visible_maddrs()

    def stats(self) -> dict[str, Any]:
        t = self.transfer.stats
        return {
            "teachers": len(self.teachers),
            "staleness": self.teachers.staleness(self._step),
            "neighbours": list(self.fetcher.neighbours),
            "bytes_in": int(t.get("bytes_in", 0)),
            "bytes_out": int(t.get("bytes_out", 0)),
            "fetch_ok": self.fetcher.stats["fetched"],
            "fetch_failed": self.fetcher.stats["failed"],  # offences: bad or refused checkpoints
            "fetch_unreachable": self.fetcher.stats["unreachable"],  # neighbours gone or not answering: no offence
            "fetch_bans": self.fetcher.stats["banned"],  # peers we stopped fetching from (repeat offenders)
            "serve_bans": int(t.get("banned", 0)),  # peers our blob server stopped serving (floods)
            "streams_refused": int(t.get("flood_refused", 0)) + int(t.get("banned_refused", 0)),
            "published_step": self._published[0],
        }
