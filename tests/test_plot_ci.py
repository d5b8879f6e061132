"""plot_ci.py: Student-t intervals against independent numbers, the countable rule, and end-to-end runs on
fixture run folders written here (TD-MPC and PPO formats), plus one real tiny tdmpc2_jax.py run."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_script

import plot_ci

WORKED = [389.0, 595.3, 540.3, 551.7, 543.1]  # REFERENCE §5: mean 523.9, 95% CI [426.3, 621.5], G1 4/5
T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}  # t_{0.975, df}


# ---------------------------------------------------------------------------
# Fixture run folders
# ---------------------------------------------------------------------------
def write_run(root: Path, env_id: str, exp_name: str, seed: int, rows, kind: str = "tdmpc") -> Path:
    """A run folder like the scripts write (REFERENCE §0). rows: (step, return_pi, return_mppi) for TD-MPC,
    (step, return, return_deterministic) for PPO."""
    run_dir = root / f"{env_id}__{exp_name}__{seed}__{1_700_000_000 + seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"env_id": env_id, "exp_name": exp_name, "seed": seed}, indent=2))
    header = "step,wall_time,return,return_deterministic" if kind == "ppo" else "step,wall_time,return_pi,return_mppi"
    lines = [header] + [f"{int(s)},{i * 10.0},{a},{b}" for i, (s, a, b) in enumerate(rows)]
    (run_dir / "eval.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def ramp(last_step: int, best: float, every: int = 1_000_000):
    """TD-MPC rows from 0 to last_step whose best-any is `best` (reached by pi at the last row; mppi 10 lower)."""
    steps = list(range(0, last_step + 1, every))
    return [(s, best * s / last_step, best * s / last_step - 10.0) for s in steps]


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, best in enumerate(WORKED, start=1):
        write_run(root, "HopperHop", "phasei9r", seed, ramp(4_000_000, best))
    write_run(root, "HopperHop", "phasex", 1, ramp(4_000_000, 300.0))
    write_run(root, "HopperHop", "phasex", 2, ramp(4_000_000, 610.0))
    write_run(root, "HopperHop", "phasex", 3, ramp(2_000_000, 520.0))  # short, but already >= g1: counts
    write_run(root, "HopperHop", "phasex", 4, ramp(2_000_000, 450.0))  # short and < g1: listed, not counted
    write_run(root / "local", "HopperHop", "phasex_local", 5, ramp(4_000_000, 400.0))
    for seed, ret in ((1, 800.0), (2, 900.0)):  # PPO: `return` is the metric, return_deterministic is ignored
        write_run(root, "CartpoleBalance", "ppo", seed, [(0, 10.0, 999.0), (4_000_000, ret, 999.0)], kind="ppo")
    return root


def write_demo_runs(root, seeds=5) -> Path:
    """Synthetic HopperHop runs for the README picture: two families of saturating curves with noise."""
    root = Path(root)
    rng = np.random.default_rng(0)
    steps = np.arange(0, 4_000_001, 100_000)
    for family, plateaus in (("synthetic_a", [330, 530, 300, 420, 380]), ("synthetic_b", [390, 595, 540, 550, 545])):
        for seed, plateau in enumerate(plateaus[:seeds], start=1):
            curve = plateau * (1 - np.exp(-steps / 900_000.0)) + rng.normal(0, 20, steps.size)
            pi = np.maximum(curve, 0).round(1)
            mppi = np.maximum(curve + rng.normal(5, 15, steps.size), 0).round(1)
            cut = steps.size if seed != 5 or family != "synthetic_a" else 26  # one run still going at 2.5M
            write_run(root, "HopperHop", family, seed, list(zip(steps[:cut], pi[:cut], mppi[:cut], strict=True)))
    return root


def write_baseline(path: Path) -> Path:
    rows = ["step,reward,seed"] + [f"{s},{r + 0.1 * s / 1e4},{seed}" for seed, r in ((1, 0.0), (2, 20.0), (3, 40.0))
                                   for s in range(0, 4_000_001, 1_000_000)]
    path.write_text("\n".join(rows) + "\n")
    return path


def table_rows(text: str) -> dict:
    """{(env, family): {column: cell}} from the Markdown table."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]
    return {(r["Env"], r["Family"]): r for r in rows}


def main_ok(capsys, *args) -> str:
    assert plot_ci.main([str(a) for a in args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def main_err(capsys, *args) -> str:
    """Run main expecting a failure; the message must be one line without a traceback."""
    assert plot_ci.main([str(a) for a in args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("plot_ci.py: error:") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------
# Student's t
# ---------------------------------------------------------------------------
def test_t_interval_worked_value():
    mean, low, high = plot_ci.t_interval(WORKED)
    assert (round(mean, 1), round(low, 1), round(high, 1)) == (523.9, 426.3, 621.5)


@pytest.mark.parametrize("values", [[1.0, 2.0, 6.0], [10.0, 12.0, 11.0, 17.0, 15.0], [3.0, 5.0]])
def test_t_interval_by_hand(values):
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * s / math.sqrt(n)
    got = plot_ci.t_interval(values)
    assert got == pytest.approx((mean, mean - half, mean + half), rel=1e-9)


def test_t_interval_n1_and_n2():
    mean, low, high = plot_ci.t_interval([42.0])
    assert mean == 42.0 and math.isnan(low) and math.isnan(high)
    mean, low, high = plot_ci.t_interval([100.0, 200.0])  # s = 70.71..., half = 12.7062 * 50
    assert (mean, low, high) == pytest.approx((150.0, 150.0 - 12.706204736174707 * 50, 150.0 + 12.706204736174707 * 50))
    assert plot_ci.t_interval([7.0, 7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        plot_ci.t_interval([])


def test_t_quantile_literals_and_other_confidences():
    for df, q in T975.items():
        assert plot_ci.t_quantile(0.975, df) == pytest.approx(q, abs=1e-9)
    assert plot_ci.t_quantile(0.95, 10) == pytest.approx(1.8124611228107335, abs=1e-9)
    assert plot_ci.t_quantile(0.025, 2) == pytest.approx(-4.302652729911275, abs=1e-9)
    assert plot_ci.t_quantile(0.5, 7) == 0.0
    _, low, high = plot_ci.t_interval([1.0, 2.0, 6.0], confidence=0.99)
    assert high - 3.0 == pytest.approx(9.924843200918276 * math.sqrt(7.0) / math.sqrt(3), rel=1e-9)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 20, 30, 60, 120, 500, 1000])
def test_t_quantile_matches_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995):
        assert plot_ci.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-8, rel=1e-9)


# ---------------------------------------------------------------------------
# Countable rule and metrics
# ---------------------------------------------------------------------------
def test_countable_rule():
    assert plot_ci.countable(4_000_000, 100.0, 4_000_000, 500)  # reached min steps
    assert plot_ci.countable(5_000_000, 100.0, 4_000_000, 500)
    assert not plot_ci.countable(3_900_000, 499.9, 4_000_000, 500)  # short and below g1
    assert plot_ci.countable(1_000_000, 500.0, 4_000_000, 500)  # short, but already at g1
    assert not plot_ci.countable(None, math.nan, 4_000_000, 500)  # no evaluation yet
    assert not plot_ci.countable(100_000, math.nan, 4_000_000, 500)


def test_metrics_tdmpc_and_ppo(tmp_path):
    d = write_run(tmp_path, "HopperHop", "glass", 1, [(0, 10.0, 20.0), (200, 30.0, 45.0), (100, 50.0, 40.0)])
    # Glass may add return_arb: an extra column, never part of best-any
    (d / "eval.csv").write_text("step,wall_time,return_pi,return_mppi,return_arb\n"
                                "0,0,10,20,999\n200,2,30,45,999\n100,1,50,40,999\n")
    run = plot_ci.read_run(d)
    assert run.kind == "tdmpc" and run.last_step == 200 and list(run.steps) == [0, 100, 200]  # sorted by step
    values = {m: plot_ci.metric_value(run, m) for m in plot_ci.METRICS}
    assert values == pytest.approx({"best-pi": 50, "best-mppi": 45, "best-any": 50, "final": 45,
                                    "strength": (20 + 50 + 45) / 3})
    p = plot_ci.read_run(write_run(tmp_path, "CartpoleBalance", "ppo", 1, [(0, 5.0, 9.0), (10, 7.0, 90.0)], "ppo"))
    assert p.kind == "ppo"
    assert {m: plot_ci.metric_value(p, m) for m in plot_ci.METRICS} == {
        "best-pi": 7.0, "best-mppi": 7.0, "best-any": 7.0, "final": 7.0, "strength": 6.0}
    with pytest.raises(plot_ci.PlotCIError, match="unknown metric"):
        plot_ci.metric_value(run, "best")


def test_mean_band_common_grid_cut_at_shortest():
    long = (np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 10.0, 20.0, 30.0]))
    short = (np.array([0.0, 1.5]), np.array([0.0, 30.0]))
    grid, mean, low, high = plot_ci.mean_band([long, short])
    assert list(grid) == [0.0, 1.0, 1.5]  # union of steps, cut at the shortest run
    assert mean == pytest.approx([0.0, 15.0, 22.5])  # short at 1.0 interpolates to 20; long at 1.5 to 15
    for i, (a, b) in enumerate([(0.0, 0.0), (10.0, 20.0), (15.0, 30.0)]):
        m, lo, hi = plot_ci.t_interval([a, b])
        assert (mean[i], low[i], high[i]) == pytest.approx((m, lo, hi))
    grid, mean, low, high = plot_ci.mean_band([long])
    assert list(mean) == [0.0, 10.0, 20.0, 30.0] and np.isnan(low).all()


def test_family_colour_depends_only_on_name():
    a = plot_ci.family_color("phasei9r")
    assert a == plot_ci.family_color("phasei9r") and a != plot_ci.family_color("phasex")
    assert all(0.0 <= c <= 1.0 for c in a)


# ---------------------------------------------------------------------------
# End to end on fixture run folders
# ---------------------------------------------------------------------------
def test_table_rows_countable_rule_and_outputs(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    text = main_ok(capsys, runs_root, "--out", out)
    rows = table_rows(text)
    assert set(rows) == {("HopperHop", "phasei9r"), ("HopperHop", "phasex"), ("HopperHop", "phasex_local"),
                         ("CartpoleBalance", "ppo")}
    r = rows["HopperHop", "phasei9r"]
    assert (r["Runs"], r["Mean"], r["95% CI"], r["G1 hits"], r["G2"]) == ("5", "523.9", "[426.3, 621.5]", "4/5", "no")
    assert r["Values"] == "389.0, 595.3, 540.3, 551.7, 543.1"  # by seed
    r = rows["HopperHop", "phasex"]  # seed 3 is short but reached g1 so counts; seed 4 is short and does not
    assert (r["Runs"], r["Values"], r["G1 hits"], r["G2"]) == ("3", "300.0, 610.0, 520.0", "2/3", "yes")
    half = T975[2] * float(np.std([300.0, 610.0, 520.0], ddof=1)) / math.sqrt(3)
    assert r["95% CI"] == f"[{476.6666667 - half:.1f}, {476.6666667 + half:.1f}]"
    r = rows["HopperHop", "phasex_local"]  # n = 1: the value and a dash
    assert (r["Runs"], r["Mean"], r["95% CI"], r["G1 hits"]) == ("1", "400.0", "—", "0/1")
    r = rows["CartpoleBalance", "ppo"]  # PPO: the `return` column, not return_deterministic (999)
    assert (r["Mean"], r["Values"], r["95% CI"]) == ("850.0", "800.0, 900.0", f"[{850 - T975[1] * 50:.1f}, "
                                                     f"{850 + T975[1] * 50:.1f}]")
    assert "Not countable" in text and "phasex seed 4: last step 2,000,000, best-any 450.0" in text
    assert "seed 3" not in text.split("Not countable")[1]

    assert (out / "ci_table.md").read_text() == text
    with open(out / "ci_table.csv") as f:
        csv_rows = {(r["env_id"], r["family"]): r for r in csv.DictReader(f)}
    assert csv_rows["HopperHop", "phasei9r"] == {"env_id": "HopperHop", "family": "phasei9r", "runs": "5",
                                                 "mean": "523.9", "ci_low": "426.3", "ci_high": "621.5",
                                                 "g1_hits": "4", "g2": "0", "values": "389.0 595.3 540.3 551.7 543.1"}
    assert csv_rows["HopperHop", "phasex_local"]["ci_low"] == ""
    for env in ("HopperHop", "CartpoleBalance"):
        png = (out / f"curves_{env}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_merge_and_metric_choice(runs_root, tmp_path, capsys):
    rows = table_rows(main_ok(capsys, runs_root, "--merge", "phasex_local=phasex", "--out", tmp_path))
    assert ("HopperHop", "phasex_local") not in rows
    assert rows["HopperHop", "phasex"]["Values"] == "300.0, 610.0, 520.0, 400.0"
    assert rows["HopperHop", "phasex"]["Runs"] == "4"
    # best-mppi is 10 lower in these fixtures; PPO maps every metric to `return`
    rows = table_rows(main_ok(capsys, runs_root, "--metric", "best-mppi", "--out", tmp_path))
    assert rows["HopperHop", "phasei9r"]["Values"] == "379.0, 585.3, 530.3, 541.7, 533.1"
    assert rows["HopperHop", "phasex"]["Values"] == "290.0, 600.0, 510.0"
    assert rows["CartpoleBalance", "ppo"]["Values"] == "800.0, 900.0"


def test_min_steps_g1_g2_flags(runs_root, tmp_path, capsys):
    text = main_ok(capsys, runs_root, "--min-steps", "2e6", "--g1", "540", "--g2", "595", "--out", tmp_path)
    assert "last step >= 2,000,000 or best-any >= 540;" in text
    rows = table_rows(text)
    assert rows["HopperHop", "phasex"]["Values"] == "300.0, 610.0, 520.0, 450.0"
    assert (rows["HopperHop", "phasei9r"]["G1 hits"], rows["HopperHop", "phasei9r"]["G2"]) == ("4/5", "yes")
    assert "Not countable" not in text


def test_baseline_overlay_and_env_filter(runs_root, tmp_path, capsys):
    base = write_baseline(tmp_path / "hopper-hop.csv")
    out = tmp_path / "out"
    rows = table_rows(main_ok(capsys, runs_root, "--baseline", base, "--out", out))  # placed by its file name
    assert len(rows) == 4 and (out / "curves_HopperHop.png").stat().st_size > 10_000
    other = write_baseline(tmp_path / "official.csv")
    rows = table_rows(main_ok(capsys, runs_root, "--env-id", "HopperHop", "--baseline", other, "--out", out))
    assert {env for env, _ in rows} == {"HopperHop"}
    assert plot_ci.assign_baselines([other], ["HopperHop"], "HopperHop")["HopperHop"][0][0] == "baseline official"
    curves = plot_ci.load_baseline(base)
    assert len(curves) == 3 and [list(s) for s, _ in curves] == [[0, 1e6, 2e6, 3e6, 4e6]] * 3
    err = main_err(capsys, runs_root, "--baseline", other, "--out", out)  # two envs, name matches neither
    assert "official.csv" in err and "--env-id" in err


def test_run_folder_given_directly_and_runs_without_evaluations(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "HopperHop", "fresh", 1, [])  # header only: just started
    text = main_ok(capsys, run_dir, "--out", tmp_path)
    assert table_rows(text)["HopperHop", "fresh"]["Runs"] == "0"
    assert "fresh seed 1: no evaluation yet" in text
    assert (tmp_path / "curves_HopperHop.png").stat().st_size > 0


def test_run_with_only_nan_returns_is_listed_not_averaged(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "HopperHop", "mixed", 1, ramp(4_000_000, 700.0))
    write_run(root, "HopperHop", "mixed", 2, [(s, math.nan, math.nan) for s in range(0, 4_000_001, 1_000_000)])
    text = main_ok(capsys, root, "--out", tmp_path)
    row = table_rows(text)["HopperHop", "mixed"]
    assert (row["Runs"], row["Mean"]) == ("1", "700.0")
    assert "mixed seed 2: last step 4,000,000, best-any —" in text


def test_demo_runs(tmp_path, capsys):
    rows = table_rows(main_ok(capsys, write_demo_runs(tmp_path / "demo"), "--out", tmp_path))
    assert rows["HopperHop", "synthetic_b"]["Runs"] == "5" and rows["HopperHop", "synthetic_a"]["Runs"] == "4"


# ---------------------------------------------------------------------------
# Bad inputs: one line on stderr, non-zero exit, no traceback
# ---------------------------------------------------------------------------
def test_no_runs_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "eval.csv").write_text("step,wall_time,return_pi,return_mppi\n")  # no args.json
    err = main_err(capsys, tmp_path / "empty", tmp_path / "orphan")
    assert "no runs found" in err and str(tmp_path / "empty") in err and str(tmp_path / "orphan") in err
    assert "no such directory" in main_err(capsys, tmp_path / "missing")


def test_malformed_csv_names_file_and_line(tmp_path, capsys):
    run_dir = write_run(tmp_path, "HopperHop", "bad", 1, ramp(4_000_000, 100.0))
    eval_csv = run_dir / "eval.csv"
    lines = eval_csv.read_text().splitlines()
    eval_csv.write_text("\n".join(lines[:2] + ["1000000,1.0,abc,3.0"] + lines[3:]) + "\n")
    assert f"{eval_csv}:3:" in main_err(capsys, tmp_path)
    eval_csv.write_text("\n".join(lines[:4] + ["3000000,1.0,2.0"]) + "\n")
    assert f"{eval_csv}:5: expected 4 fields, got 3" in main_err(capsys, tmp_path)
    eval_csv.write_text("step,wall_time,reward\n0,0,1\n")
    assert f"{eval_csv}:1:" in main_err(capsys, tmp_path)
    eval_csv.write_text("\n".join(lines) + "\n")
    (run_dir / "args.json").write_text('{"env_id": "HopperHop",\n "seed": 1,,}')
    assert f"{run_dir / 'args.json'}:2:" in main_err(capsys, tmp_path)
    (run_dir / "args.json").write_text('{"env_id": "HopperHop", "seed": 1}')
    assert "exp_name" in main_err(capsys, tmp_path)


def test_bad_flags(runs_root, tmp_path, capsys):
    err = main_err(capsys, runs_root, "--metric", "best", "--out", tmp_path)
    assert "best" in err and "best-any" in err
    assert "OLD=NEW" in main_err(capsys, runs_root, "--merge", "phasex", "--out", tmp_path)
    assert "not found" in main_err(capsys, runs_root, "--baseline", tmp_path / "nope.csv", "--out", tmp_path)
    err = main_err(capsys, runs_root, "--env-id", "WalkerRun", "--out", tmp_path)
    assert "WalkerRun" in err and "HopperHop" in err
    bad = write_baseline(tmp_path / "hopper-hop.csv")
    bad.write_text("step,reward,seed\n0,1,1\n1,x,1\n")
    assert f"{bad}:3:" in main_err(capsys, runs_root, "--baseline", bad, "--out", tmp_path)


# ---------------------------------------------------------------------------
# The real command line, import hygiene, and a real run folder
# ---------------------------------------------------------------------------
def test_cli_subprocess(runs_root, tmp_path):
    proc = run_script("plot_ci.py", str(runs_root), "--merge", "phasex_local=phasex", "--out", str(tmp_path / "o"))
    assert table_rows(proc.stdout)["HopperHop", "phasei9r"]["95% CI"] == "[426.3, 621.5]"
    assert (tmp_path / "o" / "curves_HopperHop.png").exists()
    proc = run_script("plot_ci.py", str(tmp_path / "missing"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "--metric" in run_script("plot_ci.py", "--help").stdout


def test_import_has_no_side_effects(tmp_path):
    code = "import sys, plot_ci; print('matplotlib.pyplot' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.stdout == "False\n" and proc.stderr == "" and list(tmp_path.iterdir()) == []


def test_reads_real_tdmpc2_run(tdmpc2_tiny_run, tmp_path, capsys):
    args = json.loads((tdmpc2_tiny_run / "args.json").read_text())
    with open(tdmpc2_tiny_run / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"step", "wall_time", "return_pi", "return_mppi"} <= set(rows[0])
    best = max(max(float(r["return_pi"]), float(r["return_mppi"])) for r in rows)
    text = main_ok(capsys, tdmpc2_tiny_run, "--min-steps", "0", "--out", tmp_path)
    row = table_rows(text)[args["env_id"], args["exp_name"]]
    assert (row["Runs"], row["Values"], row["95% CI"]) == ("1", f"{best:.1f}", "—")
    assert (tmp_path / f"curves_{args['env_id']}.png").stat().st_size > 0
    text = main_ok(capsys, tdmpc2_tiny_run.parent, "--out", tmp_path)  # default 4M: the tiny run is listed
    assert f"seed {args['seed']}: last step {int(float(rows[-1]['step'])):,}" in text
