"""No orphans: a `p2pcod peer` killed with SIGKILL takes its DHT process and p2p daemon along, and a peer whose
identity or listen port is still held by another process says so and stops instead of starting a second swarm."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from peerproc import PeerProc, free_port, group_members, wait_for

from p2pcod.errors import SwarmError
from p2pcod.swarm import lifetime
from p2pcod.swarm.dht import Membership
from p2pcod.swarm.lifetime import IdentityLock, wait_ports_free


@pytest.fixture
def swarm_name():
    return f"t{uuid.uuid4().hex[:8]}"


def daemons_of(identity: Path) -> list[int]:
    """Live p2pd processes started with this identity (p2pd's `-id=<identity file>` argument)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if f"-id={identity}".encode() in argv:  # a zombie's command line is empty
            found.append(int(entry.name))
    return found


def processes_of(peer: PeerProc) -> set[int]:
    """The peer's live processes: its process group (the peer, its forked DHT process, p2pd) and its daemons."""
    return set(group_members(peer.pid)) | set(daemons_of(peer.run_dir / "identity" / "p2p.key"))


# ---- the identity and port guards, in this process ---------------------------------------------------
def test_an_identity_is_held_by_one_holder_at_a_time(tmp_path):
    first = IdentityLock(tmp_path, time.monotonic())
    t0 = time.monotonic()
    with pytest.raises(SwarmError, match=rf"identity {re.escape(str(tmp_path))} is in use by process {os.getpid()}"):
        IdentityLock(tmp_path, time.monotonic() + 0.5)  # waits out its grace period, then names the holder
    assert 0.4 < time.monotonic() - t0 < 5
    first.release()
    first.release()  # idempotent
    IdentityLock(tmp_path, time.monotonic()).release()  # free again


def test_a_listen_port_held_by_another_process_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lifetime, "HELD_GRACE", 0.5)
    with socket.socket() as holder:  # bound the way p2pd binds: SO_REUSEPORT would let a second daemon share it
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        maddr = f"/ip4/127.0.0.1/tcp/{port}"
        with pytest.raises(SwarmError, match=rf"cannot listen on {maddr}: port {port} is held by another process"):
            Membership("t-orphans", identity_dir=tmp_path / "x", host_maddrs=[maddr])
        IdentityLock(tmp_path / "x", time.monotonic()).release()  # the failed start let go of the identity
    wait_ports_free([maddr, "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/9/quic"], time.monotonic())  # free now


# ---- real peers -----------------------------------------------------------------------------------------
def _joined_on_a_fixed_port(tmp_path, swarm_name, procs) -> tuple[PeerProc, str]:
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    peer = PeerProc(tmp_path / "p0", "p0", swarm_name, listen=listen)
    procs.append(peer)
    peer.wait_joined()
    return peer, listen


@pytest.mark.slow
def test_kill_9_takes_the_dht_process_and_p2pd_along(tmp_path, swarm_name, procs):
    peer, listen = _joined_on_a_fixed_port(tmp_path, swarm_name, procs)
    peer_id = peer.info()["peer_id"]
    identity = peer.run_dir / "identity" / "p2p.key"
    before = processes_of(peer)
    assert len(before) >= 3 and len(daemons_of(identity)) == 1, before  # the peer, its DHT process, p2pd
    os.kill(peer.pid, signal.SIGKILL)  # the peer process only, not its group
    peer.proc.wait(10)
    # restarted at once on the same identity and port (it waits for the old processes to let go of both)
    again = PeerProc(peer.run_dir, "p0", swarm_name, listen=listen, resume=True)
    procs.append(again)
    t0 = time.monotonic()
    wait_for(lambda: not before & processes_of(peer), 15, "the killed peer's DHT process and p2pd to exit")
    assert time.monotonic() - t0 < 15
    again.wait_joined()
    assert again.info()["peer_id"] == peer_id
    assert len(daemons_of(identity)) == 1  # one daemon on the port, not a second beside a leftover
    assert again.terminate() == 0, again.stderr()[-3000:]
    assert again.left_behind == []


@pytest.mark.slow
def test_a_second_peer_on_a_held_identity_and_port_stops_naming_them(tmp_path, swarm_name, procs):
    first, listen = _joined_on_a_fixed_port(tmp_path, swarm_name, procs)
    second = PeerProc(first.run_dir, "p0", swarm_name, listen=listen, resume=True)  # the issue's --resume
    procs.append(second)
    wait_for(lambda: not second.alive(), 90, "the second peer to stop")
    err = second.stderr()
    assert second.proc.returncode == 2, err[-3000:]
    identity_dir = first.run_dir / "identity"
    assert f"p2pcod: error: peer identity {identity_dir} is in use by process {first.pid}" in err, err[-3000:]
    # the first peer is untouched: still the only daemon of its identity, still training
    assert first.alive() and len(daemons_of(identity_dir / "p2p.key")) == 1
    step = first.last().get("step", 0)
    wait_for(lambda: first.last().get("step", 0) > step, 60, "the first peer to train on")
    assert first.terminate() == 0, first.stderr()[-3000:]
    assert first.left_behind == []
