"""A swarm peer: the Trainer plus a Session (what `p2pcod peer` runs).

The DHT node starts first (it forks a process, which must happen before torch starts its thread
pools), then the task and the model, then the training loop: every step the session is told the step
(it publishes every `reload_every` steps), metrics go to RUN_DIR/metrics.jsonl with the swarm's
counters, a local checkpoint is written every `checkpoint_every` steps, and SIGINT/SIGTERM end the
loop at a step boundary with a final checkpoint, leaving the swarm cleanly.

Under torchrun the peer is a group of ranks (p2pcod/group.py): rank 0 does all of the above, the other
ranks only train (DistributedDataParallel) with the teachers rank 0 broadcasts at step boundaries.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pcod.churn import save_predictions
from p2pcod.config import Recipe
from p2pcod.control import read_control, wait_while_held
from p2pcod.errors import ConfigError
from p2pcod.group import DebugLog, Group, TeacherSync
from p2pcod.session import Session
from p2pcod.swarm.dht import Membership
from p2pcod.tasks import get_task
from p2pcod.teachers import TeacherPool
from p2pcod.trainer import Trainer, seed_for

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class PeerOptions:
    name: str
    swarm: str = "p2pcod"
    run_dir: Path = Path("runs/peer")
    join: Sequence[str] = ()
    listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    announce: Sequence[str] = ()
    shard: int = 0
    num_shards: int = 1
    resume: bool = False
    linger: float = 0.0  # keep serving this many seconds after the last step
    control: Path | None = None  # the simulator's control file (p2pcod/control.py): start barrier, partitions
    device: str = "auto"  # cpu | cuda | auto (cuda when present)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ConfigError(f"--name {self.name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"--shard {self.shard}/{self.num_shards}: need 0 <= shard < number of shards")


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        placeholder = re.fullmatch(r"\s*I\s*/\s*(\d+)\s*", text)  # pasted from a join command as printed
        if placeholder:
            k = int(placeholder.group(1))
            raise ConfigError(f"--shard {text!r}: replace I by a shard from 0 to {k - 1} that no other peer trains on")
        raise ConfigError(f"--shard {text!r} must look like I/K, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.warning("signal %d: finishing the current step, saving and leaving", signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def join_command(maddrs: Sequence[str], opts: PeerOptions, config: str, overrides: Sequence[str] = (),
                 routed: Collection[str] | None = None) -> str:
    """The command another machine runs to join: this peer's recipe and overrides, the address `join_address`
    picks, and the other shard when that is unambiguous, else `--shard I/K` (`join_notes` says what to put)."""
    address, _ = join_address(maddrs, routed)
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    shard = _other_shard(opts) or f"I/{opts.num_shards}"
    return (f"p2pcod peer --config {shlex.quote(config)} --swarm {shlex.quote(opts.swarm)} --join {address} "
            f"--name OTHER_NAME --shard {shard}{sets}")


def join_notes(maddrs: Sequence[str], opts: PeerOptions, routed: Collection[str] | None = None) -> list[str]:
    """Shell comment lines to print under the join command: which shard to take, this peer's other addresses."""
    k, mine = opts.num_shards, opts.shard
    if k == 1:
        notes = ["# both peers train on all the data (--shard 0/1); for disjoint shards start every peer with "
                 "--shard I/K, e.g. 0/2 and 1/2"]
    elif k == 2:
        notes = [f"# this peer trains on shard {mine}/2, so the other half is left; more than two peers need "
                 f"more shards (K)"]
    else:
        notes = [f"# replace I by a shard from 0 to {k - 1} that no other peer trains on (this peer trains on "
                 f"{mine}/{k}; it knows of no other peer yet)"]
    _, others = join_address(maddrs, routed)
    if others:
        notes.append("# other addresses this peer listens on (if the one above is not reachable from the other "
                     "machine): " + " ".join(others))
    return notes


def _other_shard(opts: PeerOptions) -> str | None:
    """The shard a second peer should take, when this peer alone decides it: the same (0/1), or the other half."""
    if opts.num_shards == 1:
        return "0/1"  # 1/1 would not be a valid shard
    if opts.num_shards == 2:
        return f"{1 - opts.shard}/2"
    return None  # which of K-1 shards are free depends on peers this one does not know yet


def join_address(maddrs: Sequence[str], routed: Collection[str] | None = None) -> tuple[str, list[str]]:
    """(the address to print in the join command, the other addresses worth trying).

    Loopback, link-local and unspecified addresses only when there is nothing else (another machine cannot use
    them). Among the rest: the address this host's default route leaves from (`routed`; None: ask the kernel)
    first, as a second interface (a container bridge, a VPN) is often one the other machines cannot reach; then
    public before private addresses, IPv4 before IPv6; otherwise in the order the peer lists them.
    """
    routed = routed_addresses() if routed is None else set(routed)
    ranked = sorted((r, i) for i, a in enumerate(maddrs) if (r := _address_rank(a, routed)) is not None)
    usable = [maddrs[i] for _, i in ranked]
    if not usable:
        usable = list(maddrs)
    return usable[0], usable[1:]


def _address_rank(maddr: str, routed: Collection[str]) -> tuple[int, bool] | None:
    """Lower is better; None for an address no other machine can use."""
    parts = maddr.split("/")
    proto, host = (parts[1], parts[2]) if len(parts) > 2 else ("", "")
    if proto.startswith("dns"):
        return (1, False)  # a name someone set up for others to reach this host by (--announce)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (3, False)
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
        return None
    v6 = ip.version == 6
    if host in routed:
        return (0, v6)
    return (1, v6) if ip.is_global else (2, v6)


def routed_addresses() -> set[str]:
    """The local addresses this host's default routes (IPv4, IPv6) leave from; connecting UDP sends nothing."""
    found = set()
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation IPs
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            found.add(probe.getsockname()[0])
    return found


def run_peer(
    recipe: Recipe,
    opts: PeerOptions,
    on_start: Callable[[list[str]], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as a swarm member until the planned steps are done or `opts.stop` is set.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the final metrics record,
    the others their own last one.
    """
    group = Group.from_env(opts.device)
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    if not group.is_root:
        return _run_rank(recipe, opts, group)
    membership = Membership(  # forks the DHT process: before torch and torch.distributed start threads
        opts.swarm, identity_dir=opts.run_dir / "identity", initial_peers=list(opts.join),
        host_maddrs=list(opts.listen), announce_maddrs=list(opts.announce), ttl=recipe.exchange.ttl,
    )
    session: Session | None = None
    trainer: Trainer | None = None
    try:
        group.init()
        task = _task(recipe)
        swarm_pool = _teacher_pool(recipe, task, torch.device("cpu"))  # what the session's fetcher fills
        # a group (or a GPU) trains with its own pool that changes only at step boundaries, the same on every rank
        separate = group.distributed or group.device.type != "cpu"
        train_pool = _teacher_pool(recipe, task, group.device) if separate else swarm_pool
        trainer, resumed_from = _build_trainer(recipe, opts, group, task, train_pool)
        session = Session(
            membership=membership, name=opts.name, model=trainer.model, model_cfg=recipe.model,
            task=task.name, build_model=task.build_model, kind=task.kind, distill_cfg=recipe.distill,
            exchange=recipe.exchange, start_step=trainer.step, teachers=swarm_pool,
        )
        sync = TeacherSync(group, train_pool, source=swarm_pool) if separate else None
        session.start()
        if trainer.step > 0:
            session.publish_now(trainer.step)  # serve the resumed weights right away
        if opts.control is not None:
            _watch_control(opts.control, session, opts.stop)
        _write_identity(opts, membership, resumed_from, trainer, group)
        if on_start:
            on_start(membership.visible_maddrs())
        wait_while_held(opts.control, opts.stop)  # the simulator's start barrier (the swarm is served meanwhile)
        return _train_loop(recipe, trainer, session, opts, progress, resumed_from, group, sync)
    finally:
        if session is not None:
            session.close()
        else:
            membership.shutdown()
        if trainer is not None:
            trainer.close()
        group.close()


def _task(recipe: Recipe):
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    return get_task(recipe.task)


def _build_trainer(recipe: Recipe, opts: PeerOptions, group: Group, task, teachers: TeacherPool):
    """This rank's Trainer (its slice of the peer's shard), resumed if asked, wrapped for the group."""
    shard, num_shards = group.data_shard(opts.shard, opts.num_shards)
    metrics = None if group.is_root else opts.run_dir / "ranks" / f"rank{group.rank}" / "metrics.jsonl"
    trainer = Trainer(recipe, task, shard=shard, num_shards=num_shards, run_dir=opts.run_dir, teachers=teachers,
                      seed=group.data_seed(seed_for(recipe, opts.shard)), device=group.device, metrics_path=metrics)
    resumed_from = None
    if opts.resume:
        if trainer.resume() is not None:  # every rank loads rank 0's checkpoint
            resumed_from = trainer.step
            trainer.seed = group.data_seed(trainer.seed)  # the checkpoint holds rank 0's seed
        elif group.is_root:
            log.warning("--resume: no checkpoint in %s, starting from step 0", opts.run_dir)
    trainer.train_model = group.wrap(trainer.model)  # DDP: rank 0's weights to every rank
    return trainer, resumed_from


def _teacher_pool(recipe: Recipe, task, device: torch.device) -> TeacherPool:
    # the teachers' precision follows distill.teacher_precision on the device ("auto": bf16 where native)
    return TeacherPool(task.build_model, recipe.distill, task.kind, device=device,
                       max_teachers=recipe.exchange.max_teachers or None)


def _run_rank(recipe: Recipe, opts: PeerOptions, group: Group) -> dict[str, Any]:
    """A rank other than 0: train in step with rank 0, no swarm, no checkpoints."""
    trainer: Trainer | None = None
    debug = DebugLog(opts.run_dir, group.rank)
    try:
        group.init()
        task = _task(recipe)
        trainer, _ = _build_trainer(recipe, opts, group, task, _teacher_pool(recipe, task, group.device))
        sync = TeacherSync(group, trainer.teachers)
        t = recipe.train
        record: dict[str, Any] = {}
        while not sync.step_boundary(trainer.step >= t.steps or opts.stop.is_set()):
            trainer.train_step()
            debug.write(trainer.step, trainer.model, trainer.teachers)
            if trainer.due(t.log_every):
                record = trainer.log(extra={"rank": group.rank})
        return record
    finally:
        debug.close()
        if trainer is not None:
            trainer.close()
        group.close()


def _train_loop(recipe: Recipe, trainer: Trainer, session: Session, opts: PeerOptions,
                progress: Callable[[dict[str, Any]], None] | None, resumed_from: int | None,
                group: Group | None = None, sync: TeacherSync | None = None) -> dict[str, Any]:
    t = recipe.train
    group = group or Group()
    debug = DebugLog(opts.run_dir, group.rank)
    if trainer.step == 0:
        _log(trainer, session, evaluate=True, progress=progress)
    elif resumed_from is not None:
        _log(trainer, session, evaluate=True, progress=progress, extra={"resumed_from": resumed_from})
    try:
        while True:
            stop = trainer.step >= t.steps or opts.stop.is_set()
            if (sync.step_boundary(stop) if sync is not None else stop):
                break
            trainer.train_step()
            debug.write(trainer.step, trainer.model, trainer.teachers)
            session.step(trainer.step)
            evaluate = trainer.due(t.eval_every)
            if evaluate or trainer.due(t.log_every):
                _log(trainer, session, evaluate=evaluate, progress=progress)
            if trainer.step % t.checkpoint_every == 0:
                trainer.save()
    finally:
        debug.close()
    trainer.save()
    record = _log(trainer, session, evaluate=True, progress=progress, extra={"final": True})
    session.publish_now(trainer.step)
    # the final model's validation predictions: `p2pcod churn` compares two runs of a peer (or of a simulation)
    save_predictions(opts.run_dir, trainer.predictions())
    deadline = time.monotonic() + opts.linger
    while time.monotonic() < deadline and not opts.stop.is_set():
        opts.stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    return record


def _log(trainer: Trainer, session: Session, evaluate: bool, progress, extra: dict | None = None) -> dict[str, Any]:
    stats = session.stats()
    keys = ("bytes_in", "bytes_out", "fetch_ok", "fetch_failed", "fetch_unreachable", "fetch_bans", "serve_bans",
            "streams_refused", "neighbours")
    fields = {k: stats[k] for k in keys}
    record = trainer.log(evaluate=evaluate, extra={**fields, **(extra or {})})
    if progress:
        progress(record)
    return record


def _watch_control(path: Path, session: Session, stop: threading.Event) -> None:
    """Follow a control file written by the simulator: {"cut_off_until": unix time} partitions this peer."""

    def loop() -> None:
        seen = None
        while not stop.wait(1.0):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if (stat.st_mtime_ns, stat.st_size) == seen:
                continue
            seen = (stat.st_mtime_ns, stat.st_size)
            try:
                until = float(read_control(path).get("cut_off_until", 0.0))
            except (TypeError, ValueError) as err:
                log.warning("ignoring a bad cut_off_until in %s: %s", path, err)
                continue
            if until != session.cut_off_until:
                log.warning("control: cut off from the swarm until %.1f", until)
                session.set_cut_off(until)

    threading.Thread(target=loop, name="p2pcod-control", daemon=True).start()


def _write_identity(opts: PeerOptions, membership: Membership, resumed_from: int | None, trainer: Trainer,
                    group: Group) -> None:
    """RUN_DIR/peer.json: who this peer is and where it listens (read by the simulator and tests)."""
    info = {
        "name": opts.name, "swarm": opts.swarm, "peer_id": membership.peer_id,
        "maddrs": membership.visible_maddrs(), "resumed_from": resumed_from, "time": time.time(),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "group_size": group.world_size, "device": str(group.device),
    }
    path = opts.run_dir / "peer.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
