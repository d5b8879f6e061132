# plot_ci.py — the seeds' 5-seed comparison table and learning curves with 95% confidence bands.
# Docs: README.md, section "plot_ci.py"; spec: REFERENCE.md §0 (run folder, metric names) and §5.
#
#   python plot_ci.py runs/ [--metric best-any] [--merge phasex_local=phasex] \
#       [--baseline hopper-hop.csv] [--env-id HopperHop] [--out plots/]
#
# Depends only on numpy, matplotlib and the standard library.
"""Make the 5-seed comparison table (mean, Student-t 95% CI, G1 hits) and learning curves from run folders."""

import argparse
import csv
import hashlib
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

METRICS = ("best-any", "best-pi", "best-mppi", "final", "strength")
TDMPC_COLUMNS = ("step", "return_pi", "return_mppi")
PPO_COLUMNS = ("step", "return")
BASELINE_COLUMNS = ("step", "reward", "seed")
DASH = "—"


class PlotCIError(Exception):
    """A problem with the inputs; `main` prints it as one line and exits with code 1."""


# ---------------------------------------------------------------------------
# Student's t: quantile from the regularised incomplete beta function (exact to ~1e-12)
# ---------------------------------------------------------------------------
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


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom, t >= 0."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


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


def countable(last_step, metric: float, min_steps: float, g1: float) -> bool:
    """The seeds' rule: a run counts once it reached `min_steps`, or earlier when its metric is already >= g1."""
    if last_step is None:
        return False
    return bool(last_step >= min_steps or metric >= g1)


# ---------------------------------------------------------------------------
# Reading run folders and baselines
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

    @property
    def steps(self) -> np.ndarray:
        return self.columns["step"]

    @property
    def last_step(self):
        return int(self.steps[-1]) if self.steps.size else None


def read_csv_columns(path: Path, required: tuple[str, ...]) -> dict:
    """Columns of a numeric CSV with a header; PlotCIError names the file and line of any bad row."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise PlotCIError(f"{path}: not a text CSV file") from None
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
    """Read `run_dir/args.json` and `run_dir/eval.csv` (TD-MPC or PPO format, REFERENCE §0)."""
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
    with open(eval_path, newline="", errors="replace") as f:
        header = [h.strip() for h in f.readline().split(",")]
    kind = "ppo" if "return" in header and "return_pi" not in header else "tdmpc"
    columns = read_csv_columns(eval_path, PPO_COLUMNS if kind == "ppo" else TDMPC_COLUMNS)
    return Run(run_dir, str(args["env_id"]), str(args["exp_name"]), seed, kind, _sorted_by_step(columns))


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


def load_baseline(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-seed curves (steps, reward) of a CSV in the official TD-MPC2 format `step,reward,seed`."""
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
        curves.append((c["step"], c["reward"]))
    return curves


# ---------------------------------------------------------------------------
# Metrics (REFERENCE §0): per-row score, then best / final / strength
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


# ---------------------------------------------------------------------------
# The table
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


def parse_merges(items) -> dict:
    """`OLD=NEW` strings -> {OLD: NEW}."""
    merges = {}
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise PlotCIError(f"--merge expects OLD=NEW, got {item!r}")
        merges[old] = new
    return merges


def summarize(runs, metric="best-any", min_steps=4_000_000, g1=500.0, g2=600.0, merges=None):
    """Group runs by (env_id, merged exp_name); return (table rows, non-countable [(family, run, value)])."""
    merges = merges or {}
    groups = defaultdict(list)
    for run in runs:
        groups[(run.env_id, merges.get(run.exp_name, run.exp_name))].append(run)
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
                rejected.append((env_id, family, run, value))
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


def format_markdown(rows, rejected, metric, min_steps, g1, g2) -> str:
    """The Markdown table, a one-line legend, and the runs that do not count yet."""
    lines = [
        f"Metric {metric}; a run counts when its last step >= {min_steps:,.0f} or {metric} >= {g1:g}; "
        f"G1 hits = #(value >= {g1:g}) / Runs; G2 = any value >= {g2:g}; 95% CI by Student's t (n-1 dof).",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(TABLE_HEADER) - 1)) + "|---|",
    ]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    if rejected:
        lines += ["", f"Not countable yet (last step < {min_steps:,.0f} and {metric} < {g1:g}; or no finite return):"]
        for env_id, family, run, value in rejected:
            last = "no evaluation yet" if run.last_step is None else f"last step {run.last_step:,}"
            lines.append(f"- {env_id} / {family} seed {run.seed}: {last}, {metric} {_num(value)} ({run.path})")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows) -> None:
    """The table as CSV: one row per (env, family), numbers to one decimal (empty when undefined), values
    separated by spaces, g2 as 0/1."""
    fmt = lambda x: "" if math.isnan(x) else f"{x:.1f}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env_id", "family", "runs", "mean", "ci_low", "ci_high", "g1_hits", "g2", "values"])
        for r in rows:
            w.writerow([r.env_id, r.family, len(r.values), fmt(r.mean), fmt(r.low), fmt(r.high), r.g1_hits,
                        int(r.g2_any), " ".join(f"{v:.1f}" for v in r.values)])


# ---------------------------------------------------------------------------
# Learning curves
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


def family_color(name: str):
    """A colour fixed by the family name alone (md5 hash -> hue, brightness), the same in every plot and run."""
    digest = hashlib.md5(name.encode()).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    return tuple(hsv_to_rgb((hue, 0.8, 0.55 + 0.35 * digest[4] / 255)))


def _steps_label(x, _pos=None) -> str:
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else (f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}")


def plot_env(path: Path, env_id: str, rows, baselines, metric: str, g1: float, g2: float) -> None:
    """curves_{env}.png: per family the mean over countable runs with a 95% band, baselines in grey, G1/G2 lines."""
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.add_subplot()
    returns = [g1, g2]  # every plotted return, for the y range
    for label, curves in baselines:
        returns += [v for _, values in curves for v in values]
        grid, mean, low, high = mean_band(curves)
        ax.plot(grid, mean, color="0.25", lw=1.8, label=f"{label} (n={len(curves)})",
                marker="." if grid.size == 1 else None)
        ax.fill_between(grid, low, high, color="0.5", alpha=0.25, lw=0)
    for row in rows:
        if not row.runs:
            continue
        curves = [(r.steps, score_curve(r, metric)) for r in row.runs]
        returns += [v for _, values in curves for v in values]
        grid, mean, low, high = mean_band(curves)
        color = family_color(row.family)
        ax.plot(grid, mean, color=color, lw=1.8, label=f"{row.family} (n={len(curves)})",
                marker="." if grid.size == 1 else None)
        ax.fill_between(grid, low, high, color=color, alpha=0.2, lw=0)
    ax.axhline(g1, color="k", ls="--", lw=1, label=f"G1 = {g1:g}")
    ax.axhline(g2, color="k", ls=":", lw=1, label=f"G2 = {g2:g}")
    # The y range follows the returns themselves: with 2-3 seeds a t band (t = 12.7 at n = 2) can reach far past any
    # return and would squash the curves, so it is cut at the frame instead.
    y_low, y_high = np.nanmin(returns), np.nanmax(returns)
    pad = 0.05 * (y_high - y_low) or 1.0
    ax.set_ylim(y_low - pad, y_high + pad)
    ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    series = {"best-pi": "return_pi", "best-mppi": "return_mppi"}.get(metric, "max(return_pi, return_mppi)")
    if any(r.kind == "ppo" for row in rows for r in row.runs):
        series += "; PPO: return"
    ax.set_title(f"{env_id}: mean over countable seeds, 95% t band\n(per-eval {series})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def assign_baselines(paths, env_ids, env_filter=None) -> dict:
    """{env_id: [(label, curves)]}: a baseline goes to --env-id if given, else to the env its file is named after
    (hopper-hop.csv -> HopperHop), else to the only env present."""
    out = defaultdict(list)
    for p in paths or ():
        curves = load_baseline(p)
        if env_filter:
            env = env_filter
        else:
            matches = [e for e in env_ids if _norm(e) == _norm(Path(p).stem)]
            if not matches and len(env_ids) != 1:
                raise PlotCIError(f"{p}: cannot tell which env this baseline belongs to; name the file after the "
                                  f"env (e.g. hopper-hop.csv) or pass --env-id")
            env = matches[0] if matches else env_ids[0]
        out[env].append((f"baseline {Path(p).stem}", curves))
    return out


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


def build_parser() -> argparse.ArgumentParser:
    epilog = ("A run counts when its last eval step >= --min-steps, or earlier once its metric >= --g1; the others "
              "are listed under the table. Writes the table to stdout and ci_table.md, ci_table.csv and "
              "curves_{env}.png to --out.")
    p = _Parser(prog="plot_ci.py", description=__doc__, epilog=epilog)
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="folders searched recursively for runs (an eval.csv with a sibling args.json)")
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
    p.add_argument("--env-id", default=None, help="only runs of this env (baselines are drawn on its plot)")
    p.add_argument("--out", default=".", help="folder for ci_table.md, ci_table.csv and curves_{env}.png (default: .)")
    return p


def run_cli(argv=None) -> str:
    """Parse, load, summarise, write the outputs; returns the Markdown text. Raises PlotCIError on bad input."""
    args = build_parser().parse_args(argv)
    merges = parse_merges(args.merge)
    runs = load_runs(args.dirs)
    if args.env_id is not None:
        envs = sorted({r.env_id for r in runs})
        runs = [r for r in runs if r.env_id == args.env_id]
        if not runs:
            raise PlotCIError(f"no runs of env {args.env_id} below {', '.join(args.dirs)} (found: {', '.join(envs)})")
    unused = sorted(set(merges) - {r.exp_name for r in runs})
    if unused:
        print(f"plot_ci.py: note: --merge names no run: {', '.join(unused)}", file=sys.stderr)
    rows, rejected = summarize(runs, args.metric, args.min_steps, args.g1, args.g2, merges)
    env_ids = sorted({r.env_id for r in rows})
    baselines = assign_baselines(args.baseline, env_ids, args.env_id)
    text = format_markdown(rows, rejected, args.metric, args.min_steps, args.g1, args.g2)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ci_table.md").write_text(text)
    write_csv(out / "ci_table.csv", rows)
    written = ["ci_table.md", "ci_table.csv"]
    for env_id in env_ids:
        name = "curves_" + re.sub(r"[^A-Za-z0-9_.-]", "_", env_id) + ".png"
        plot_env(out / name, env_id, [r for r in rows if r.env_id == env_id], baselines.get(env_id, []),
                 args.metric, args.g1, args.g2)
        written.append(name)
    print(f"plot_ci.py: wrote {', '.join(written)} in {out}", file=sys.stderr)
    return text


def main(argv=None) -> int:
    """CLI entry point: the table on stdout, files in --out; a bad input is one line on stderr and exit code 1."""
    try:
        text = run_cli(argv)
    except (PlotCIError, OSError) as e:
        print(f"plot_ci.py: error: {e}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
