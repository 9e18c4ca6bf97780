"""The `p2pcod` command. Only this module prints and chooses exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pcod.errors import P2pcodError

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except P2pcodError as err:
        print(f"p2pcod: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("p2pcod: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pcod", description="Peer-to-peer codistillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train M models codistilling in one process (or baselines)")
    p.add_argument("--config", required=True, help="peer recipe TOML, e.g. peers/lm-tiny.toml")
    p.add_argument("--models", type=int, default=2,
                   help="models in the group, m0..m<M-1>; 1 = plain baseline. They learn from each other along "
                        "exchange.topology, as peers do (2 models: each from the other; none: M independent "
                        "models, no exchange; edges: pairs of the names m0, m1, ...)")
    p.add_argument("--ensemble", action="store_true", help="train independent copies, evaluate their average")
    p.add_argument("--fp32-teachers", action="store_true",
                   help="skip the int8 codec for teachers (ablation; distill.teacher_precision still applies)")
    p.add_argument("--run-dir", default=None, help="where metrics and checkpoints go (default runs/<recipe>-...)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=200 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("peer", help="train as a peer of a swarm, exchanging checkpoints with other peers")
    p.add_argument("--config", required=True, help="peer recipe TOML, e.g. peers/lm-tiny.toml")
    p.add_argument("--join", action="append", default=[], metavar="MULTIADDR",
                   help="multiaddr of any peer already in the swarm (repeatable); none: start a new swarm")
    p.add_argument("--listen", action="append", default=[], metavar="MULTIADDR",
                   help="where to listen (default /ip4/0.0.0.0/tcp/0: all interfaces, a free port)")
    p.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                   help="public address to announce when behind NAT/port forwarding")
    p.add_argument("--name", default=None, help="this peer's name in the swarm (default: the host name)")
    p.add_argument("--swarm", default="p2pcod", help="swarm name: peers of different swarms ignore each other")
    p.add_argument("--topology", default=None, help="override exchange.topology (full, ring, ring-bi, ...)")
    p.add_argument("--shard", default="0/1", metavar="I/K", help="train on shard I of K of the task's data")
    p.add_argument("--run-dir", default=None, help="metrics, checkpoints and identity (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--linger", type=float, default=0.0, help="keep serving this many seconds after training")
    p.add_argument("--control", default=None, help="JSON control file (simulator): {\"cut_off_until\": unix time}")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                   help="train on cpu, cuda or auto (cuda when present; teachers in bf16 there). Under torchrun "
                        "--nproc-per-node N the peer is a group of N data-parallel ranks; rank 0 joins the swarm")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key (repeatable)")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("simulate", help="run N real peers on this machine from an experiment spec, then report")
    p.add_argument("spec", help="experiment spec TOML, e.g. topologies/ring-4.toml")
    p.add_argument("--run-dir", default=None, help="where the run goes (default runs/<spec>-<time>)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("report", help="plots and summary.md of a simulation or training run")
    p.add_argument("run_dir")
    p.add_argument("--baseline", default=None,
                   help="another run to compare with (e.g. the independent peers; default: the simulation's own "
                        "RUN_DIR/clean or RUN_DIR/alone when it has one)")
    p.add_argument("--target", type=float, default=None, help="target validation loss (default: the baseline's best)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("churn", help="prediction churn between two finished runs")
    p.add_argument("runs", nargs=2, metavar="RUN_DIR")
    p.set_defaults(func=cmd_churn)

    p = sub.add_parser("inspect", help="show the header of a checkpoint blob, or what a run's checkpoint.ckpt holds")
    p.add_argument("blob", help="an exchanged checkpoint blob, or a run directory's checkpoint.ckpt")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("data", help="data utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synth-ctr", help="write a synthetic click log in the Criteo TSV format")
    d.add_argument("--rows", type=int, required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_synth_ctr)
    return parser


def _default_run_dir(config: str, suffix: str) -> Path:
    return Path("runs") / f"{Path(config).stem}-{suffix}"


class _Progress:
    """A progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, start: int = 0, quiet: bool = False) -> None:
        self.bar = None
        if sys.stderr.isatty() and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.last = start

    def __call__(self, record: dict[str, Any]) -> None:
        keys = ("train_loss", "distill_loss", "val_loss", "teachers", "bytes_in", "bytes_out")
        shown = {k: record[k] for k in keys if k in record}
        if record.get("staleness"):
            shown["stale"] = max(record["staleness"].values())  # steps behind, of the stalest teacher
        if record.get("time"):
            shown["steps/s"] = round(record["step"] / record["time"], 1)
        if self.bar is not None:
            self.bar.update(record["step"] - self.last)
            self.bar.set_postfix(shown)
        elif "val_loss" in record:
            print(f"step {record['step']}: " + " ".join(f"{k}={v}" for k, v in shown.items()), file=sys.stderr)
        self.last = record["step"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    from p2pcod.config import load_recipe
    from p2pcod.local import LocalGroup

    recipe = load_recipe(args.config, args.overrides)
    mode = "ensemble" if args.ensemble else "codistill"
    kind = f"{mode}{args.models}" if args.models > 1 else "baseline"
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config, kind)
    if (run_dir / "checkpoint.ckpt").exists() and not args.resume:
        raise P2pcodError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-dir")
    group = LocalGroup(recipe, run_dir, models=args.models, mode=mode, fp32_teachers=args.fp32_teachers)
    if args.resume and group.resume():
        print(f"resumed {run_dir} at step {group.step}", file=sys.stderr)
    progress = _Progress(recipe.train.steps, group.step)
    try:
        summary = group.run(progress)
    finally:
        progress.close()
        group.close()
    print(json.dumps({"run_dir": str(run_dir), **summary}))
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    import socket

    from p2pcod.config import load_recipe
    from p2pcod.peer import (
        PeerOptions,
        install_signal_handlers,
        join_command,
        join_notes,
        parse_shard,
        routed_addresses,
        run_peer,
    )

    overrides = list(args.overrides) + ([f'exchange.topology="{args.topology}"'] if args.topology else [])
    recipe = load_recipe(args.config, overrides)
    shard, num_shards = parse_shard(args.shard)
    name = args.name or socket.gethostname().split(".")[0] or "peer"
    opts = PeerOptions(
        name=name, swarm=args.swarm, run_dir=Path(args.run_dir or Path("runs") / name), join=args.join,
        listen=args.listen or ["/ip4/0.0.0.0/tcp/0"], announce=args.announce, shard=shard,
        num_shards=num_shards, resume=args.resume, linger=args.linger,
        control=Path(args.control) if args.control else None, device=args.device,
    )
    rank = os.environ.get("RANK", "0") or "0"
    if (opts.run_dir / "checkpoint.ckpt").exists() and not args.resume:
        raise P2pcodError(f"{opts.run_dir} already holds a run: pass --resume or choose another --run-dir")
    install_signal_handlers(opts.stop)
    progress = _Progress(recipe.train.steps) if rank == "0" else _Progress(0, quiet=True)

    def on_start(maddrs: list[str]) -> None:
        print(f"peer {name} in swarm {args.swarm!r} listening on:", file=sys.stderr)
        for a in maddrs:
            print(f"  {a}", file=sys.stderr)
        routed = routed_addresses()  # one answer for the command and its notes
        print("another machine joins with:\n  " + join_command(maddrs, opts, args.config, overrides, routed),
              file=sys.stderr)
        for note in join_notes(maddrs, opts, routed):
            print(f"  {note}", file=sys.stderr)
        sys.stderr.flush()

    try:
        record = run_peer(recipe, opts, on_start=on_start, progress=progress)
    finally:
        progress.close()
    if rank == "0":
        print(json.dumps({"run_dir": str(opts.run_dir), **record}, default=str))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from p2pcod.sim import run_simulation

    run_dir = run_simulation(args.spec, args.run_dir, progress=lambda line: print(line, file=sys.stderr, flush=True),
                             report=not args.no_report)
    print(run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from p2pcod.report import write_report

    print(write_report(args.run_dir, baseline=args.baseline, target=args.target))
    return 0


def cmd_churn(args: argparse.Namespace) -> int:
    from p2pcod.churn import churn_runs

    print(f"{churn_runs(*args.runs):.6f}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from p2pcod import checkpoint, codec
    from p2pcod.errors import CheckpointError, CodecError

    path = Path(args.blob)
    if path.is_dir() and (path / "checkpoint.ckpt").is_file():  # a run directory
        path = path / "checkpoint.ckpt"
    try:
        local = checkpoint.is_checkpoint(path)
        blob = b"" if local else path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if local:  # RUN_DIR/checkpoint.ckpt: what --resume continues from
        out = {"format": "local checkpoint (what --resume continues from), not an exchanged blob",
               "path": str(path), "size": path.stat().st_size, **checkpoint.summary(checkpoint.load(path))}
        print(json.dumps(out, indent=1, default=str))
        return 0
    if not blob.startswith(codec.MAGIC):
        raise CodecError(f"{path} is neither an exchanged checkpoint blob nor a run's checkpoint.ckpt "
                         f"(it starts with {blob[:8]!r})")
    try:
        header = codec.peek(blob)
    except CodecError as err:
        raise CodecError(f"{path}: {err}") from None
    header["digest"] = codec.digest(blob)
    header["size"] = len(blob)
    print(json.dumps(header, indent=1, default=str))
    return 0


def cmd_synth_ctr(args: argparse.Namespace) -> int:
    from p2pcod.tasks.ctr import write_synthetic_ctr

    write_synthetic_ctr(args.out, args.rows, seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
