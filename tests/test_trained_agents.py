"""Trained agents: --evaluate of a checkpoint and --keep-every, in the three TD-MPC scripts."""

import json
import math

import numpy as np
import pytest
from conftest import TINY_TDMPC2, read_eval, run_script
from scipy import stats

# Glass with its extra on (its prototypes are restored) and its arb mode. se_ib_tdmpc2.py's --evaluate is the same
# harness code, copied literally (its only variant line is the docstring), and is left out for CI time.
VARIANTS = [
    ("tdmpc2_jax.py", []),
    ("tdmpc_glass_jax.py", ["--glass-warmup-steps", "200", "--arbitration-margin", "5"]),
]


def folder_state(run_dir):
    """Every file of the run folder outside evaluations/, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "evaluations" not in p.relative_to(run_dir).parts}


@pytest.mark.parametrize("script, flags", VARIANTS, ids=[s for s, _ in VARIANTS])
def test_evaluate_gives_the_eval_rows_again_and_changes_nothing(script, flags, tmp_path):
    """Checkpoints every 400 env steps, the newest one kept plus the multiples of 800: 800 and 1200 stay. --evaluate
    of each, with the run's 2 episodes, gives that step's eval.csv means exactly (same program, same key), with
    their sample std and Student-t interval; the training files are untouched."""
    run_dir = tmp_path / "run"
    run_script(script, *TINY_TDMPC2, *flags, "--total-steps", "1200", "--keep-checkpoints", "1", "--keep-every", "800",
               "--run-dir", str(run_dir))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [800, 1200]
    before, rows = folder_state(run_dir), {int(row["step"]): row for row in read_eval(run_dir)}
    modes = ["pi", "mppi", "arb"] if "--arbitration-margin" in flags else ["pi", "mppi"]
    for step, step_flags in [(800, ["--evaluate-step", "800"]), (1200, [])]:  # unset: the newest
        out = run_script(script, "--evaluate", str(run_dir), *step_flags).stdout
        record = json.loads((run_dir / "evaluations" / f"step{step}.json").read_text())
        assert (record["step"], record["episodes"], list(record["modes"])) == (step, 2, modes)
        for mode in modes:
            result = record["modes"][mode]
            assert f"{result['mean']:.6g}" == rows[step][f"return_{mode}"], (mode, step)
            returns = np.array(result["returns"])
            assert len(returns) == 2 and result["mean"] == pytest.approx(returns.mean(), rel=1e-6)
            half = stats.t.ppf(0.975, 1) * returns.std(ddof=1) / math.sqrt(2)  # 12.706 x std / sqrt(2)
            assert result["ci95"] == pytest.approx([returns.mean() - half, returns.mean() + half], rel=1e-6)
            assert f"step {step:,}: {mode} {result['mean']:.1f} (std {returns.std(ddof=1):.1f}, 95% CI" in out
    assert folder_state(run_dir) == before
    if script != "tdmpc2_jax.py":
        return
    more = run_script(script, "--evaluate", str(run_dir), "--eval-episodes", "5").stdout
    assert len(json.loads((run_dir / "evaluations" / "step1200.json").read_text())["modes"]["pi"]["returns"]) == 5
    assert "5 episodes" in more
    for bad, needle in [(["--num-envs", "8"], "--evaluate: --num-envs is not an evaluation flag; with --evaluate only "
                          "--evaluate-step, --eval-episodes, --capture-video, --video-height, --video-width may be "
                          "given"),
                        (["--evaluate-step", "400"], f"--evaluate {run_dir}: no checkpoint at step 400; complete "
                         "checkpoints: 800, 1200")]:
        proc = run_script(script, "--evaluate", str(run_dir), *bad, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {needle}"], proc.stderr
    assert folder_state(run_dir) == before


@pytest.mark.parametrize("flags, error", [
    (["--keep-every", "600"], "--keep-every (600) must be a multiple of --checkpoint-every (400): checkpoints are "
                              "written only there"),
    (["--evaluate-step", "400"], "--evaluate-step needs --evaluate RUN_DIR"),
])
def test_trained_agent_flags_are_refused_in_one_line_where_they_cannot_apply(flags, error):
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, *flags, "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {error}", proc.stderr
