"""An honest Session against hostile peers that speak the real protocol (p2pcod/adversary.py), on 127.0.0.1.

For every attack: no bad teacher is ever loaded, the honest peer keeps running (its fetch rounds end within
the fetch timeout), the offender is logged and, after repeated offences, banned. The cases of
tests/test_session.py (bit flip, garbage, lying fingerprint or config, a digest not served) are not repeated.
"""

from __future__ import annotations

import logging
import re
import resource
import time

import pytest
import torch
from peerproc import eventually

from p2pcod import codec
from p2pcod.adversary import LOCAL, Adversary, RecordForger, bomb, huge_config, with_kept_value, with_scale
from p2pcod.config import ExchangeConfig
from p2pcod.distill import DistillConfig
from p2pcod.fetcher import Fetcher, FetchPolicy
from p2pcod.session import CODEC_ID, Session
from p2pcod.swarm.dht import Membership
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import Transfer, TransferTimeout
from p2pcod.teachers import TeacherPool
from p2pcod.topology import TopologyConfig, neighbours

SWARM = "t-hostile"
FETCH_TIMEOUT = 1.5
BAN_AFTER = 3


BUILT: list[tuple[dict, str]] = []  # (config, device type) of every model `build` made


def build(cfg):
    torch.manual_seed(cfg.get("seed", 0))
    model = torch.nn.Sequential(torch.nn.Linear(cfg["width"], 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, cfg.get("out", 5)))
    BUILT.append((dict(cfg), model[0].weight.device.type))
    return model


CFG = {"width": 16}




@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    exchange = ExchangeConfig(topology="full", reload_every=5, ttl=10.0, heartbeat=1.0, fetch_timeout=FETCH_TIMEOUT)
    s = Session.join(swarm=SWARM, name="honest", identity_dir=tmp_path_factory.mktemp("honest"), host_maddrs=LOCAL,
                     model=build(CFG), model_cfg=CFG, task="toy", build_model=build, kind="multiclass",
                     exchange=exchange, distill_cfg=DistillConfig())
    s.fetcher.policy.backoff = 0.2  # retry quickly so that the test sees repeated offences
    s.fetcher.policy.ban_after = BAN_AFTER
    s.fetcher.interval = 0.2
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def adversaries(honest, tmp_path):
    made: list[Adversary] = []

    def make(name: str) -> Adversary:
        a = Adversary(SWARM, tmp_path / name, honest.visible_maddrs(), name)
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.close()


@pytest.fixture(scope="module")
def valid():
    state = build({**CFG, "seed": 1}).state_dict()
    return codec.encode(state, {"peer": "x"}), codec.fingerprint(state)


def _flip_last(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


# name -> (mode, blob maker: valid blob -> announced blob, served bytes or None, fragment of the error)
BLOB_ATTACKS = {
    "digest-mismatch": ("serve", lambda b: b, _flip_last, "sha256"),
    "truncated": ("truncated", lambda b: b, None, "sent .* of the"),
    "endless": ("endless", lambda b: b, None, "more than"),
    "stalled": ("stall", lambda b: b, None, "took longer than"),
    "nan-weights": ("serve", lambda b: with_kept_value(b, "0.bias", float("nan")), None, "NaN or Inf"),
    "inf-scale": ("serve", lambda b: with_scale(b, "0.weight", float("inf")), None, "non-finite"),
    "bomb": ("serve", bomb, None, "declares content size"),
}


@pytest.mark.parametrize("attack", sorted(BLOB_ATTACKS))
def test_bad_blob_is_rejected_logged_and_banned(attack, honest, adversaries, valid, caplog):
    caplog.set_level(logging.INFO)
    mode, make_blob, make_served, fragment = BLOB_ATTACKS[attack]
    blob, fp = valid
    announced = make_blob(blob)
    assert announced == blob or codec.digest(announced) != codec.digest(blob)
    bad = adversaries(f"m-{attack}")
    served = make_served(announced) if make_served else None
    t0 = time.monotonic()
    bad.offer(announced, step=5, model_cfg=CFG, fingerprint=fp, mode=mode, served=served)
    health = honest.fetcher.health

    def banned() -> bool:
        assert bad.name not in honest.teachers.names(), "a bad checkpoint became a teacher"
        h = health.get(bad.peer_id)
        return h is not None and h.banned_until > time.monotonic()

    assert eventually(banned, timeout=BAN_AFTER * (FETCH_TIMEOUT + 5) + 15), f"{attack}: not banned"
    elapsed = time.monotonic() - t0
    h = health[bad.peer_id]
    assert h.offences >= BAN_AFTER
    assert pytest.approx(h.banned_until - time.monotonic(), abs=20) == honest.fetcher.policy.ban_for
    assert re.search(fragment, h.last_error), h.last_error
    # every fetch round ended: no more than ban_after fetches, each bounded by the fetch timeout
    assert elapsed < BAN_AFTER * (FETCH_TIMEOUT + 5) + 15
    assert bad.requests >= BAN_AFTER  # each offence was a real fetch over the network
    logged = [r.getMessage() for r in caplog.records if bad.peer_id in r.getMessage()]
    assert any("rejected" in m for m in logged) and any("banning peer" in m for m in logged), logged
    # banned: the same offer is not fetched again, and the honest peer is alive and training
    requests = bad.requests
    rounds = honest.fetcher.stats["rounds"]
    assert eventually(lambda: honest.fetcher.stats["rounds"] >= rounds + 3, timeout=15)
    assert bad.requests == requests
    assert honest.fetcher._thread.is_alive()
    x = torch.randn(4, 16)
    assert torch.isfinite(honest.distill_loss(honest.model(x), x, step=10))
    assert bad.name not in honest.teachers.names()


def test_huge_config_is_refused_before_fetching_and_never_built(honest, adversaries, valid):
    """"huge-config": a record announcing an enormous model config (4 GB of weights) with a small valid blob and
    that blob's fingerprint. Before the fix the blob decoded fine and the TeacherPool then built the announced model;
    now the config is built on the meta device before anything is fetched, refused as an offence, and never built
    for real."""
    blob, fp = valid
    cfg = huge_config("toy", CFG)
    assert cfg == {"width": 16 << 20}  # Linear(16M, 64): 1e9 weights
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    BUILT.clear()
    bad = adversaries("m-huge")
    bad.offer(blob, step=5, model_cfg=cfg, fingerprint=fp)
    h = lambda: honest.fetcher.health.get(bad.peer_id)  # noqa: E731
    assert eventually(lambda: h() is not None and h().offences >= BAN_AFTER, timeout=30)
    assert re.search(r"announced model config has \d+ bytes of weights, over the limit", h().last_error), h().last_error
    assert h().banned_until > time.monotonic()
    assert bad.requests == 0  # refused before a byte was fetched
    assert [device for c, device in BUILT if c == cfg] == ["meta"]  # vetted once (remembered), never built for real
    assert bad.name not in honest.teachers.names() and honest.fetcher._thread.is_alive()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20  # < 1 GiB more at the peak


def test_foreign_architecture_is_loaded_but_never_used(honest, adversaries, caplog):
    """A valid checkpoint of another architecture, announced honestly (hetero swarms are legitimate): it is
    loaded, but a teacher whose logits do not fit the student's is left out of every distillation target."""
    caplog.set_level(logging.WARNING)
    other = adversaries("m-foreign")
    state = build({"width": 16, "out": 7}).state_dict()
    other.offer(codec.encode(state, {}), step=5, model_cfg={"width": 16, "out": 7},
                fingerprint=codec.fingerprint(state))
    assert eventually(lambda: "m-foreign" in honest.teachers.names(), timeout=30)
    x = torch.randn(3, 16)
    logits = honest.model(x)
    assert honest.teachers.predict(x, expect_shape=logits.shape) is None
    assert honest.distill_loss(logits, x, step=10).item() == 0.0
    assert honest.teachers.skipped()["m-foreign"] >= 1
    assert any("m-foreign" in r.getMessage() and "logits shape (3, 7)" in r.getMessage() for r in caplog.records)


def test_identity_claims_and_garbage_records(honest, adversaries, valid, caplog):
    caplog.set_level(logging.WARNING)
    blob, fp = valid
    bob = adversaries("bob")
    bob.offer(blob, step=5, model_cfg=CFG, fingerprint=fp)
    assert eventually(lambda: "bob" in honest.teachers.names(), timeout=30)
    # a second peer claims bob's name, with a newer step: ignored (the name belongs to bob's peer id)
    thief = adversaries("thief")
    newer = codec.encode(build({**CFG, "seed": 3}).state_dict(), {})
    thief.offer(newer, step=50, model_cfg=CFG, fingerprint=fp, name="bob")
    # a raw DHT node stores records under its own key that claim bob's peer id, and schema garbage
    forger = RecordForger(SWARM, honest.visible_maddrs())
    try:
        stolen = {**_record_wire(bob), "name": "bob2", "step": 99}
        for value in (stolen, {"v": 1, "name": "x"}, [1, 2, 3], "junk", {**_record_wire(bob), "size": -1}):
            forger.store(value)
        assert eventually(lambda: any(thief.peer_id in r.getMessage() and "claims the name" in r.getMessage()
                                    for r in caplog.records), timeout=20)
        rounds = honest.fetcher.stats["rounds"]
        assert eventually(lambda: honest.fetcher.stats["rounds"] >= rounds + 5, timeout=20)
        members = honest.members()
        by_id = {}
        for r in members:
            by_id.setdefault(r.peer_id, set()).add(r.name)
        assert by_id[bob.peer_id] == {"bob"}  # the forged "bob2" claiming bob's peer id never got in
        assert all(r.name != "bob2" and r.step != 99 for r in members)
        assert thief.requests == 0 and thief.peer_id not in honest.fetcher.health  # never fetched from
        assert [(i.name, i.step) for i in honest.teachers.info() if i.name == "bob"] == [("bob", 5)]
        assert honest.fetcher._thread.is_alive()
    finally:
        forger.close()


def _record_wire(adv: Adversary) -> dict:
    return {"v": 1, "name": adv.name, "peer_id": adv.peer_id, "step": 1, "digest": "", "size": 0,
            "codec": "p2pcod-int8/1", "task": "toy", "model_cfg": CFG, "fingerprint": "", "time": time.time()}


def test_flood_of_streams_does_not_starve_other_peers(honest, adversaries, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    honest.publish_now(5)
    step, digest, size = honest._published
    flooder = adversaries("m-flood")
    carol_m = Membership(SWARM, identity_dir=tmp_path / "carol", host_maddrs=LOCAL,
                         initial_peers=honest.visible_maddrs())
    carol = Transfer(carol_m)
    try:
        opened = flooder.flood(honest.membership.peer_id, 70)  # silent: more than all handshake slots
        opened += flooder.flood(honest.membership.peer_id, 10, digest=digest)  # requests never read
        assert opened >= 40
        t = honest.transfer.stats
        cap = honest.transfer.max_streams_per_peer
        assert eventually(lambda: t["flood_refused"] + t["banned_refused"] >= opened - cap, timeout=15)
        assert any(flooder.peer_id in r.getMessage() and "more than" in r.getMessage() for r in caplog.records)
        # past ban_after offences the flooder is banned: its next streams are cut without an answer
        assert t["banned"] >= 1
        assert any(flooder.peer_id in r.getMessage() and "banning peer" in r.getMessage() for r in caplog.records)
        refused = t["banned_refused"]
        flooder.flood(honest.membership.peer_id, 3, digest=digest)
        assert eventually(lambda: t["banned_refused"] >= refused + 3, timeout=15)
        # another peer is still served, at once, while the flood holds its streams
        for _ in range(3):
            blob = carol.fetch(honest.membership.peer_id, digest, size, max_bytes=1 << 24, timeout=10)
            assert codec.digest(blob) == digest
        x = torch.randn(2, 16)
        assert torch.isfinite(honest.distill_loss(honest.model(x), x, step=10))
        flooder.stop_flood()  # the flooder's streams end and its slots are freed
        assert eventually(lambda: flooder.peer_id not in honest.transfer._per_peer, timeout=20)
    finally:
        carol.close()
        carol_m.shutdown()


def test_a_peer_that_failed_before_is_fetched_last(valid):
    """A staller is tried after the peers that never failed, so it delays their refresh by at most nothing."""
    blob, fp = valid
    blob2 = codec.encode(build({**CFG, "seed": 4}).state_dict(), {})
    ids = {"p-one": "Qm" + "1" * 44, "p-two": "Qm" + "2" * 44}
    staller, good = neighbours("me", list(ids), 0, TopologyConfig("full"))  # the staller comes first in order
    calls: list[str] = []

    def record(name: str, data: bytes) -> PeerRecord:
        return PeerRecord(name=name, peer_id=ids[name], step=5, digest=codec.digest(data), size=len(data),
                          codec=CODEC_ID, task="toy", model_cfg=CFG, fingerprint=fp, time=time.time())

    records = [record(staller, blob), record(good, blob)]

    def fetch_blob(peer_id, digest, size, max_bytes, timeout):
        calls.append(peer_id)
        if peer_id == ids[staller]:
            raise TransferTimeout("stalled")
        return blob if digest == codec.digest(blob) else blob2

    f = Fetcher(me="me", task="toy", teachers=TeacherPool(build, DistillConfig(), "multiclass"),
                members=lambda: records, fetch_blob=fetch_blob, topology=TopologyConfig("full"), reload_every=5,
                my_step=lambda: 0, policy=FetchPolicy(max_bytes=1 << 24, timeout=1.0, backoff=0.0))
    f.run_once()
    assert calls == [ids[staller], ids[good]] and f.teachers.names() == [good]
    records[1] = record(good, blob2)  # the good peer publishes a new checkpoint
    calls.clear()
    f.run_once()
    assert calls == [ids[good], ids[staller]]
    assert f.health[ids[staller]].offences == 2 and f.held[good] == codec.digest(blob2)


def test_huge_configs_of_the_tasks_pass_their_checks_but_build_tens_of_gb():
    """The adversary's huge configs are within the tasks' maxima (only building them, on meta, shows their size)."""
    from p2pcod.tasks import check_config
    from p2pcod.tasks.ctr import N_INT, CTRNet
    from p2pcod.tasks.lm import GPT, gpt_config

    lm = huge_config("lm", {"layers": 2, "width": 64, "heads": 4, "context": 64})
    check_config({"name": "lm", "seq_len": 64}, lm)
    ctr = huge_config("ctr", {"hidden": [256, 128], "embed_dim": 8})
    check_config({"name": "ctr"}, ctr)
    with torch.device("meta"):
        models = [GPT(gpt_config(lm)), CTRNet(10_000, ctr["embed_dim"], ctr["hidden"], N_INT)]
    for m in models:
        assert sum(t.numel() * t.element_size() for t in m.state_dict().values()) > 20e9
