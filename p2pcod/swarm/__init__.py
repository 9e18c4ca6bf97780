"""The swarm's network layer: the only code that touches the network or asyncio. No torch, no models.

    records.PeerRecord   what a peer announces (pure, schema-checked)
    dht.Membership       hivemind DHT node: announce / members / leave / shutdown (signed, expiring records)
    lifetime             the DHT process and p2pd die with the peer; one holder per identity and port
    transfer.Transfer    serve my checkpoint blob, fetch others' by digest over libp2p streams
    transfer.TokenBucket bandwidth limiter

Membership and Transfer are imported lazily so that `p2pcod.swarm.records` stays cheap to import.
"""

from __future__ import annotations

from typing import Any

from p2pcod.swarm.records import RECORD_VERSION, PeerRecord

__all__ = ["RECORD_VERSION", "Membership", "PeerRecord", "TokenBucket", "Transfer"]


def __getattr__(name: str) -> Any:
    if name == "Membership":
        from p2pcod.swarm.dht import Membership

        return Membership
    if name in ("Transfer", "TokenBucket"):
        from p2pcod.swarm import transfer

        return getattr(transfer, name)
    raise AttributeError(f"module 'p2pcod.swarm' has no attribute {name!r}")
