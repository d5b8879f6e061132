# plot_ci.py — compare families of runs: the 5-seed table (mean, Student-t 95% CI, G1 hits), learning curves with
# 95% bands, and with --aggregate the across-task analyses of Agarwal et al. (NeurIPS 2021): IQM, mean, median and
# optimality gap with stratified bootstrap CIs, probabilities of improvement, performance profiles. With --html all of
# it on one page with each run's progress, rewritten every few minutes with --watch while the runs go on.
# Docs: docs/plot_ci.md.
#
#   python plot_ci.py runs/ [--metric best-any] [--merge OLD=NEW] [--env-id HopperHop] \
#       [--baseline data/official_tdmpc2/hopper-hop.csv] [--aggregate] [--compare X Y] [--out plots/] \
#       [--describe families.json] [--html] [--watch 300]
#   python plot_ci.py --glass-timeline runs/RUN_DIR [--thresholds 100 250 400]   # a Glass run's partition S over time
#
# Depends only on numpy, matplotlib and the standard library.
"""Compare families of runs: the 5-seed table (mean, Student-t 95% CI, G1 hits), learning curves with 95% bands, and
across-task aggregates with stratified bootstrap CIs (IQM, probability of improvement, performance profiles)."""

import argparse
import csv
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import signal
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import hsv_to_rgb, to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

METRICS = ("best-any", "best-pi", "best-mppi", "final", "strength")
TDMPC_COLUMNS = ("step", "return_pi", "return_mppi")
PPO_COLUMNS = ("step", "return")
BASELINE_COLUMNS = ("step", "reward", "seed")
DASH = "—"


class PlotCIError(Exception):
    """A problem with the inputs; `main` prints it as one line and exits with code 1."""


# ---------------------------------------------------------------------------
# Reading run folders and baselines (docs/plot_ci.md, "Run folders")
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run folder: its args.json identity and its eval.csv columns (rows sorted by step)."""

    path: Path
    env_id: str
    exp_name: str
    seed: int
    kind: str  # "tdmpc" (return_pi, return_mppi) or "ppo" (return)
    columns: dict
    modified: float = math.nan  # eval.csv's modification time (Unix seconds) when it was read
    continued: "Continuation | None" = None  # args.json's init_from: a run started from another run's checkpoint

    @property
    def steps(self) -> np.ndarray:
        return self.columns["step"]

    @property
    def last_step(self):
        return int(self.steps[-1]) if self.steps.size else None


# Flags that say how a run was run, not what it trains: left out of a continuation's label (a continuation always
# changes total_steps, for one).
RUN_FLAGS = frozenset({
    "seed", "run_dir", "num_seeds", "distributed", "total_steps", "checkpoint_every", "keep_checkpoints", "keep_every",
    "save_model", "resume", "init_from", "dry_run", "evaluate", "evaluate_step", "dump_rollouts", "capture_video",
    "video_episodes", "video_every", "video_height", "video_width", "log_freq", "track", "wandb_project_name",
    "wandb_entity"})


def _flag_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Continuation:
    """A run started (--init-from) from another run's checkpoint at `step`, with some flags changed."""

    step: int
    changed: tuple = ()  # ((flag, before, after), ...) sorted by flag, RUN_FLAGS left out

    def label(self) -> str:
        """E.g. "continued from step 40,000: k_update 256→128": part of the family's name, so of every label."""
        flags = ", ".join(f"{name} {_flag_value(before)}→{_flag_value(after)}" for name, before, after in self.changed)
        return f"continued from step {self.step:,}" + (f": {flags}" if flags else "")


def read_continuation(value, args_path: Path) -> Continuation | None:
    """args.json's init_from: null or absent for a run from scratch, else the record the scripts write,
    {"run_dir": ..., "step": N, "changed": {flag: {"before": x, "after": y}, ...}}."""
    if value is None:
        return None
    record = value if isinstance(value, dict) else {}
    step, changed = record.get("step"), record.get("changed", {})
    if not (type(step) is int and isinstance(changed, dict)  # not bool, which is an int too
            and all(isinstance(c, dict) and {"before", "after"} <= c.keys() for c in changed.values())):
        raise PlotCIError(f"{args_path}: init_from {json.dumps(value)[:80]} is not a record "
                          '{"run_dir", "step": N, "changed": {flag: {"before", "after"}}}')
    return Continuation(step, tuple((name, c["before"], c["after"]) for name, c in sorted(changed.items())
                                    if name not in RUN_FLAGS))


def read_csv_columns(path: Path, required: tuple[str, ...], being_written: bool = False) -> dict:
    """Columns of a numeric CSV with a header; PlotCIError names the file and line of any bad row.

    being_written: the file is appended to while we read (a run's eval.csv), so a last line without its newline is
    a row still being written and is left out; its digits so far could parse as a wrong number.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise PlotCIError(f"{path}: not a text CSV file") from None
    if being_written and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return {name: np.zeros(0) for name in required}
    header = [h.strip() for h in rows[0]]
    missing = [name for name in required if name not in header]
    if missing:
        raise PlotCIError(f"{path}:1: header {','.join(header)} lacks column(s) {', '.join(missing)}")
    data = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise PlotCIError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
        try:
            data.append([float(v) for v in row])
        except ValueError:
            raise PlotCIError(f"{path}:{line}: non-numeric value in {','.join(row)!r}") from None
    array = np.asarray(data, dtype=float).reshape(len(data), len(header))
    return {name: array[:, i] for i, name in enumerate(header)}


def _sorted_by_step(columns: dict) -> dict:
    """Rows ordered by step; of repeated steps (a resumed run) the last written row wins."""
    steps = columns["step"]
    order = np.argsort(steps, kind="stable")
    keep = np.ones(order.size, dtype=bool)
    keep[:-1] = steps[order][1:] != steps[order][:-1]
    return {name: col[order][keep] for name, col in columns.items()}


def read_run(run_dir: Path) -> Run:
    """Read `run_dir/args.json` and `run_dir/eval.csv` (TD-MPC or PPO format)."""
    args_path, eval_path = run_dir / "args.json", run_dir / "eval.csv"
    try:
        args = json.loads(args_path.read_text())
    except json.JSONDecodeError as e:
        raise PlotCIError(f"{args_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("env_id", "exp_name", "seed") if not isinstance(args, dict) or k not in args]
    if missing:
        raise PlotCIError(f"{args_path}: lacks key(s) {', '.join(missing)}")
    try:
        seed = int(args["seed"])
    except (TypeError, ValueError):
        raise PlotCIError(f"{args_path}: seed {args['seed']!r} is not an integer") from None
    modified = eval_path.stat().st_mtime
    with open(eval_path, newline="", errors="replace") as f:
        header = [h.strip() for h in f.readline().split(",")]
    kind = "ppo" if "return" in header and "return_pi" not in header else "tdmpc"
    columns = read_csv_columns(eval_path, PPO_COLUMNS if kind == "ppo" else TDMPC_COLUMNS, being_written=True)
    continued = read_continuation(args.get("init_from"), args_path)
    return Run(run_dir, str(args["env_id"]), str(args["exp_name"]), seed, kind, _sorted_by_step(columns), modified,
               continued)


def load_runs(dirs) -> list[Run]:
    """Every run below `dirs`: each `eval.csv` with a sibling `args.json`, ordered by (env, family, seed, path)."""
    seen, runs = set(), []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise PlotCIError(f"{d}: no such directory")
        for eval_path in sorted(d.rglob("eval.csv")):
            run_dir = eval_path.parent.resolve()
            if run_dir not in seen and (run_dir / "args.json").is_file():
                seen.add(run_dir)
                runs.append(read_run(eval_path.parent))
    if not runs:
        looked = ", ".join(str(d) for d in dirs) or "(no directories given)"
        raise PlotCIError(f"no runs found (no eval.csv with a sibling args.json) below: {looked}")
    return sorted(runs, key=lambda r: (r.env_id, r.exp_name, r.seed, str(r.path)))


def load_baseline(path, action_repeat: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-seed curves (env steps, reward) of a CSV in the official TD-MPC2 format `step,reward,seed`.

    The official CSVs count agent steps and the official DMC env repeats every action twice, so one of their steps
    is `action_repeat` = 2 env steps, our unit; pass 1 for a CSV already in env steps.
    """
    path = Path(path)
    if not path.is_file():
        raise PlotCIError(f"{path}: baseline CSV not found")
    cols = read_csv_columns(path, BASELINE_COLUMNS)
    if cols["step"].size == 0:
        raise PlotCIError(f"{path}: baseline CSV has no rows")
    curves = []
    for seed in np.unique(cols["seed"]):
        mask = cols["seed"] == seed
        c = _sorted_by_step({"step": cols["step"][mask], "reward": cols["reward"][mask]})
        curves.append((c["step"] * action_repeat, c["reward"]))
    return curves


# The official curves (data/official_tdmpc2/, by file stem) were made on the original dm_control suite; our runs are on
# MuJoCo Playground's ports, which differ: in every port the physics (DMC_PORT_NOTE), and per task as below. A few
# words each, for the legend and the note under the table; the measurements are in docs/envs.md.
OFFICIAL_DMC_DIFFERENCES = {
    "acrobot-swingup": "Euler integrator instead of RK4",
    "cartpole-balance": "Euler integrator instead of RK4",
    "cartpole-swingup": "Euler integrator instead of RK4",
    "cheetah-run": "",
    "finger-spin": "other timestep, friction cone and integrator; reset skips the collision check",
    "hopper-hop": "touch readings differ strongly under MJX",
    "pendulum-swingup": "observation order swapped; reset covers half the angle range",
    "quadruped-walk": "Playground has no port of this task",
    "reacher-easy": "first observation computed before the target is placed",
    "walker-run": "no torso-height observation (a torso orientation entry instead)",
    "walker-walk": "no torso-height observation (a torso orientation entry instead)",
}
DMC_PORT_NOTE = ("The official TD-MPC2 curves were made on the original dm_control suite. In every MuJoCo Playground "
                 "port the physics differs (fewer solver and line-search iterations, eulerdamp off, contacts capped "
                 "per model), so trajectories from one state split within 1 to 100 env steps and a fixed policy "
                 "scores differently. Per task: docs/envs.md.")


class Baseline(NamedTuple):
    label: str
    curves: list  # [(env steps, reward)] per seed
    dmc_differences: str | None  # None unless it is an official dm_control curve: then that task's known differences


def _name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def assign_baselines(paths, env_ids, env_filter=None, action_repeat: int = 2) -> dict:
    """{env_id: [Baseline]}: a baseline goes to --env-id if given, else to the env its file is named after
    (hopper-hop.csv -> HopperHop), else to the only env present. A file named like an official TD-MPC2 CSV is taken
    for the official dm_control curve of that task."""
    out = defaultdict(list)
    for p in paths or ():
        curves = load_baseline(p, action_repeat)
        if env_filter:
            env = env_filter
        else:
            matches = [e for e in env_ids if _name_key(e) == _name_key(Path(p).stem)]
            if not matches and len(env_ids) != 1:
                raise PlotCIError(f"{p}: cannot tell which env this baseline belongs to; name the file after the "
                                  f"env (e.g. hopper-hop.csv) or pass --env-id")
            env = matches[0] if matches else env_ids[0]
        stem = Path(p).stem
        out[env].append(Baseline(f"baseline {stem}", curves, OFFICIAL_DMC_DIFFERENCES.get(stem)))
    return out


def baseline_note(env_id: str, b: Baseline) -> str:
    """What an official dm_control curve's task differs in here, for under the table."""
    return f"{env_id}, {b.label}: {b.dmc_differences or 'no difference known beyond the physics'}"


# ---------------------------------------------------------------------------
# Metrics and the countable rule (docs/plot_ci.md, "Metrics")
# ---------------------------------------------------------------------------
def score_curve(run: Run, metric: str) -> np.ndarray:
    """The per-evaluation return the metric is taken over.

    TD-MPC: best-pi -> return_pi, best-mppi -> return_mppi, otherwise max(return_pi, return_mppi) per row
    (extra columns such as Glass's return_arb are ignored). PPO: always the stochastic `return` column.
    """
    if metric not in METRICS:
        raise PlotCIError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if run.kind == "ppo":
        return run.columns["return"]
    if metric == "best-pi":
        return run.columns["return_pi"]
    if metric == "best-mppi":
        return run.columns["return_mppi"]
    return np.fmax(run.columns["return_pi"], run.columns["return_mppi"])


def metric_value(run: Run, metric: str) -> float:
    """best-* = max over rows, final = last row, strength = mean over rows; nan when there are no rows."""
    curve = score_curve(run, metric)
    if curve.size == 0 or np.all(np.isnan(curve)):
        return math.nan
    if metric == "final":
        return float(curve[-1])
    if metric == "strength":
        return float(np.nanmean(curve))
    return float(np.nanmax(curve))


def countable(last_step, metric: float, min_steps: float, g1: float) -> bool:
    """A run counts once it reached `min_steps`, or earlier when its metric is already >= g1."""
    if last_step is None:
        return False
    return bool(last_step >= min_steps or metric >= g1)


# ---------------------------------------------------------------------------
# The table (docs/plot_ci.md, "The table")
# ---------------------------------------------------------------------------
@dataclass
class FamilyRow:
    env_id: str
    family: str
    runs: list  # countable runs, by seed
    values: list  # their metric values
    g1_hits: int
    g2_any: bool
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class Rejected:
    """A run that does not count (yet): listed under the table and the aggregates, never averaged in."""

    env_id: str
    family: str
    run: Run
    value: float


def parse_merges(items) -> dict:
    """`OLD=NEW` strings -> {OLD: NEW}."""
    merges = {}
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise PlotCIError(f"--merge expects OLD=NEW, got {item!r}")
        merges[old] = new
    return merges


def family_names(run: Run, merges: dict) -> tuple[str, str]:
    """(the name a --merge OLD can match, the family): the exp_name; for a continuation its merged exp_name followed by
    its label, so that it never counts as a from-scratch seed of its source's family."""
    name = merges.get(run.exp_name, run.exp_name)
    if run.continued is None:
        return run.exp_name, name
    full = f"{name} ({run.continued.label()})"
    return full, merges.get(full, full)  # a continuation family can be merged by its whole name too


def summarize(runs, metric="best-any", min_steps=4_000_000, g1=500.0, g2=600.0, merges=None):
    """Group runs by (env_id, family): the merged exp_name, plus for a continuation its step and changed flags (see
    family_names); return (table rows, non-countable runs as Rejected)."""
    merges = merges or {}
    groups = defaultdict(list)
    for run in runs:
        groups[(run.env_id, family_names(run, merges)[1])].append(run)
    rows, rejected = [], []
    for (env_id, family), members in sorted(groups.items()):
        counted, values = [], []
        for run in sorted(members, key=lambda r: (r.seed, str(r.path))):
            value = metric_value(run, metric)
            # A run without a finite metric (every eval NaN) is listed below the table, not averaged in.
            if not math.isnan(value) and countable(run.last_step, value, min_steps, g1):
                counted.append(run)
                values.append(value)
            else:
                rejected.append(Rejected(env_id, family, run, value))
        mean, low, high = t_interval(values) if values else (math.nan, math.nan, math.nan)
        g1_hits = sum(v >= g1 for v in values)
        rows.append(FamilyRow(env_id, family, counted, values, g1_hits, any(v >= g2 for v in values), mean, low, high))
    return rows, rejected


def _num(x: float) -> str:
    return DASH if math.isnan(x) else f"{x:.1f}"


def table_cells(row: FamilyRow) -> list[str]:
    n = len(row.values)
    ci = DASH if n < 2 else f"[{row.low:.1f}, {row.high:.1f}]"
    values = ", ".join(f"{v:.1f}" for v in row.values) or DASH
    return [row.env_id, row.family, str(n), _num(row.mean), ci, f"{row.g1_hits}/{n}", "yes" if row.g2_any else "no",
            values]


TABLE_HEADER = ["Env", "Family", "Runs", "Mean", "95% CI", "G1 hits", "G2", "Values"]


@dataclass(frozen=True)
class Table:
    """A table as text cells, rendered both as Markdown and on the HTML page, so the two show the same numbers."""

    header: list
    rows: list
    numeric: tuple  # indices of the right-aligned columns


def family_table(rows, descriptions=None) -> Table:
    """The table of families; with --describe a last column holds each family's line."""
    header = TABLE_HEADER + (["Description"] if descriptions else [])
    cells = [table_cells(r) + ([descriptions.get(r.family, "")] if descriptions else []) for r in rows]
    return Table(header, cells, (2, 3, 4, 5, 6))


def markdown_table(t: Table) -> list[str]:
    return ["| " + " | ".join(t.header) + " |",
            "|" + "|".join("---:" if i in t.numeric else "---" for i in range(len(t.header))) + "|",
            *("| " + " | ".join(cells) + " |" for cells in t.rows)]


def rule_line(metric, min_steps, g1, g2) -> str:
    return (f"Metric {metric}; a run counts when its last step >= {min_steps:,.0f} or {metric} >= {g1:g}; "
            f"G1 hits = #(value >= {g1:g}) / Runs; G2 = any value >= {g2:g}; 95% CI by Student's t (n-1 dof).")


def not_countable_caption(metric, min_steps, g1) -> str:
    return f"Not countable yet (last step < {min_steps:,.0f} and {metric} < {g1:g}; or no finite return):"


def rejected_line(r: Rejected, metric: str) -> str:
    last = "no evaluation yet" if r.run.last_step is None else f"last step {r.run.last_step:,}"
    return f"{r.env_id} / {r.family} seed {r.run.seed}: {last}, {metric} {_num(r.value)} ({r.run.path})"


def dmc_baseline_notes(baselines) -> list[str]:
    """baseline_note of every official dm_control curve among {env_id: [Baseline]}."""
    return [baseline_note(env, b) for env, found in sorted(baselines.items()) for b in found
            if b.dmc_differences is not None]


def format_markdown(rows, rejected, metric, min_steps, g1, g2, baselines=None, descriptions=None) -> str:
    """The Markdown table, a one-line legend, what the dm_control baselines differ in, and the runs that do not
    count yet."""
    lines = [rule_line(metric, min_steps, g1, g2), "", *markdown_table(family_table(rows, descriptions))]
    notes = dmc_baseline_notes(baselines or {})
    if notes:
        lines += ["", f"Baselines from dm_control, not from Playground. {DMC_PORT_NOTE}"]
        lines += [f"- {note}" for note in notes]
    if rejected:
        lines += ["", not_countable_caption(metric, min_steps, g1)]
        lines += [f"- {rejected_line(r, metric)}" for r in rejected]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows) -> None:
    """The table as CSV: one row per (env, family), numbers to one decimal (empty when undefined), values
    separated by spaces, g2 as 0/1."""
    fmt = lambda x: "" if math.isnan(x) else f"{x:.1f}"
    write_csv_rows(path, ["env_id", "family", "runs", "mean", "ci_low", "ci_high", "g1_hits", "g2", "values"],
                   [[r.env_id, r.family, len(r.values), fmt(r.mean), fmt(r.low), fmt(r.high), r.g1_hits,
                     int(r.g2_any), " ".join(f"{v:.1f}" for v in r.values)] for r in rows])


# ---------------------------------------------------------------------------
# Learning curves (docs/plot_ci.md, "The curves")
# ---------------------------------------------------------------------------
def mean_band(curves, confidence: float = 0.95):
    """Mean and t band of (steps, values) curves on a common grid.

    The grid is the union of the curves' steps from the latest first step to the earliest last step, so every grid
    point averages all n curves (each interpolated linearly) and n never changes along the band.
    Returns (grid, mean, low, high); low/high are nan when n = 1.
    """
    start = max(float(s[0]) for s, _ in curves)
    stop = min(float(s[-1]) for s, _ in curves)
    grid = np.unique(np.concatenate([s[(s >= start) & (s <= stop)] for s, _ in curves]))
    ys = np.stack([np.interp(grid, s, v) for s, v in curves])
    mean = ys.mean(axis=0)
    if len(curves) < 2:
        return grid, mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    half = t_quantile(0.5 + confidence / 2.0, len(curves) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(curves))
    return grid, mean, mean - half, mean + half


@dataclass(frozen=True)
class Band:
    """One line of a curves plot and its rows in curves_{env}.csv: the mean of n curves with its 95% t band."""

    family: str
    legend: str
    color: tuple
    grid: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int
    returns: np.ndarray  # every value of the curves, also outside the grid: the y range covers them
    start: float = math.nan  # a continuation family's checkpoint step: drawn as a dotted line where its curve begins


def make_band(family: str, legend: str, color, curves, start: float = math.nan) -> Band:
    grid, mean, low, high = mean_band(curves)
    returns = np.concatenate([values for _, values in curves])
    return Band(family, legend, color, grid, mean, low, high, len(curves), returns, start)


def family_color(name: str):
    """A colour fixed by the family name alone (md5 hash -> hue, brightness), the same in every plot and run."""
    digest = hashlib.md5(name.encode()).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    return tuple(hsv_to_rgb((hue, 0.8, 0.55 + 0.35 * digest[4] / 255)))


def env_bands(rows, baselines, metric: str, action_repeat: int, descriptions=None) -> list[Band]:
    """The bands of one env: its baselines (grey, steps converted to env steps; an official dm_control curve says so
    on a second legend line), then each family with countable runs (its --describe line after its name)."""
    unit = "env steps" if action_repeat == 1 else f"agent steps ×{action_repeat}"
    bands = []
    for b in baselines:
        legend = f"{b.label} ({unit}, n={len(b.curves)})"
        if b.dmc_differences is not None:
            legend += f"\ndm_control, not Playground: {b.dmc_differences or 'physics differs'}"
        bands.append(make_band(b.label, legend, (0.25, 0.25, 0.25), b.curves))
    for row in rows:
        if row.runs:
            curves = [(r.steps, score_curve(r, metric)) for r in row.runs]
            description = (descriptions or {}).get(row.family)
            legend = f"{row.family} (n={len(curves)})" + (f": {description}" if description else "")
            # A continuation's curve starts after the checkpoint it was continued from: a dotted line marks that step.
            starts = [r.continued.step for r in row.runs if r.continued is not None]
            start = float(min(starts)) if starts else math.nan
            bands.append(make_band(row.family, legend, family_color(row.family), curves, start))
    return bands


def write_curves_csv(path: Path, bands) -> None:
    """The data behind curves_{env}.png: one row per band and grid step (lo, hi empty when n = 1)."""
    write_csv_rows(path, ["family", "step", "mean", "lo", "hi", "n"],
                   [[b.family, f"{s:.0f}" if s == round(s) else f"{s:g}", _csv_num(m), _csv_num(lo), _csv_num(hi),
                     b.n] for b in bands for s, m, lo, hi in zip(b.grid, b.mean, b.low, b.high, strict=True)])


def _steps_label(x, _pos=None) -> str:
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else (f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}")


def plot_env(path: Path, env_id: str, bands, series: str, g1: float, g2: float) -> None:
    """curves_{env}.png: per band the mean with its 95% t band (baselines grey), G1/G2 as horizontal lines."""
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    for b in bands:
        ax.plot(b.grid, b.mean, color=b.color, lw=1.8, label=b.legend, marker="." if b.grid.size == 1 else None)
        ax.fill_between(b.grid, b.low, b.high, color=b.color, alpha=0.2, lw=0)
        if not math.isnan(b.start):
            ax.axvline(b.start, color=b.color, ls=":", lw=1)
    ax.axhline(g1, color="k", ls="--", lw=1, label=f"G1 = {g1:g}")
    ax.axhline(g2, color="k", ls=":", lw=1, label=f"G2 = {g2:g}")
    # The y range follows the returns themselves: with 2-3 seeds a t band (t = 12.7 at n = 2) can reach far past any
    # return and would squash the curves, so it is cut at the frame instead.
    returns = np.concatenate([[g1, g2], *(b.returns for b in bands)])
    y_low, y_high = np.nanmin(returns), np.nanmax(returns)
    pad = 0.05 * (y_high - y_low) or 1.0
    ax.set_ylim(y_low - pad, y_high + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(f"{env_id}: mean over countable seeds, 95% t band\n(per-eval {series})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def curve_series(rows, metric: str) -> str:
    """The per-evaluation series the curves show, for the plot title."""
    series = {"best-pi": "return_pi", "best-mppi": "return_mppi"}.get(metric, "max(return_pi, return_mppi)")
    if any(r.kind == "ppo" for row in rows for r in row.runs):
        series += "; PPO: return"
    return series


# ---------------------------------------------------------------------------
# Aggregates across tasks: IQM, probability of improvement, performance profiles
# (docs/plot_ci.md, "Aggregates across tasks").
# Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021.
# Every function takes normalised scores with runs on the last axis and keeps leading axes (bootstrap resamples).
# ---------------------------------------------------------------------------
AGGREGATES = ("iqm", "mean", "median", "optimality_gap")
AGGREGATE_TITLES = {"iqm": "IQM", "mean": "Mean", "median": "Median", "optimality_gap": "Optimality gap"}
DMC_MAX_RETURN = 1000.0  # a DM Control episode: 1,000 env steps with rewards in [0, 1]
PROFILE_POINTS = 101


def iqm(scores: np.ndarray) -> np.ndarray:
    """Interquartile mean: drop the floor(n/4) lowest and highest of the n values, average the rest."""
    n = scores.shape[-1]
    cut = n // 4
    return np.sort(scores, axis=-1)[..., cut:n - cut].mean(axis=-1)


def aggregate_metrics(per_task: list[np.ndarray]) -> dict[str, np.ndarray]:
    """IQM over the runs of all tasks pooled; mean and median of the per-task means; optimality gap = the mean over
    tasks of mean(max(0, 1 - score)). Each task weighs the same whatever its number of runs."""
    pooled = np.concatenate(per_task, axis=-1)
    task_means = np.stack([s.mean(axis=-1) for s in per_task], axis=-1)
    task_gaps = np.stack([np.maximum(0.0, 1.0 - s).mean(axis=-1) for s in per_task], axis=-1)
    return {"iqm": iqm(pooled), "mean": task_means.mean(axis=-1), "median": np.median(task_means, axis=-1),
            "optimality_gap": task_gaps.mean(axis=-1)}


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 for a run X drawn from `x` and a run Y from `y`: the Mann-Whitney U / (n_x n_y)."""
    diff = x[..., :, None] - y[..., None, :]
    return (diff > 0).mean(axis=(-2, -1)) + 0.5 * (diff == 0).mean(axis=(-2, -1))


def performance_profile(per_task: list[np.ndarray], taus: np.ndarray) -> np.ndarray:
    """Fraction of runs with score > tau for every tau (last axis), averaged over tasks."""
    return np.mean([np.count_nonzero(s[..., :, None] > taus, axis=-2) / s.shape[-1] for s in per_task], axis=0)


def stratified_resample(per_task: list[np.ndarray], reps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`reps` stratified bootstrap samples: each task's n runs drawn n times with replacement, tasks kept apart.
    Task i comes back with shape (reps, n_i)."""
    return [s[rng.integers(0, s.size, size=(reps, s.size))] for s in per_task]


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval: the (1 - c)/2 and (1 + c)/2 quantiles over the resamples (axis 0)."""
    tail = 50.0 * (1.0 - confidence)
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)


def bootstrap_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator fixed by the seed and the names (analysis, families): a family's intervals are the same whichever
    other families the command compares, and in whatever order."""
    words = [int.from_bytes(hashlib.md5(name.encode()).digest()[:4], "big") for name in names]
    return np.random.default_rng([seed, *words])


@dataclass
class Analysis:
    """What --aggregate computes: normalised scores per family and task, then the three analyses' results."""

    tasks: list  # tasks every analysed family has runs on
    dropped_tasks: list  # tasks some analysed family lacks: left out
    normalisation: str  # how scores were normalised, in words
    scores: dict  # {family: [scores of its countable runs on each task, in `tasks` order]}
    aggregates: dict  # {family: {metric: (value, lo, hi)}}
    improvements: list  # [(x, y, task, probability, lo, hi)]; task "all" = the average over tasks
    taus: np.ndarray
    profiles: dict  # {family: (fraction, lo, hi)}, arrays over taus


def normalisation_ranges(mode: str, tasks, baselines) -> tuple[dict, str]:
    """{task: (zero, one)} for score = (return - zero) / (one - zero), and the rule in words."""
    if mode == "dmc":
        return {t: (0.0, DMC_MAX_RETURN) for t in tasks}, f"return / {DMC_MAX_RETURN:g} (DM Control's maximum)"
    ranges = {}
    for task in tasks:
        found = baselines.get(task, [])
        if len(found) != 1:
            raise PlotCIError(f"--normalize baseline needs exactly one --baseline for {task}, got {len(found)}")
        _, mean, _, _ = mean_band(found[0].curves)
        zero, one = float(mean.min()), float(mean.max())
        if one == zero:
            raise PlotCIError(f"--normalize baseline divides by zero on {task}: the mean curve of {found[0].label} "
                              f"is flat at {zero:g} (min = max)")
        ranges[task] = (zero, one)
    return ranges, "(return - min) / (max - min), min and max of the baseline's mean curve on each task"


def analysis_tasks(rows, families) -> tuple[list, list]:
    """(tasks that every family has runs on, tasks left out because some family lacks them)."""
    tasks_of = {f: {r.env_id for r in rows if r.family == f} for f in families}
    common = set.intersection(*tasks_of.values())
    if not common:
        listing = "; ".join(f"{f} on {', '.join(sorted(t))}" for f, t in tasks_of.items())
        raise PlotCIError(f"no task has runs of every family compared ({listing})")
    return sorted(common), sorted(set.union(*tasks_of.values()) - common)


def analyse(rows, baselines, pairs=None, normalize="dmc", reps=50_000, seed=0) -> Analysis:
    """Aggregates, probabilities of improvement and performance profiles of the countable runs.

    `pairs` [(X, Y)] chooses the families (those named) and the comparisons; by default every family, every pair.
    """
    known = sorted({r.family for r in rows})
    families = list(dict.fromkeys(f for pair in pairs for f in pair)) if pairs else known
    unknown = [f for f in families if f not in known]
    if unknown:
        raise PlotCIError(f"--compare: no runs of family {', '.join(unknown)} (families: {', '.join(known)})")
    pairs = pairs or list(itertools.combinations(families, 2))
    tasks, dropped = analysis_tasks(rows, families)
    ranges, rule = normalisation_ranges(normalize, tasks, baselines)
    row_of = {(r.env_id, r.family): r for r in rows}
    scores = {}
    for family in families:
        scores[family] = []
        for task in tasks:
            values = row_of[task, family].values
            if len(values) < 2:
                raise PlotCIError(f"family {family} has {len(values)} countable run(s) on {task}; the bootstrap "
                                  f"needs at least 2 per family and task (see the not-countable list, --merge, "
                                  f"--compare)")
            zero, one = ranges[task]
            scores[family].append((np.asarray(values, dtype=float) - zero) / (one - zero))

    aggregates = {}
    for family in families:
        point = aggregate_metrics(scores[family])
        boot = aggregate_metrics(stratified_resample(scores[family], reps, bootstrap_rng(seed, "aggregate", family)))
        aggregates[family] = {m: (float(point[m]), *map(float, percentile_interval(boot[m]))) for m in AGGREGATES}

    improvements = []
    for x, y in pairs:
        rng = bootstrap_rng(seed, "improvement", x, y)
        boot_x, boot_y = stratified_resample(scores[x], reps, rng), stratified_resample(scores[y], reps, rng)
        points = [probability_of_improvement(a, b) for a, b in zip(scores[x], scores[y], strict=True)]
        boots = [probability_of_improvement(a, b) for a, b in zip(boot_x, boot_y, strict=True)]
        for task, point, boot in [*zip(tasks, points, boots, strict=True), ("all", np.mean(points), np.mean(boots, 0))]:
            improvements.append((x, y, task, float(point), *map(float, percentile_interval(boot))))

    every_score = np.concatenate([s for f in families for s in scores[f]])
    taus = np.linspace(min(0.0, every_score.min()), max(1.0, every_score.max()), PROFILE_POINTS)
    profiles = {}
    for family in families:
        boot = performance_profile(stratified_resample(scores[family], reps, bootstrap_rng(seed, "profile", family)),
                                   taus)
        profiles[family] = (performance_profile(scores[family], taus), *percentile_interval(boot))
    return Analysis(tasks, dropped, rule, scores, aggregates, improvements, taus, profiles)


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"


IMPROVEMENT_CAPTION = ("Probability of improvement P(X > Y) + ½ P(X = Y) of a run of X over a run of Y on the same "
                       "task; `all` = the average over tasks; P(Y > X) = 1 - P(X > Y).")


def analysis_caption(a: Analysis, metric: str, reps: int, seed: int) -> str:
    return (f"Aggregates of {metric} over {len(a.tasks)} task(s) ({', '.join(a.tasks)}); normalised score = "
            f"{a.normalisation}. 95% CIs by stratified bootstrap (runs resampled within each task; {reps:,} "
            f"resamples, seed {seed}).")


def aggregate_table(a: Analysis) -> Table:
    rows = [[family, str(sum(s.size for s in a.scores[family])),
             *(f"{v:.3f} {_ci(lo, hi)}" for v, lo, hi in (values[m] for m in AGGREGATES))]
            for family, values in a.aggregates.items()]
    return Table(["Family", "Runs", *(AGGREGATE_TITLES[m] for m in AGGREGATES)], rows,
                 tuple(range(1, len(AGGREGATES) + 2)))


def improvement_table(a: Analysis) -> Table:
    rows = [[x, y, task, f"{p:.3f}", _ci(lo, hi)] for x, y, task, p, lo, hi in a.improvements]
    return Table(["X", "Y", "Task", "Probability", "95% CI"], rows, (3, 4))


def unused_runs(a: Analysis, rejected) -> list[Rejected]:
    """The not-countable runs of the families and tasks analysed."""
    return [r for r in rejected if r.family in a.scores and r.env_id in a.tasks]


def format_analysis(a: Analysis, rejected, metric: str, reps: int, seed: int) -> str:
    """The aggregates and probabilities of improvement as Markdown, and what was left out."""
    lines = [analysis_caption(a, metric, reps, seed), "", *markdown_table(aggregate_table(a))]
    if a.improvements:
        lines += ["", IMPROVEMENT_CAPTION, "", *markdown_table(improvement_table(a))]
    lines += ["", "Performance profiles (fraction of runs with normalised score > τ, 95% bands): profiles.png, "
                  "profiles.csv."]
    if a.dropped_tasks:
        lines.append(f"Left out (not run by every family compared): {', '.join(a.dropped_tasks)}.")
    unused = unused_runs(a, rejected)
    if unused:
        lines += ["", "Not used (not countable):"] + [f"- {rejected_line(r, metric)}" for r in unused]
    return "\n".join(lines) + "\n"


def write_analysis_csvs(out: Path, a: Analysis) -> list[str]:
    """aggregate.csv, improvement.csv, profiles.csv: the data behind the pictures and the Markdown."""
    write_csv_rows(out / "aggregate.csv", ["family", "metric", "value", "lo", "hi"],
                   [[f, m, *map(_csv_num, a.aggregates[f][m])] for f in a.aggregates for m in AGGREGATES])
    write_csv_rows(out / "improvement.csv", ["family_x", "family_y", "task", "probability", "lo", "hi"],
                   [[x, y, task, *map(_csv_num, (p, lo, hi))] for x, y, task, p, lo, hi in a.improvements])
    write_csv_rows(out / "profiles.csv", ["family", "tau", "fraction", "lo", "hi"],
                   [[f, _csv_num(tau), *map(_csv_num, values)] for f, (fraction, lo, hi) in a.profiles.items()
                    for tau, *values in zip(a.taus, fraction, lo, hi, strict=True)])
    return ["aggregate.csv", "improvement.csv", "profiles.csv"]


def plot_aggregates(path: Path, a: Analysis) -> None:
    """aggregate.png: per metric, each family's point estimate (tick) and 95% bootstrap CI (bar)."""
    families = list(a.aggregates)
    fig = Figure(figsize=(11, 1.2 + 0.45 * len(families)), dpi=110)
    axes = fig.subplots(1, len(AGGREGATES), sharey=True)
    for ax, metric in zip(axes, AGGREGATES, strict=True):
        for i, family in enumerate(families):
            value, lo, hi = a.aggregates[family][metric]
            color = family_color(family)
            ax.barh(i, hi - lo, left=lo, height=0.6, color=color, alpha=0.35)
            ax.vlines(value, i - 0.3, i + 0.3, color=color, lw=2.5)
        ax.set_title(AGGREGATE_TITLES[metric] + (" (lower is better)" if metric == "optimality_gap" else ""),
                     fontsize=10)
        ax.set_xlabel("normalised score", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(families)), families, fontsize=9)
    axes[0].invert_yaxis()
    fig.suptitle(f"{', '.join(a.tasks)}: point estimate and 95% stratified bootstrap CI", fontsize=10)
    fig.tight_layout(w_pad=2.0)
    save_figure(fig, path)


def plot_profiles(path: Path, a: Analysis) -> None:
    """profiles.png: per family the fraction of runs above each normalised score tau, with its 95% band."""
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    for family, (fraction, lo, hi) in a.profiles.items():
        color = family_color(family)
        label = f"{family} ({sum(s.size for s in a.scores[family])} runs)"
        ax.plot(a.taus, fraction, color=color, lw=1.8, label=label, drawstyle="steps-post")
        ax.fill_between(a.taus, lo, hi, color=color, alpha=0.2, lw=0, step="post")
    ax.set_xlabel("normalised score τ")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Performance profiles on {', '.join(a.tasks)}, 95% stratified bootstrap bands", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------
# The dashboard page (docs/plot_ci.md, "The dashboard"): every env's table, curves and runs' progress, and the
# aggregates, as one index.html beside the PNGs. Plain HTML and CSS, no script: it opens as a file or through any
# static server, and with --watch a <meta http-equiv="refresh"> reloads it.
# ---------------------------------------------------------------------------
PAGE_STYLE = """
body { font: 14px/1.45 sans-serif; color: #222; max-width: 1150px; margin: 1.2em auto; padding: 0 1em; }
h2 { border-bottom: 2px solid #ccc; margin-top: 1.6em; }
h3 { margin: 1em 0 0.2em; font-size: 15px; }
table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; border-radius: 2px; }
.note { background: #fff7dc; border-left: 3px solid #d9a400; padding: 0.3em 0.7em; }
.made { color: #555; }
.runs td:last-child { font-size: 11px; color: #666; word-break: break-all; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
"""


def _text(s: str) -> str:
    """Escaped text; `code` spans as in the Markdown."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))


def _swatch(family: str) -> str:
    return f'<span class="swatch" style="background:{to_hex(family_color(family))}"></span>'


def html_table(t: Table, swatch_column=None, css_class=None) -> str:
    """The table as HTML; the cells of `swatch_column` (family names) start with the family's colour."""
    def cell(tag, i, text):
        attr = ' class="num"' if i in t.numeric else ""
        swatch = _swatch(text) if i == swatch_column and tag == "td" else ""
        return f"<{tag}{attr}>{swatch}{_text(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(t.header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(cells)) + "</tr>" for cells in t.rows)
    attr = f' class="{css_class}"' if css_class else ""
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _utc(t: float, fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime(fmt)


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return DASH
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def run_speed(run: Run) -> float:
    """Env steps per second of wall time from the first to the last evaluation, evaluations included; nan with fewer
    than two. eval.csv's wall_time continues across a resume, so time spent preempted does not count."""
    wall = run.columns.get("wall_time")
    if wall is None or wall.size < 2 or not wall[-1] > wall[0]:
        return math.nan
    return float((run.steps[-1] - run.steps[0]) / (wall[-1] - wall[0]))


STALLED_EVALS = 3  # a run whose eval.csv is older than this many of its evaluation intervals has an ETA "stalled?"


def progress_table(rows, rejected, min_steps: int, now: float) -> Table:
    """Per run of these families, countable or not: last step, speed, the ETA to min_steps at that speed, the age of
    its eval.csv, whether it counts. A run preempted or crashed below min_steps stops writing, so its ETA would
    stay put: it reads "stalled?" instead."""
    cells = []
    for row in rows:
        runs = [(r, "yes") for r in row.runs]
        runs += [(r.run, "not yet") for r in rejected if (r.env_id, r.family) == (row.env_id, row.family)]
        for run, counts in sorted(runs, key=lambda rc: (rc[0].seed, str(rc[0].path))):
            last, speed = run.last_step, run_speed(run)
            if last is not None and last >= min_steps:
                eta = "reached"
            elif math.isnan(speed) or speed <= 0:  # no rows, or one
                eta = DASH
            elif now - run.modified > STALLED_EVALS * (last - run.steps[0]) / (run.steps.size - 1) / speed:
                eta = "stalled?"
            else:
                left = (min_steps - last) / speed
                eta = f"{_duration(left)} ({_utc(now + left)})"
            rate = DASH if math.isnan(speed) else f"{speed:,.0f}" if speed >= 100 else f"{speed:.1f}"
            cells.append([row.family, str(run.seed), DASH if last is None else f"{last:,}", rate, eta,
                          f"{_duration(now - run.modified)} ago", counts, str(run.path)])
    return Table(["Family", "Seed", "Last step", "Steps/s", f"ETA to {min_steps:,}", "eval.csv written", "Counts",
                  "Folder"], cells, (2, 3))


def format_page(args, rows, rejected, baselines, descriptions, images, analysis, analysis_error, now) -> str:
    """index.html. `images` maps each PNG to a digest of its bytes, appended to its address so that a browser
    reloading the page fetches a redrawn picture instead of its cached copy."""
    env_ids = sorted({r.env_id for r in rows})
    img = lambda name, alt: f'<img src="{html.escape(name)}?v={images[name]}" alt="{html.escape(alt)}">'
    reload = f'<meta http-equiv="refresh" content="{args.watch}">\n' if args.watch else ""
    sections = [(f"env-{_file_name(e)}", e) for e in env_ids]
    if analysis is not None or analysis_error:
        sections.append(("aggregates", "Aggregates"))
    parts = [
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n{reload}'
        f"<title>plot_ci.py: {html.escape(', '.join(env_ids))}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>",
        f"<h1>Families of runs: {html.escape(', '.join(env_ids))}</h1>",
        f'<p class="made">Made <time datetime="{_utc(now, "%Y-%m-%dT%H:%M:%SZ")}">{_utc(now, "%Y-%m-%d %H:%M:%S UTC")}'
        f"</time> from the runs below {_text(', '.join(args.dirs))}"
        + (f"; reloads every {args.watch} s." if args.watch else ".") + "</p>",
        f"<p>{_text(rule_line(args.metric, args.min_steps, args.g1, args.g2))}</p>",
        "<nav>" + " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in sections) + "</nav>",
    ]
    for env_id in env_ids:
        env_rows = [r for r in rows if r.env_id == env_id]
        env_rejected = [r for r in rejected if r.env_id == env_id]
        parts += [f'<section id="env-{_file_name(env_id)}">\n<h2>{html.escape(env_id)}</h2>',
                  html_table(family_table(env_rows, descriptions), swatch_column=1, css_class="families")]
        parts += [f'<p class="note"><b>Baseline from dm_control, not from Playground.</b> {_text(n)}. '
                  f"{_text(DMC_PORT_NOTE)}</p>" for n in dmc_baseline_notes({env_id: baselines.get(env_id, [])})]
        if env_rejected:
            parts += [f"<p>{_text(not_countable_caption(args.metric, args.min_steps, args.g1))}</p>",
                      "<ul>" + "".join(f"<li>{_text(rejected_line(r, args.metric))}</li>" for r in env_rejected)
                      + "</ul>"]
        parts += [img(f"curves_{_file_name(env_id)}.png", f"{env_id}: learning curves with 95% bands"),
                  f"<h3>{html.escape(env_id)}: progress of every run</h3>",
                  html_table(progress_table(env_rows, env_rejected, args.min_steps, now), swatch_column=0,
                             css_class="runs"),
                  "</section>"]
    if analysis is not None:
        parts += ['<section id="aggregates">\n<h2>Aggregates across tasks</h2>',
                  f"<p>{_text(analysis_caption(analysis, args.metric, args.bootstrap_reps, args.bootstrap_seed))}</p>",
                  html_table(aggregate_table(analysis), swatch_column=0)]
        if analysis.improvements:
            parts += [f"<p>{_text(IMPROVEMENT_CAPTION)}</p>", html_table(improvement_table(analysis))]
        parts += [img("aggregate.png", "aggregates with 95% bootstrap CIs"),
                  img("profiles.png", "performance profiles with 95% bootstrap bands")]
        if analysis.dropped_tasks:
            parts.append(f"<p>Left out (not run by every family compared): {_text(', '.join(analysis.dropped_tasks))}"
                         f".</p>")
        unused = unused_runs(analysis, rejected)
        if unused:
            parts += ["<p>Not used (not countable):</p>",
                      "<ul>" + "".join(f"<li>{_text(rejected_line(r, args.metric))}</li>" for r in unused) + "</ul>"]
        parts.append("</section>")
    elif analysis_error:
        parts.append(f'<section id="aggregates">\n<h2>Aggregates across tasks</h2>\n<p class="note">Not computed at '
                     f"this refresh: {_text(analysis_error)}</p>\n</section>")
    return "\n".join(parts + ["</body>\n</html>\n"])


# ---------------------------------------------------------------------------
# Writing files: through a temporary file and a rename, so a reader never sees half a file
# ---------------------------------------------------------------------------
def write_atomic(path: Path, write) -> None:
    """Call write(tmp) on a temporary name in the same folder (same extension), then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv_rows(path: Path, header, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    write_atomic(path, write)


def save_figure(fig: Figure, path: Path) -> None:
    write_atomic(path, fig.savefig)


def _csv_num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


# ---------------------------------------------------------------------------
# --glass-timeline: a Glass run's partition S over its evaluations (docs/plot_ci.md, "Glass timeline")
# ---------------------------------------------------------------------------
GLASS_THRESHOLDS = (100.0, 250.0, 400.0)


def read_glass_partitions(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(env steps (T,), S (T, N, K)) from the glass/P_S_step{step}.npz that tdmpc_glass_jax.py writes at every
    evaluation but the first: row n of S is prototype n's soft membership of the K clusters (it sums to 1)."""
    dumps = sorted((int(m[1]), path) for path in Path(run_dir, "glass").glob("P_S_step*.npz")
                   if (m := re.fullmatch(r"P_S_step(\d+)\.npz", path.name)))
    if not dumps:
        raise PlotCIError(f"{run_dir}: no glass/P_S_step*.npz (a tdmpc_glass_jax.py run writes one per evaluation "
                          "after the first)")
    partitions = []
    for _, path in dumps:
        try:
            with open(path, "rb") as f:
                S = np.asarray(np.load(f)["S"], dtype=float)
        except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
            raise PlotCIError(f"{path}: not an .npz with the partition S ({type(e).__name__}: {e})") from None
        if S.ndim != 2 or (partitions and S.shape != partitions[0].shape):
            want = "(prototypes, clusters)" if not partitions else f"{partitions[0].shape} as in the earlier dumps"
            raise PlotCIError(f"{path}: S has shape {S.shape}, expected {want}")
        partitions.append(S)
    return np.array([step for step, _ in dumps]), np.stack(partitions)


def first_crossings(run: Run, thresholds) -> dict:
    """{threshold: the first evaluation step at which max(return_pi, return_mppi) >= it, None if never}."""
    score = score_curve(run, "best-any")
    return {t: int(run.steps[np.argmax(score >= t)]) if np.any(score >= t) else None for t in thresholds}


def plot_glass_timeline(path: Path, run: Run, steps, S, crossings: dict) -> None:
    """One panel per prototype: its membership of each cluster as stacked areas over env steps, and a vertical
    line where the run's return first crosses each threshold (the same lines in every panel)."""
    num_prototypes, num_clusters = S.shape[1:]
    cols = math.ceil(math.sqrt(num_prototypes))
    rows = math.ceil(num_prototypes / cols)
    fig = Figure(figsize=(2.4 * cols + 0.6, 1.7 * rows + 1.4), dpi=110)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    cmap = colormaps["tab10" if num_clusters <= 10 else "tab20"]
    colors = [cmap(k % cmap.N) for k in range(num_clusters)]
    styles = ("--", "-.", ":")
    reached = [(t, step) for t, step in crossings.items() if step is not None]
    for n, ax in enumerate(axes):
        if n >= num_prototypes:
            ax.set_visible(False)
            continue
        ax.stackplot(steps, S[:, n, :].T, colors=colors, labels=[f"cluster {k}" for k in range(num_clusters)])
        for i, (t, step) in enumerate(reached):
            ax.axvline(step, color="k", ls=styles[i % len(styles)], lw=1,
                       label=f"max(pi, mppi) ≥ {t:g} at step {step:,}")
        ax.set_title(f"prototype {n}", fontsize=8)
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
        ax.tick_params(labelsize=7)
    missed = [f"{t:g}" for t, step in crossings.items() if step is None]
    title = (f"{run.path.name}: each prototype's cluster membership S (glass/P_S_step*.npz)\n{run.env_id}, "
             f"{run.exp_name}, seed {run.seed}" + (f"; never reached: {', '.join(missed)}" if missed else ""))
    fig.suptitle(title, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room below for the legend
    fig.supxlabel("environment steps", fontsize=8, y=0.085)
    save_figure(fig, path)


def read_glass_timeline(run_dir) -> tuple[Run, np.ndarray, np.ndarray]:
    """--glass-timeline RUN_DIR: (the run, its dumps' steps, their S), read before any output is written."""
    run_dir = Path(run_dir)
    if not (run_dir / "args.json").is_file() or not (run_dir / "eval.csv").is_file():
        raise PlotCIError(f"--glass-timeline {run_dir}: not a run folder (no args.json and eval.csv there)")
    return read_run(run_dir), *read_glass_partitions(run_dir)


def write_glass_timeline(out: Path, thresholds, run: Run, steps, S) -> str:
    """glass_timeline_{run folder}.png in `out`; returns its file name."""
    name = f"glass_timeline_{_file_name(run.path.resolve().name)}.png"
    out.mkdir(parents=True, exist_ok=True)
    plot_glass_timeline(out / name, run, steps, S, first_crossings(run, thresholds))
    return name


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise PlotCIError(f"{message} (see --help)")


def _steps(text: str) -> int:
    """A step count; accepts 4000000, 4_000_000 or 4e6."""
    try:
        return int(float(text.replace("_", "")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step count: {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    epilog = ("A run counts when its last eval step >= --min-steps, or earlier once its metric >= --g1; the others "
              "are listed under the table. Writes the table to stdout and ci_table.md, ci_table.csv, "
              "curves_{env}.png and curves_{env}.csv to --out; with --aggregate or --compare also aggregate.md, "
              "aggregate.csv, improvement.csv, profiles.csv, aggregate.png and profiles.png; with --html or --watch "
              "also index.html; with --glass-timeline glass_timeline_{run}.png. Docs: docs/plot_ci.md.")
    p = _Parser(prog="plot_ci.py", description=__doc__, epilog=epilog)
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="folders searched recursively for runs (an eval.csv with a sibling args.json); optional with "
                        "--glass-timeline")
    p.add_argument("--metric", default="best-any", choices=METRICS,
                   help="per-run value. TD-MPC: best-pi/best-mppi = max of return_pi/return_mppi, best-any = max of "
                        "both, final = last row of max(pi, mppi), strength = mean over rows of it. PPO runs use "
                        "their stochastic `return` column for every metric (default: best-any)")
    p.add_argument("--min-steps", type=_steps, default=4_000_000,
                   help="a run counts once its last eval step >= this (default: 4e6)")
    p.add_argument("--g1", type=float, default=500.0,
                   help="goal 1; a shorter run already counts once metric >= g1 (default: 500)")
    p.add_argument("--g2", type=float, default=600.0,
                   help="goal 2; the G2 column says whether any run reached it (default: 600)")
    p.add_argument("--merge", action="append", metavar="OLD=NEW",
                   help="count exp_name OLD as family NEW (repeatable)")
    p.add_argument("--baseline", action="append", metavar="CSV",
                   help="per-seed curves in the official TD-MPC2 format step,reward,seed, drawn as a grey band "
                        "(repeatable); placed on the plot of --env-id, or of the env the file is named after")
    p.add_argument("--baseline-action-repeat", type=_positive_int, default=2, metavar="K",
                   help="env steps per step of the --baseline CSVs: 2 for the official TD-MPC2 CSVs, which count "
                        "agent steps of an env that repeats every action twice; 1 for a CSV in env steps (default: 2)")
    p.add_argument("--env-id", default=None, help="only runs of this env (baselines are drawn on its plot)")
    p.add_argument("--aggregate", action="store_true",
                   help="across tasks: IQM, mean, median, optimality gap of normalised scores with stratified "
                        "bootstrap 95%% CIs; probability of improvement of every pair of families; performance "
                        "profiles")
    p.add_argument("--compare", nargs=2, action="append", metavar=("X", "Y"),
                   help="probability of improvement of family X over Y (repeatable; implies --aggregate, which then "
                        "covers the families named)")
    p.add_argument("--normalize", choices=("dmc", "baseline"), default="dmc",
                   help="score for --aggregate: dmc = return / 1000; baseline = (return - min) / (max - min) of the "
                        "--baseline's mean curve on that task (default: dmc)")
    p.add_argument("--bootstrap-reps", type=_positive_int, default=50_000, metavar="N",
                   help="bootstrap resamples for --aggregate (default: 50000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                   help="seed of the bootstrap: the same command gives the same intervals (default: 0)")
    p.add_argument("--describe", metavar="FILE",
                   help="a .json object or .toml table mapping family -> one line, shown in the tables and the "
                        "curves' legend")
    p.add_argument("--html", action="store_true",
                   help="also write index.html: every env's table, curves and runs' progress (last step, steps/s, "
                        "ETA to --min-steps) and the aggregates on one page")
    p.add_argument("--watch", type=_positive_int, metavar="SECONDS",
                   help="rewrite every output each SECONDS until Ctrl-C, and make the page reload at that period "
                        "(implies --html)")
    p.add_argument("--glass-timeline", metavar="RUN_DIR",
                   help="also (or, without DIRs, only) glass_timeline_{run}.png: each prototype's cluster membership "
                        "from the Glass run's glass/P_S_step*.npz over env steps, with a line where its return "
                        "first crosses each --thresholds value")
    p.add_argument("--thresholds", nargs="+", type=float, default=list(GLASS_THRESHOLDS), metavar="RETURN",
                   help="returns marked on --glass-timeline: the first step max(return_pi, return_mppi) >= each "
                        "(default: 100 250 400)")
    p.add_argument("--out", default=".", help="folder for the tables, pictures and their CSVs (default: .)")
    return p


def _file_name(env_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", env_id)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dirs and args.glass_timeline is None:
        parser.error("the following arguments are required: DIR")
    args.html = args.html or args.watch is not None
    return args


def read_descriptions(path) -> dict:
    """--describe FILE: {family: one line of text} from a JSON object or a TOML table, by the file's extension."""
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlotCIError(f"{path}: --describe file not found") from None
    except UnicodeDecodeError:
        raise PlotCIError(f"{path}: --describe file is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlotCIError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise PlotCIError(f"{path}: reading TOML needs Python 3.11 or later; use a .json file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PlotCIError(f"{path}: not valid TOML ({e})") from None
    else:
        raise PlotCIError(f"{path}: --describe takes a .json or .toml file")
    if not isinstance(data, dict):
        raise PlotCIError(f"{path}: expected an object mapping family -> description, got {type(data).__name__}")
    for family, line in data.items():
        if not isinstance(line, str) or "\n" in line.strip():
            raise PlotCIError(f"{path}: the description of {family!r} is not one line of text")
    return {family: line.strip() for family, line in data.items()}


def _digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()[:10]


def write_outputs(args, descriptions, verbose: bool = True) -> str:
    """Load, summarise, write every output; returns the Markdown text. Raises PlotCIError on bad input.
    verbose: the notes and the list of files written on stderr (a --watch refresh is silent)."""
    note = (lambda text: print(f"plot_ci.py: note: {text}", file=sys.stderr)) if verbose else (lambda text: None)
    merges = parse_merges(args.merge)
    runs = load_runs(args.dirs)
    if args.env_id is not None:
        envs = sorted({r.env_id for r in runs})
        runs = [r for r in runs if r.env_id == args.env_id]
        if not runs:
            raise PlotCIError(f"no runs of env {args.env_id} below {', '.join(args.dirs)} (found: {', '.join(envs)})")
    unused = sorted(set(merges) - {name for r in runs for name in (r.exp_name, family_names(r, merges)[0])})
    if unused:
        note(f"--merge names no run: {', '.join(unused)}")
    rows, rejected = summarize(runs, args.metric, args.min_steps, args.g1, args.g2, merges)
    undescribed = sorted(set(descriptions) - {r.family for r in rows})
    if undescribed:
        note(f"--describe names no family: {', '.join(undescribed)}")
    env_ids = sorted({r.env_id for r in rows})
    baselines = assign_baselines(args.baseline, env_ids, args.env_id, args.baseline_action_repeat)
    text = format_markdown(rows, rejected, args.metric, args.min_steps, args.g1, args.g2, baselines, descriptions)
    # Every analysis runs before any file is written, so bad input leaves no half set of outputs.
    analysis = analysis_error = None
    if args.aggregate or args.compare:
        try:
            analysis = analyse(rows, baselines, [tuple(p) for p in args.compare or ()], args.normalize,
                               args.bootstrap_reps, args.bootstrap_seed)
        except PlotCIError as e:
            if not args.watch:
                raise
            # A live page keeps its tables while some family still waits for its second countable run.
            analysis_error = str(e)
            note(f"no aggregates yet: {e}")
        if analysis is not None and analysis.dropped_tasks:
            note(f"aggregates leave out {', '.join(analysis.dropped_tasks)} (not run by every family compared)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "ci_table.md", text)
    write_csv(out / "ci_table.csv", rows)
    written = ["ci_table.md", "ci_table.csv"]
    for env_id in env_ids:
        env_rows = [r for r in rows if r.env_id == env_id]
        bands = env_bands(env_rows, baselines.get(env_id, []), args.metric, args.baseline_action_repeat, descriptions)
        name = "curves_" + _file_name(env_id)
        write_curves_csv(out / f"{name}.csv", bands)
        plot_env(out / f"{name}.png", env_id, bands, curve_series(env_rows, args.metric), args.g1, args.g2)
        written += [f"{name}.png", f"{name}.csv"]
    if analysis is not None:
        analysis_text = format_analysis(analysis, rejected, args.metric, args.bootstrap_reps, args.bootstrap_seed)
        write_text(out / "aggregate.md", analysis_text)
        written += ["aggregate.md", *write_analysis_csvs(out, analysis), "aggregate.png", "profiles.png"]
        plot_aggregates(out / "aggregate.png", analysis)
        plot_profiles(out / "profiles.png", analysis)
        text += "\n" + analysis_text
    if args.html:
        images = {name: _digest(out / name) for name in written if name.endswith(".png")}
        write_text(out / "index.html", format_page(args, rows, rejected, baselines, descriptions, images, analysis,
                                                   analysis_error, time.time()))
        written.append("index.html")
    if verbose:
        print(f"plot_ci.py: wrote {', '.join(written)} in {out}", file=sys.stderr)
    return text


def watch(args, descriptions) -> None:
    """Rewrite every output each --watch seconds until Ctrl-C or SIGTERM. A refresh that fails (a run folder moved
    away mid-read, a broken args.json) says so in one line and leaves the previous outputs in place."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: no temporary file left behind
    print(f"plot_ci.py: rewriting {Path(args.out) / 'index.html'} every {args.watch} s; Ctrl-C stops",
          file=sys.stderr)
    try:
        while True:
            time.sleep(args.watch)
            try:
                write_outputs(args, descriptions, verbose=False)
            except (PlotCIError, OSError) as e:
                print(f"plot_ci.py: refresh skipped at {_utc(time.time(), '%H:%M:%S UTC')}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("plot_ci.py: stopped watching", file=sys.stderr)


def main(argv=None) -> int:
    """CLI entry point: the table on stdout, files in --out; a bad input is one line on stderr and exit code 1.
    With --watch the first pass must succeed; later refreshes that fail are reported and retried."""
    try:
        args = parse_args(argv)
        descriptions = read_descriptions(args.describe)
        timeline = read_glass_timeline(args.glass_timeline) if args.glass_timeline is not None else None
        text = write_outputs(args, descriptions) if args.dirs else ""
        if timeline is not None:
            name = write_glass_timeline(Path(args.out), args.thresholds, *timeline)
            print(f"plot_ci.py: wrote {name} in {args.out}", file=sys.stderr)
    except (PlotCIError, OSError) as e:
        print(f"plot_ci.py: error: {e}", file=sys.stderr)
        return 1
    print(text, end="", flush=True)
    if args.watch and args.dirs:  # the timeline is drawn once
        watch(args, descriptions)
    return 0


# ---------------------------------------------------------------------------
# Student's t: quantile from the regularised incomplete beta function (exact to ~1e-12), so no scipy is needed
# ---------------------------------------------------------------------------
def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t interval with n-1 dof; low = high = nan when n = 1."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the exact CDF)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom, t >= 0."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes `betacf`)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


if __name__ == "__main__":
    sys.exit(main())
