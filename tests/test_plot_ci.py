"""plot_ci.py: Student-t intervals and the across-task aggregates against independent numbers (hand-worked values,
scipy, rliable), the countable rule, the baseline's step unit, and end-to-end runs on fixture run folders written
here (TD-MPC and PPO formats), plus one real tiny tdmpc2_jax.py run."""

import csv
import itertools
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

WORKED = [389.0, 595.3, 540.3, 551.7, 543.1]  # docs/plot_ci.md, "The table": 523.9 [426.3, 621.5], G1 4/5
T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}  # t_{0.975, df}


# ---------------------------------------------------------------------------
# Fixture run folders
# ---------------------------------------------------------------------------
def write_run(root: Path, env_id: str, exp_name: str, seed: int, rows, kind: str = "tdmpc", init_from=None) -> Path:
    """A run folder like the scripts write (docs/plot_ci.md, "Run folders"). rows: (step, return_pi, return_mppi)
    for TD-MPC, (step, return, return_deterministic) for PPO; init_from: args.json's record of a continuation."""
    run_dir = root / f"{env_id}__{exp_name}__{seed}__{1_700_000_000 + seed}"
    run_dir.mkdir(parents=True)
    args = {"env_id": env_id, "exp_name": exp_name, "seed": seed, "init_from": init_from}
    (run_dir / "args.json").write_text(json.dumps(args, indent=2))
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
        write_run(root, "HopperHop", "glass_off_1m", seed, ramp(4_000_000, best))
    write_run(root, "HopperHop", "glass_off_2m", 1, ramp(4_000_000, 300.0))
    write_run(root, "HopperHop", "glass_off_2m", 2, ramp(4_000_000, 610.0))
    write_run(root, "HopperHop", "glass_off_2m", 3, ramp(2_000_000, 520.0))  # short, but already >= g1: counts
    write_run(root, "HopperHop", "glass_off_2m", 4, ramp(2_000_000, 450.0))  # short and < g1: listed, not counted
    write_run(root / "local", "HopperHop", "glass_off_2m_local", 5, ramp(4_000_000, 400.0))
    for seed, ret in ((1, 800.0), (2, 900.0)):  # PPO: `return` is the metric, return_deterministic is ignored
        write_run(root, "CartpoleBalance", "ppo", seed, [(0, 10.0, 999.0), (4_000_000, ret, 999.0)], kind="ppo")
    return root


# Synthetic plateaus (made up, not results) shaped like a 5-seed HopperHop comparison of a Glass family that switches
# Glass off at 1M steps against TD-MPC2 at two update rates, plus a second task so the aggregates span tasks.
DEMO_PLATEAUS = {
    ("HopperHop", "glass_off_1m"): [395, 600, 545, 555, 540],
    ("HopperHop", "tdmpc2_k256"): [335, 530, 310, 420, 380],
    ("HopperHop", "tdmpc2_k128"): [290, 335, 300, 315, 280],
    ("CheetahRun", "glass_off_1m"): [760, 810, 790, 745, 800],
    ("CheetahRun", "tdmpc2_k256"): [780, 820, 800, 770, 790],
    ("CheetahRun", "tdmpc2_k128"): [700, 740, 720, 690, 730],
}
DEMO_STOPS = {("HopperHop", "tdmpc2_k256", 5): 3_000_000}  # stopped early below G1: listed, not counted


def write_demo_runs(root) -> Path:
    """Synthetic run folders for docs/plot_ci.md: saturating curves with noise, 5 seeds per family, to 8M env steps
    (the official TD-MPC2 curves' 4M agent steps)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    steps = np.arange(0, 8_000_001, 200_000)
    for (env_id, family), plateaus in DEMO_PLATEAUS.items():
        for seed, plateau in enumerate(plateaus, start=1):
            curve = plateau * (1 - np.exp(-steps / 900_000.0)) + rng.normal(0, 20, steps.size)
            pi = np.maximum(curve, 0).round(1)
            mppi = np.maximum(curve + rng.normal(5, 15, steps.size), 0).round(1)
            keep = steps <= DEMO_STOPS.get((env_id, family, seed), steps[-1])
            write_run(root, env_id, family, seed, list(zip(steps[keep], pi[keep], mppi[keep], strict=True)))
    return root


def write_baseline(path: Path) -> Path:
    rows = ["step,reward,seed"] + [f"{s},{r + 0.1 * s / 1e4},{seed}" for seed, r in ((1, 0.0), (2, 20.0), (3, 40.0))
                                   for s in range(0, 4_000_001, 1_000_000)]
    path.write_text("\n".join(rows) + "\n")
    return path


def table_rows(text: str) -> dict:
    """{(env, family): {column: cell}} from the Markdown table (the first table in `text`)."""
    lines = list(itertools.takewhile(lambda ln: ln.startswith("|"), itertools.dropwhile(
        lambda ln: not ln.startswith("|"), text.splitlines())))
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
    a = plot_ci.family_color("glass_off_1m")
    assert a == plot_ci.family_color("glass_off_1m") and a != plot_ci.family_color("glass_off_2m")
    assert all(0.0 <= c <= 1.0 for c in a)


# ---------------------------------------------------------------------------
# End to end on fixture run folders
# ---------------------------------------------------------------------------
def test_table_rows_countable_rule_and_outputs(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    text = main_ok(capsys, runs_root, "--out", out)
    rows = table_rows(text)
    assert set(rows) == {("HopperHop", "glass_off_1m"), ("HopperHop", "glass_off_2m"),
                         ("HopperHop", "glass_off_2m_local"), ("CartpoleBalance", "ppo")}
    r = rows["HopperHop", "glass_off_1m"]
    assert (r["Runs"], r["Mean"], r["95% CI"], r["G1 hits"], r["G2"]) == ("5", "523.9", "[426.3, 621.5]", "4/5", "no")
    assert r["Values"] == "389.0, 595.3, 540.3, 551.7, 543.1"  # by seed
    r = rows["HopperHop", "glass_off_2m"]  # seed 3 is short but reached g1 so counts; seed 4 is short and does not
    assert (r["Runs"], r["Values"], r["G1 hits"], r["G2"]) == ("3", "300.0, 610.0, 520.0", "2/3", "yes")
    half = T975[2] * float(np.std([300.0, 610.0, 520.0], ddof=1)) / math.sqrt(3)
    assert r["95% CI"] == f"[{476.6666667 - half:.1f}, {476.6666667 + half:.1f}]"
    r = rows["HopperHop", "glass_off_2m_local"]  # n = 1: the value and a dash
    assert (r["Runs"], r["Mean"], r["95% CI"], r["G1 hits"]) == ("1", "400.0", "—", "0/1")
    r = rows["CartpoleBalance", "ppo"]  # PPO: the `return` column, not return_deterministic (999)
    assert (r["Mean"], r["Values"], r["95% CI"]) == ("850.0", "800.0, 900.0", f"[{850 - T975[1] * 50:.1f}, "
                                                     f"{850 + T975[1] * 50:.1f}]")
    assert "Not countable" in text and "glass_off_2m seed 4: last step 2,000,000, best-any 450.0" in text
    assert "seed 3" not in text.split("Not countable")[1]

    assert (out / "ci_table.md").read_text() == text
    with open(out / "ci_table.csv") as f:
        csv_rows = {(r["env_id"], r["family"]): r for r in csv.DictReader(f)}
    assert csv_rows["HopperHop", "glass_off_1m"] == {"env_id": "HopperHop", "family": "glass_off_1m", "runs": "5",
                                                 "mean": "523.9", "ci_low": "426.3", "ci_high": "621.5",
                                                 "g1_hits": "4", "g2": "0", "values": "389.0 595.3 540.3 551.7 543.1"}
    assert csv_rows["HopperHop", "glass_off_2m_local"]["ci_low"] == ""
    for env in ("HopperHop", "CartpoleBalance"):
        png = (out / f"curves_{env}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_merge_and_metric_choice(runs_root, tmp_path, capsys):
    rows = table_rows(main_ok(capsys, runs_root, "--merge", "glass_off_2m_local=glass_off_2m", "--out", tmp_path))
    assert ("HopperHop", "glass_off_2m_local") not in rows
    assert rows["HopperHop", "glass_off_2m"]["Values"] == "300.0, 610.0, 520.0, 400.0"
    assert rows["HopperHop", "glass_off_2m"]["Runs"] == "4"
    # best-mppi is 10 lower in these fixtures; PPO maps every metric to `return`
    rows = table_rows(main_ok(capsys, runs_root, "--metric", "best-mppi", "--out", tmp_path))
    assert rows["HopperHop", "glass_off_1m"]["Values"] == "379.0, 585.3, 530.3, 541.7, 533.1"
    assert rows["HopperHop", "glass_off_2m"]["Values"] == "290.0, 600.0, 510.0"
    assert rows["CartpoleBalance", "ppo"]["Values"] == "800.0, 900.0"


def test_continuation_is_its_own_family(tmp_path, capsys):
    root = tmp_path / "runs"
    source = write_run(root, "HopperHop", "tdmpc2", 1, ramp(4_000_000, 500.0))
    write_run(root, "HopperHop", "tdmpc2", 2, ramp(4_000_000, 600.0))
    # Its own folder as the scripts make it (a new timestamp); eval.csv rows after the checkpoint step.
    record = {"run_dir": str(source), "step": 2_000_000,
              "changed": {"lr": {"before": 3e-4, "after": 1e-4}, "total_steps": {"before": 4_000_000, "after": 6e6}}}
    rows = [(s, 700.0, 690.0) for s in range(2_500_000, 6_000_001, 500_000)]
    write_run(root / "continued", "HopperHop", "tdmpc2", 1, rows, init_from=record)
    out = tmp_path / "out"
    text = main_ok(capsys, root, "--out", out)
    family = "tdmpc2 (continued from step 2,000,000: lr 0.0003→0.0001)"  # total_steps: how it ran, left out
    rows = table_rows(text)
    assert set(rows) == {("HopperHop", "tdmpc2"), ("HopperHop", family)}
    assert (rows["HopperHop", "tdmpc2"]["Runs"], rows["HopperHop", "tdmpc2"]["Values"]) == ("2", "500.0, 600.0")
    assert (rows["HopperHop", family]["Runs"], rows["HopperHop", family]["Values"]) == ("1", "700.0")
    assert {r["family"] for r in read_csv(out / "ci_table.csv")} == {"tdmpc2", family}
    assert {r["family"] for r in read_csv(out / "curves_HopperHop.csv")} == {"tdmpc2", family}
    runs = plot_ci.load_runs([root])
    starts = {b.family: b.start for b in plot_ci.env_bands(plot_ci.summarize(runs)[0], [], "best-any", 2)}
    assert starts[family] == 2_000_000 and math.isnan(starts["tdmpc2"])  # the dotted line where it was continued
    # A continuation family can be renamed by its whole name; a continuation that changed no flag of the algorithm
    # is still no from-scratch seed.
    rows = table_rows(main_ok(capsys, root, "--merge", f"{family}=tdmpc2_lr_drop", "--out", out))
    assert rows["HopperHop", "tdmpc2_lr_drop"]["Runs"] == "1" and rows["HopperHop", "tdmpc2"]["Runs"] == "2"
    args_path = next((root / "continued").iterdir()) / "args.json"
    args_path.write_text(json.dumps({**json.loads(args_path.read_text()), "init_from": {**record, "changed": {}}}))
    assert ("HopperHop", "tdmpc2 (continued from step 2,000,000)") in table_rows(main_ok(capsys, root, "--out", out))

    for bad in (f"{source}:2000000", {**record, "step": "2000000"}, {**record, "changed": {"lr": 1e-4}}):
        args_path.write_text(json.dumps({"env_id": "HopperHop", "exp_name": "tdmpc2", "seed": 1, "init_from": bad}))
        err = main_err(capsys, root, "--out", out)
        assert f"{args_path}: init_from " in err and "is not a record" in err


def test_min_steps_g1_g2_flags(runs_root, tmp_path, capsys):
    text = main_ok(capsys, runs_root, "--min-steps", "2e6", "--g1", "540", "--g2", "595", "--out", tmp_path)
    assert "last step >= 2,000,000 or best-any >= 540;" in text
    rows = table_rows(text)
    assert rows["HopperHop", "glass_off_2m"]["Values"] == "300.0, 610.0, 520.0, 450.0"
    assert (rows["HopperHop", "glass_off_1m"]["G1 hits"], rows["HopperHop", "glass_off_1m"]["G2"]) == ("4/5", "yes")
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
    curves = plot_ci.load_baseline(base)  # official steps are agent steps: x2 env steps by default
    assert len(curves) == 3 and [list(s) for s, _ in curves] == [[0, 2e6, 4e6, 6e6, 8e6]] * 3
    assert [list(s) for s, _ in plot_ci.load_baseline(base, action_repeat=1)] == [[0, 1e6, 2e6, 3e6, 4e6]] * 3
    err = main_err(capsys, runs_root, "--baseline", other, "--out", out)  # two envs, name matches neither
    assert "official.csv" in err and "--env-id" in err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_curves_csv_has_official_baseline_in_env_steps(runs_root, tmp_path, capsys):
    official = REPO / "data" / "official_tdmpc2" / "hopper-hop.csv"
    rows = read_csv(official)
    at = lambda step: [float(r["reward"]) for r in rows if int(r["step"]) == step]
    assert len(at(100_000)) == 3 and np.mean(at(4_000_000)) == pytest.approx(449.2, abs=0.05)

    out = tmp_path / "out"
    main_ok(capsys, runs_root, "--baseline", official, "--out", out)
    curves = read_csv(out / "curves_HopperHop.csv")
    assert list(curves[0]) == ["family", "step", "mean", "lo", "hi", "n"]
    baseline = {int(r["step"]): r for r in curves if r["family"] == "baseline hopper-hop"}
    # official step 100,000 is env step 200,000; 4,000,000 is 8,000,000; no baseline row at an odd 100k
    assert float(baseline[200_000]["mean"]) == pytest.approx(np.mean(at(100_000)), abs=1e-3)
    _, lo, hi = plot_ci.t_interval(at(4_000_000))
    assert [float(baseline[8_000_000][k]) for k in ("mean", "lo", "hi")] == pytest.approx(
        [np.mean(at(4_000_000)), lo, hi], abs=1e-3)
    assert baseline[8_000_000]["n"] == "3" and 100_000 not in baseline and max(baseline) == 8_000_000
    family = {int(r["step"]): r for r in curves if r["family"] == "glass_off_1m"}  # the ramps end at WORKED
    assert [float(family[4_000_000][k]) for k in ("mean", "lo", "hi")] == pytest.approx(
        plot_ci.t_interval(WORKED), abs=1e-3)
    single = [r for r in curves if r["family"] == "glass_off_2m_local"]
    assert single and all(r["n"] == "1" and r["lo"] == r["hi"] == "" for r in single)
    assert {r["family"] for r in read_csv(out / "curves_CartpoleBalance.csv")} == {"ppo"}

    main_ok(capsys, runs_root, "--baseline", official, "--baseline-action-repeat", "1", "--out", out)
    baseline = {int(r["step"]): r for r in read_csv(out / "curves_HopperHop.csv") if "baseline" in r["family"]}
    assert float(baseline[100_000]["mean"]) == pytest.approx(np.mean(at(100_000)), abs=1e-3)
    assert max(baseline) == 4_000_000
    bands = plot_ci.env_bands([], plot_ci.assign_baselines([official], ["HopperHop"])["HopperHop"], "best-any", 2)
    assert bands[0].legend == "baseline hopper-hop (agent steps ×2, n=3)\ndm_control, not Playground: touch readings " \
                              "differ strongly under MJX"
    assert plot_ci.env_bands([], {}, "best-any", 1) == []
    baselines = plot_ci.assign_baselines([official], ["HopperHop"], action_repeat=1)["HopperHop"]
    bands = plot_ci.env_bands([], baselines, "best-any", 1)
    assert bands[0].legend.split("\n")[0] == "baseline hopper-hop (env steps, n=3)"


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


def test_demo_runs(tmp_path, capsys, monkeypatch):
    """The docs' example (docs/plot_ci.md, "Example"): its command prints exactly the text the docs show."""
    monkeypatch.chdir(tmp_path)
    write_demo_runs("demo_runs")
    out = tmp_path / "out"
    text = main_ok(capsys, "demo_runs", "--baseline", REPO / "data/official_tdmpc2/hopper-hop.csv", "--baseline",
                   REPO / "data/official_tdmpc2/cheetah-run.csv", "--aggregate", "--out", out)
    docs = (REPO / "docs" / "plot_ci.md").read_text()
    shown = docs.split("--aggregate --out plots\n```\n\n")[1].split("\n**Reading it.**")[0]
    assert text == shown
    rows = table_rows(text)
    assert rows["HopperHop", "glass_off_1m"]["Runs"] == "5" and rows["HopperHop", "tdmpc2_k256"]["Runs"] == "4"
    assert "HopperHop / tdmpc2_k256 seed 5: last step 3,000,000" in text.split("Not used")[1]
    # Counted from the table's values: on HopperHop glass_off_1m's 449.7 beats 2 of tdmpc2_k256's 4 runs and its
    # other 4 runs beat all 4 (18 of 20 pairs); on CheetahRun 0 + 4 + 1 + 0 + 4 = 9 of 25.
    improvement = {(r["family_x"], r["family_y"], r["task"]): r for r in read_csv(out / "improvement.csv")}
    assert float(improvement["glass_off_1m", "tdmpc2_k256", "HopperHop"]["probability"]) == pytest.approx(18 / 20)
    assert float(improvement["glass_off_1m", "tdmpc2_k256", "all"]["probability"]) == pytest.approx(
        (18 / 20 + 9 / 25) / 2)


# ---------------------------------------------------------------------------
# Aggregates across tasks: hand-checkable numbers, rliable's numbers, the command, bad input
# ---------------------------------------------------------------------------
def test_iqm_by_hand():
    assert plot_ci.iqm(np.array([7.0, 1.0, 100.0, 3.0, 5.0, -50.0, 4.0, 6.0])) == pytest.approx(4.5)  # mean(3,4,5,6)
    assert plot_ci.iqm(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == pytest.approx(3.0)  # n = 5: one cut at each end
    assert plot_ci.iqm(np.array([2.0, 8.0, 5.0])) == pytest.approx(5.0)  # n = 3: nothing cut
    assert plot_ci.iqm(np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 10.0]])) == pytest.approx([2.5, 5.0])


def test_aggregate_metrics_by_hand():
    tasks = [np.array([0.2, 0.4, 1.3]), np.array([0.5, 0.9])]  # task means 0.6333 and 0.7
    got = plot_ci.aggregate_metrics(tasks)
    assert got["iqm"] == pytest.approx((0.4 + 0.5 + 0.9) / 3)  # 5 pooled runs: lowest and highest cut
    assert got["mean"] == pytest.approx((1.9 / 3 + 0.7) / 2)
    assert got["median"] == pytest.approx((1.9 / 3 + 0.7) / 2)  # median of two task means
    assert got["optimality_gap"] == pytest.approx(((0.8 + 0.6 + 0.0) / 3 + (0.5 + 0.1) / 2) / 2)


def test_probability_of_improvement_by_hand():
    low, high = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0])
    assert plot_ci.probability_of_improvement(high, low) == 1.0  # disjoint samples
    assert plot_ci.probability_of_improvement(low, high) == 0.0
    assert plot_ci.probability_of_improvement(low, low) == 0.5
    # pairs (1,2) (1,3) (2,2) (2,3): one tie, no win
    assert plot_ci.probability_of_improvement(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == pytest.approx(1 / 8)


def test_performance_profile_by_hand():
    taus = np.array([0.0, 0.4, 0.5, 0.9])
    got = plot_ci.performance_profile([np.array([0.2, 0.4, 0.6, 0.8]), np.array([1.0, 0.0])], taus)
    assert got == pytest.approx([(1.0 + 0.5) / 2, (0.5 + 0.5) / 2, (0.5 + 0.5) / 2, (0.0 + 0.5) / 2])  # score > tau


def test_stratified_bootstrap_by_hand():
    """Runs are resampled within their task, and the percentile interval of a 2-run mean is [lower, higher]: the
    resampled mean is a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4."""
    tasks = [np.array([0.1, 0.3]), np.array([10.0, 20.0, 30.0])]
    a, b = plot_ci.stratified_resample(tasks, 20_000, np.random.default_rng(0))
    assert a.shape == (20_000, 2) and b.shape == (20_000, 3)
    assert set(np.unique(a)) == {0.1, 0.3} and set(np.unique(b)) == {10.0, 20.0, 30.0}
    means = a.mean(axis=1)
    assert np.mean(np.isclose(means, 0.2)) == pytest.approx(0.5, abs=0.02)
    assert plot_ci.percentile_interval(means) == pytest.approx((0.1, 0.3))
    samples = np.arange(1.0, 202.0)  # 1..201: the 2.5% and 97.5% percentiles are 6 and 196
    assert plot_ci.percentile_interval(samples) == pytest.approx((6.0, 196.0))


def rliable_fixture():
    """Two families, 5 runs x 3 tasks of normalised scores, as rliable takes them (runs x tasks)."""
    rng = np.random.default_rng(7)
    return {"a": rng.uniform(0.2, 0.9, (5, 3)).round(3), "b": rng.uniform(0.1, 0.8, (5, 3)).round(3)}


def test_against_rliable():
    """Point estimates equal rliable 1.2's; the bootstrap intervals agree within Monte-Carlo error (rliable draws
    from numpy's global generator, seeded here, so the two use different random streams)."""
    pytest.importorskip("rliable")
    from rliable import library, metrics

    scores = rliable_fixture()
    per_task = {k: list(v.T) for k, v in scores.items()}  # ours: one array of runs per task
    rly_funcs = {"iqm": metrics.aggregate_iqm, "mean": metrics.aggregate_mean, "median": metrics.aggregate_median,
                 "optimality_gap": metrics.aggregate_optimality_gap}
    ours = plot_ci.aggregate_metrics(per_task["a"])
    for name, func in rly_funcs.items():
        assert ours[name] == pytest.approx(func(scores["a"]), abs=1e-12), name
    ours_pi = np.mean([plot_ci.probability_of_improvement(x, y) for x, y in zip(*per_task.values(), strict=True)])
    assert ours_pi == pytest.approx(metrics.probability_of_improvement(scores["a"], scores["b"]), abs=1e-12)

    state = np.random.get_state()
    try:
        np.random.seed(0)
        stack = lambda s: np.array([rly_funcs[m](s) for m in plot_ci.AGGREGATES])
        _, rly_ci = library.get_interval_estimates({"a": scores["a"]}, stack, reps=5_000)
        _, rly_pi_ci = library.get_interval_estimates({"ab": [scores["a"], scores["b"]]},
                                                      metrics.probability_of_improvement, reps=1_000)
        taus = np.linspace(0.0, 1.0, 21)
        rly_profile, rly_profile_ci = library.create_performance_profile({"a": scores["a"]}, taus, reps=2_000)
    finally:
        np.random.set_state(state)
    rows = [plot_ci.FamilyRow(f"task{t}", family, [], list(scores[family][:, t] * 1000), 0, False, 0, 0, 0)
            for family in scores for t in range(3)]
    analysis = plot_ci.analyse(rows, {}, [("a", "b")], reps=5_000, seed=0)
    lows, highs = rly_ci["a"]
    for metric, lo, hi in zip(plot_ci.AGGREGATES, lows, highs, strict=True):
        assert analysis.aggregates["a"][metric][1:] == pytest.approx((lo, hi), abs=0.02), metric
    assert analysis.improvements[-1][2] == "all"
    assert analysis.improvements[-1][3] == pytest.approx(ours_pi, abs=1e-12)
    assert analysis.improvements[-1][4:] == pytest.approx(np.ravel(rly_pi_ci["ab"]), abs=0.03)
    assert plot_ci.performance_profile(per_task["a"], taus) == pytest.approx(rly_profile["a"], abs=1e-12)
    boot = plot_ci.performance_profile(plot_ci.stratified_resample(per_task["a"], 2_000, np.random.default_rng(0)),
                                       taus)
    low, high = plot_ci.percentile_interval(boot)
    assert np.abs(low - rly_profile_ci["a"][0]).max() <= 1 / 15 + 1e-9  # fractions move in steps of 1/15
    assert np.abs(high - rly_profile_ci["a"][1]).max() <= 1 / 15 + 1e-9


def test_aggregate_end_to_end(runs_root, tmp_path, capsys):
    """The three analyses on the fixture runs, against numbers worked by hand from WORKED and glass_off_2m's
    countable 300, 610, 520 (seed 4 does not count and is listed)."""
    out = tmp_path / "out"
    text = main_ok(capsys, runs_root, "--compare", "glass_off_1m", "glass_off_2m", "--out", out)
    table, analysis = text.split("\nAggregates of best-any over 1 task(s) (HopperHop)")
    assert (out / "ci_table.md").read_text() == table  # the table file stays the table alone
    assert (out / "aggregate.md").read_text() == "Aggregates of best-any over 1 task(s) (HopperHop)" + analysis
    assert "glass_off_2m seed 4: last step 2,000,000" in analysis.split("Not used (not countable):")[1]

    agg = {(r["family"], r["metric"]): r for r in read_csv(out / "aggregate.csv")}
    assert list(read_csv(out / "aggregate.csv")[0]) == ["family", "metric", "value", "lo", "hi"]
    expected = {"iqm": (540.3 + 543.1 + 551.7) / 3000, "mean": np.mean(WORKED) / 1000,
                "median": np.mean(WORKED) / 1000, "optimality_gap": 1 - np.mean(WORKED) / 1000}
    for metric, value in expected.items():
        row = agg["glass_off_1m", metric]
        assert float(row["value"]) == pytest.approx(value, abs=1e-6)
        assert float(row["lo"]) <= float(row["value"]) <= float(row["hi"])
    # a bootstrap mean of five runs lies between their smallest and largest
    assert 0.389 <= float(agg["glass_off_1m", "mean"]["lo"]) and float(agg["glass_off_1m", "mean"]["hi"]) <= 0.5953
    assert float(agg["glass_off_2m", "mean"]["value"]) == pytest.approx((300 + 610 + 520) / 3000, abs=1e-6)

    improvement = read_csv(out / "improvement.csv")
    assert list(improvement[0]) == ["family_x", "family_y", "task", "probability", "lo", "hi"]
    # wins of WORKED over (300, 610, 520): 1 + 2 + 2 + 2 + 2 = 9 of 15 pairs
    assert [(r["task"], float(r["probability"])) for r in improvement] == [("HopperHop", 0.6), ("all", 0.6)]

    profiles = {(r["family"], round(float(r["tau"]), 6)): r for r in read_csv(out / "profiles.csv")}
    assert list(read_csv(out / "profiles.csv")[0]) == ["family", "tau", "fraction", "lo", "hi"]
    assert float(profiles["glass_off_1m", 0.5]["fraction"]) == 0.8  # 4 of the 5 above 500
    assert float(profiles["glass_off_2m", 0.5]["fraction"]) == pytest.approx(2 / 3)
    assert float(profiles["glass_off_1m", 0.0]["fraction"]) == 1.0 and float(profiles["glass_off_1m", 1.0]["hi"]) == 0
    for name in ("aggregate.png", "profiles.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_aggregate_seeded_and_independent_of_other_families(runs_root, tmp_path, capsys):
    args = [runs_root, "--merge", "glass_off_2m_local=glass_off_2m", "--bootstrap-reps", "2000"]
    first, again, other_seed, alone = (tmp_path / name for name in ("1", "2", "3", "4"))
    main_ok(capsys, *args, "--aggregate", "--env-id", "HopperHop", "--out", first)
    main_ok(capsys, *args, "--aggregate", "--env-id", "HopperHop", "--out", again)
    for name in ("aggregate.csv", "improvement.csv", "profiles.csv", "aggregate.md"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    main_ok(capsys, *args, "--aggregate", "--env-id", "HopperHop", "--bootstrap-seed", "1", "--out", other_seed)
    assert (first / "aggregate.csv").read_bytes() != (other_seed / "aggregate.csv").read_bytes()
    main_ok(capsys, *args, "--compare", "glass_off_2m", "glass_off_1m", "--out", alone)  # PPO's env left out
    rows = lambda d: {tuple(r.values()) for r in read_csv(d / "aggregate.csv")}
    assert rows(alone) == rows(first)  # the same intervals whichever families share the command


def test_normalize_by_baseline(runs_root, tmp_path, capsys):
    """Score = (return - min) / (max - min) of the baseline's mean curve: write_baseline's mean curve runs 20 .. 60."""
    base = write_baseline(tmp_path / "hopper-hop.csv")
    main_ok(capsys, runs_root, "--compare", "glass_off_1m", "glass_off_2m", "--baseline", base, "--normalize",
            "baseline", "--out", tmp_path / "out")
    agg = {(r["family"], r["metric"]): r for r in read_csv(tmp_path / "out" / "aggregate.csv")}
    assert float(agg["glass_off_1m", "mean"]["value"]) == pytest.approx((np.mean(WORKED) - 20) / 40, abs=1e-6)


def test_aggregate_errors_are_one_line(runs_root, tmp_path, capsys):
    err = main_err(capsys, runs_root, "--aggregate", "--env-id", "HopperHop", "--out", tmp_path)
    assert "glass_off_2m_local has 1 countable run(s) on HopperHop" in err and "at least 2" in err
    err = main_err(capsys, runs_root, "--compare", "glass_off_1m", "ppo", "--out", tmp_path)
    assert "no task has runs of every family" in err and "ppo on CartpoleBalance" in err
    flat = tmp_path / "hopper-hop.csv"
    flat.write_text("step,reward,seed\n0,250,1\n1000,250,1\n0,250,2\n1000,250,2\n")
    err = main_err(capsys, runs_root, "--compare", "glass_off_1m", "glass_off_2m", "--baseline", flat, "--normalize",
                   "baseline", "--out", tmp_path)
    assert "divides by zero on HopperHop" in err and "250" in err
    err = main_err(capsys, runs_root, "--compare", "glass_off_1m", "glass_off_2m", "--normalize", "baseline",
                   "--out", tmp_path)
    assert "--baseline for HopperHop" in err
    assert "no runs of family nope" in main_err(capsys, runs_root, "--compare", "glass_off_1m", "nope")
    assert "positive integer" in main_err(capsys, runs_root, "--aggregate", "--bootstrap-reps", "0")
    assert "positive integer" in main_err(capsys, runs_root, "--baseline-action-repeat", "0")
    assert not (tmp_path / "aggregate.csv").exists() and not (tmp_path / "ci_table.md").exists()  # nothing written


# ---------------------------------------------------------------------------
# --glass-timeline
# ---------------------------------------------------------------------------
def write_glass_dumps(run_dir: Path, steps, num_prototypes: int = 5, num_clusters: int = 3) -> np.ndarray:
    """glass/P_S_step{step}.npz as tdmpc_glass_jax.py writes them (P, A, S), S's rows softmaxed; returns S (T, N, K)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(steps), num_prototypes, num_clusters))
    S = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    (run_dir / "glass").mkdir()
    P = np.full((num_prototypes, num_prototypes), 1 / num_prototypes)
    for step, s in zip(steps, S, strict=True):
        np.savez(run_dir / "glass" / f"P_S_step{step}.npz", P=P, A=P / num_prototypes, S=s)
    return S


def test_glass_timeline(tmp_path, capsys, monkeypatch):
    rows = [(s, s / 5_000, s / 5_000 - 50) for s in range(0, 1_500_001, 250_000)]  # 100 at 500k, 250 at 1.25M
    run_dir = write_run(tmp_path / "runs", "HopperHop", "glass", 3, rows)
    steps = [250_000, 500_000, 1_000_000, 1_500_000]
    S = write_glass_dumps(run_dir, steps)
    (run_dir / "glass" / "clusters_step500000.png").write_bytes(b"")  # other files there are not read
    got_steps, got_S = plot_ci.read_glass_partitions(run_dir)
    assert list(got_steps) == steps and np.allclose(got_S, S)  # by step as a number, not as text
    run = plot_ci.read_run(run_dir)
    assert plot_ci.first_crossings(run, [100, 250, 400]) == {100: 500_000, 250: 1_250_000, 400: None}

    figures = {}
    save = plot_ci.save_figure
    monkeypatch.setattr(plot_ci, "save_figure", lambda fig, path: (figures.update({path.name: fig}), save(fig, path)))
    out = tmp_path / "out"
    assert main_ok(capsys, "--glass-timeline", run_dir, "--out", out) == ""  # without DIRs: no table
    name = f"glass_timeline_{run_dir.name}.png"
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes().startswith(b"\x89PNG")
    fig = figures[name]
    title = fig.get_suptitle()
    assert run_dir.name in title and "seed 3" in title and "never reached: 400" in title
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"prototype {n}" for n in range(5)]  # 5 of a 3 x 2 grid
    assert [line.get_xdata()[0] for line in panels[4].get_lines()] == [500_000, 1_250_000]
    assert len(panels[0].collections) == 3  # one stacked area per cluster
    main_ok(capsys, "--glass-timeline", run_dir, "--thresholds", "10", "--out", out)
    assert "never reached" not in figures[name].get_suptitle()

    assert "required: DIR" in main_err(capsys, "--out", out)
    np.savez(run_dir / "glass" / "P_S_step2000000.npz", S=np.ones((4, 3)))
    assert "S has shape (4, 3), expected (5, 3)" in main_err(capsys, "--glass-timeline", run_dir, "--out", out)
    (run_dir / "glass" / "P_S_step2000000.npz").write_bytes(b"not a zip")
    err = main_err(capsys, tmp_path / "runs", "--glass-timeline", run_dir, "--out", tmp_path / "none")
    assert "P_S_step2000000.npz: not an .npz with the partition S" in err
    assert not (tmp_path / "none").exists()  # read before the table's outputs are written
    other = write_run(tmp_path / "runs", "HopperHop", "tdmpc2", 1, rows)
    assert "no glass/P_S_step*.npz" in main_err(capsys, "--glass-timeline", other)
    assert "not a run folder" in main_err(capsys, "--glass-timeline", tmp_path / "nowhere")


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
    assert "OLD=NEW" in main_err(capsys, runs_root, "--merge", "glass_off_2m", "--out", tmp_path)
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
    proc = run_script("plot_ci.py", str(runs_root), "--merge", "glass_off_2m_local=glass_off_2m",
                      "--out", str(tmp_path / "o"))
    assert table_rows(proc.stdout)["HopperHop", "glass_off_1m"]["95% CI"] == "[426.3, 621.5]"
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
