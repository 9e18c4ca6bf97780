"""Small pieces of the peer command line: shard parsing, names, the printed join command."""

import shlex
from pathlib import Path

import pytest

from p2pcod.cli import build_parser, main
from p2pcod.errors import ConfigError
from p2pcod.peer import PeerOptions, join_command, parse_shard


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
    cmd = join_command(maddrs, opts, "peers/lm-tiny.toml")
    assert "--join /ip4/192.0.2.10/tcp/31337/p2p/QmX" in cmd and "127.0.0.1" not in cmd
    assert "--swarm lab" in cmd and "--shard 1/3" in cmd and "--config peers/lm-tiny.toml" in cmd
    # a peer that only listens on loopback can only offer loopback
    assert "--join /ip4/127.0.0.1/tcp/31337/p2p/QmX" in join_command(maddrs[:1], opts, "r.toml")


@pytest.mark.parametrize("shard,num_shards,expect", [(0, 1, "0/1"), (0, 2, "1/2"), (2, 3, "0/3")])
def test_the_printed_join_command_is_one_the_cli_accepts(shard, num_shards, expect):
    """It must run as printed: a valid shard (1/1 would not be), the recipe's overrides and the swarm."""
    opts = PeerOptions(name="alice", swarm="my lab", shard=shard, num_shards=num_shards, run_dir=Path("runs/a"))
    overrides = ['exchange.topology="ring"', "model.hidden=[64, 32]"]
    cmd = join_command(["/ip4/192.0.2.10/tcp/31337/p2p/QmX"], opts, "peers/lm-tiny.toml", overrides)
    argv = shlex.split(cmd)
    assert argv[:2] == ["p2pcod", "peer"]
    args = build_parser().parse_args(argv[1:])
    assert args.overrides == overrides and args.swarm == "my lab" and args.shard == expect
    assert args.join == ["/ip4/192.0.2.10/tcp/31337/p2p/QmX"]
    i, k = parse_shard(args.shard)
    PeerOptions(name="bob", shard=i, num_shards=k)  # raises if the shard is impossible


def test_cli_errors_name_the_problem(capsys, tmp_path):
    assert main(["peer", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["churn", str(tmp_path), str(tmp_path)]) == 2
    assert "predictions.npy" in capsys.readouterr().err
