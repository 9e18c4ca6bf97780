"""Reproduce the paper's results at small scale on this machine (a script, not a test).

    python benchmarks/paper.py all --jobs 2          # every experiment, then docs/RESULTS.md figures
    python benchmarks/paper.py steps|split|reload|churn|int8 [--steps N] [--jobs J]
    python benchmarks/paper.py cost [--seeds 0 1 2] [--variants exact defaults k=1 f=0.25 ...]
                                                           # cheaper distillation settings vs the exact mean

Each experiment runs `p2pcod train` jobs (in parallel, one torch thread each) into
runs/paper/<experiment>/<run>, then prints a markdown table and writes a PNG into docs/.
Runs that already finished are reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "paper"
DOCS = ROOT / "docs"
FIG_SUFFIX = ""
EXTRA_SETS: list[str] = []
LM_SETS: list[str] = []  # overrides for the lm runs only (--corpus)
sys.path.insert(0, str(ROOT))

from p2pcod.churn import churn_runs, mean_and_half_range  # noqa: E402
from p2pcod.trainer import read_metrics  # noqa: E402


def train(run_dir: Path, recipe: str, models: int, sets: list[str], ensemble: bool = False,
          fp32_teachers: bool = False) -> Path:
    if (run_dir / "predictions.npy").exists():
        return run_dir
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # an unfinished run: start it again
    cmd = [sys.executable, "-m", "p2pcod", "train", "--config", str(ROOT / "peers" / recipe),
           "--models", str(models), "--run-dir", str(run_dir), "--set", "train.threads=1"]
    for s in EXTRA_SETS + (LM_SETS if recipe.startswith("lm") else []) + sets:
        cmd += ["--set", s]
    if ensemble:
        cmd.append("--ensemble")
    if fp32_teachers:
        cmd.append("--fp32-teachers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run_dir


def run_all(jobs: list[tuple], parallel: int) -> list[Path]:
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: train(*job[:4], **(job[4] if len(job) > 4 else {})), jobs))


def curve(run_dir: Path, key: str = "val_loss") -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if key in r]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows])


def steps_to(run_dir: Path, target: float, key: str = "val_loss") -> int | None:
    steps, vals = curve(run_dir, key)
    hit = np.nonzero(vals <= target + 1e-9)[0]
    return int(steps[hit[0]]) if hit.size else None


def plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path, target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, linewidth=1.8)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats per byte)" if "lm" in title else "validation loss")
    ax.set_title(f"{title} [{FIG_SUFFIX.strip('-')}]" if FIG_SUFFIX else title)
    lows = [y[len(y) // 3:].min() for _, y in curves.values() if len(y)]
    highs = [y[len(y) // 3:].max() for _, y in curves.values() if len(y)]
    if lows:
        pad = 0.05 * (max(highs) - min(lows) + 1e-9)
        ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(path.with_name(f"{path.stem}{FIG_SUFFIX}{path.suffix}"), dpi=110)
    plt.close(fig)


def fmt(v: float | None) -> str:
    return "not reached" if v is None else str(v)


def exp_steps(args) -> str:
    """Fig. 2a: steps to reach the baseline's best validation loss."""
    d = RUNS / "steps"
    base = [f"train.steps={args.steps}", f"train.seed={args.seed}"]
    jobs = [
        (d / "baseline", "lm-tiny.toml", 1, base),
        (d / "codistill2", "lm-tiny.toml", 2, base),
        (d / "ensemble2", "lm-tiny.toml", 2, base + ['train.split="same"'], {"ensemble": True}),
        (d / "smooth-uniform", "lm-tiny.toml", 1, base + ['distill.target="uniform"', "distill.alpha=0.1"]),
        (d / "smooth-unigram", "lm-tiny.toml", 1, base + ['distill.target="unigram"', "distill.alpha=0.1"]),
    ]
    run_all(jobs, args.jobs)
    target = float(curve(d / "baseline")[1].min())
    rows, curves = [], {}
    for name, key in (("baseline", "val_loss"), ("codistill2", "val_loss"), ("ensemble2", "ensemble_val_loss"),
                      ("smooth-uniform", "val_loss"), ("smooth-unigram", "val_loss")):
        curves[name] = curve(d / name, key)
        rows.append(f"| {name} | {fmt(steps_to(d / name, target, key))} | {curves[name][1].min():.4f} |")
    plot(curves, f"lm-tiny: codistillation vs baselines (seed {args.seed})", DOCS / "steps-to-target.png", target)
    return "\n".join([
        f"Target: the baseline's best validation loss, {target:.4f}. {args.steps} steps, seed {args.seed}.",
        "Codistillation is evaluated as the mean of its two models; the ensemble on its averaged prediction.",
        "", "| run | steps to target | best val loss |", "|---|---|---|", *rows,
    ])


def exp_split(args) -> str:
    """Fig. 2b: two-way codistillation on the same data versus disjoint shards."""
    d = RUNS / "split"
    base = [f"train.steps={args.steps}", f"train.seed={args.seed}"]
    run_all([(d / "disjoint", "lm-tiny.toml", 2, base + ['train.split="disjoint"']),
             (d / "same", "lm-tiny.toml", 2, base + ['train.split="same"'])], args.jobs)
    curves = {name: curve(d / name) for name in ("disjoint", "same")}
    plot(curves, "lm-tiny: 2-way codistillation, same vs disjoint data", DOCS / "same-vs-disjoint.png")
    rows = [f"| {n} | {c[1].min():.4f} | {c[1][-1]:.4f} |" for n, c in curves.items()]
    return "\n".join(["| data | best val loss | final val loss |", "|---|---|---|", *rows])


def exp_reload(args) -> str:
    """Fig. 4: how stale may teachers be? Sweep the reload interval."""
    d = RUNS / "reload"
    intervals = [1, 50, 250, 1000]
    base = [f"train.steps={args.steps}", f"train.seed={args.seed}"]
    run_all([(d / f"reload-{r}", "lm-tiny.toml", 2, base + [f"exchange.reload_every={r}"]) for r in intervals],
            args.jobs)
    curves = {f"reload every {r}": curve(d / f"reload-{r}") for r in intervals}
    plot(curves, "lm-tiny: 2-way codistillation, teacher reload interval", DOCS / "reload-interval.png")
    rows = [f"| {r} | {curves[f'reload every {r}'][1].min():.4f} | {curves[f'reload every {r}'][1][-1]:.4f} |"
            for r in intervals]
    note = f"With {args.steps} steps, a reload interval >= the run length means teachers are never refreshed."
    return "\n".join([note, "", "| reload every | best val loss | final val loss |", "|---|---|---|", *rows])


def exp_churn(args) -> str:
    """Table 1: prediction churn between retrains on ctr."""
    d = RUNS / "churn"
    pairs = [(2 * i + 1, 2 * i + 2) for i in range(args.pairs)]
    kinds = {"single DNN": (1, {}), "ensemble of two": (2, {"ensemble": True}), "2-way codistilled": (2, {})}
    jobs = []
    for label, (models, kw) in kinds.items():
        for a, b in pairs:
            for seed in (a, b):
                split = ['train.split="same"'] if kw.get("ensemble") else []
                jobs.append((d / f"{label.replace(' ', '-')}-s{seed}", "ctr-small.toml", models,
                             [f"train.seed={seed}"] + split, kw))
    run_all(jobs, args.jobs)
    rows = []
    for label in kinds:
        tag = label.replace(" ", "-")
        values = [churn_runs(d / f"{tag}-s{a}", d / f"{tag}-s{b}") for a, b in pairs]
        losses = [curve(d / f"{tag}-s{s}", "ensemble_val_loss" if "ensemble" in label else "val_loss")[1][-1]
                  for p in pairs for s in p]
        mean, half = mean_and_half_range(values)
        rows.append(f"| {label} | {mean:.4f} ± {half:.4f} | {np.mean(losses):.4f} |")
    return "\n".join([f"{len(pairs)} retrain pairs (seeds {pairs}); churn = mean |p_a - p_b| on the validation set,"
                      " reported as mean ± half range as in the paper.", "",
                      "| model | churn | mean final val loss (BCE) |", "|---|---|---|", *rows])


def exp_int8(args) -> str:
    """int8 teachers versus fp32 teachers: the difference should be within seed noise."""
    d = RUNS / "int8"
    seeds = [args.seed + i for i in range(args.pairs)]
    base = [f"train.steps={args.steps}"]
    jobs = [(d / f"int8-s{s}", "lm-tiny.toml", 2, base + [f"train.seed={s}"]) for s in seeds]
    jobs += [(d / f"fp32-s{s}", "lm-tiny.toml", 2, base + [f"train.seed={s}"], {"fp32_teachers": True}) for s in seeds]
    run_all(jobs, args.jobs)
    out = {}
    for kind in ("int8", "fp32"):
        out[kind] = [float(curve(d / f"{kind}-s{s}")[1][-1]) for s in seeds]
    diff = np.mean(out["int8"]) - np.mean(out["fp32"])
    noise = max(np.ptp(out["int8"]), np.ptp(out["fp32"]))
    rows = [f"| {k} | {', '.join(f'{v:.4f}' for v in vals)} | {np.mean(vals):.4f} |" for k, vals in out.items()]
    return "\n".join(["| teachers | final val loss per seed | mean |", "|---|---|---|", *rows, "",
                      f"Difference of means (int8 - fp32): {diff:+.4f}; seed spread (max range): {noise:.4f}."])


EXACT = ["distill.teachers_per_step=0", "distill.batch_fraction=1.0", 'distill.teacher_precision="fp32"']
COST_SETTINGS = {  # name -> (models, teachers each holds, overrides)
    "ring-4": (4, 1, ['exchange.topology="ring"', "train.steps=300"]),
    "full-4": (4, 3, ['exchange.topology="full"', "train.steps=300"]),
    "data-limited-2": (2, 1, ["task.max_bytes=1000000", "distill.burn_in=100", "train.steps=800"]),
}


COST_VARIANTS = {  # name -> overrides; each ablation changes the exact mean in one way
    "exact": EXACT,
    "defaults": [],  # the recipe's
    "k=1": EXACT + ["distill.teachers_per_step=1"],
    "f=0.25": EXACT + ["distill.batch_fraction=0.25"],
    "f=0.5": EXACT + ["distill.batch_fraction=0.5"],
    "bf16": EXACT + ['distill.teacher_precision="bf16"'],
    "k=1,f=0.5,auto": ["distill.teachers_per_step=1", "distill.batch_fraction=0.5", 'distill.teacher_precision="auto"'],
}


def exp_cost(args) -> str:
    """The cheap distillation settings (k teachers per step, part of the batch, bf16 teachers) against the exact
    full mean, at equal steps: mean final / best validation loss of the models, per seed."""
    d = RUNS / "cost"
    seeds = args.seeds
    variants = args.variants or ["exact", "defaults"]
    jobs = [(d / f"{name}-{variant}-s{seed}", "lm-tiny.toml", models, sets + [f"train.seed={seed}"]
             + COST_VARIANTS[variant])
            for name, (models, held, sets) in COST_SETTINGS.items() for variant in variants for seed in seeds
            if not (variant == "k=1" and held == 1)]  # a draw of one of one teacher is the exact mean
    run_all(jobs, args.jobs)
    rows = ["| setting | distillation | final val per seed (mean of the models) | mean ± half range | best val mean |"
            " wall s (mean) |", "|---|---|---|---|---|---|"]
    summary = []
    for name in COST_SETTINGS:
        means = {}
        for variant in variants:
            if not (d / f"{name}-{variant}-s{seeds[0]}").exists():
                continue  # not run (k=1 where one teacher is held)
            finals, bests, walls = [], [], []
            for seed in seeds:
                run = d / f"{name}-{variant}-s{seed}"
                models = sorted(p for p in run.iterdir() if p.is_dir())
                per = [curve(m) for m in models]
                finals.append(float(np.mean([c[1][-1] for c in per])))
                bests.append(float(np.mean([c[1].min() for c in per])))
                walls.append(read_metrics(run / "metrics.jsonl")[-1]["time"])
            mean, half = mean_and_half_range(finals)
            means[variant] = (mean, half)
            rows.append(f"| {name} | {variant} | {', '.join(f'{v:.4f}' for v in finals)} | {mean:.4f} ± {half:.4f} | "
                        f"{np.mean(bests):.4f} | {np.mean(walls):.0f} |")
        for variant in means:
            if variant == "exact" or "exact" not in means:
                continue
            diff = means[variant][0] - means["exact"][0]
            spread = max(means[variant][1], means["exact"][1])
            summary.append(f"- {name}: {variant} - exact = {diff:+.4f} nats (half range of the seeds: {spread:.4f}; "
                           f"{'within' if abs(diff) <= spread else 'outside'} the seed spread)")
    return "\n".join([f"lm-tiny, seeds {seeds}; exact: {' '.join(EXACT)}.", "", *rows, "", *summary])


EXPERIMENTS = {"steps": exp_steps, "split": exp_split, "reload": exp_reload, "churn": exp_churn, "int8": exp_int8,
               "cost": exp_cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=3, help="retrain pairs (churn) / seeds (int8)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the cost experiment")
    ap.add_argument("--variants", nargs="+", choices=list(COST_VARIANTS), default=None,
                    help="distillation settings of the cost experiment (default: exact, defaults)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="recipe override for every run of the experiment (repeatable)")
    ap.add_argument("--tag", default="", help="suffix for the runs/ and docs/ names (e.g. a longer horizon)")
    ap.add_argument("--corpus", default=None, metavar="PATH",
                    help="lm runs read this text tree instead of the standard library (task.corpus); use with --tag")
    args = ap.parse_args()
    global RUNS, FIG_SUFFIX
    EXTRA_SETS.extend(args.sets)
    if args.corpus:
        LM_SETS.append(f"task.corpus={json.dumps(str(Path(args.corpus).resolve()))}")
    RUNS = RUNS.parent / f"paper{args.tag}" if args.tag else RUNS
    FIG_SUFFIX = args.tag
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    results = {}
    for name in names:
        results[name] = EXPERIMENTS[name](args)
        print(f"\n## {name}\n\n{results[name]}\n", flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"results-{'-'.join(names)}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
