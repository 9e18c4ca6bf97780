"""Plots and a markdown summary of a run directory (`p2pcod report RUN_DIR [--baseline RUN_DIR]`).

Reads a simulator run (RUN_DIR/peers/<name>/metrics.jsonl + events.jsonl), an in-process `p2pcod
train` run (RUN_DIR/m<i>/metrics.jsonl) or a single peer's run dir (RUN_DIR/metrics.jsonl), and writes
into RUN_DIR: loss.png (validation loss against step and wall time, the baseline's peers dashed),
bytes.png (bytes received / sent over time), staleness.png (teachers held and their staleness) and
summary.md (steps and wall time to a target loss, final losses, bytes per step against a ring all-reduce of fp32
gradients, the faults and how each peer rode them out).
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcod.errors import DataError

FAULT_EVENTS = ("kill", "cut")


@dataclass
class PeerRun:
    name: str
    rows: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)  # peer.json
    wall: list[float] = field(default_factory=list)  # seconds since the run started, one per row

    def val_curve(self) -> list[tuple[int, float]]:
        """(step, val loss), the last value per step (a restarted peer repeats steps), sorted by step."""
        last: dict[int, float] = {}
        for row in self.rows:
            if "val_loss" in row and _finite(row["val_loss"]):
                last[int(row["step"])] = float(row["val_loss"])
        return sorted(last.items())

    def val_times(self) -> list[tuple[float, float]]:
        """(wall time, val loss) of every evaluation in time order (a tie keeps row order: the later row wins)."""
        return sorted(((w, float(r["val_loss"])) for r, w in zip(self.rows, self.wall, strict=True)
                       if _finite(r.get("val_loss"))), key=lambda p: p[0])

    @property
    def final_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)

    def steps_per_s(self) -> float | None:
        """Training rate: steps over the metrics clock, summed over incarnations (restarts' gaps excluded)."""
        steps = seconds = 0.0
        for idx in self.incarnations():
            timed = [self.rows[i] for i in idx if "time" in self.rows[i]]
            if len(timed) >= 2:
                steps += int(timed[-1]["step"]) - int(timed[0]["step"])
                seconds += float(timed[-1]["time"]) - float(timed[0]["time"])
        return steps / seconds if seconds > 0 and steps > 0 else None

    def incarnations(self) -> list[list[int]]:
        """Row indices per process lifetime: a new one starts at a resume or when steps go back."""
        out: list[list[int]] = []
        for i, row in enumerate(self.rows):
            prev = self.rows[i - 1] if i else None
            went_back = "time" in row and "time" in prev and row["time"] < prev["time"] if prev else False
            if prev is None or "resumed_from" in row or int(row["step"]) < int(prev["step"]) or went_back:
                out.append([])
            out[-1].append(i)
        return out

    def total_bytes(self, key: str) -> list[float]:
        """Cumulative bytes per row across restarts (a new process starts its counters at 0)."""
        out = [0.0] * len(self.rows)
        carried = 0.0
        for rows in self.incarnations():
            last = 0.0
            for i in rows:
                last = float(self.rows[i].get(key, 0) or 0)
                out[i] = carried + last
            carried += last
        return out


@dataclass
class RunData:
    path: Path
    peers: dict[str, PeerRun]
    events: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "sim"

    @property
    def label(self) -> str:
        return self.path.name

    def params(self) -> int | None:
        values = [p.info.get("params") for p in self.peers.values() if p.info.get("params")]
        return int(max(values)) if values else None

    def mean_curve(self) -> list[tuple[int, float]]:
        """Mean val loss over peers at the steps every peer evaluated."""
        curves = [dict(p.val_curve()) for p in self.peers.values() if p.val_curve()]
        if not curves:
            return []
        common = set.intersection(*(set(c) for c in curves))
        return [(s, sum(c[s] for c in curves) / len(curves)) for s in sorted(common)]

    def mean_time_curve(self) -> list[tuple[float, float]]:
        """Mean val loss over peers against wall time, at every peer's evaluation once all have evaluated.

        Each peer counts with its latest loss by then (held, not interpolated: a loss is known only once
        evaluated; a peer that stopped keeps its last), so peers evaluating at different times compare fairly.
        """
        curves = [p.val_times() for p in self.peers.values() if p.val_times()]
        if not curves:
            return []
        start = max(c[0][0] for c in curves)
        times = sorted({t for c in curves for t, _ in c if t >= start})
        return [(t, sum(_held(c, t) for c in curves) / len(curves)) for t in times]


# ---- loading ----------------------------------------------------------------------------------------
def load_run(run_dir: str | Path) -> RunData:
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"run directory {path} does not exist")
    events = _read_jsonl(path / "events.jsonl") if (path / "events.jsonl").exists() else []
    if (path / "peers").is_dir():
        dirs, kind = sorted(d for d in (path / "peers").iterdir() if (d / "metrics.jsonl").exists()), "sim"
    else:
        dirs = sorted((d for d in path.glob("m*") if re.fullmatch(r"m\d+", d.name) and (d / "metrics.jsonl").exists()),
                      key=lambda d: int(d.name[1:]))
        kind = "train"
        if not dirs and (path / "metrics.jsonl").exists():
            dirs, kind = [path], "peer"
    if not dirs:
        raise DataError(f"{path} holds no metrics.jsonl (peers/<name>/, m<i>/ or its own): is it a run directory?")
    order = [n for e in events if e.get("event") == "sim_start" for n in e.get("names", [])]
    peers = {}
    for d in sorted(dirs, key=lambda d: order.index(d.name) if d.name in order else len(order)):
        rows = [r for r in _read_jsonl(d / "metrics.jsonl") if isinstance(r, dict) and "step" in r]
        info = _read_json(d / "peer.json")
        peer = PeerRun(d.name if kind != "peer" else path.name, rows, info)
        peer.wall = _wall_times(peer, events)
        peers[peer.name] = peer
    return RunData(path, peers, events, kind)


def _wall_times(peer: PeerRun, events: list[dict[str, Any]]) -> list[float]:
    """Each row's seconds since the simulation started; without events, the peer's own clock.

    The simulator's "clock" events place each process's metrics clock on the simulation clock (from when
    it saw the rows appear); older runs fall back on peer.json's time, which is late by the peer's set-up.
    """
    wall = [float(r.get("time", 0.0)) for r in peer.rows]
    start = next((e["unix"] for e in events if e.get("event") == "sim_start"), None)
    mine = [e for e in events if e.get("peer") == peer.name]
    origins = [float(e["origin_t"]) for e in mine if e.get("event") == "clock"]
    if not origins and start is not None:
        origins = [float(e["peer_unix"]) - float(start) for e in mine
                   if e.get("event") == "joined" and e.get("peer_unix")]
    if not origins:
        return wall
    for rows, origin in zip(peer.incarnations()[::-1], origins[::-1], strict=False):  # latest with latest
        first = peer.rows[rows[0]]
        if "resumed_from" in first and not any(e.get("event") == "clock" for e in mine):
            origin -= float(first.get("time", 0.0))  # a resumed clock starts at the checkpoint's elapsed time
        for i in rows:
            wall[i] = origin + float(peer.rows[i].get("time", 0.0))
    return wall


# ---- numbers ------------------------------------------------------------------------------------------
def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below `target` (None: never)."""
    return next((s for s, v in curve if v <= target), None)


def time_to_target(points: list[tuple[float, float]], target: float) -> float | None:
    """Seconds of the first evaluation (wall time, val loss) at or below `target` (None: never)."""
    return next((t for t, v in sorted(points, key=lambda p: p[0]) if v <= target), None)


def equal_time_losses(run: RunData, base: RunData) -> tuple[float, float, float] | None:
    """(T, run's mean val, baseline's mean val) at T = the earlier of the two runs' last evaluations, the
    latest time both are known: a longer run would otherwise look better only for having trained longer."""
    mine, theirs = run.mean_time_curve(), base.mean_time_curve()
    if not mine or not theirs:
        return None
    t = min(mine[-1][0], theirs[-1][0])
    a, b = _held(mine, t), _held(theirs, t)
    return None if a is None or b is None else (t, a, b)


def allreduce_bytes_per_step(params: int, n: int) -> float:
    """Bytes each peer sends per step in a ring all-reduce of fp32 gradients: 2·(N−1)/N · 4·params."""
    return 2 * (n - 1) / n * 4 * params


def choose_target(run: RunData, baseline: RunData | None, target: float | None) -> tuple[float | None, str]:
    if target is not None:
        return target, "given"
    if baseline is not None and baseline.mean_curve():
        best = min(v for _, v in baseline.mean_curve())
        return best, f"the best mean validation loss of the baseline {baseline.label}"
    bests = [min(v for _, v in p.val_curve()) for p in run.peers.values() if p.val_curve()]
    if not bests:
        return None, "no validation loss recorded"
    return max(bests), "no baseline: the loosest level every peer reached (the worst of the peers' best losses)"


def peer_table(run: RunData) -> list[dict[str, Any]]:
    n, params = len(run.peers), run.params()
    allreduce = allreduce_bytes_per_step(params, n) if params and n > 1 else None
    out = []
    for p in run.peers.values():
        curve = p.val_curve()
        steps = max(p.final_step, 1)
        sent = p.total_bytes("bytes_out")[-1] if p.rows else 0.0
        got = p.total_bytes("bytes_in")[-1] if p.rows else 0.0
        out.append({
            "peer": p.name, "steps": p.final_step, "rate": p.steps_per_s(), "final": curve[-1][1] if curve else None,
            "best": min(v for _, v in curve) if curve else None, "sent": sent, "received": got,
            "sent_per_step": sent / steps, "received_per_step": got / steps,
            "ratio": sent / steps / allreduce if allreduce else None,
        })
    return out


# ---- faults --------------------------------------------------------------------------------------------
def fault_story(run: RunData) -> list[str]:
    """One line per fault: what happened and how the peers rode it out."""
    lines = []
    events = run.events
    for i, e in enumerate(events):
        kind, name = e.get("event"), e.get("peer")
        if kind not in FAULT_EVENTS or name not in run.peers:
            if kind == "exit" and e.get("unexpected"):
                lines.append(f"- t={e['t']:.1f}s **{name}** exited on its own with code {e.get('rc')} "
                             f"at step {e.get('step')}")
            continue
        peer = run.peers[name]
        t = float(e["t"])
        if kind == "kill":
            lines.append(_kill_line(run, peer, e, events[i + 1:]))
        elif kind == "cut":
            end = t + float(e.get("duration_s", 0))
            fails = _at(peer, end, "fetch_failed", 0) - _at(peer, t, "fetch_failed", 0)
            steps = f"step {_at(peer, t, 'step', 0)} -> {_at(peer, end, 'step', 0)}"
            lines.append(f"- t={t:.1f}s **{name}** cut off for {e.get('duration_s', 0):.0f} s at step "
                         f"{e.get('step')}: it kept training ({steps}),"
                         f" teachers {_at(peer, t, 'teachers', 0)} -> {_at(peer, end, 'teachers', 0)}, "
                         f"{fails} failed fetches; {_others(run, name, t, end)}")
    for e in events:
        if e.get("event") == "start" and e.get("late") and e.get("peer") in run.peers:
            lines.append(_join_line(run, run.peers[e["peer"]], float(e["t"])))
    return lines


def _kill_line(run: RunData, peer: PeerRun, e: dict[str, Any], later: list[dict[str, Any]]) -> str:
    t = float(e["t"])
    before = [r["step"] for r, w in zip(peer.rows, peer.wall, strict=True) if w <= t + 0.5]
    last = max(before, default=e.get("step", 0))
    text = f"- t={t:.1f}s **{peer.name}** killed (SIGKILL) at step {last}"
    restart = next((x for x in later if x.get("event") == "restart" and x.get("peer") == peer.name), None)
    if restart is None:
        return text + f"; not restarted. {_others(run, peer.name, t, None)}"
    joined = next((x for x in later if x.get("event") == "joined" and x.get("peer") == peer.name
                   and x["t"] >= restart["t"]), {})
    resumed = joined.get("resumed_from")
    if resumed is None:
        resumed = next((r["resumed_from"] for r in peer.rows if r.get("resumed_from") is not None), None)
    back = float(joined.get("t", restart["t"]))
    text += f"; restarted at t={float(restart['t']):.1f}s (same run dir and identity), "
    if resumed is None:
        text += "found no checkpoint and started over from step 0"
    else:
        text += f"resumed at step {resumed} from its checkpoint, lost {max(0, int(last) - int(resumed))} steps"
    text += f", finished at step {peer.final_step}. During the {back - t:.0f} s outage "
    text += _others(run, peer.name, t, back)
    return text


def _join_line(run: RunData, peer: PeerRun, t: float) -> str:
    swarm_step = max((_at(p, t, "step", 0) for n, p in run.peers.items() if n != peer.name), default=0)
    first = next((r for r in peer.rows if (r.get("teachers") or 0) > 0), None)
    got = f"got its first teacher at step {first['step']}" if first else "never got a teacher"
    return (f"- t={t:.1f}s **{peer.name}** joined late, when the swarm was at step {swarm_step}; {got}, "
            f"finished at step {peer.final_step}")


def _others(run: RunData, name: str, t0: float, t1: float | None) -> str:
    moves = [(n, _at(p, t0, "step", 0), _at(p, t1, "step", 0) if t1 is not None else p.final_step)
             for n, p in run.peers.items() if n != name]
    if not moves:
        return ""
    kept = all(b > a for _, a, b in moves)
    return ("the other peers kept training: " if kept else "other peers: ") + ", ".join(
        f"{n} step {a}->{b}" for n, a, b in moves)


def _held(points: list[tuple[float, float]], t: float) -> float | None:
    """The value of the last (time, value) point at or before t, points in time order (None: none yet)."""
    i = bisect_right(points, t, key=lambda p: p[0])
    return points[i - 1][1] if i else None


def _at(peer: PeerRun, t: float, key: str, default: Any) -> Any:
    """The value of `key` in the peer's last row written at or before wall time t."""
    value = default
    for row, w in zip(peer.rows, peer.wall, strict=True):
        if w > t:
            break
        value = row.get(key, value)
    return value


# ---- output -----------------------------------------------------------------------------------------
def write_report(run_dir: str | Path, baseline: str | Path | None = None, target: float | None = None) -> Path:
    """Write loss.png, bytes.png, staleness.png and summary.md into run_dir; returns summary.md's path.

    Without a baseline, a simulation's own comparison run (RUN_DIR/clean, else RUN_DIR/alone) is the baseline,
    so re-running the report gives the simulator's report."""
    run = load_run(run_dir)
    if baseline is None:
        baseline = next((run.path / d for d in ("clean", "alone") if (run.path / d / "peers").is_dir()), None)
    base = load_run(baseline) if baseline is not None else None
    level, why = choose_target(run, base, target)
    plot_all(run, base, level)
    path = run.path / "summary.md"
    path.write_text(summary_markdown(run, base, level, why))
    return path


def summary_markdown(run: RunData, base: RunData | None, target: float | None, why: str) -> str:
    n, params = len(run.peers), run.params()
    spec = next((e for e in run.events if e.get("event") == "sim_start"), {})
    out = [f"# Run {run.label}", ""]
    if spec:
        out += [f"Spec `{spec.get('spec')}`: {n} peers, topology {spec.get('topology')}, {spec.get('steps')} steps, "
                f"{spec.get('threads')} thread(s) per peer; ended: "
                f"{next((e.get('reason') for e in run.events if e.get('event') == 'sim_end'), '?')}.", ""]
    if base is not None:
        out += [f"Baseline: `{base.path}` ({len(base.peers)} peers, dashed in the plots).", ""]
    out += ["![validation loss](loss.png)", "", "![bytes](bytes.png)", "", "![staleness](staleness.png)", ""]
    out += _target_section(run, base, target, why)
    out += _peer_section(run, base, n, params)
    out += adversary_section(run)
    story = fault_story(run)
    out += ["## Faults", ""] + (story or ["None scheduled; no peer exited on its own."]) + [""]
    return "\n".join(out)


# ---- adversaries ---------------------------------------------------------------------------------------
def adversaries(run: RunData) -> dict[str, dict[str, Any]]:
    """name -> {"attacks", "requests" (blob requests the honest peers sent it), "flood_streams"} of every
    adversary the simulator started (p2pcod/adversary.py logs to peers/<name>/attacks.jsonl)."""
    out: dict[str, dict[str, Any]] = {}
    for e in run.events:
        if e.get("event") in ("start", "restart") and e.get("role") == "adversary":
            rows = _read_jsonl(run.path / "peers" / e["peer"] / "attacks.jsonl")
            last = rows[-1] if rows else {}
            out[e["peer"]] = {"attacks": e.get("attacks", []), "requests": int(last.get("requests", 0)),
                              "flood_streams": int(last.get("flood_streams", 0)), "rounds": len(rows)}
    return out


def adversary_section(run: RunData) -> list[str]:
    hostile = adversaries(run)
    if not hostile:
        return []
    out = ["## Adversaries", ""]
    for name, a in hostile.items():
        out.append(f"- **{name}** ({', '.join(a['attacks'])}): {a['requests']} blob requests from honest peers "
                   f"answered with its bad checkpoints, {a['flood_streams']} flood streams opened")
    out += ["", "| honest peer | teachers loaded from adversaries | failed fetches | peers banned (fetching) "
            "| peers banned (serving) | streams refused |", "|---|---|---|---|---|---|"]
    for p in run.peers.values():
        loaded = sorted({n for r in p.rows for n in (r.get("staleness") or {}) if n in hostile})
        last = p.rows[-1] if p.rows else {}
        keys = ("fetch_failed", "fetch_bans", "serve_bans", "streams_refused")
        counts = " | ".join(str(last.get(k, "-")) for k in keys)
        out.append(f"| {p.name} | {', '.join(loaded) or 'none'} | {counts} |")
    return out + [""]


def _target_section(run: RunData, base: RunData | None, target: float | None, why: str) -> list[str]:
    out = ["## Steps and time to the target loss", ""]
    if target is None:
        return out + ["No validation loss was recorded.", ""]
    out += [f"Target validation loss **{target:.4f}** ({why}); the first evaluated step at or below it and the "
            "seconds since the run started (the mean row: the peers' mean loss, by wall time each peer's latest):",
            "", "| peer | steps (this run) | time s (this run) | steps (baseline) | time s (baseline) |",
            "|---|---|---|---|---|"]
    base_peers = _matched(run, base)
    for name, p in run.peers.items():
        b = base_peers.get(name)
        out.append(f"| {name} | {_reach(p.val_curve(), p.val_times(), target)} | "
                   f"{_reach(b.val_curve(), b.val_times(), target) if b else '- | -'} |")
    mine, theirs = _mean_reach(run, target), _mean_reach(base, target) if base else (None, None)
    out.append(f"| **mean of peers** | {_fmt_steps(mine[0])} | {_fmt_secs(mine[1])} | "
               + (f"{_fmt_steps(theirs[0])} | {_fmt_secs(theirs[1])} |" if base else "- | - |"))
    for what, a, b in (("steps", mine[0], theirs[0]), ("wall-clock time", mine[1], theirs[1])):
        if a and b:
            out += ["", f"Speed-up in {what}: {b / a:.2f}x."]
    if base is not None:
        out += ["", _equal_time_line(run, base)]
    return out + [""]


def _equal_time_line(run: RunData, base: RunData) -> str:
    """Whether this run's peers were ahead of the baseline's at the same wall time, with the rule used."""
    cmp = equal_time_losses(run, base)
    if cmp is None:
        return "No equal-time comparison: a run has no validation loss on its wall clock."
    t, mine, theirs = cmp
    diff = round(mine - theirs, 4)
    verdict = "level" if diff == 0 else f"{'ahead' if diff < 0 else 'behind'} by {abs(diff):.4f}"
    return (f"At equal wall-clock time ({t:.1f} s, the shorter run's last evaluation; each peer's latest validation "
            f"loss by then, averaged over peers), this run's peers averaged val {mine:.4f} against {theirs:.4f} "
            f"for the baseline: {verdict}.")


def _mean_reach(run: RunData, target: float) -> tuple[int | None, float | None]:
    """Steps and seconds to the target of the peers' mean curves (by step, by wall time)."""
    return steps_to_target(run.mean_curve(), target), time_to_target(run.mean_time_curve(), target)


def _reach(curve: list[tuple[int, float]], times: list[tuple[float, float]], target: float) -> str:
    """One peer's "steps | time s" cells."""
    return f"{_fmt_steps(steps_to_target(curve, target))} | {_fmt_secs(time_to_target(times, target))}"


def _peer_section(run: RunData, base: RunData | None, n: int, params: int | None) -> list[str]:
    rows = peer_table(run)
    allreduce = allreduce_bytes_per_step(params, n) if params and n > 1 else None
    out = ["## Peers", ""]
    if allreduce:
        out += [f"A ring all-reduce of fp32 gradients for this model ({params:,} parameters, N = {n}) sends "
                f"2·(N−1)/N · 4·params = {allreduce / 1e3:,.1f} kB per step per peer.", ""]
    matched = _matched(run, base)
    head = "| peer | steps | steps/s |" + (" steps/s baseline |" if base is not None else "")
    head += " final val | best val |"
    if base is not None:
        head += " final val alone/baseline | change |"
    head += " MB sent | MB received | kB sent/step | x fewer than all-reduce |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = matched.get(r["peer"])
        size = int(run.peers[r["peer"]].info.get("group_size") or 1)
        label = f"{r['peer']} (group of {size})" if size > 1 else r["peer"]
        line = f"| {label} | {r['steps']} | {_fmt_rate(r['rate'])} |"
        if base is not None:
            line += f" {_fmt_rate(b.steps_per_s() if b else None)} |"
        line += f" {_fmt(r['final'])} | {_fmt(r['best'])} |"
        if base is not None:
            bf = b.val_curve()[-1][1] if b and b.val_curve() else None
            change = f"{(r['final'] - bf) / bf * 100:+.1f}%" if bf and r["final"] is not None else "-"
            line += f" {_fmt(bf)} | {change} |"
        fewer = 1 / r["ratio"] if r["ratio"] else None  # all-reduce bytes / our bytes
        ratio = "n/a" if fewer is None else f"{fewer:,.0f}x" if fewer >= 10 else f"{fewer:.2f}x"
        line += (f" {r['sent'] / 1e6:.2f} | {r['received'] / 1e6:.2f} | {r['sent_per_step'] / 1e3:.2f} | {ratio} |")
        out.append(line)
    return out + [""]


def _matched(run: RunData, base: RunData | None) -> dict[str, PeerRun]:
    """Baseline peer per peer of this run: by name, else by position."""
    if base is None:
        return {}
    if set(run.peers) <= set(base.peers):
        return {n: base.peers[n] for n in run.peers}
    return dict(zip(run.peers, base.peers.values(), strict=False))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fmt_steps(s: int | None) -> str:
    return "not reached" if s is None else str(s)


def _fmt_secs(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.1f}"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line (killed mid-write)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- plots -------------------------------------------------------------------------------------------
def plot_all(run: RunData, base: RunData | None, target: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(run.peers)}
    matched = _matched(run, base)
    paths = []
    for name, draw in (("loss.png", _plot_loss), ("bytes.png", _plot_bytes), ("staleness.png", _plot_staleness)):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        draw(axes, run, matched, colours, target)
        _mark_faults(axes[1] if name != "staleness.png" else None, run)
        fig.suptitle(f"{run.label}: {len(run.peers)} peers" + (f" (dashed: baseline {base.label})" if base else ""))
        fig.tight_layout()
        fig.savefig(run.path / name, dpi=110)
        plt.close(fig)
        paths.append(run.path / name)
    return paths


def _plot_loss(axes, run: RunData, matched: dict[str, PeerRun], colours, target: float | None) -> None:
    for name, p in run.peers.items():
        b = matched.get(name)
        for peer, style, tag in ((p, "-", ""), (b, "--", " (baseline)")):
            if peer is None:
                continue
            pts = [(r["step"], w, float(r["val_loss"])) for r, w in zip(peer.rows, peer.wall, strict=True)
                   if _finite(r.get("val_loss"))]
            if pts:
                steps, wall, val = zip(*pts, strict=True)
                axes[0].plot(steps, val, style, color=colours[name], marker=".", label=f"{name}{tag}")
                axes[1].plot(wall, val, style, color=colours[name], marker=".", label=f"{name}{tag}")
    for ax, xlabel in zip(axes, ("training step", "wall time since start (s)"), strict=True):
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
        ax.set(xlabel=xlabel, ylabel="validation loss")
        ax.grid(alpha=0.3)
    axes[0].set_title("validation loss by step")
    axes[1].set_title("validation loss by wall time")
    _zoom_losses(axes, run, matched)
    axes[0].legend(fontsize=8, ncol=2)


def _zoom_losses(axes, run: RunData, matched: dict[str, PeerRun]) -> None:
    """The first evaluation (an untrained model) would squash the interesting part: clip the y range there."""
    vals = [v for p in [*run.peers.values(), *matched.values()] for s, v in p.val_curve() if s > 0]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = 0.08 * (hi - lo or 1.0)
        for ax in axes:
            ax.set_ylim(lo - pad, hi + pad)


def _plot_bytes(axes, run: RunData, matched: dict[str, PeerRun], colours, _target: float | None) -> None:
    for name, p in run.peers.items():
        for ax, key in zip(axes, ("bytes_in", "bytes_out"), strict=True):
            ax.plot(p.wall, [b / 1e6 for b in p.total_bytes(key)], color=colours[name], label=name)
    for ax, what in zip(axes, ("received", "sent"), strict=True):
        ax.set(xlabel="wall time since start (s)", ylabel=f"MB {what} (cumulative)", title=f"checkpoint bytes {what}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)


def _plot_staleness(axes, run: RunData, matched: dict[str, PeerRun], colours, _target: float | None) -> None:
    for name, p in run.peers.items():
        steps = [r["step"] for r in p.rows]
        axes[0].step(steps, [r.get("teachers", 0) or 0 for r in p.rows], where="post", color=colours[name], label=name)
        pts = [(r["step"], sum(r["staleness"].values()) / len(r["staleness"])) for r in p.rows
               if isinstance(r.get("staleness"), dict) and r["staleness"]]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), color=colours[name], marker=".", label=name)
    axes[0].set(xlabel="training step", ylabel="teachers held", title="teachers held")
    axes[1].set(xlabel="training step", ylabel="mean teacher staleness (steps)", title="teacher staleness")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the baseline alone has no teachers to draw
            ax.legend(fontsize=8, ncol=2)


def _mark_faults(ax, run: RunData) -> None:
    """Faults on a wall-time axis: kills red, restarts and late joins green, partitions shaded."""
    if ax is None:
        return
    for e in run.events:
        kind, t = e.get("event"), float(e.get("t", 0))
        if kind == "kill":
            ax.axvline(t, color="red", linestyle=":", linewidth=1)
            ax.annotate(f"kill {e.get('peer')}", (t, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color="red", rotation=90, va="top", ha="right")
        elif kind == "restart" or (kind == "start" and e.get("late")):
            label = "restart" if kind == "restart" else "join"
            ax.axvline(t, color="green", linestyle=":", linewidth=1)
            ax.annotate(f"{label} {e.get('peer')}", (t, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color="green", rotation=90, va="top", ha="right")
        elif kind == "cut":
            ax.axvspan(t, t + float(e.get("duration_s", 0)), color="orange", alpha=0.15)
            ax.annotate(f"cut {e.get('peer')}", (t, 0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="darkorange", va="bottom")
