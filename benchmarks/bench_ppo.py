"""Speed of `ppo_playground.py` against Brax's own `ppo.train`, raw env stepping, and sequential seeds.

Three measurements on one env and one config (CPU-sized by default; pass Playground's sizes on a GPU):
  1. training env-steps/s of ours vs Brax's `ppo.train` (same env wrapper, networks and PPO settings), plus the
     final evaluation returns of both at the same step count;
  2. our training env-steps/s vs raw env stepping with uniform random actions at the same num_envs (target >= 60%);
  3. wall time of `--num-seeds 4` (vmapped, one process) vs 4 sequential single-seed runs.
Compile time is excluded from every env-steps/s figure and included in the wall times of 3 (as a user sees it).

    python benchmarks/bench_ppo.py                      # CPU-sized config (see Config below)
    python benchmarks/bench_ppo.py --skip-seeds         # only 1 and 2

Not run in CI. Brax 0.14.2 calls `jax.device_put_replicated`, which JAX 0.10 no longer has: a small shim below.
"""

import dataclasses
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ppo_playground as ours  # noqa: E402


@dataclasses.dataclass
class Config:
    env_id: str = "CartpoleBalance"
    """DM Control env"""
    impl: str = "jax"
    """MJX backend"""
    num_envs: int = 128
    """parallel training envs (Playground: 2048)"""
    batch_size: int = 128
    """sequences per minibatch (Playground: 1024)"""
    num_minibatches: int = 8
    """minibatches per epoch (Playground: 32)"""
    unroll_length: int = 30
    """agent steps per sequence (Playground: 30)"""
    num_updates_per_batch: int = 4
    """epochs per batch (Playground: 16)"""
    value_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """value MLP (Brax/Playground: 5 x 256)"""
    total_steps: int = 614_400
    """env steps per training run in measurement 1 (20 iterations; both trainers use Brax's rounding)"""
    num_evals: int = 3
    """evaluations (Brax counts the one at step 0); Brax's SPS is taken over the last block"""
    num_eval_envs: int = 128
    """evaluation episodes"""
    seeds_total_steps: int = 307_200
    """env steps per seed in measurement 3 (10 iterations, --step-rounding iteration)"""
    skip_brax: bool = False
    """skip measurement 1"""
    skip_seeds: bool = False
    """skip measurement 3"""
    skip_ours: bool = False
    """skip our full training run (then measurement 1 and the training/raw ratio are skipped too)"""


def ppo_flags(cfg: Config, total_steps: int) -> list[str]:
    return ["--env-id", cfg.env_id, "--impl", cfg.impl, "--num-envs", str(cfg.num_envs),
            "--batch-size", str(cfg.batch_size), "--num-minibatches", str(cfg.num_minibatches),
            "--unroll-length", str(cfg.unroll_length), "--num-updates-per-batch", str(cfg.num_updates_per_batch),
            "--value-hidden-sizes", *map(str, cfg.value_hidden_sizes), "--total-steps", str(total_steps),
            "--num-evals", str(cfg.num_evals), "--num-eval-envs", str(cfg.num_eval_envs)]


def resolved(cfg: Config, total_steps: int) -> ours.Args:
    """Our resolved config, env sizes included (the env is loaded again where it is used)."""
    return ours.setup(tyro.cli(ours.Args, args=ppo_flags(cfg, total_steps)))[0]


def time_ours(args: ours.Args) -> dict:
    """Our training iteration in-process: env-steps/s over all iterations after the ahead-of-time compile."""
    env = ours.make_env(args)
    keys = jnp.stack([jax.random.PRNGKey(args.seed)])
    reset_fn = jax.jit(jax.vmap(functools.partial(ours.reset_training_envs, env, args)))
    env_state, k_env = reset_fn(keys)
    ts = jax.jit(jax.vmap(functools.partial(ours.init_ppo_state, args)))(keys, env_state)
    t0 = time.time()
    step = jax.jit(jax.vmap(functools.partial(ours.training_iteration, env, args)), donate_argnums=0)
    step = step.lower(ts).compile()
    compile_s = time.time() - t0
    t0 = time.time()
    for it in range(1, args.num_iterations + 1):
        ts, metrics = step(ts)
        jax.block_until_ready(metrics)
        if args.num_resets_per_eval > 0 and it % args.iterations_per_epoch == 0:
            env_state, k_env = reset_fn(k_env)
            ts = ts.replace(env_state=env_state)
    train_s = time.time() - t0
    ret, ret_det = jax.jit(jax.vmap(functools.partial(ours.evaluate, env, args)))(
        ts.params, ts.normalizer, keys)
    return dict(sps=args.total_steps_resolved / train_s, steps=args.total_steps_resolved, compile_s=compile_s,
                eval_return=float(ret[0]), eval_return_deterministic=float(ret_det[0]))


def time_brax(args: ours.Args) -> dict:
    """Brax's ppo.train with the same settings; env-steps/s as Brax reports it (training epochs only)."""
    if not hasattr(jax, "device_put_replicated"):  # shim: brax 0.14.2 calls it, JAX 0.10 removed it
        def device_put_replicated(x, devices):
            assert len(devices) == 1, "the shim covers the single-device case only"
            return jax.tree.map(lambda a: jax.device_put(jnp.asarray(a)[None], devices[0]), x)
        jax.device_put_replicated = device_put_replicated
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as ppo
    from mujoco_playground import wrapper

    env = ours.make_env(args)
    sps, last = [], {}

    def progress(step, metrics):
        if "training/walltime" in metrics:
            sps.append((step, float(metrics["training/walltime"]), float(metrics["training/sps"])))
        last.update(step=step, ret=float(metrics.get("eval/episode_reward", np.nan)))

    network_factory = functools.partial(ppo_networks.make_ppo_networks,
                                        policy_hidden_layer_sizes=tuple(args.policy_hidden_sizes),
                                        value_hidden_layer_sizes=tuple(args.value_hidden_sizes))
    t0 = time.time()
    ppo.train(env, num_timesteps=args.total_steps, num_evals=args.num_evals, reward_scaling=args.reward_scaling,
              episode_length=args.episode_length, normalize_observations=args.normalize_observations,
              action_repeat=args.action_repeat, unroll_length=args.unroll_length,
              num_minibatches=args.num_minibatches, num_updates_per_batch=args.num_updates_per_batch,
              discounting=args.discounting, learning_rate=args.learning_rate, entropy_cost=args.entropy_cost,
              num_envs=args.num_envs, batch_size=args.batch_size, num_resets_per_eval=args.num_resets_per_eval,
              num_eval_envs=args.num_eval_envs, clipping_epsilon=args.clipping_epsilon,
              gae_lambda=args.gae_lambda, seed=args.seed, network_factory=network_factory,
              wrap_env_fn=wrapper.wrap_for_brax_training, progress_fn=progress, log_training_metrics=False)
    wall = time.time() - t0
    # Brax's own `training/sps` divides the steps of all num_resets_per_eval epochs by the time of one epoch (10x
    # too high at Playground's settings), so we use its cumulative training walltime instead, from the first eval
    # after init (the first block holds the compile) to the last.
    (step0, wall0, _), (step1, wall1, reported) = sps[0], sps[-1]
    return dict(sps=(step1 - step0) / (wall1 - wall0), brax_reported_sps=reported, steps=last.get("step"),
                eval_return=last.get("ret"), wall_s=wall)


def time_random_stepping(args: ours.Args, num_steps: int, repeats: int = 5) -> float:
    """Raw env-steps/s of the same wrapped env with uniform random actions at num_envs (one scan, jitted)."""
    env = ours.make_env(args)
    state = jax.jit(lambda k: ours.env_reset(env, k, args.num_envs))(jax.random.PRNGKey(0))

    @jax.jit
    def rollout(state, key):
        def step(state, k):
            action = jax.random.uniform(k, (args.num_envs, env.action_size), minval=-1.0, maxval=1.0)
            state, out = ours.env_step(env, args, state, action)
            return state, out.reward
        return jax.lax.scan(step, state, jax.random.split(key, num_steps))

    state, rewards = rollout(state, jax.random.PRNGKey(1))  # compile
    jax.block_until_ready(rewards)
    t0 = time.time()
    for i in range(repeats):
        state, rewards = rollout(state, jax.random.PRNGKey(2 + i))
        jax.block_until_ready(rewards)
    return repeats * num_steps * args.num_envs * args.action_repeat / (time.time() - t0)


def time_rollout_only(args: ours.Args, repeats: int = 5) -> float:
    """Env-steps/s of our rollout alone (policy inference, sampling, storage; no SGD) at num_envs."""
    env = ours.make_env(args)
    keys = jnp.stack([jax.random.PRNGKey(args.seed)])
    env_state, _ = jax.jit(jax.vmap(functools.partial(ours.reset_training_envs, env, args)))(keys)
    ts = jax.jit(jax.vmap(functools.partial(ours.init_ppo_state, args)))(keys, env_state)
    rollout = jax.jit(jax.vmap(lambda ts, k: ours.collect_rollout(env, args, ts, k)))
    out = rollout(ts, keys)  # compile
    jax.block_until_ready(out)
    t0 = time.time()
    for i in range(repeats):
        out = rollout(ts, keys + i)
        jax.block_until_ready(out)
    return repeats * args.steps_per_iteration / (time.time() - t0)


def time_cli(flags: list[str], run_dir: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, str(REPO / "ppo_playground.py"), *flags, "--run-dir", run_dir], check=True,
                   capture_output=True, text=True)
    return time.time() - t0


if __name__ == "__main__":
    cfg = tyro.cli(Config)
    args = resolved(cfg, cfg.total_steps)
    print(f"config: {json.dumps(ppo_flags(cfg, cfg.total_steps))}")
    print(f"steps/iteration {args.steps_per_iteration:,}, iterations {args.num_iterations}, "
          f"hard reset every {args.iterations_per_epoch} iteration(s)", flush=True)
    results = {}

    if not cfg.skip_ours:
        results["ours"] = time_ours(args)
        print(f"ours:  {results['ours']}", flush=True)
    if not cfg.skip_brax and not cfg.skip_ours:
        results["brax"] = time_brax(args)
        print(f"brax:  {results['brax']}", flush=True)
        print(f"ratio ours / brax env-steps/s: {results['ours']['sps'] / results['brax']['sps']:.2f}")

    rollout_steps = args.unroll_length * args.batch_size * args.num_minibatches // args.num_envs
    results["random_sps"] = time_random_stepping(args, rollout_steps)
    print(f"raw random-action stepping at num_envs={args.num_envs}: {results['random_sps']:,.0f} env-steps/s")
    if not cfg.skip_ours:
        print(f"ratio ours training / raw stepping: {results['ours']['sps'] / results['random_sps']:.2f}")
    results["rollout_sps"] = time_rollout_only(args)
    print(f"our rollout alone (no SGD): {results['rollout_sps']:,.0f} env-steps/s, "
          f"{results['rollout_sps'] / results['random_sps']:.2f} of raw stepping", flush=True)

    if not cfg.skip_seeds:
        flags = [*ppo_flags(cfg, cfg.seeds_total_steps), "--step-rounding", "iteration"]
        with tempfile.TemporaryDirectory() as tmp:
            vmapped = time_cli([*flags, "--num-seeds", "4"], f"{tmp}/vmapped")
            sequential = sum(time_cli([*flags, "--seed", str(s)], f"{tmp}/seq{s}") for s in range(1, 5))
        results["seeds"] = dict(vmapped_4_s=vmapped, sequential_4_s=sequential, ratio=sequential / vmapped)
        print(f"--num-seeds 4: {vmapped:.1f} s; 4 sequential runs: {sequential:.1f} s; "
              f"speed-up {sequential / vmapped:.2f}x")
    print(json.dumps(results, indent=2))
