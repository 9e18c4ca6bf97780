"""The background teacher fetcher: members -> topology -> fetch -> decode -> TeacherPool.swap.

It runs on its own thread and never blocks training. Everything it reads from the network is
untrusted. Before a byte is fetched, the model config a record announces is built on the meta device
(shapes only, no memory; the task bounds the config's values first): its weights must fit
`exchange.max_blob_mb` and its fingerprint must be the announced one, and it sets the limits of this
fetch and decode (`codec.limits_for`), so that peers of one task may run models of different sizes and
none of them can make us download or decode more than its announced model. Then a blob larger than
announced or than those limits is refused before it is read, the digest is checked against the signed
record, the codec decodes with the limits and checks the fingerprint, and the TeacherPool refuses weights
that do not fit the announced model config. Any failure is logged and counted, the old teacher stays,
and the offending peer is retried later with exponential backoff; after repeated offences it is banned
for a while. A neighbour that cannot be reached or went away mid-transfer is no offender: it is logged as
unreachable or gone and retried with backoff, never banned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from p2pcod import codec
from p2pcod.errors import P2pcodError
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import BlobNotServed, PeerBusy, PeerGone
from p2pcod.teachers import TeacherPool
from p2pcod.topology import TopologyConfig, neighbours

log = logging.getLogger(__name__)


@dataclass
class PeerHealth:
    """What we know about one remote peer's behaviour."""

    failures: int = 0  # consecutive failed fetches
    offences: int = 0  # failed fetches in total
    unreachable: int = 0  # consecutive fetches it was unreachable or gone for (no offence: only backoff)
    retry_at: float = 0.0  # monotonic time before which we do not try again
    banned_until: float = 0.0
    last_error: str = ""
    not_served: str = ""  # a digest the peer announced but did not serve once


@dataclass
class FetchPolicy:
    max_bytes: int  # no checkpoint larger than this, nor a model config whose weights take more (max_blob_mb)
    timeout: float
    backoff: float = 2.0  # first retry delay (s), doubled per consecutive failure
    max_backoff: float = 60.0
    ban_after: int = 5  # consecutive failures before a ban
    ban_for: float = 300.0
    min_rate: float = 0.0  # bytes/s: a checkpoint may take size / min_rate seconds if that exceeds `timeout`

    def timeout_for(self, size: int) -> float:
        """The bound on one download of `size` bytes: `timeout`, longer for big checkpoints on slow links."""
        return max(self.timeout, size / self.min_rate) if self.min_rate > 0 else self.timeout


@dataclass(frozen=True)
class Vetted:
    """What the model config of a record builds (on the meta device)."""

    fingerprints: frozenset[str]  # of the model as built, and held in each float dtype (a bf16 peer)
    nbytes: int  # its weights, as built (fp32 for the tasks' models)
    limits: codec.Limits  # codec.limits_for the model: accepts its checkpoints and little else


def _float_variants(state: Mapping[str, torch.Tensor]) -> list[Mapping[str, torch.Tensor]]:
    """The state dict as built and with its float tensors in each training dtype: a peer may hold the same
    architecture in bf16 or fp16 (its fingerprint names the dtypes); casting meta tensors costs nothing."""
    variants: list[Mapping[str, torch.Tensor]] = [state]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        variants.append({k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()})
    return variants


VET_CACHE = 32  # model configs whose vetting is remembered (most recently used)


class Fetcher:
    def __init__(
        self,
        *,
        me: str,
        task: str,
        teachers: TeacherPool,
        members: Callable[[], list[PeerRecord]],
        fetch_blob: Callable[[str, str, int, int, float], bytes],
        topology: TopologyConfig,
        reload_every: int,
        my_step: Callable[[], int],
        policy: FetchPolicy,
        interval: float = 1.0,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.me = me
        self.task = task
        self.teachers = teachers
        self._members = members
        self._fetch_blob = fetch_blob
        self.topology = topology
        self.reload_every = reload_every
        self._my_step = my_step
        self.policy = policy
        self.interval = interval
        self.health: dict[str, PeerHealth] = {}
        self.held: dict[str, str] = {}  # teacher name -> digest held
        self.stats = {"fetched": 0, "failed": 0, "rejected": 0, "bytes": 0, "banned": 0, "rounds": 0,
                      "unreachable": 0}
        self._warned: set[str] = set()  # peer ids already warned about
        self._owner: dict[str, str] = {}  # name -> the peer id that holds it
        self._seen: dict[str, float] = {}  # peer id -> monotonic time its record was last listed
        self.name_grace = 30.0  # s a name stays with a peer whose record is missing from the listing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.neighbours: list[str] = []
        self._paused = paused  # true while cut off from the swarm (simulated partition): no fetching
        self._vetted: OrderedDict[str, Vetted | str] = OrderedDict()  # canonical config -> Vetted or why refused

    # ---- thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="p2pcod-fetcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a bug here must not kill training; it is logged
                log.exception("fetcher round failed")
            self._stop.wait(self.interval)

    # ---- one round ----------------------------------------------------------------------------
    def run_once(self) -> None:
        self.stats["rounds"] += 1
        if self._paused():
            return
        records = self._members()
        by_name = self._usable(records)
        round_ = self._my_step() // self.reload_every
        wanted = neighbours(self.me, sorted(set(by_name) | {self.me}), round_, self.topology)
        self.neighbours = wanted
        for dropped in self.teachers.retain(wanted):
            self.held.pop(dropped, None)
            log.info("dropped teacher %s (left the swarm or no longer a neighbour)", dropped)
        # peers that failed us before go last: a staller costs the others at most one timeout per round
        for name in sorted(wanted, key=lambda n: self._failed_before(by_name[n].peer_id)):
            if self._stop.is_set() or self._paused():
                return
            record = by_name[name]
            if record.digest and self.held.get(name) != record.digest and self._may_try(record):
                self._fetch(record)

    def _usable(self, records: Sequence[PeerRecord]) -> dict[str, PeerRecord]:
        """Records of peers of my task, one per name.

        Names are labels anyone may announce, while a record's peer id is bound to its signing key. A name
        belongs to the first peer id seen with it for as long as that peer stays in the swarm (a restarted
        peer keeps its id; a record missing from one listing keeps its name for `name_grace` s), so a
        newcomer cannot take over an honest peer's place by claiming its name.
        """
        now = time.monotonic()
        present = {r.peer_id for r in records}
        for pid in present:
            self._seen[pid] = now
        # an owner missing from one listing (a partial DHT answer) keeps its name for name_grace seconds
        self._owner = {n: pid for n, pid in self._owner.items()
                       if pid in present or now - self._seen.get(pid, 0.0) < self.name_grace}
        self._seen = {pid: t for pid, t in self._seen.items() if now - t < self.name_grace}
        out: dict[str, PeerRecord] = {}
        for r in records:
            if r.task != self.task:
                self._warn_once(r, f"skipping peer {r.name}: its task is {r.task!r}, mine is {self.task!r}")
                continue
            owner = self._owner.setdefault(r.name, r.peer_id)
            if owner != r.peer_id:
                self._warn_once(r, f"ignoring peer {r.peer_id}: it claims the name {r.name!r} of peer {owner}")
                continue
            if r.name != self.me:
                out[r.name] = r
        return out

    def _warn_once(self, record: PeerRecord, message: str) -> None:
        if record.peer_id not in self._warned:
            log.warning(message)
            self._warned.add(record.peer_id)

    def _failed_before(self, peer_id: str) -> tuple[int, int]:
        h = self.health.get(peer_id)
        return (0, 0) if h is None else (h.offences, h.unreachable)

    def _may_try(self, record: PeerRecord) -> bool:
        h = self.health.get(record.peer_id)
        now = time.monotonic()
        return h is None or (now >= h.retry_at and now >= h.banned_until)

    def limits_for(self, record: PeerRecord) -> codec.Limits:
        """The limits of fetching and decoding the checkpoint of `record`, from the model config it announces;
        P2pcodError (before anything is fetched) when that config builds no model, a model over max_bytes, or a
        model of another fingerprint than announced."""
        p = self.policy
        v = self.vet(record.model_cfg)
        if isinstance(v, str):
            raise P2pcodError(v)
        if v.nbytes > p.max_bytes:
            raise P2pcodError(f"announced model config has {v.nbytes} bytes of weights, over the limit {p.max_bytes} "
                              f"(exchange.max_blob_mb)")
        if record.fingerprint not in v.fingerprints:
            raise P2pcodError(f"announced fingerprint {record.fingerprint[:16]}... does not match the announced model "
                              f"config (names, shapes and dtypes, in any float dtype)")
        return dataclasses.replace(v.limits, max_blob_bytes=min(v.limits.max_blob_bytes, p.max_bytes))

    def vet(self, model_cfg: Mapping) -> Vetted | str:
        """What `model_cfg` builds on the meta device, or why it builds nothing; remembered per canonical config."""
        try:
            key = json.dumps(model_cfg, sort_keys=True)
        except (TypeError, ValueError) as err:
            return f"announced model config is not plain JSON: {err}"
        v = self._vetted.get(key)
        if v is not None:
            self._vetted.move_to_end(key)
            return v
        try:
            model = self.teachers.meta_model(model_cfg)
            state = model.state_dict()
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            v = Vetted(frozenset(map(codec.fingerprint, _float_variants(state))), nbytes, codec.limits_for(state))
        except P2pcodError as err:
            v = str(err)
        self._vetted[key] = v
        while len(self._vetted) > VET_CACHE:
            self._vetted.popitem(last=False)
        return v

    def _fetch(self, record: PeerRecord) -> None:
        p = self.policy
        try:
            limits = self.limits_for(record)
            if record.size > limits.max_blob_bytes:
                raise P2pcodError(f"announced size {record.size} exceeds the limit {limits.max_blob_bytes} for its "
                                  f"model config")
            blob = self._fetch_blob(record.peer_id, record.digest, record.size, limits.max_blob_bytes,
                                    p.timeout_for(record.size))
            self.stats["bytes"] += len(blob)
            state, meta = codec.decode(blob, expect_fingerprint=record.fingerprint, limits=limits)
            self.teachers.swap(record.name, state, record.model_cfg, record.step, meta)
        except PeerBusy:  # the peer is serving others: not misbehaviour, retry soon without a strike
            self._retry_soon(record)
            return
        except PeerGone as err:  # unreachable, or left mid-transfer: not misbehaviour either
            self._unreachable(record, err)
            return
        except BlobNotServed as err:
            # Usually our copy of its record is a little older than the blobs it serves: retry without a
            # strike once; the same digest refused again is an offence (it announces what it does not serve).
            h = self.health.setdefault(record.peer_id, PeerHealth())
            if h.not_served != record.digest:
                h.not_served = record.digest
                self._retry_soon(record)
            else:
                self._offence(record, err)
            return
        except P2pcodError as err:
            self._offence(record, err)
            return
        self.held[record.name] = record.digest
        self.health.pop(record.peer_id, None)
        self.stats["fetched"] += 1
        log.info("teacher %s updated to step %d (%d bytes)", record.name, record.step, record.size)

    def _retry_soon(self, record: PeerRecord) -> None:
        h = self.health.setdefault(record.peer_id, PeerHealth())
        h.retry_at = time.monotonic() + self.policy.backoff

    def _unreachable(self, record: PeerRecord, err: Exception) -> None:
        """Back off from a neighbour we cannot reach (exponentially: its record may outlive it by a ttl), with no
        strike toward a ban: an unreachable peer is not a misbehaving one."""
        if self._paused():  # our own partition
            return
        p = self.policy
        h = self.health.setdefault(record.peer_id, PeerHealth())
        h.unreachable += 1
        h.last_error = str(err)
        delay = min(p.backoff * 2 ** (h.unreachable - 1), p.max_backoff)
        h.retry_at = time.monotonic() + delay
        self.stats["unreachable"] += 1
        log.info("neighbour %s (%s) is unreachable or gone, keeping the old teacher; retrying in %.0f s: %s",
                 record.name, record.peer_id, delay, err)

    def _offence(self, record: PeerRecord, err: Exception) -> None:
        if self._paused():  # our own partition, not the peer's fault
            return
        p = self.policy
        h = self.health.setdefault(record.peer_id, PeerHealth())
        h.failures += 1
        h.offences += 1
        h.last_error = str(err)
        h.retry_at = time.monotonic() + min(p.backoff * 2 ** (h.failures - 1), p.max_backoff)
        self.stats["failed"] += 1
        if h.failures >= p.ban_after:
            h.banned_until = time.monotonic() + p.ban_for
            h.failures = 0
            self.stats["banned"] += 1
            log.warning("banning peer %s (%s) for %.0f s after repeated failures: %s",
                        record.name, record.peer_id, p.ban_for, err)
        else:
            log.warning("checkpoint from peer %s (%s) rejected, keeping the old teacher: %s",
                        record.name, record.peer_id, err)
