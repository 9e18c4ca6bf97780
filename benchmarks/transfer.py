"""Blob fetch throughput between two peers on loopback: p2pcod Transfer vs hivemind's raw binary stream.

    .venv/bin/python benchmarks/transfer.py [--size-mb 64] [--repeats 5] [--chunk-kb 1024]

Both paths use the same two libp2p daemons (one per hivemind DHT node) and the same replicated P2P
handles; "raw" is hivemind's own P2P.send_raw_data / receive_raw_data with none of Transfer's checks
(request validation, size header, slot accounting, rate-limit calls, incremental sha256, final copy).
Prints the median MiB/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivemind.p2p import P2P, PeerID  # noqa: E402

from p2pcod.swarm.dht import Membership  # noqa: E402
from p2pcod.swarm.transfer import Transfer  # noqa: E402

RAW = "/p2pcod-bench/raw/1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-kb", type=int, default=1024, help="Transfer chunk_size in KiB")
    args = ap.parse_args()
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
