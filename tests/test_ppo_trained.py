"""Trained agents in ppo_playground.py: --evaluate of a checkpoint, --keep-every and --init-from (as
tests/test_trained_agents.py tests them in the TD-MPC scripts)."""

import json
import math

import numpy as np
import pytest
from conftest import PPO_CPU, read_eval, read_video, run_script
from scipy import stats

import ppo_playground as P

# The PPO CLI config (2 seeds on one device) with 3 iterations of 10,240 env steps, evaluated (and checkpointed)
# after each: the newest checkpoint is kept plus the multiples of 20,480, so that 20480 and 30720 stay.
FLAGS = [*PPO_CPU, "--total-steps", "30720", "--num-evals", "4", "--num-resets-per-eval", "0", "--episode-length",
         "1000", "--keep-checkpoints", "1", "--keep-every", "20480"]

same_worker = pytest.mark.xdist_group("ppo_tiny_runs")  # the group of the other PPO CLI runs (one compile cache)


def folder_state(run_dir):
    """Every file of the run folder outside evaluations/, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and "evaluations" not in p.relative_to(run_dir).parts}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The two seed folders of the run above (seeds 1 and 2)."""
    base = tmp_path_factory.mktemp("ppo_trained") / "run"
    run_script("ppo_playground.py", *FLAGS, "--run-dir", str(base))
    return [base.with_name("run__1"), base.with_name("run__2")]


def check_record(run_dir, step, out):
    """evaluations/step{step}.json against the eval.csv row training wrote at that step: the same means to the
    printed digits (same program, same key), 16 episodes per mode with their sample std and t-interval."""
    record = json.loads((run_dir / "evaluations" / f"step{step}.json").read_text())
    assert (record["run_dir"], record["step"], record["episodes"]) == (str(run_dir), step, 16)
    assert list(record["modes"]) == ["stochastic", "deterministic"] and "versions" in record["metadata"]
    (row,) = [r for r in read_eval(run_dir) if int(r["step"]) == step]
    for mode, column in [("stochastic", "return"), ("deterministic", "return_deterministic")]:
        result = record["modes"][mode]
        assert f"{result['mean']:.6g}" == row[column], (run_dir.name, step, mode)
        returns = np.array(result["returns"])
        assert len(returns) == 16 and result["mean"] == pytest.approx(returns.mean(), rel=1e-6)
        assert result["std"] == pytest.approx(returns.std(ddof=1), rel=1e-6)
        half = stats.t.ppf(0.975, 15) * returns.std(ddof=1) / math.sqrt(16)
        assert result["ci95"] == pytest.approx([returns.mean() - half, returns.mean() + half], rel=1e-6)
        assert f"step {step:,}: {mode} {result['mean']:.1f} (std {result['std']:.1f}, 95% CI" in out


@same_worker
def test_evaluate_gives_the_eval_rows_again_and_changes_nothing(trained):
    """--keep-every kept 20480 besides the newest; --evaluate of both (unset step: the newest) in the second seed's
    folder gives its eval.csv rows again, and the training files are untouched."""
    for run_dir in trained:
        assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [20480, 30720]
    run_dir = trained[1]
    before = folder_state(run_dir)
    for step, step_flags in [(30720, []), (20480, ["--evaluate-step", "20480"])]:
        out = run_script("ppo_playground.py", "--evaluate", str(run_dir), *step_flags).stdout
        check_record(run_dir, step, out)
    assert folder_state(run_dir) == before


@same_worker
def test_evaluate_video_rollouts_refusals_and_keep_every_on_resume(trained):
    """With --capture-video --video-episodes 2 the first two episodes of each mode go to evaluations/videos/ (the
    reset state and 1000 agent steps each); --dump-rollouts writes every step, whose masked rewards add up to the
    recorded returns; training flags and missing steps are refused in one line; --keep-every may be given on
    --resume. The training files stay untouched."""
    run_dir = trained[0]
    before = folder_state(run_dir)
    out = run_script("ppo_playground.py", "--evaluate", str(run_dir), "--evaluate-step", "20480", "--capture-video",
                     "--video-episodes", "2", "--dump-rollouts", "--video-height", "48", "--video-width", "64").stdout
    check_record(run_dir, 20480, out)
    videos = run_dir / "evaluations" / "videos"
    assert sorted(p.name for p in videos.iterdir()) == [f"{mode}_step20480{episode}.mp4" for mode in
                                                       ("deterministic", "stochastic") for episode in ("", "_episode1")]
    for path in videos.iterdir():
        assert read_video(path)[1].shape == (1001, 48, 64, 3)
    rollouts = np.load(run_dir / "evaluations" / "rollouts_step20480.npz")
    record = json.loads((run_dir / "evaluations" / "step20480.json").read_text())
    assert sorted(rollouts) == sorted(f"{mode}_{name}" for mode in ("stochastic", "deterministic")
                                      for name in ("obs", "action", "reward", "alive"))
    for mode in ("stochastic", "deterministic"):
        assert rollouts[f"{mode}_obs"].shape == (16, 1000, 5) and rollouts[f"{mode}_action"].shape == (16, 1000, 1)
        masked = (rollouts[f"{mode}_reward"] * rollouts[f"{mode}_alive"]).sum(1)
        np.testing.assert_allclose(masked, record["modes"][mode]["returns"], rtol=1e-5)
    for bad, needle in [
        (["--evaluate", str(run_dir), "--num-envs", "8"], "--evaluate: --num-envs is not an evaluation flag; with "
         "--evaluate only --evaluate-step, --num-eval-envs, --dump-rollouts, --capture-video, --video-episodes, "
         "--video-height, --video-width may be given"),
        ([*FLAGS, "--dump-rollouts", "--dry-run"], "--dump-rollouts needs --evaluate RUN_DIR"),
        ([*FLAGS, "--video-episodes", "17", "--dry-run"], "--video-episodes (17) must not exceed --num-eval-envs (16)"),
        (["--evaluate", str(run_dir), "--evaluate-step", "10240"], f"--evaluate {run_dir}: no checkpoint at step "
         "10240; complete checkpoints: 20480, 30720"),
        (["--evaluate", str(run_dir / "nope")], f"--evaluate {run_dir / 'nope'}: no such folder (expected a run "
         "folder of ppo_playground.py)"),
        ([*FLAGS, "--evaluate-step", "20480", "--dry-run"], "--evaluate-step needs --evaluate RUN_DIR"),
        ([*FLAGS, "--keep-every", "15360", "--dry-run"], "--keep-every (15360) must be a multiple of the checkpoint "
         "spacing (10240 env steps): checkpoints are written only there"),
    ]:
        proc = run_script("ppo_playground.py", *bad, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {needle}"], proc.stderr
    printed = run_script("ppo_playground.py", "--resume", str(run_dir), "--keep-every", "10240", "--dry-run").stdout
    assert json.loads(printed)["keep_every"] == 10240
    assert folder_state(run_dir) == before


def test_keep_every_must_be_a_multiple_of_the_checkpoint_spacing():
    """The spacing: between evaluations by default, lcm(--checkpoint-every, one iteration) with it (a checkpoint is
    written at the first iteration at or past each multiple), none with --checkpoint-every 0."""
    tiny = dict(env_id="CartpoleBalance", impl="jax", num_envs=64, batch_size=32, num_minibatches=16,
                unroll_length=20, total_steps=30720, num_evals=4, num_resets_per_eval=0)  # 10,240 env steps each
    assert P.resolve_args(P.Args(**tiny, keep_every=20480)).keep_every == 20480
    assert P.resolve_args(P.Args(**tiny, checkpoint_every=4096, keep_every=3 * 20480)).keep_every == 61440
    for overrides, needle in [
        (dict(keep_every=5120), "multiple of the checkpoint spacing (10240 env steps)"),
        (dict(checkpoint_every=4096, keep_every=10240), "multiple of the checkpoint spacing (20480 env steps)"),
        (dict(checkpoint_every=0, keep_every=20480), "--checkpoint-every 0 writes none but the last"),
        (dict(keep_every=-1), "--keep-every must not be negative"),
    ]:
        with pytest.raises(P.UserError) as exc:
            P.resolve_args(P.Args(**tiny, **overrides))
        assert "\n" not in str(exc.value) and needle in str(exc.value), str(exc.value)


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """A one-seed run of the same config, 2 iterations, evaluated at 0 and 20480 and checkpointed after each: a seed
    alone on its device is trained by the program a continuation runs (a seed of a batch shares its device, and is
    vmapped)."""
    run_dir = tmp_path_factory.mktemp("ppo_solo") / "run"
    flags = [*PPO_CPU, "--num-seeds", "1", "--total-steps", "20480", "--num-evals", "2", "--num-resets-per-eval", "0",
             "--episode-length", "1000", "--checkpoint-every", "10240"]
    run_script("ppo_playground.py", *flags, "--run-dir", str(run_dir))
    return run_dir


@same_worker
def test_init_from_continues_exactly_and_records_what_changed(solo, tmp_path):
    """--init-from RUN:10240 with nothing changed writes, in its own folder, exactly the eval rows the source wrote
    after 10240; from the newest checkpoint with --total-steps, --num-evals and --checkpoint-every changed, args.json
    names them with their before/after values and the steps go on from 20480. Flags the stored state cannot take
    are refused in one line; the source folder stays untouched."""
    before, rows = folder_state(solo), read_eval(solo)
    out = run_script("ppo_playground.py", "--init-from", f"{solo}:10240", "--run-dir", str(tmp_path / "same")).stdout
    assert f"continued from {solo} at step 10,240 (no flag changed)" in out
    columns = ("step", "return", "return_deterministic")
    assert [tuple(r[c] for c in columns) for r in read_eval(tmp_path / "same")] == [
        tuple(r[c] for c in columns) for r in rows if int(r["step"]) > 10240]
    saved = json.loads((tmp_path / "same" / "args.json").read_text())
    assert saved["init_from"] == {"run_dir": str(solo), "step": 10240, "changed": {}}
    run_script("ppo_playground.py", "--init-from", str(solo), "--total-steps", "30720", "--num-evals", "1",
               "--checkpoint-every", "0", "--run-dir", str(tmp_path / "changed"))
    saved = json.loads((tmp_path / "changed" / "args.json").read_text())
    assert saved["init_from"] == {"run_dir": str(solo), "step": 20480, "changed": {
        "total_steps": {"before": 20480, "after": 30720}, "num_evals": {"before": 2, "after": 1},
        "checkpoint_every": {"before": 10240, "after": 0}}}
    assert [int(r["step"]) for r in read_eval(tmp_path / "changed")] == [30720]
    proc = run_script("ppo_playground.py", "--init-from", str(solo), "--num-envs", "8", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --init-from: --num-envs 8 differs from the source run's 64, and the checkpoint's state was made with "
        "it"], proc.stderr
    for overrides, needle in [
        (dict(value_hidden_sizes=(8, 8)), "--value-hidden-sizes 8 8 differs from the source run's 64 64 64"),
        (dict(max_grad_norm=1.0), "--max-grad-norm 1.0 differs from the source run's None"),
        (dict(num_seeds=2), "--init-from continues one seed, the source folder's: --num-seeds must be 1"),
        (dict(resume=str(solo)), "--init-from starts a new run from a checkpoint, --resume continues a run"),
        (dict(init_from=f"{solo}:999"), f"--init-from {solo}: no checkpoint at step 999; complete checkpoints: "
         "10240, 20480"),
        (dict(impl="jax"), "that checkpoint is at step 20,480; pass a --total-steps past it"),
    ]:
        with pytest.raises(P.UserError) as exc:
            P.train(P.Args(**{"init_from": str(solo), "run_dir": str(tmp_path / "refused"), **overrides}))
        assert "\n" not in str(exc.value) and needle in str(exc.value), str(exc.value)
    assert folder_state(solo) == before and not (tmp_path / "refused").exists()
