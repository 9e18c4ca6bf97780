"""Swarm membership on real hivemind DHT nodes (127.0.0.1 only): records, expiry, restarts, attacks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from peerproc import eventually

from p2pcod.errors import ConfigError, RecordError, SwarmError
from p2pcod.swarm.dht import Membership, PeerRecordValidator, check_entry, peer_id_of_owner, peers_key
from p2pcod.swarm.records import PeerRecord, parse_wire, tombstone_wire

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
SWARM = "t-swarm"


def make_record(m: Membership | str, name: str, step: int = 0, **kw) -> PeerRecord:
    fields = dict(
        name=name,
        peer_id=m if isinstance(m, str) else m.peer_id,
        step=step,
        digest="",
        size=0,
        codec="p2pcod-int8/1",
        task="lm",
        model_cfg={"layers": 2, "width": [8, 16], "act": "gelu"},
        fingerprint="ab" * 32,
        time=time.time(),
    )
    fields.update(kw)
    return PeerRecord(**fields)


def steps_by_name(m: Membership) -> dict[str, int]:
    return {r.name: r.step for r in m.members()}


@pytest.fixture
def nodes(tmp_path) -> Iterator[Callable[..., Membership]]:
    """Factory of Memberships on loopback; every one is shut down at the end, even on failure."""
    made: list[Membership] = []

    def make(name: str, *, via: Membership | None = None, ttl: float = 30.0) -> Membership:
        m = Membership(
            SWARM,
            identity_dir=tmp_path / name,
            host_maddrs=LOCAL,
            ttl=ttl,
            initial_peers=via.visible_maddrs() if via else (),
        )
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.shutdown()


# ---- records (pure) -------------------------------------------------------------------------------
def test_record_round_trip_and_typed_rejections():
    rec = make_record(
        "QmStxopftxCy9zc5gbbkLPFvjVqX74JHPp9R2CwEWq5pU9", "alice", 7, digest="0f" * 32, size=123
    )
    back = PeerRecord.from_wire(MSGPackSerializer.loads(MSGPackSerializer.dumps(rec.to_wire())))
    assert back == rec
    bad = {
        "name": "a b",
        "step": -1,
        "digest": "XYZ",
        "size": "5",
        "time": float("nan"),
        "model_cfg": {"x": object()},
        "task": "",
        "peer_id": "0OIl",
    }
    for field, value in bad.items():
        wire = rec.to_wire() | {field: value}
        with pytest.raises(RecordError, match=field):
            PeerRecord.from_wire(wire)
    with pytest.raises(RecordError, match="unknown"):
        PeerRecord.from_wire(rec.to_wire() | {"evil": 1})
    with pytest.raises(RecordError, match="'v'"):
        PeerRecord.from_wire(rec.to_wire() | {"v": 2})
    with pytest.raises(RecordError, match="size"):  # a digest without a size is inconsistent
        PeerRecord.from_wire(rec.to_wire() | {"size": 0})
    with pytest.raises(RecordError, match="deeper"):
        PeerRecord.from_wire(rec.to_wire() | {"model_cfg": {"a": [[[[[1]]]]]}})
    assert parse_wire(tombstone_wire(rec.peer_id, 5.0)) is None


def test_validator_binds_record_to_signer_and_schema(caplog):
    caplog.set_level(logging.WARNING)
    key = RSAPrivateKey()
    subkey = RSASignatureValidator(key).local_public_key
    me = peer_id_of_owner(subkey)
    other = peer_id_of_owner(RSASignatureValidator(RSAPrivateKey()).local_public_key)
    validator = PeerRecordValidator(SWARM)
    key_id = DHTID.generate(source=peers_key(SWARM)).to_bytes()

    def ok(value, sub=subkey, key_bytes=key_id) -> bool:
        record = DHTRecord(
            key_bytes, MSGPackSerializer.dumps(sub), MSGPackSerializer.dumps(value), get_dht_time()
        )
        return validator.validate(record)

    assert ok(make_record(me, "me").to_wire())
    assert ok(tombstone_wire(me, 1.0))
    assert not ok(make_record(other, "me").to_wire())  # someone else's peer id
    assert not ok(make_record(me, "me").to_wire(), sub=b"plain-subkey")  # unsigned subkey
    assert not ok({"garbage": True})
    assert not ok(make_record(me, "me", model_cfg={"blob": "x" * 1000, "more": ["y" * 1000] * 20}).to_wire())
    assert ok({"anything": 1}, key_bytes=DHTID.generate(source="another/key").to_bytes())  # not our key
    with pytest.raises(RecordError, match="signed by"):
        check_entry(subkey, make_record(other, "x").to_wire())
    # the offender (the signer of the subkey) is logged once, by peer id, with the reason
    refusals = [r.getMessage() for r in caplog.records if "refusing a peer record" in r.getMessage()]
    assert len([m for m in refusals if f"from peer {me}" in m]) == 1
    assert any(f"from peer {me}" in m and f"claims peer_id {other!r}" in m for m in refusals)
    assert any("from subkey" in m for m in refusals)  # the unsigned one


def test_bad_swarm_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="swarm"):
        Membership("bad swarm!", identity_dir=tmp_path / "x", host_maddrs=LOCAL)


# ---- real DHT nodes ---------------------------------------------------------------------------------
def test_members_see_each_other_and_records_expire(nodes):
    a = nodes("a")
    b = nodes("b", via=a, ttl=3.0)  # bob's records live 3 s without a heartbeat
    assert a.peer_id != b.peer_id
    assert a.announce(make_record(a, "alice", 3)) and b.announce(make_record(b, "bob", 4))
    for m in (a, b):
        assert eventually(lambda m=m: steps_by_name(m) == {"alice": 3, "bob": 4}, timeout=2.5)
    assert {r.peer_id for r in a.members()} == {a.peer_id, b.peer_id}

    t0 = time.monotonic()
    assert eventually(lambda: "bob" not in steps_by_name(a), timeout=8)
    assert time.monotonic() - t0 > 0.5  # it did not vanish at once
    assert steps_by_name(a) == {"alice": 3}

    assert b.announce(make_record(b, "bob", 6))  # a heartbeat brings it back
    assert eventually(lambda: steps_by_name(a).get("bob") == 6, timeout=2.5)
    b.leave()  # and leaving removes it before its expiry
    assert eventually(lambda: "bob" not in steps_by_name(a), timeout=2.0)
    assert a.stats["tombstones"] >= 1


def test_restart_keeps_peer_id_and_overwrites_own_record(nodes, tmp_path):
    a = nodes("a")
    b = nodes("b", via=a)
    first_id = b.peer_id
    assert b.announce(make_record(b, "bob", 10))
    assert eventually(lambda: steps_by_name(a).get("bob") == 10)
    b.shutdown()
    b.shutdown()  # idempotent
    b2 = nodes("b", via=a)
    assert b2.peer_id == first_id
    assert b2.announce(make_record(b2, "bob", 2))  # a lower step, but a newer announce: it wins
    assert eventually(
        lambda: (
            [(r.name, r.step) for r in a.members()] == [("bob", 2)]
            or sorted((r.name, r.step) for r in a.members()) == [("bob", 2)]
        )
    )
    assert [r.peer_id for r in a.members() if r.name == "bob"] == [first_id]


def test_hostile_writer_cannot_overwrite_or_inject(nodes):
    a = nodes("a")
    b = nodes("b", via=a)
    assert a.announce(make_record(a, "alice", 3))
    assert b.announce(make_record(b, "bob", 4))
    key = peers_key(SWARM)
    attacker_key = RSASignatureValidator(RSAPrivateKey())
    evil = hivemind.DHT(
        initial_peers=a.visible_maddrs(), start=True, host_maddrs=LOCAL, record_validators=[attacker_key]
    )
    try:
        found = evil.get(key, latest=True)
        victim_subkey = next(s for s, v in found.value.items() if v.value.get("name") == "alice")
        forged = make_record(a, "alice", 999).to_wire()
        late = get_dht_time() + 120
        evil.store(key, forged, late, subkey=victim_subkey)  # no valid signature for alice's key
        fake_sig = forged | {"pad": b"[signature:AAAA]"}
        evil.store(key, fake_sig, late, subkey=victim_subkey)
        # garbage under the attacker's own (signed) subkey: wrong schema, or claiming alice's peer id
        own = attacker_key.local_public_key
        for garbage in ({"v": 1, "name": "x"}, [1, 2, 3], "junk", make_record(a, "mallory", 1).to_wire()):
            evil.store(key, garbage, late, subkey=own)
            time.sleep(0.1)
        evil.store(key, "unsigned junk", late, subkey=b"plain")
        for m in (a, b):
            records = m.members()
            assert {(r.name, r.step) for r in records} == {("alice", 3), ("bob", 4)}
            raw = m.dht.get(key, latest=True)  # below our own checks: the DHT nodes refused the garbage
            assert set(raw.value) == {a._subkey, b._subkey} and victim_subkey == a._subkey
            assert raw.value[a._subkey].value["step"] == 3
    finally:
        evil.shutdown()


def test_bootstrap_peer_is_not_special(nodes):
    a = nodes("a")
    b = nodes("b", via=a)
    c = nodes("c", via=a)
    for m, name in ((a, "a"), (b, "b"), (c, "c")):
        assert m.announce(make_record(m, name, 1))
    assert eventually(lambda: set(steps_by_name(b)) == {"a", "b", "c"})
    a.shutdown()
    assert b.announce(make_record(b, "b", 2)) and c.announce(make_record(c, "c", 2))
    for m in (b, c):
        assert eventually(
            lambda m=m: {k: v for k, v in steps_by_name(m).items() if k != "a"} == {"b": 2, "c": 2}
        )


def test_unreachable_initial_peers_is_a_swarm_error_naming_them(tmp_path):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmStxopftxCy9zc5gbbkLPFvjVqX74JHPp9R2CwEWq5pU9"
    t0 = time.monotonic()
    with pytest.raises(SwarmError, match=r"tcp/9.*\(attempt 4\)"):  # retried, then given up
        Membership(
            SWARM, identity_dir=tmp_path / "x", host_maddrs=LOCAL, initial_peers=[dead], start_timeout=20
        )
    assert time.monotonic() - t0 < 25


def test_joiner_retries_until_a_late_bootstrap_peer_answers(tmp_path):
    """hivemind pings initial peers once (3 s): a joiner must retry while a busy bootstrap peer comes up."""
    import socket
    import threading

    from hivemind.p2p import PeerID

    from p2pcod.swarm.dht import load_identity

    identity, _ = load_identity(tmp_path / "boot")
    with socket.socket() as s:  # a free port for the bootstrap peer, known before it starts
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    boot_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PeerID.from_identity(identity.read_bytes()).to_base58()}"
    made: list[Membership] = []
    errors: list[BaseException] = []

    def join() -> None:
        try:
            made.append(Membership(SWARM, identity_dir=tmp_path / "joiner", host_maddrs=LOCAL,
                                   initial_peers=[boot_addr], start_timeout=60))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    joiner = threading.Thread(target=join)
    joiner.start()
    try:
        time.sleep(5.0)  # the joiner's first bootstrap attempt fails meanwhile
        made.append(Membership(SWARM, identity_dir=tmp_path / "boot", host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"]))
        joiner.join(60)
        assert not joiner.is_alive() and errors == [] and len(made) == 2
        boot, joined = made[1], made[0]
        assert joined.announce(make_record(joined, "j", 1))
        assert eventually(lambda: steps_by_name(boot).get("j") == 1)
    finally:
        joiner.join(60)
        for m in made:
            m.shutdown()
