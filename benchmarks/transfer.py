"""Blob fetch throughput between two peers on loopback, and the exchange's bytes per training step.

    .venv/bin/python benchmarks/transfer.py [--size-mb 64] [--repeats 5] [--chunk-kb 1024]
    .venv/bin/python benchmarks/transfer.py --traffic-only [--reload 50] [--peers 4]

Both paths use the same two libp2p daemons (one per hivemind DHT node) and the same replicated P2P
handles; "raw" is hivemind's own P2P.send_raw_data / receive_raw_data with none of Transfer's checks
(request validation, size header, slot accounting, rate-limit calls, incremental sha256, final copy).
Prints the median MiB/s of each and the ratio.

Traffic: for each recipe's model (its initial weights, encoded by the recipe's codec), the bytes each
peer sends per training step at `--reload` for each topology (every peer serves its checkpoint once to
each peer that learns from it, every reload interval), against a ring all-reduce of fp32 gradients for
the same model and N (2·(N−1)/N · 4·params per step), and the reload interval that makes the exchange
500x smaller. A simulation's summary.md measures the same on real runs (e.g. topologies/ring-4.toml).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from hivemind.p2p import P2P, PeerID  # noqa: E402

from p2pcod import codec  # noqa: E402
from p2pcod.config import load_recipe  # noqa: E402
from p2pcod.report import allreduce_bytes_per_step  # noqa: E402
from p2pcod.swarm.dht import Membership  # noqa: E402
from p2pcod.swarm.transfer import Transfer  # noqa: E402
from p2pcod.tasks import get_task  # noqa: E402
from p2pcod.topology import TopologyConfig, graph  # noqa: E402

RAW = "/p2pcod-bench/raw/1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-kb", type=int, default=1024, help="Transfer chunk_size in KiB")
    ap.add_argument("--traffic-only", action="store_true", help="only the bytes-per-step table")
    ap.add_argument("--reload", type=int, default=50, help="exchange.reload_every for the traffic table")
    ap.add_argument("--peers", type=int, default=4, help="N for the traffic table")
    ap.add_argument("--recipe", action="append", help="recipes for the traffic table (default lm-tiny, lm-small)")
    args = ap.parse_args()
    if not args.traffic_only:
        throughput(args)
    traffic(args.recipe or ["peers/lm-tiny.toml", "peers/lm-small.toml"], args.reload, args.peers)


def traffic(recipes: list[str], reload: int, n: int) -> None:
    """Bytes sent per peer per step by the checkpoint exchange vs a ring all-reduce of fp32 gradients."""
    names = [f"p{i}" for i in range(n)]
    for path in recipes:
        recipe = load_recipe(path)
        torch.manual_seed(0)
        model = get_task(recipe.task).build_model(recipe.model)
        params = sum(p.numel() for p in model.parameters())  # what an all-reduce sums: gradients only
        state = model.state_dict()
        blob = codec.encode(state, {"bench": True}, recipe.exchange.codec_options())
        fp32 = 4 * sum(t.numel() for t in state.values())  # the checkpoint also carries buffers
        allreduce = allreduce_bytes_per_step(params, n)
        print(f"\n{path}: {params:,} params, checkpoint {len(blob) / 1e3:,.1f} kB "
              f"({fp32 / len(blob):.2f}x smaller than its fp32 state dict); N = {n}, reload every {reload} steps; "
              f"ring all-reduce: {allreduce / 1e3:,.1f} kB/step/peer")
        print(f"  {'topology':<12} {'fetchers/peer':>13} {'kB/step/peer':>13} {'x fewer':>8} {'reload for 500x':>16}")
        for name in ("ring", "ring-bi", "exponential", "full"):
            g = graph(names, 0, TopologyConfig(name=name))
            fetchers = sum(len(v) for v in g.values()) / n  # mean times each checkpoint is fetched
            per_step = fetchers * len(blob) / reload
            need = math.ceil(500 * fetchers * len(blob) / allreduce)
            print(f"  {name:<12} {fetchers:>13.1f} {per_step / 1e3:>13.2f} {allreduce / per_step:>8.0f} {need:>16}")


def throughput(args: argparse.Namespace) -> None:
    blob = os.urandom(int(args.size_mb * 2**20))
    digest = hashlib.sha256(blob).hexdigest()
    local = ["/ip4/127.0.0.1/tcp/0"]
    with tempfile.TemporaryDirectory() as tmp:
        a = Membership("bench", identity_dir=f"{tmp}/a", host_maddrs=local)
        b = Membership("bench", identity_dir=f"{tmp}/b", host_maddrs=local, initial_peers=a.visible_maddrs())
        ta, tb = Transfer(a), Transfer(b, chunk_size=args.chunk_kb * 1024)
        try:
            ta.publish(blob, digest)
            pa, pb = a.p2p(), b.p2p()

            async def serve_raw(_info, _reader, writer) -> None:
                await P2P.send_raw_data(blob, writer)
                writer.close()

            a.loop.run(pa.add_binary_stream_handler(RAW, serve_raw), 10)
            peer = PeerID.from_base58(a.peer_id)

            async def fetch_raw() -> int:
                _, reader, writer = await pb.call_binary_stream_handler(peer, RAW)
                data = await P2P.receive_raw_data(reader)
                writer.close()
                return len(data)

            def raw_once() -> float:
                t0 = time.perf_counter()
                assert b.loop.run(fetch_raw(), 120) == len(blob)
                return time.perf_counter() - t0

            def ours_once() -> float:
                t0 = time.perf_counter()
                got = tb.fetch(a.peer_id, digest, len(blob), max_bytes=len(blob), timeout=120)
                dt = time.perf_counter() - t0
                assert len(got) == len(blob)
                return dt

            raw_once(), ours_once()  # warm-up: connection, buffers
            raw_t, ours_t = [], []
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                raw_t.append(raw_once())
                ours_t.append(ours_once())
            mib = len(blob) / 2**20
            raw_rate, ours_rate = mib / statistics.median(raw_t), mib / statistics.median(ours_t)
            print(f"blob {mib:.0f} MiB, {args.repeats} repeats, Transfer chunk {args.chunk_kb} KiB")
            runs = lambda ts: ", ".join(f"{mib / t:.0f}" for t in ts)
            print(f"raw hivemind binary stream: {raw_rate:7.1f} MiB/s  (runs: {runs(raw_t)})")
            print(f"p2pcod Transfer.fetch     : {ours_rate:7.1f} MiB/s  (runs: {runs(ours_t)})")
            print(f"ratio Transfer / raw      : {ours_rate / raw_rate:7.2f}")
        finally:
            ta.close()
            tb.close()
            a.shutdown()
            b.shutdown()


if __name__ == "__main__":
    main()
