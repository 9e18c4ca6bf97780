"""Training rate of an honest peer under attack: steps/s of an in-process training loop with a Session,
clean vs with an adversary (p2pcod/adversary.py) flooding its blob server or serving bad checkpoints.

    .venv/bin/python benchmarks/hostile.py [--seconds 15] [--attacks flood,bomb,endless,stall,nan] [--ban]

The honest peer has one honest teacher (bob) and trains an MLP on random data with distillation; bob and
each attacker run in their own process (spawned), so that they do not share the honest peer's GIL. Without
--ban the honest peer never bans (ban_after is huge, retry backoff 0.2 s): the attack never stops, the
worst case. Each attack is measured between two clean runs; the figure is its rate / the mean clean rate.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from p2pcod import codec
from p2pcod.adversary import LOCAL, Adversary, bomb, with_kept_value
from p2pcod.config import ExchangeConfig
from p2pcod.distill import DistillConfig
from p2pcod.session import Session

SWARM = "bench-hostile"
CFG = {"width": 256, "hidden": 512, "out": 10}


def build(cfg):
    return torch.nn.Sequential(torch.nn.Linear(cfg["width"], cfg["hidden"]), torch.nn.ReLU(),
                               torch.nn.Linear(cfg["hidden"], cfg["hidden"]), torch.nn.ReLU(),
                               torch.nn.Linear(cfg["hidden"], cfg["out"]))


def train(session: Session, seconds: float, step0: int) -> tuple[float, int]:
    """Train for `seconds`; returns (steps/s, last step)."""
    model = session.model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(step0)
    step, t0 = step0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = torch.randn(64, CFG["width"], generator=g)
        y = torch.randint(0, CFG["out"], (64,), generator=g)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + session.distill_loss(logits, x, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        session.step(step)
    return (step - step0) / (time.perf_counter() - t0), step


def _peer_main(role: str, identity_dir: str, maddrs: list[str], digest: str, ready, stop) -> None:
    """Runs in its own process (the honest peer's CPU and GIL are not shared): bob, or one attack."""
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    adv = Adversary(SWARM, identity_dir, maddrs, role)
    opened = 0
    try:
        state = build(CFG).state_dict()
        valid, fp = codec.encode(state, {}), codec.fingerprint(state)
        step = 50 if role == "bob" else 60
        if role in ("bob", "flood"):
            if role == "bob":
                adv.offer(valid, step=step, model_cfg=CFG, fingerprint=fp)
        elif role == "bomb":
            adv.offer(bomb(valid, 256 << 20), step=step, model_cfg=CFG, fingerprint=fp)
        elif role == "endless":
            adv.offer(valid, step=step, model_cfg=CFG, fingerprint=fp, mode="endless")
        elif role == "stall":
            adv.offer(valid, step=step, model_cfg=CFG, fingerprint=fp, mode="stall")
        elif role == "nan":
            adv.offer(with_kept_value(valid, "0.bias", float("nan")), step=step, model_cfg=CFG, fingerprint=fp)
        else:
            raise SystemExit(f"unknown attack {role!r}")
        ready.set()
        while not stop.is_set():
            if role == "flood":  # ~80 streams held at the honest server, reopened every second
                opened += adv.flood(maddrs[0].rsplit("/", 1)[-1], 70)
                opened += adv.flood(maddrs[0].rsplit("/", 1)[-1], 10, digest=digest)
                stop.wait(1.0)
                adv.stop_flood()
            else:
                stop.wait(0.5)
    finally:
        adv.close()


class PeerProcess:
    def __init__(self, role: str, identity_dir: Path, maddrs: list[str], digest: str) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_peer_main, args=(role, str(identity_dir), maddrs, digest, self.ready,
                                                         self.stop), daemon=False)
        self.proc.start()
        if not self.ready.wait(120):
            self.close()
            raise SystemExit(f"the {role} process did not start")

    def close(self) -> None:
        self.stop.set()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--attacks", default="flood,bomb,endless,stall,nan")
    ap.add_argument("--ban", action="store_true", help="let the honest peer ban offenders (default: never)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)  # the honest peer's warnings about each offence are expected
    tmp = Path(tempfile.mkdtemp(prefix="p2pcod-hostile-"))
    exchange = ExchangeConfig(topology="full", reload_every=50, ttl=10.0, heartbeat=1.0, fetch_timeout=5.0)
    torch.manual_seed(0)
    honest = Session.join(swarm=SWARM, name="honest", identity_dir=tmp / "honest", host_maddrs=LOCAL,
                          model=build(CFG), model_cfg=CFG, task="toy", build_model=build, kind="multiclass",
                          exchange=exchange, distill_cfg=DistillConfig())
    honest.fetcher.policy.backoff = 0.2
    honest.fetcher.interval = 0.2
    if not args.ban:
        honest.fetcher.policy.ban_after = 10**9
    procs: list[PeerProcess] = []
    try:
        honest.publish_now(0)
        _, digest, _ = honest._published
        maddrs = honest.visible_maddrs()
        procs.append(PeerProcess("bob", tmp / "bob", maddrs, digest))
        deadline = time.monotonic() + 60
        while "bob" not in honest.teachers.names() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "bob" in honest.teachers.names(), "the honest teacher never arrived"
        step = 0
        clean, step = train(honest, args.seconds, step)
        print(f"clean: {clean:.1f} steps/s", flush=True)
        for attack in args.attacks.split(","):
            fails0, refused0 = honest.fetcher.stats["failed"], honest.transfer.stats["flood_refused"]
            mal = PeerProcess(attack, tmp / f"mal-{attack}", maddrs, digest)
            procs.append(mal)
            rate, step = train(honest, args.seconds, step)
            mal.close()
            procs.remove(mal)
            after, step = train(honest, args.seconds, step)
            base = (clean + after) / 2
            extra = (f"{honest.transfer.stats['flood_refused'] - refused0} streams refused" if attack == "flood"
                     else f"{honest.fetcher.stats['failed'] - fails0} rejected fetches")
            print(f"{attack}: {rate:.1f} steps/s vs clean {base:.1f} ({rate / base:.0%}); {extra}; "
                  f"teachers {honest.teachers.names()}", flush=True)
            clean = after
    finally:
        for p in procs:
            p.close()
        honest.close()


if __name__ == "__main__":
    main()
