"""Small pieces of the peer command line: shard parsing, names, the printed join command."""

import ipaddress
import shlex
from pathlib import Path

import pytest

from p2pcod.cli import build_parser, main
from p2pcod.errors import ConfigError
from p2pcod.peer import PeerOptions, join_address, join_command, join_notes, parse_shard, routed_addresses


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    assert parse_shard(" 0 / 1 ") == (0, 1)
    with pytest.raises(ConfigError, match="I/K"):
        parse_shard("1-4")
    with pytest.raises(ConfigError, match="shard"):
        PeerOptions(name="a", shard=4, num_shards=4)


def test_peer_names_are_checked():
    with pytest.raises(ConfigError, match="--name"):
        PeerOptions(name="no spaces please")
    assert PeerOptions(name="alice-1.b_2").name == "alice-1.b_2"


def test_join_command_prefers_a_reachable_address():
    opts = PeerOptions(name="alice", swarm="lab", num_shards=3, run_dir=Path("runs/alice"))
    maddrs = ["/ip4/127.0.0.1/tcp/31337/p2p/QmX", "/ip4/192.0.2.10/tcp/31337/p2p/QmX"]
    cmd = join_command(maddrs, opts, "peers/lm-tiny.toml", routed=())
    assert "--join /ip4/192.0.2.10/tcp/31337/p2p/QmX" in cmd and "127.0.0.1" not in cmd
    assert "--swarm lab" in cmd and "--config peers/lm-tiny.toml" in cmd
    # a peer that only listens on loopback can only offer loopback
    assert "--join /ip4/127.0.0.1/tcp/31337/p2p/QmX" in join_command(maddrs[:1], opts, "r.toml", routed=())
    assert join_notes(maddrs, opts, routed=())[1:] == []  # no other address worth listing


def test_a_second_interface_is_not_proposed_and_is_listed():
    """Sorted, a container bridge (172.17.0.1) comes first; the address the default route uses is the one printed."""
    opts = PeerOptions(name="alice", num_shards=2)
    maddrs = [f"/ip4/{ip}/tcp/31337/p2p/QmX" for ip in ("10.8.0.2", "127.0.0.1", "169.254.7.7", "172.17.0.1",
                                                         "192.168.1.20")] + ["/ip6/fe80::1/tcp/31337/p2p/QmX"]
    cmd = join_command(maddrs, opts, "r.toml", routed={"192.168.1.20"})
    assert "--join /ip4/192.168.1.20/tcp/31337/p2p/QmX " in cmd
    notes = join_notes(maddrs, opts, routed={"192.168.1.20"})
    assert notes[-1] == ("# other addresses this peer listens on (if the one above is not reachable from the other "
                         "machine): /ip4/10.8.0.2/tcp/31337/p2p/QmX /ip4/172.17.0.1/tcp/31337/p2p/QmX")
    assert all(n.startswith("# ") for n in notes)  # pasted along, they are shell comments


@pytest.mark.parametrize("listed,expect", [
    (["10.0.0.5", "1.2.3.4"], "1.2.3.4"),  # without a default route: public before private
    (["2606:4700::1111", "1.2.3.4"], "1.2.3.4"),  # IPv4 before IPv6
    (["127.0.0.1", "::1"], "127.0.0.1"),  # nothing else: loopback, in the peer's order
])
def test_join_address_ranking(listed, expect):
    maddrs = [f"/ip{6 if ':' in ip else 4}/{ip}/tcp/1/p2p/QmX" for ip in listed]
    address, others = join_address(maddrs, routed=())
    assert address.split("/")[2] == expect and len(others) == len(listed) - 1


def test_routed_addresses_are_local_ips():
    for ip in routed_addresses():  # empty on a host without a default route
        ipaddress.ip_address(ip)


@pytest.mark.parametrize("shard,num_shards,expect", [(0, 1, "0/1"), (0, 2, "1/2"), (1, 2, "0/2"), (2, 3, "I/3")])
def test_the_printed_join_command_is_one_the_cli_accepts(shard, num_shards, expect):
    """It must parse as printed (the recipe's overrides and the swarm quoted); the shard is one a second peer can
    take as is (never 1/1) or, with K > 2, the placeholder I that the notes explain."""
    opts = PeerOptions(name="alice", swarm="my lab", shard=shard, num_shards=num_shards, run_dir=Path("runs/a"))
    overrides = ['exchange.topology="ring"', "model.hidden=[64, 32]"]
    cmd = join_command(["/ip4/192.0.2.10/tcp/31337/p2p/QmX"], opts, "peers/lm-tiny.toml", overrides, routed=())
    argv = shlex.split(cmd)
    assert argv[:2] == ["p2pcod", "peer"]
    args = build_parser().parse_args(argv[1:])
    assert args.overrides == overrides and args.swarm == "my lab" and args.shard == expect
    assert args.join == ["/ip4/192.0.2.10/tcp/31337/p2p/QmX"]
    if expect.startswith("I/"):
        with pytest.raises(ConfigError, match=r"replace I by a shard from 0 to 2 that no other peer trains on"):
            parse_shard(args.shard)
        notes = join_notes(["/ip4/192.0.2.10/tcp/1/p2p/QmX"], opts, routed=())
        assert "(this peer trains on 2/3; it knows of no other peer yet)" in notes[0]
        return
    i, k = parse_shard(args.shard)
    assert i != shard or k == 1  # never this peer's own shard
    PeerOptions(name="bob", shard=i, num_shards=k)  # raises if the shard is impossible


def test_cli_errors_name_the_problem(capsys, tmp_path):
    assert main(["peer", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["churn", str(tmp_path), str(tmp_path)]) == 2
    assert "predictions.npy" in capsys.readouterr().err
