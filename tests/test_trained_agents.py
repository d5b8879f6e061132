"""Trained agents: --evaluate of a checkpoint, --keep-every and --init-from."""

import json
import math

import numpy as np
import pytest
from conftest import TINY_TDMPC2, read_eval, run_script
from scipy import stats

# On tdmpc2_jax.py's runs. Glass's --evaluate (the same copied harness, with its prototypes restored) is checked
# against its eval.csv in tests/test_glass.py, on the run its video test makes; se_ib_tdmpc2.py's (the same copied code)
# is left out for CI time.
same_worker = pytest.mark.xdist_group("trained_agents")  # each source run is made once, on one worker


def folder_state(run_dir):
    """Every file of the run folder outside evaluations/, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "evaluations" not in p.relative_to(run_dir).parts}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tdmpc2_jax.py run to 1200 env steps: checkpoints every 400 env steps, the newest one kept plus the
    multiples of 800, so that 800 and 1200 stay."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--total-steps", "1200", "--keep-checkpoints", "1", "--keep-every",
               "800", "--run-dir", str(run_dir))
    return run_dir


@same_worker
def test_evaluate_gives_the_eval_rows_again_and_changes_nothing(trained):
    """--evaluate of the kept checkpoints, with the run's 2 episodes, gives that step's eval.csv means exactly (same
    program, same key), with their sample std and Student-t interval; the training files are untouched."""
    run_dir = trained
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [800, 1200]
    before, rows = folder_state(run_dir), {int(row["step"]): row for row in read_eval(run_dir)}
    modes = ["pi", "mppi"]
    for step, step_flags in [(800, ["--evaluate-step", "800"]), (1200, [])]:  # unset: the newest
        out = run_script("tdmpc2_jax.py", "--evaluate", str(run_dir), *step_flags).stdout
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


@same_worker
def test_evaluate_dumps_rollouts_and_videos_and_refuses_training_flags(trained):
    """5 episodes per mode with --dump-rollouts and 2 videos per mode: the dumped rewards of the running steps add up
    to the recorded returns, each SimNorm group of a dumped latent is a distribution, an episode runs from its first
    step; the training files stay untouched and a training flag is refused in one line."""
    run_dir = trained
    before = folder_state(run_dir)
    out = run_script("tdmpc2_jax.py", "--evaluate", str(run_dir), "--eval-episodes", "5", "--dump-rollouts",
                     "--capture-video", "--video-episodes", "2", "--video-height", "48", "--video-width", "64").stdout
    assert "5 episodes" in out
    record = json.loads((run_dir / "evaluations" / "step1200.json").read_text())
    with np.load(run_dir / "evaluations" / "rollouts_step1200.npz") as dump:
        for mode in ["pi", "mppi"]:
            obs, z, action = dump[f"{mode}_obs"], dump[f"{mode}_z"], dump[f"{mode}_action"]
            reward, alive = dump[f"{mode}_reward"], dump[f"{mode}_alive"]
            assert obs.shape == (5, 50, 5) and z.shape == (5, 50, 16) and action.shape == (5, 50, 1)  # 100 env steps
            assert alive[:, 0].all() and np.abs(action).max() <= 1
            np.testing.assert_allclose(z.reshape(5, 50, 2, 8).sum(-1), 1, rtol=1e-5)  # 16 = 2 groups of 8
            np.testing.assert_allclose((reward * alive).sum(1), record["modes"][mode]["returns"], rtol=1e-5)
    videos = sorted(p.name for p in (run_dir / "evaluations" / "videos").iterdir())
    assert videos == ["mppi_step1200.mp4", "mppi_step1200_episode1.mp4", "pi_step1200.mp4", "pi_step1200_episode1.mp4"]
    for bad, needle in [(["--num-envs", "8"], "--evaluate: --num-envs is not an evaluation flag; with --evaluate only "
                          "--evaluate-step, --eval-episodes, --dump-rollouts, --capture-video, --video-episodes, "
                          "--video-height, --video-width may be given"),
                        (["--evaluate-step", "400"], f"--evaluate {run_dir}: no checkpoint at step 400; complete "
                         "checkpoints: 800, 1200")]:
        proc = run_script("tdmpc2_jax.py", "--evaluate", str(run_dir), *bad, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {needle}"], proc.stderr
    assert folder_state(run_dir) == before


@same_worker
def test_init_from_continues_exactly_and_records_what_changed(trained, tmp_path):
    """--init-from RUN:800 with nothing changed writes, in its own folder, exactly the eval rows the source wrote
    after 800; from the newest checkpoint with --k-update and --total-steps changed, args.json names both with their
    before/after values and the steps go on from 1200. Flags the stored state cannot take are refused in one line."""
    source = trained
    before, rows = folder_state(source), read_eval(source)
    out = run_script("tdmpc2_jax.py", "--init-from", f"{source}:800", "--run-dir", str(tmp_path / "same")).stdout
    assert f"continued from {source} at step 800 (no flag changed)" in out
    same = read_eval(tmp_path / "same")
    assert [(r["step"], r["return_pi"], r["return_mppi"]) for r in same] == [
        (r["step"], r["return_pi"], r["return_mppi"]) for r in rows if int(r["step"]) > 800]
    saved = json.loads((tmp_path / "same" / "args.json").read_text())
    assert saved["init_from"] == {"run_dir": str(source), "step": 800, "changed": {}}
    run_script("tdmpc2_jax.py", "--init-from", str(source), "--k-update", "4", "--total-steps", "1600",
               "--run-dir", str(tmp_path / "changed"))
    saved = json.loads((tmp_path / "changed" / "args.json").read_text())
    assert saved["init_from"] == {"run_dir": str(source), "step": 1200, "changed": {
        "total_steps": {"before": 1200, "after": 1600}, "k_update": {"before": 2, "after": 4}}}
    assert [int(r["step"]) for r in read_eval(tmp_path / "changed")] == [1600]
    for bad, needle in [(["--num-envs", "8"], "--init-from: --num-envs 8 differs from the source run's 4, and the "
                          "checkpoint's state was made with it"),
                        (["--total-steps", "1200"], "--init-from: that checkpoint is at step 1,200; pass a "
                         "--total-steps past it"),
                        (["--resume", str(source)], "--init-from starts a new run from a checkpoint, --resume "
                         "continues a run: give one of them")]:
        proc = run_script("tdmpc2_jax.py", "--init-from", str(source), *bad, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {needle}"], proc.stderr
    assert folder_state(source) == before


@pytest.mark.parametrize("flags, error", [
    (["--keep-every", "600"], "--keep-every (600) must be a multiple of --checkpoint-every (400): checkpoints are "
                              "written only there"),
    (["--evaluate-step", "400"], "--evaluate-step needs --evaluate RUN_DIR"),
])
def test_trained_agent_flags_are_refused_in_one_line_where_they_cannot_apply(flags, error):
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, *flags, "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {error}", proc.stderr
