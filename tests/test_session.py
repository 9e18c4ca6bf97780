"""The Session (library API) against hostile peers on real hivemind (127.0.0.1): bad blobs never become teachers."""

from __future__ import annotations

import re
import time

import pytest
import torch
from peerproc import eventually

from p2pcod import codec
from p2pcod.config import ExchangeConfig
from p2pcod.distill import DistillConfig
from p2pcod.session import CODEC_ID, Session
from p2pcod.swarm.dht import Membership
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import Transfer
from p2pcod.tasks.lm import GPT, gpt_config

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
SWARM = "t-session"


def build(cfg):
    torch.manual_seed(cfg.get("seed", 0))
    return torch.nn.Sequential(torch.nn.Linear(cfg["width"], 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))




@pytest.fixture
def honest(tmp_path):
    model = build({"width": 16})
    exchange = ExchangeConfig(topology="full", reload_every=5, ttl=10.0, heartbeat=1.0)
    s = Session.join(swarm=SWARM, name="honest", identity_dir=tmp_path / "honest", host_maddrs=LOCAL,
                     model=model, model_cfg={"width": 16}, task="toy", build_model=build, kind="multiclass",
                     exchange=exchange, distill_cfg=DistillConfig())
    s.fetcher.policy.backoff = 0.2  # retry quickly so the test sees repeated offences
    s.fetcher.interval = 0.2
    yield s
    s.close()


class Adversary:
    """A peer written on the swarm layer directly: it announces whatever record and serves whatever bytes."""

    def __init__(self, tmp_path, via: Session, name: str) -> None:
        self.m = Membership(SWARM, identity_dir=tmp_path / name, initial_peers=via.visible_maddrs(),
                            host_maddrs=LOCAL, ttl=10.0)
        self.t = Transfer(self.m)
        self.name = name

    def offer(self, blob: bytes, step: int, model_cfg: dict, fingerprint: str, announce_digest: str | None = None):
        digest = codec.digest(blob)
        self.t.publish(blob, digest)
        self.m.announce(PeerRecord(
            name=self.name, peer_id=self.m.peer_id, step=step, digest=announce_digest or digest, size=len(blob),
            codec=CODEC_ID, task="toy", model_cfg=model_cfg, fingerprint=fingerprint, time=time.time()))

    def close(self):
        self.t.close()
        self.m.shutdown()


def test_hostile_blobs_are_rejected_and_the_offender_banned(tmp_path, honest):
    bad = Adversary(tmp_path, honest, "mallory")
    try:
        good_state = build({"width": 16, "seed": 1}).state_dict()
        good_fp = codec.fingerprint(good_state)
        valid = codec.encode(good_state, {"peer": "mallory"})
        corrupt = bytearray(valid)
        corrupt[len(corrupt) // 2] ^= 0xFF
        wrong_arch = codec.encode(build({"width": 24}).state_dict(), {})
        attacks = [
            dict(blob=bytes(corrupt), step=5, model_cfg={"width": 16}, fingerprint=good_fp),  # bit flip, right digest
            dict(blob=b"\x00" * 4096, step=10, model_cfg={"width": 16}, fingerprint=good_fp),  # garbage
            dict(blob=wrong_arch, step=15, model_cfg={"width": 16}, fingerprint=good_fp),  # fingerprint lies
            dict(blob=wrong_arch, step=20, model_cfg={"width": 16},  # honest fingerprint, config lies
                 fingerprint=codec.fingerprint(build({"width": 24}))),
            dict(blob=valid, step=25, model_cfg={"width": 16}, fingerprint=good_fp,
                 announce_digest="ab" * 32),  # announces a digest it does not serve
        ]
        for i, attack in enumerate(attacks, 1):
            bad.offer(**attack)
            assert eventually(lambda i=i: honest.fetcher.stats["failed"] >= i, 30), f"attack {i} not attempted"
            assert len(honest.teachers) == 0, f"attack {i} produced a teacher"
        health = honest.fetcher.health[bad.m.peer_id]
        assert health.offences >= len(attacks)
        assert health.banned_until > time.monotonic()  # 5 strikes: banned for a while
        # while banned, even a valid checkpoint from it is not fetched
        bad.offer(valid, 30, {"width": 16}, good_fp)
        time.sleep(1.5)
        assert len(honest.teachers) == 0
    finally:
        bad.close()


def test_valid_peer_becomes_a_teacher(tmp_path, honest):
    """The positive control for the test above: the same path with an honest blob yields a teacher."""
    peer = Adversary(tmp_path, honest, "bob")
    try:
        state = build({"width": 16, "seed": 2}).state_dict()
        peer.offer(codec.encode(state, {}), 5, {"width": 16}, codec.fingerprint(state))
        assert eventually(lambda: honest.teachers.names() == ["bob"], 30)
        x = torch.randn(3, 16)
        target = honest.predict(x)
        assert target is not None and target.shape == (3, 5)
        assert torch.allclose(target.sum(-1), torch.ones(3), atol=1e-5)
        loss = honest.distill_loss(honest.model(x), x, step=10)
        assert loss.item() > 0
        stats = honest.stats()
        assert stats["teachers"] == 1 and stats["bytes_in"] > 0 and stats["fetch_ok"] == 1
    finally:
        peer.close()


def test_fetch_limits_follow_the_announced_model(tmp_path, honest):
    """Limits come from the model config a record announces, built on the meta device before anything is fetched:
    a checkpoint far larger than its announced model, a config whose weights exceed max_blob_mb, and a fingerprint
    that is not the announced config's are all refused before a byte is downloaded."""
    limits = honest.fetcher.limits_for(honest.record())  # our own announced model: what a same-size peer gets
    nbytes = sum(p.numel() * 4 for p in honest.model.parameters())
    assert limits.max_decoded_bytes <= 1.25 * nbytes + (1 << 20) and limits.max_tensors == 4
    assert limits.max_blob_bytes < 3 << 20 and honest.fetcher.policy.max_bytes == 2048 << 20  # max_blob_mb
    honest.fetcher.policy.ban_after = 100  # retries of one case must not ban the peer before the next case
    bad = Adversary(tmp_path, honest, "huge")
    try:
        big = torch.nn.Linear(2048, 2048)  # 16 MB of fp32, ~4 MB encoded: above every limit of a 6 KB model
        blob = codec.encode(big.state_dict(), {})
        assert len(blob) > limits.max_blob_bytes
        with torch.device("meta"):
            enormous_fp = codec.fingerprint(build({"width": 10**7}))  # 2.6 GB of fp32 weights
        cases = [  # (model config, fingerprint, error)
            ({"width": 16}, honest.fingerprint, "announced size .* exceeds the limit .* for its model config"),
            ({"width": 10**7}, enormous_fp, "bytes of weights, over the limit .*max_blob_mb"),
            ({"width": 24}, honest.fingerprint, "fingerprint .* does not match the announced model config"),
            ({"widht": 16}, honest.fingerprint, "announced model config: building the model from its config failed"),
        ]
        for i, (cfg, fp, error) in enumerate(cases, 1):
            bad.offer(blob, 5 * i, cfg, fp)
            # a retry of the previous record may fail first: wait for this record's own refusal
            def refused(error=error):
                h = honest.fetcher.health.get(bad.m.peer_id)
                return h is not None and re.search(error, h.last_error)

            assert eventually(refused, 30), (cfg, honest.fetcher.health.get(bad.m.peer_id))
            assert honest.fetcher.stats["failed"] >= i
            assert bad.t.stats["uploads"] == 0 and bad.t.stats["bytes_out"] == 0  # refused before connecting
        assert len(honest.teachers) == 0
    finally:
        bad.close()


def gpt(cfg):
    return GPT(gpt_config(cfg))


def test_peers_of_different_widths_teach_each_other(tmp_path):
    """A heterogeneous swarm (topologies/hetero-3.toml): each peer fetches and decodes its neighbour's checkpoint
    within the limits of the model the neighbour announces, not its own, in both directions."""
    cfgs = {"narrow": {"layers": 1, "width": 32, "heads": 2, "context": 16},
            "wide": {"layers": 1, "width": 96, "heads": 2, "context": 16}}
    exchange = ExchangeConfig(topology="full", reload_every=5, ttl=10.0, heartbeat=1.0)
    sessions: dict[str, Session] = {}
    try:
        for name, cfg in cfgs.items():
            torch.manual_seed(len(sessions))
            sessions[name] = Session.join(
                swarm=SWARM, name=name, identity_dir=tmp_path / name, host_maddrs=LOCAL,
                initial_peers=sessions["narrow"].visible_maddrs() if sessions else (), model=gpt(cfg),
                model_cfg=cfg, task="lm", build_model=gpt, kind="multiclass", exchange=exchange,
                distill_cfg=DistillConfig(burn_in=0))
            sessions[name].fetcher.interval = 0.2
        narrow, wide = sessions["narrow"], sessions["wide"]
        # the narrow model's own limits would refuse every tensor of the wide one that is wider than its own
        assert max(p.numel() for p in wide.model.parameters()) > codec.limits_for(narrow.model).max_tensor_numel
        for step, s in enumerate(sessions.values(), 5):
            s.publish_now(step)
        assert eventually(lambda: narrow.teachers.names() == ["wide"] and wide.teachers.names() == ["narrow"], 60)
        x = torch.randint(0, 256, (2, 16))
        for me, other in (("narrow", "wide"), ("wide", "narrow")):
            s = sessions[me]
            stats = s.stats()
            assert (stats["teachers"], stats["fetch_ok"], stats["fetch_failed"]) == (1, 1, 0), (me, stats)
            assert s.fetcher.health == {}
            assert [(i.name, i.model_cfg["width"]) for i in s.teachers.info()] == [(other, cfgs[other]["width"])]
            logits = s.model(x)
            assert s.predict(x).shape == logits.shape == (2, 16, 256)
            assert s.distill_loss(logits, x, step=10).item() > 0
    finally:
        for s in sessions.values():
            s.close()


def test_exchange_config_sets_bans_and_stream_caps(tmp_path):
    exchange = ExchangeConfig(ban_after=2, ban_for=7.0, max_streams_per_peer=2, heartbeat=1.0, ttl=10.0,
                              stall_timeout=9.0, min_fetch_mbit=2.0, download_mbit=0.5)
    s = Session.join(swarm=SWARM, name="cfg", identity_dir=tmp_path / "cfg", host_maddrs=LOCAL,
                     model=build({"width": 16}), model_cfg={"width": 16}, task="toy", build_model=build,
                     kind="multiclass", exchange=exchange, distill_cfg=DistillConfig())
    try:
        assert (s.fetcher.policy.ban_after, s.fetcher.policy.ban_for) == (2, 7.0)
        assert (s.transfer.max_streams_per_peer, s.transfer.ban_for, s.transfer.stall_timeout) == (2, 7.0, 9.0)
        # a big checkpoint gets the time it needs at the slower of min_fetch_mbit and our own download cap
        assert s.fetcher.policy.timeout_for(10_000_000) == pytest.approx(10_000_000 / (0.5e6 / 8))  # 160 s
        assert s.fetcher.policy.timeout_for(1000) == exchange.fetch_timeout  # small ones: fetch_timeout
    finally:
        s.close()
