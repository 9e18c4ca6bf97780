"""Codistilled peers against the same peers alone, at equal steps and at equal wall-clock time (a script, not a test).

    python benchmarks/wallclock.py topologies/ring-4.toml topologies/full-4.toml --seeds 0 1
    python benchmarks/wallclock.py topologies/demo-3.toml --seeds 0 1 2 --variants defaults exact

For every spec, seed and variant it runs `p2pcod simulate` on a copy of the spec (train.seed set; variant
"exact" sets the paper's exact distillation: every teacher, every example, fp32) into
runs/wallclock/<spec>-<variant>-s<seed>; the "defaults" run also runs the same peers alone (compare_alone),
and every variant of a seed is compared with that one alone run. Real peers on 127.0.0.1 share this machine's
cores, the swarm and its alone run one after the other. Prints one markdown table; runs that finished are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pcod.report import equal_time_losses, load_run  # noqa: E402

RUNS = ROOT / "runs" / "wallclock"
VARIANTS = {
    "defaults": {},
    "exact": {"teachers_per_step": 0, "batch_fraction": 1.0, "teacher_precision": "fp32"},
}


def dump_toml(table: dict[str, Any], prefix: str = "") -> str:
    """TOML text of nested tables of scalars and lists (what a simulator spec without [[peer]] holds)."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in table.items():
        if isinstance(v, dict):
            out.append(dump_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out)


def run(spec: Path, variant: str, seed: int) -> Path:
    name = f"{spec.stem}-{variant}-s{seed}"
    run_dir = RUNS / name
    if (run_dir / "summary.md").exists():
        return run_dir
    raw = tomllib.loads(spec.read_text())
    if "peer" in raw or "fault" in raw:
        raise SystemExit(f"{spec}: specs with [[peer]] or [[fault]] tables are not supported here")
    swarm = raw["swarm"]
    swarm.setdefault("set", {}).setdefault("train", {})["seed"] = seed
    swarm["set"].setdefault("distill", {}).update(VARIANTS[variant])
    recipe = ROOT / swarm["recipe"]  # as the simulator resolves it: the working directory, else the spec's
    swarm["recipe"] = str(recipe if recipe.exists() else spec.resolve().parent / swarm["recipe"])
    swarm["compare_alone"] = variant == "defaults"
    swarm.pop("baseline", None)
    if variant != "defaults":
        swarm["baseline"] = str(run(spec, "defaults", seed) / "alone")
    RUNS.mkdir(parents=True, exist_ok=True)
    copy = RUNS / f"{name}.toml"
    copy.write_text(dump_toml(raw) + "\n")
    print(f"$ p2pcod simulate {copy.relative_to(ROOT)}", flush=True)
    subprocess.run([sys.executable, "-m", "p2pcod", "simulate", str(copy), "--run-dir", str(run_dir)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run_dir


def row(spec: Path, variant: str, seed: int) -> str:
    run_dir = run(spec, variant, seed)
    swarm, alone = load_run(run_dir), load_run(RUNS / f"{spec.stem}-defaults-s{seed}" / "alone")
    finals = [p.val_curve()[-1][1] for p in swarm.peers.values() if p.val_curve()]
    alone_finals = [p.val_curve()[-1][1] for p in alone.peers.values() if p.val_curve()]
    rates = [p.steps_per_s() for p in swarm.peers.values() if p.steps_per_s()]
    alone_rates = [p.steps_per_s() for p in alone.peers.values() if p.steps_per_s()]
    eq = equal_time_losses(swarm, alone)
    at_time = "-" if eq is None else f"{eq[1]:.4f} vs {eq[2]:.4f} at {eq[0]:.0f} s ({eq[1] - eq[2]:+.4f})"
    return (f"| {spec.stem} | {variant} | {seed} | {np.mean(finals):.4f} vs {np.mean(alone_finals):.4f} "
            f"({np.mean(finals) - np.mean(alone_finals):+.4f}) | {at_time} | "
            f"{np.mean(rates) / np.mean(alone_rates):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", type=Path)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["defaults"], choices=list(VARIANTS))
    args = ap.parse_args()
    lines = ["| spec | distillation | seed | final val, mean of peers: swarm vs alone (equal steps) | "
             "mean val at equal wall-clock time: swarm vs alone | steps/s swarm / alone |", "|---|---|---|---|---|---|"]
    for spec in args.specs:
        for seed in args.seeds:
            for variant in args.variants:
                lines.append(row(spec, variant, seed))
                print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
