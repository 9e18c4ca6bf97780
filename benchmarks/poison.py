"""Poisoned peer vs robust teacher aggregation: run the poisoned-5-* specs and table the honest peers (a script).

    python benchmarks/poison.py                      # runs/poison/<spec>, then the markdown table
    python benchmarks/poison.py --only-table         # table the runs already there
    python benchmarks/poison.py topologies/poisoned-5-mean.toml ...   # other specs

Each spec is one `p2pcod simulate` run (five lm-tiny peers, one poisoned) into runs/poison/<spec name>;
a run that already finished (events.jsonl has sim_end) is reused. The table shows every peer's final
validation loss and the mean over the honest peers (every peer whose recipe has no task.poison).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "poison"
SPECS = [ROOT / "topologies" / f"poisoned-5-{v}.toml" for v in ("none", "mean", "median")]


def finished(run_dir: Path) -> bool:
    events = run_dir / "events.jsonl"
    if not events.exists():
        return False
    return any(json.loads(line).get("event") == "sim_end" for line in events.read_text().splitlines() if line.strip())


def simulate(spec: Path, run_dir: Path) -> None:
    if finished(run_dir):
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: start it again
    cmd = [sys.executable, "-m", "p2pcod", "simulate", str(spec), "--run-dir", str(run_dir), "--no-report"]
    print("$", " ".join(["p2pcod", *cmd[3:]]), flush=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def poisoned_peers(spec: Path) -> set[str]:
    raw = tomllib.loads(spec.read_text())
    out = set()
    for p in raw.get("peer", []):
        if p.get("set", {}).get("task", {}).get("poison", "none") != "none":
            out.add(p.get("name", f"p{p['index']}"))
    return out


def final_val(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    vals = [r for r in rows if "val_loss" in r]
    return float(vals[-1]["val_loss"])


def table(specs: list[Path]) -> str:
    lines = []
    header = None
    for spec in specs:
        run_dir = RUNS / spec.stem
        names = sorted(p.name for p in (run_dir / "peers").iterdir())
        bad = poisoned_peers(spec)
        finals = {n: final_val(run_dir / "peers" / n / "metrics.jsonl") for n in names}
        honest = [finals[n] for n in names if n not in bad]
        if header is None:
            header = ["run", "mean honest final val loss", *names]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append(f"| {spec.stem} | {sum(honest) / len(honest):.4f} | "
                     + " | ".join(f"{finals[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*", type=Path, default=SPECS)
    ap.add_argument("--only-table", action="store_true", help="do not run; table the finished runs")
    args = ap.parse_args()
    specs = [s.resolve() for s in args.specs]
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.only_table:
        for spec in specs:
            simulate(spec, RUNS / spec.stem)
    print(table(specs))


if __name__ == "__main__":
    main()
