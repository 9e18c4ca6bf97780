"""What a teacher costs: the step time of a codistilled trainer over a plain one (a script, not a test).

    python benchmarks/overhead.py                         # lm-tiny and lm-small, 1 / 3 / 7 teachers held
    python benchmarks/overhead.py --recipes lm-tiny --teachers 7 --rounds 20
    python benchmarks/overhead.py --precision-check       # bf16 / int8 teachers against fp32 on trained models

Every variant is a real Trainer (the one `p2pcod train` and `p2pcod peer` run) on the recipe's data, past burn-in,
holding N teachers. The variants' steps are interleaved with the plain trainer's in one process, round after
round, so a machine shared with other jobs slows them alike; the figure is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pcod.config import load_recipe  # noqa: E402
from p2pcod.tasks import get_task  # noqa: E402
from p2pcod.teachers import TeacherPool  # noqa: E402
from p2pcod.trainer import Trainer  # noqa: E402

EXACT = {"teachers_per_step": 0, "batch_fraction": 1.0, "teacher_precision": "fp32", "prefetch": False}
VARIANTS = {  # each changes the exact full mean (the paper's algorithm) in one way; "defaults" is the recipe's
    "exact": {},
    "k=1": {"teachers_per_step": 1},
    "f=0.25": {"batch_fraction": 0.25},
    "bf16": {"teacher_precision": "bf16"},
    "int8": {"teacher_precision": "int8"},
    "prefetch": {"prefetch": True},
    "defaults": None,
    "defaults+prefetch": {"prefetch": True},
}


def trainer_for(recipe, task, run_dir: Path, distill: dict | None, teachers: int) -> Trainer:
    d = {"burn_in": 0} if distill is None else {**EXACT, **distill, "burn_in": 0}
    r = recipe.replace(distill=d, train={"steps": 10**6, "eval_batches": 1})
    pool = None
    if teachers:
        pool = TeacherPool(task.build_model, r.distill, task.kind)
        for i in range(teachers):
            torch.manual_seed(100 + i)
            pool.swap(f"t{i}", task.build_model(r.model).state_dict(), r.model, step=0)
    return Trainer(r, task, shard=0, num_shards=1, run_dir=run_dir, teachers=pool)


def measure(recipe_name: str, counts: list[int], rounds: int, steps: int, variants: list[str]) -> None:
    recipe = load_recipe(ROOT / "peers" / f"{recipe_name}.toml")
    task = get_task(recipe.task)
    print(f"\n### {recipe_name} (batch {recipe.train.batch_size}, {torch.get_num_threads()} threads); "
          f"recipe defaults: k={recipe.distill.teachers_per_step}, f={recipe.distill.batch_fraction}, "
          f"precision={recipe.distill.teacher_precision}\n")
    print("| teachers held | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            plain = trainer_for(recipe, task, Path(tmp) / "plain", None, 0)
            runs = {v: trainer_for(recipe, task, Path(tmp) / v, VARIANTS[v], n) for v in variants}
            times: dict[str, list[float]] = {v: [] for v in ["plain", *variants]}
            for r in range(rounds + 1):  # round 0 warms up
                for name, tr in [("plain", plain), *runs.items()]:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        tr.train_step()
                    tr.distill.discard()  # a prefetched target still computing belongs to this variant's time
                    if r:
                        times[name].append((time.perf_counter() - t0) / steps)
            base = statistics.median(times["plain"])
            cells = [f"{statistics.median(times[v]) / base:.3f}" for v in variants]
            print(f"| {n} | " + " | ".join(cells) + f" |   (plain step {base * 1e3:.1f} ms)", flush=True)
            for tr in [plain, *runs.values()]:
                tr.close()


def precision_check(recipe_name: str, steps: int) -> None:
    """Train the recipe's model for `steps`, then compare bf16 and int8 teachers with the fp32 one on validation."""
    recipe = load_recipe(ROOT / "peers" / f"{recipe_name}.toml").replace(train={"steps": steps})
    task = get_task(recipe.task)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(recipe, task, shard=0, num_shards=1, run_dir=tmp)
        for _ in range(steps):
            tr.train_step()
        val = tr.evaluate()
        state = tr.model.state_dict()
        tr.close()
    pools = {}
    for p in ("fp32", "bf16", "int8"):
        pools[p] = TeacherPool(task.build_model, recipe.distill.__class__(teacher_precision=p), task.kind)
        pools[p].swap("t", state, recipe.model, step=steps)
    batches = task.val_batches(recipe.train.eval_batch_size, recipe.train.eval_batches)
    with torch.no_grad():
        _compare(recipe_name, steps, val, task, pools, batches)


def _compare(recipe_name: str, steps: int, val: float, task, pools: dict, batches: list) -> None:
    ref = [pools["fp32"].logits(b.x)[0] for b in batches]
    for p in ("bf16", "int8"):
        agree, kl, count = 0.0, 0.0, 0
        t0 = time.perf_counter()
        got = [pools[p].logits(b.x)[0] for b in batches]
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            pools["fp32"].logits(b.x)
        dt_ref = time.perf_counter() - t0
        for a, g in zip(ref, got, strict=True):
            if task.kind == "binary":
                pa, pg = torch.sigmoid(a), torch.sigmoid(g)
                agree += float(((pa > 0.5) == (pg > 0.5)).sum())
                kl += float((torch.xlogy(pa, pa) - torch.xlogy(pa, pg) + torch.xlogy(1 - pa, 1 - pa)
                             - torch.xlogy(1 - pa, 1 - pg)).sum())
                count += pa.numel()
            else:
                la, lg = a.log_softmax(-1), g.log_softmax(-1)
                agree += float((a.argmax(-1) == g.argmax(-1)).sum())
                kl += float((la.exp() * (la - lg)).sum())
                count += la[..., 0].numel()
        print(f"| {recipe_name} ({steps} steps, val {val:.3f}) | {p} | {agree / count * 100:.2f}% | "
              f"{kl / count:.2e} | {dt_ref / dt:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["lm-tiny", "lm-small"])
    ap.add_argument("--teachers", nargs="+", type=int, default=[1, 3, 7])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds (medians over these)")
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision-check", action="store_true",
                    help="agreement, KL and speed of bf16 / int8 teachers against fp32 on trained models")
    ap.add_argument("--train-steps", type=int, default=300, help="training steps before --precision-check")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision_check:
        print("| model | precision | top-1 agreement with fp32 | mean KL(fp32 || it) per position | speed vs fp32 |")
        print("|---|---|---|---|---|")
        for name in args.recipes:
            precision_check(name, args.train_steps)
        return
    for name in args.recipes:
        measure(name, args.teachers, args.rounds, args.steps, args.variants)


if __name__ == "__main__":
    main()
