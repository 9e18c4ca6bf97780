"""The fetcher's choice of whom to fetch from, without a network: records in, fetch calls out."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from p2pcod import codec
from p2pcod.distill import DistillConfig
from p2pcod.errors import P2pcodError
from p2pcod.fetcher import Fetcher, FetchPolicy
from p2pcod.session import CODEC_ID
from p2pcod.swarm.records import PeerRecord
from p2pcod.swarm.transfer import BlobMismatch, BlobTruncated, PeerGone, StreamCut
from p2pcod.teachers import TeacherPool
from p2pcod.topology import TopologyConfig

CFG = {"width": 8}


def build(cfg):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, cfg["width"]), torch.nn.Linear(cfg["width"], 16))


def fetcher(members, fetch_blob) -> Fetcher:
    """A fetcher of task lm with a full topology, no backoff, and no network but `fetch_blob`."""
    return Fetcher(me="me", task="lm", teachers=TeacherPool(build, DistillConfig(), "multiclass"),
                   members=members, fetch_blob=fetch_blob, topology=TopologyConfig("full"), reload_every=5,
                   my_step=lambda: 0, policy=FetchPolicy(max_bytes=1 << 24, timeout=1.0, backoff=0.0))


def test_a_neighbour_of_another_task_is_skipped_with_one_warning(caplog):
    model = build(CFG)
    blob, fp = codec.encode(model.state_dict(), {}), codec.fingerprint(model)

    def record(name: str, peer_id: str, task: str) -> PeerRecord:
        return PeerRecord(name=name, peer_id=peer_id, step=5, digest=codec.digest(blob), size=len(blob),
                          codec=CODEC_ID, task=task, model_cfg=CFG, fingerprint=fp, time=time.time())

    records = [record("same", "Qm" + "1" * 44, "lm"), record("other", "Qm" + "2" * 44, "ctr")]
    calls: list[str] = []

    def fetch_blob(peer_id, digest, size, max_bytes, timeout):
        calls.append(peer_id)
        return blob

    f = fetcher(lambda: records, fetch_blob)
    with caplog.at_level(logging.WARNING, logger="p2pcod.fetcher"):
        f.run_once()
        f.run_once()
    assert calls == ["Qm" + "1" * 44] and f.teachers.names() == ["same"]
    assert f.neighbours == ["same"]
    warnings = [r.getMessage() for r in caplog.records if "other" in r.getMessage()]
    assert warnings == ["skipping peer other: its task is 'ctr', mine is 'lm'"]


def test_a_peer_holding_the_announced_model_in_bf16_is_accepted():
    """The fingerprint names dtypes: a neighbour training the same architecture in bf16 is the same model, while
    other shapes under the same config are not."""
    model = build(CFG)
    f = fetcher(lambda: [], None)

    def record(fp: str) -> PeerRecord:
        return PeerRecord(name="n", peer_id="Qm" + "1" * 44, step=5, digest="0" * 64, size=1000, codec=CODEC_ID,
                          task="lm", model_cfg=CFG, fingerprint=fp, time=time.time())

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        limits = f.limits_for(record(codec.fingerprint(model.to(dtype))))
        assert limits.max_tensors == 3 and limits.max_tensor_numel == 16 * 8
    other = build({"width": 12})
    with pytest.raises(P2pcodError, match="does not match the announced model config"):
        f.limits_for(record(codec.fingerprint(other)))


@pytest.mark.parametrize("error,offence", [
    (PeerGone("cannot open a blob stream to Qm...: P2PDaemonError: failed to find any peer in table"), False),
    (PeerGone("peer Qm... sent 64000 of the 3145745 bytes of blob 727c; it answers no more: the peer went away"),
     False),
    (BlobMismatch("blob from Qm... has sha256 0f0f, not abab"), True),
    (BlobTruncated("peer Qm... sent 64000 of the 3145745 bytes of blob 727c"), True),  # cut, and still answers
    (StreamCut("Qm... closed the stream early (0 header bytes)"), True),
])
def test_a_neighbour_that_went_away_is_no_offender(error, offence, caplog):
    """A fetch failing because the neighbour is unreachable or left is logged as such and never leads to a ban; a
    bad blob (digest mismatch, a stream cut by a peer that still answers) is still an offence."""
    model = build(CFG)
    blob = codec.encode(model.state_dict(), {})
    rec = PeerRecord(name="n", peer_id="Qm" + "1" * 44, step=5, digest=codec.digest(blob), size=len(blob),
                     codec=CODEC_ID, task="lm", model_cfg=CFG, fingerprint=codec.fingerprint(model), time=time.time())

    def fetch_blob(peer_id, digest, size, max_bytes, timeout):
        raise error

    f = fetcher(lambda: [rec], fetch_blob)  # backoff 0: every round tries again; ban_after 5
    with caplog.at_level(logging.INFO, logger="p2pcod.fetcher"):
        for _ in range(8):
            f.run_once()
    h = f.health[rec.peer_id]
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    if offence:
        assert h.offences == 5 and h.banned_until > time.monotonic() and f.stats["banned"] == 1  # then no tries
        assert any("rejected" in m for _, m in logged)
    else:
        assert (h.offences, h.failures, h.banned_until, f.stats["failed"], f.stats["banned"]) == (0, 0, 0.0, 0, 0)
        assert h.unreachable == 8 and f.stats["unreachable"] == 8
        assert all(level == logging.INFO and "rejected" not in m for level, m in logged), logged
        assert all("neighbour n (Qm" in m and "is unreachable or gone" in m for _, m in logged), logged
    assert f.teachers.names() == []
