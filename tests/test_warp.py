"""MJX's warp backend, Playground's default on a GPU, in every training script. Here it runs on warp's CPU device:
the same kernels, slowly. Episodes of 100 env steps make envs reset during each run, HopperHop brings contacts
(warp's contact pool has no per-env axis), CartpoleBalance has none. Every run is a process of its own, as a user
runs it: warp's console lines and kernel loads are per process."""

import json
import re

import numpy as np
import pytest
from conftest import TINY_TDMPC2, TWO_DEVICES, assert_resume_is_exact, read_eval, read_video, run_script

pytestmark = pytest.mark.slow


def run(script: str, *args: str, **kwargs):
    return run_script(script, *args, own_process=True, **kwargs)


def with_env(flags: list[str], env_id: str, impl: str = "warp") -> list[str]:
    """`flags` with their --env-id and --impl replaced."""
    out = list(flags)
    out[out.index("--env-id") + 1], out[out.index("--impl") + 1] = env_id, impl
    return out


TD_CARTPOLE, TD_HOPPER = with_env(TINY_TDMPC2, "CartpoleBalance"), with_env(TINY_TDMPC2, "HopperHop")
SHORT = ["--total-steps", "600", "--eval-freq", "200"]  # 4 evaluations; the envs reset at env step 400
# PPO at the smallest batch that still resets envs (100-step episodes) and evaluates twice; two seeds per device,
# so the seed axis is vmapped over warp's batch of envs.
PPO_WARP = ["--impl", "warp", "--num-envs", "8", "--batch-size", "8", "--num-minibatches", "4", "--unroll-length", "10",
            "--num-updates-per-batch", "2", "--num-eval-envs", "4", "--num-seeds", "2", "--total-steps", "640",
            "--num-evals", "2", "--episode-length", "100"]


def assert_readable_warp_run(stdout: str, run_dir, env_id: str, naconmax: int, njmax: int):
    """The first line of ours names the backend and its buffers; warp's per-module lines are silenced; the run folder
    records the backend and has finite evaluations."""
    ours = [line for line in stdout.splitlines() if not line.startswith("Warp CUDA warning")]
    assert ours[0].startswith(f"{env_id} (warp, naconmax {naconmax}, njmax {njmax})"), ours[0]
    assert not [line for line in stdout.splitlines() if re.match(r"Module .* load on device", line)]
    assert "iterations limit reached" not in stdout  # counted and said once by us instead
    config = json.loads((run_dir / "args.json").read_text())
    assert (config["impl"], config["naconmax"], config["njmax"]) == ("warp", naconmax, njmax)
    rows = read_eval(run_dir)
    assert len(rows) >= 2
    values = [float(v) for row in rows for k, v in row.items() if k.startswith("return")]
    assert np.isfinite(values).all()


@pytest.fixture(scope="module")
def cartpole_warp_run(tmp_path_factory):
    """One tiny tdmpc2_jax.py run on CartpoleBalance under warp, with videos."""
    run_dir = tmp_path_factory.mktemp("warp") / "cartpole"
    proc = run("tdmpc2_jax.py", *TD_CARTPOLE, *SHORT, "--run-dir", str(run_dir), "--capture-video",
                      "--video-height", "48", "--video-width", "64")
    return proc.stdout, run_dir


@pytest.mark.xdist_group("warp_cartpole")  # the fixture runs once
def test_tdmpc2_cartpole_under_warp_trains_evaluates_and_records(cartpole_warp_run):
    stdout, run_dir = cartpole_warp_run
    assert_readable_warp_run(stdout, run_dir, "CartpoleBalance", 0, 2)  # Playground's buffers: no contacts
    assert [int(row["step"]) for row in read_eval(run_dir)] == [0, 200, 400, 600]
    meta, frames = read_video(run_dir / "videos" / "mppi_step600.mp4")
    assert frames.shape == (51, 48, 64, 3)  # initial state + 50 agent steps: the poses come out of warp's Data
    assert frames.std(axis=0).max() > 0  # the pole moves


def test_tdmpc2_hopper_under_warp_resumes_exactly(tmp_path):
    """Contacts and resets in the carry: a warp run interrupted at its first checkpoint and resumed writes what the
    uninterrupted run wrote (the eval rows and every TensorBoard scalar)."""
    assert_resume_is_exact("tdmpc2_jax.py", [*TD_HOPPER, "--eval-freq", "200"], tmp_path, half=200, full=600,
                           own_process=True)
    config = json.loads((tmp_path / "whole" / "args.json").read_text())
    assert (config["impl"], config["naconmax"]) == ("warp", 50_000)  # Playground's pool: ample room for 4 envs


GLASS = ("tdmpc_glass_jax.py", ["--glass-warmup-steps", "200"])
SE_IB = ("se_ib_tdmpc2.py", ["--se-coef", "0.01", "--ib-coef", "0.01"])
eval_returns = lambda run: np.array([[float(r["return_pi"]), float(r["return_mppi"])] for r in read_eval(run)])


@pytest.mark.xdist_group("warp_cartpole")  # the fixture runs once
def test_glass_cartpole_two_seeds_on_two_devices_under_warp(cartpole_warp_run, tmp_path):
    """Glass on CartpoleBalance with one seed per device on two CPU devices: each seed runs its own program, compiled
    for two devices. Seed 1's untrained evaluation equals the solo tdmpc2_jax.py run's (Glass's own parameters draw
    from their own RNG stream); training then goes its own way (Glass switches on at env step 200)."""
    stdout_solo, solo = cartpole_warp_run
    script, extra = GLASS
    proc = run(script, *TD_CARTPOLE, *SHORT, *extra, "--num-seeds", "2", "--run-dir", str(tmp_path / "b"),
                      env=TWO_DEVICES)
    assert "2 seeds, 1 per device on 2 devices" in proc.stdout
    for folder in (tmp_path / "b__1", tmp_path / "b__2"):
        assert_readable_warp_run(proc.stdout, folder, "CartpoleBalance", 0, 2)
        assert len(eval_returns(folder)) == 4
    np.testing.assert_array_equal(eval_returns(tmp_path / "b__1")[0], eval_returns(solo)[0])
    assert not np.array_equal(eval_returns(tmp_path / "b__2"), eval_returns(solo))


@pytest.mark.parametrize("script, extra, env_id", [(*GLASS, "HopperHop"), (*SE_IB, "HopperHop"),
                                                   (*SE_IB, "CartpoleBalance")])
def test_variants_under_warp(script, extra, env_id, tmp_path):
    """With HopperHop, two seeds share the device: the seed axis is vmapped over warp's batch of envs."""
    seeds = ["--num-seeds", "2"] if env_id == "HopperHop" else []
    run_dir = tmp_path / "run"
    proc = run(script, *with_env(TINY_TDMPC2, env_id), *SHORT, *extra, *seeds, "--run-dir", str(run_dir))
    naconmax, njmax = (50_000, 50) if env_id == "HopperHop" else (0, 2)
    for folder in [run_dir] if not seeds else [tmp_path / "run__1", tmp_path / "run__2"]:
        assert_readable_warp_run(proc.stdout, folder, env_id, naconmax, njmax)


@pytest.mark.parametrize("env_id", ["HopperHop", "CartpoleBalance"])
def test_ppo_under_warp(env_id, tmp_path):
    proc = run("ppo_playground.py", "--env-id", env_id, *PPO_WARP, "--run-dir", str(tmp_path / "run"))
    naconmax, njmax = (50_000, 50) if env_id == "HopperHop" else (0, 2)
    for seed in (1, 2):
        assert_readable_warp_run(proc.stdout, tmp_path / f"run__{seed}", env_id, naconmax, njmax)


def test_contact_overflow_stops_the_run_in_one_line(tmp_path):
    """A pool of one contact for four hoppers overflows at once: the run stops with one line naming the step and the
    flag to raise, instead of simulating with dropped contacts."""
    proc = run("tdmpc2_jax.py", *TD_HOPPER, *SHORT, "--naconmax", "1",
                      "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    *_, last = proc.stderr.strip().splitlines()  # after warp's own note that this machine has no CUDA driver
    assert re.fullmatch(r"error: warp overflow \(flags 0x[0-9a-f]+\) at env step \d+: the env batch ran out of room "
                        r"for contacts \(raise --naconmax, now 1 for all envs of a device\); stopping \(checkpoints "
                        r"written so far are intact\)", last), last


def test_warp_buffer_flags_are_refused_under_jax():
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--naconmax", "100", "--dry-run", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --naconmax and --njmax size warp's contact buffers; they apply to --impl "
                                   "warp only")
