"""TD-MPC2 at the official scale: the numbers a GPU run is planned from, measured in one process.

    python benchmarks/bench_scale.py                        # HopperHop, 256 envs, K 256, model size 5 (defaults)
    python benchmarks/bench_scale.py --env-id CartpoleBalance --num-envs 4 --k-update 2 --sizes 1 --seeds 2  # CPU

Measures, each as the median (and min) of `--repeats` calls after one compiling call:
- one gradient update (batch 256, horizon 3) per model size, and the same update vmapped over `--seeds` agents (what
  a batch of seeds in one program costs per update, against `--seeds` separate updates);
- the MPPI plan for all `--num-envs` envs (vmapped) and for one env;
- raw env stepping of `--num-envs` envs with random actions;
- the jitted training chunk at `--num-envs` / `--k-update` (env step + MPPI + store + K updates; `--pi-chunk` also
  with policy collection): env steps/s after seeding, and the first call's compile time.
Numbers go into docs/tdmpc2.md by hand with the machine they came from; nothing here is asserted.
"""

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tdmpc2_jax as T  # noqa: E402


def timed(fn, *args, repeats: int):
    """(compile-and-first-call seconds, median seconds, min seconds) of fn(*args)."""
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - tick
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tick)
    return first, float(np.median(times)), float(np.min(times))


def report(name: str, result, per: float = 1.0, unit: str = "ms"):
    first, median, fastest = result
    print(f"{name}: median {1e3 * median / per:,.2f} {unit}, min {1e3 * fastest / per:,.2f} {unit} "
          f"(first call {first:,.1f} s)", flush=True)


def make_trainer(venv, size: int, collect_policy: str):
    overrides = dict(model_size=size, num_envs=cli.num_envs, k_update=cli.k_update, pretrain_updates=0,
                     buffer_size=cli.buffer_size, collect_policy=collect_policy)
    args = T.resolve_args(T.Args(env_id=cli.env_id, **overrides), venv)
    return T.Trainer(args, venv), args


def bench_chunk(venv, size: int, collect_policy: str):
    """Compile time of the training chunk, then its env steps/s once seeding is over; returns the trained carry."""
    trainer, args = make_trainer(venv, size, collect_policy)
    chunk = jax.jit(partial(trainer.chunk, num_vector_steps=cli.chunk_vector_steps))
    carry = jax.jit(trainer.init)(jax.random.key(0))
    tick = time.perf_counter()
    carry, _ = jax.block_until_ready(chunk(carry))  # compiles seeding, the updates and the planner: one program
    compile_and_first = time.perf_counter() - tick
    seed_vector_steps = args.seed_steps // (args.num_envs * args.action_repeat)
    while int(carry.vector_step) < seed_vector_steps + cli.chunk_vector_steps:  # past seeding: every step updates
        carry, _ = jax.block_until_ready(chunk(carry))
    times = []
    for _ in range(cli.repeats):
        tick = time.perf_counter()
        carry, _ = jax.block_until_ready(chunk(carry))
        times.append(time.perf_counter() - tick)
    env_steps = cli.chunk_vector_steps * args.num_envs * args.action_repeat
    print(f"size {size}: training chunk, --num-envs {args.num_envs} --k-update {args.k_update} "
          f"--collect-policy {collect_policy}: median {env_steps / np.median(times):,.1f} env steps/s "
          f"({1e3 * np.median(times) / cli.chunk_vector_steps:,.1f} ms per vector step), "
          f"best {env_steps / np.min(times):,.1f}; first call (compile + run) {compile_and_first:,.1f} s", flush=True)
    return trainer, args, carry


def bench_update_and_plan(trainer, args, carry):
    size = args.model_size
    valid_cumsum = jnp.cumsum(T.valid_starts(carry.buffer, args.horizon).reshape(-1))
    batch = T.buffer_sample(carry.buffer, valid_cumsum, jax.random.key(1), args.batch_size, args.horizon)
    report(f"size {size}: one update (batch {args.batch_size}, H {args.horizon})",
           timed(jax.jit(trainer.update), carry.agent, batch, jax.random.key(2), repeats=cli.repeats))

    # A batch of seeds: agents stacked on a leading axis, each with its own batch and key.
    agents = jax.vmap(lambda k: T.init_agent(trainer.model, trainer.wm_tx, trainer.pi_tx, k))(
        jax.random.split(jax.random.key(3), cli.seeds))
    batches = jax.tree.map(lambda x: jnp.stack([x] * cli.seeds), batch)
    report(f"size {size}: update vmapped over {cli.seeds} seeds, per seed",
           timed(jax.jit(jax.vmap(trainer.update)), agents, batches, jax.random.split(jax.random.key(4), cli.seeds),
                 repeats=cli.repeats), per=cli.seeds)

    obs = T.observation(carry.env_state)
    act = jax.jit(lambda agent, o, pm, k: T.act_mppi(trainer.model, agent, o, pm, jnp.zeros(o.shape[0], bool), k,
                                                     eval_mode=False))
    for num in sorted({1, cli.num_envs}):
        report(f"size {size}: MPPI plan for {num} env(s) ({args.num_samples} samples, {args.iterations} iterations)",
               timed(act, carry.agent, obs[:num], carry.plan_mean[:num], jax.random.key(5), repeats=cli.repeats))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="HopperHop")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--k-update", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--buffer-size", type=int, default=200_000)
    parser.add_argument("--chunk-vector-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pi-chunk", action="store_true", help="also time the chunk with --collect-policy pi")
    cli = parser.parse_args()
    device = jax.devices()[0]
    print(f"{device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores, jax {jax.__version__}", flush=True)
    venv = T.VectorEnv(T.load_env(cli.env_id, "jax"), action_repeat=2)
    step = jax.jit(venv.step)
    state = venv.reset(jax.random.key(0), cli.num_envs)
    actions = jax.random.uniform(jax.random.key(1), (cli.num_envs, venv.action_dim), minval=-1, maxval=1)
    first, median, fastest = timed(step, state, actions, repeats=cli.repeats)
    print(f"env stepping, {cli.num_envs} envs, random actions: median {2 * cli.num_envs / median:,.0f} env steps/s, "
          f"best {2 * cli.num_envs / fastest:,.0f}", flush=True)
    for size in cli.sizes:
        bench_update_and_plan(*bench_chunk(venv, size, "mppi"))
        if cli.pi_chunk:
            bench_chunk(venv, size, "pi")
