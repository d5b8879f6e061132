"""Speed of tdmpc2_jax.py's pieces and of its full loop, measured in one process; optional learning curve.

    python benchmarks/bench_tdmpc2.py                   # update / plan / env / full-loop timings (HopperHop)
    python benchmarks/bench_tdmpc2.py --learning-curve  # + the tiny-model CartpoleBalance run to 30k env steps

Every time is the median of `--repeats` calls after one compiling call. Numbers go into docs/tdmpc2.md by hand,
with the machine they came from; nothing here is asserted.
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tdmpc2_jax as T  # noqa: E402


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() often says only x86_64)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, *args, repeats: int) -> float:
    """Median wall time in seconds of fn(*args) after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tick)
    return float(np.median(times))


def make_trainer(env_id: str, seed_vector_steps: int, num_envs: int, **overrides):
    venv = T.VectorEnv(T.load_env(env_id, "jax"), action_repeat=2)
    args = T.Args(env_id=env_id, impl="jax", num_envs=num_envs, seed_steps=seed_vector_steps * num_envs * 2,
                  pretrain_updates=0, buffer_size=100_000, **overrides)
    args = T.resolve_args(args, venv)
    return T.Trainer(args, venv), args


def filled_carry(trainer, vector_steps: int):
    """A carry whose buffer holds `vector_steps` random-action steps (the trainer must still be seeding)."""
    carry = jax.jit(trainer.init)(jax.random.key(0))
    carry, _ = jax.jit(partial(trainer.chunk, num_vector_steps=vector_steps))(carry)
    return carry


def bench_pieces(env_id: str, repeats: int):
    rows = {}
    for size in (1, 5):
        trainer, args = make_trainer(env_id, seed_vector_steps=10**9, model_size=size, num_envs=16)
        carry = filled_carry(trainer, 20)
        updates = jax.jit(lambda c, k, tr=trainer: tr.run_updates(c.agent, c.buffer, k, 10))
        rows[f"update, model size {size} (batch 256, H 3)"] = timed(updates, carry, jax.random.key(1),
                                                                   repeats=repeats) / 10
        for num_envs in (1, 16):
            obs = T.observation(carry.env_state)[:num_envs]
            act = jax.jit(lambda c, o, k, tr=trainer, n=num_envs: T.act_mppi(
                tr.model, c.agent, o, c.plan_mean[:n], c.episode_step[:n] == 0, k, eval_mode=False))
            rows[f"MPPI plan, model size {size}, {num_envs} env(s), 512 samples"] = timed(
                act, carry, obs, jax.random.key(2), repeats=repeats)
    return rows


def bench_full_loop(env_id: str, collect_policy: str, repeats: int, vector_steps: int = 4):
    """Env steps/s of the jitted training chunk (--num-envs 16 --k-update 4) and its parts measured alone."""
    trainer, args = make_trainer(env_id, seed_vector_steps=3, num_envs=16, k_update=4, collect_policy=collect_policy)
    carry = filled_carry(trainer, 3)  # past seeding: every further vector step plans (or samples) and updates
    chunk = jax.jit(partial(trainer.chunk, num_vector_steps=vector_steps))
    t_chunk = timed(chunk, carry, repeats=repeats) / vector_steps
    venv = trainer.venv
    obs = T.observation(carry.env_state)
    t_env = timed(jax.jit(venv.step), carry.env_state, carry.plan_mean[:, 0], repeats=repeats)
    if collect_policy == "pi":
        act = lambda c, k: T.act_pi(trainer.model, c.agent, obs, k, eval_mode=False)
    else:
        act = lambda c, k: T.act_mppi(trainer.model, c.agent, obs, c.plan_mean, c.episode_step == 0, k, eval_mode=False)
    t_act = timed(jax.jit(act), carry, jax.random.key(3), repeats=repeats)
    t_updates = timed(jax.jit(lambda c, k: trainer.run_updates(c.agent, c.buffer, k, args.k_update)),
                      carry, jax.random.key(4), repeats=repeats)
    parts = t_env + t_act + t_updates
    return {
        "env steps/s": args.num_envs * args.action_repeat / t_chunk,
        "ms per vector step": 1e3 * t_chunk,
        "ms env + act + K updates measured alone": 1e3 * parts,
        "overhead": t_chunk / parts - 1,
    }


def learning_curve():
    """The learning test's tiny model and flags (tests/conftest.py) on CartpoleBalance, run on to 30k env steps with an
    eval every 5k (the learning-curve row of docs/tdmpc2.md)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import LEARN_TDMPC2

    run_dir = REPO / "runs" / f"bench_learning_curve_{int(time.time())}"
    flags = [*LEARN_TDMPC2, "--total-steps", "30000", "--eval-freq", "5000", "--seed", "3", "--run-dir", str(run_dir)]
    print("learning curve:", "python tdmpc2_jax.py " + " ".join(flags), flush=True)
    subprocess.run([sys.executable, str(REPO / "tdmpc2_jax.py"), *flags], check=True)
    print((run_dir / "eval.csv").read_text())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HopperHop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning-curve", action="store_true", help="also run the 30k-step learning curve")
    parser.add_argument("--only-learning-curve", action="store_true", help="run just the learning curve")
    cli = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {jax.device_count()} x {jax.devices()[0].platform}, "
          f"jax {jax.__version__}", flush=True)
    if cli.only_learning_curve:
        learning_curve()
        sys.exit(0)
    for name, seconds in bench_pieces(cli.env_id, cli.repeats).items():
        print(f"{name}: {1e3 * seconds:.1f} ms", flush=True)
    for policy in ("mppi", "pi"):
        result = bench_full_loop(cli.env_id, policy, cli.repeats)
        print(f"full loop {cli.env_id} --num-envs 16 --k-update 4 --collect-policy {policy}: "
              + ", ".join(f"{k} {v:.3g}" if k != "overhead" else f"{k} {v:+.1%}" for k, v in result.items()),
              flush=True)
    if cli.learning_curve:
        learning_curve()
