"""Cost of Glass per gradient update against TD-MPC2, model size 5 (batch 256, horizon 3), measured in one process.

    python benchmarks/bench_glass.py                # 5 variants, median of --repeats timings of --updates updates

Variants: TD-MPC2 (tdmpc2_jax.py); Glass statically off (--glass-off-step 0); Glass scheduled off (weights set,
env step before the warm-up: the gate is closed on every update); Glass on every 4th update (the default
--glass-every-k-updates 4); Glass on every update (--glass-every-k-updates 1). The env step is a traced argument, as in
training, so the gate is never constant-folded. Observation and action sizes are HopperHop's (15, 4); no env is
stepped. Each timing runs `--updates` updates in one jitted fori_loop after one compiling call; the variants take
turns within every repeat, so load from other processes hits them alike. Numbers go into docs/glass.md by hand.
"""

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_tdmpc2 import cpu_name  # noqa: E402

import tdmpc2_jax as T  # noqa: E402
import tdmpc_glass_jax as G  # noqa: E402

OBS_DIM, ACTION_DIM = 15, 4  # HopperHop
# What resolve_args reads from the env (no env is loaded): HopperHop with action repeat 2.
HOPPER_HOP = SimpleNamespace(impl="jax", episode_length=1000, action_dim=ACTION_DIM, max_agent_steps=500)
GLASS_ON_STEP = 200_000  # past the default 100k warm-up


def make_updates(module, num_updates: int, **overrides):
    """(jitted `num_updates` updates on one batch, initial agent, batch) for model size 5 with `overrides`."""
    args = module.resolve_args(module.Args(model_size=5, **overrides), HOPPER_HOP)
    model = module.WorldModel(args, OBS_DIM, ACTION_DIM)
    wm_tx, pi_tx = module.make_optimizers(args, jax.eval_shape(model.init, jax.random.key(0))[0])
    agent = jax.jit(lambda key: module.init_agent(model, wm_tx, pi_tx, key))(jax.random.key(0))
    update = partial(module.update, model, wm_tx, pi_tx)
    k_obs, k_act, k_rew = jax.random.split(jax.random.key(1), 3)
    h, b = args.horizon, args.batch_size
    batch = (jax.random.normal(k_obs, (h + 1, b, OBS_DIM)),
             jax.random.uniform(k_act, (h, b, ACTION_DIM), minval=-1, maxval=1),
             jax.random.uniform(k_rew, (h, b)), jnp.zeros((h, b)))

    @jax.jit
    def run(agent, batch, *env_step):
        step = lambda i, agent: update(agent, batch, jax.random.fold_in(jax.random.key(2), i), *env_step)[0]
        return jax.lax.fori_loop(0, num_updates, step, agent)

    return run, agent, batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--updates", type=int, default=20)
    cli = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {jax.device_count()} x {jax.devices()[0].platform}, "
          f"jax {jax.__version__}; model size 5, batch 256, horizon 3, {cli.updates} updates per timing", flush=True)
    step = jnp.int32(GLASS_ON_STEP)
    variants = {
        "TD-MPC2 (tdmpc2_jax.py)": (T, {}, ()),
        "Glass statically off (--glass-off-step 0)": (G, {"glass_off_step": 0}, (step,)),
        "Glass scheduled off (before the warm-up)": (G, {}, (jnp.int32(0),)),
        "Glass on every 4th update (default)": (G, {}, (step,)),
        "Glass on every update (--glass-every-k-updates 1)": (G, {"glass_every_k_updates": 1}, (step,)),
    }
    runs = {}
    for name, (module, overrides, env_step) in variants.items():
        run, agent, batch = make_updates(module, cli.updates, **overrides)
        tick = time.perf_counter()
        jax.block_until_ready(run(agent, batch, *env_step))  # compile
        print(f"compiled {name} in {time.perf_counter() - tick:.0f} s", flush=True)
        runs[name] = (run, agent, batch, env_step)
    times = {name: [] for name in variants}
    for _ in range(cli.repeats):
        for name, (run, agent, batch, env_step) in runs.items():
            tick = time.perf_counter()
            jax.block_until_ready(run(agent, batch, *env_step))
            times[name].append((time.perf_counter() - tick) / cli.updates)
    base = times["TD-MPC2 (tdmpc2_jax.py)"]
    for name, seconds in times.items():
        median, fastest = float(np.median(seconds)), min(seconds)
        print(f"{name}: {1e3 * median:.1f} ms per update (min {1e3 * fastest:.1f}), vs TD-MPC2 "
              f"{median / np.median(base) - 1:+.1%} (median) / {fastest / min(base) - 1:+.1%} (min)", flush=True)


if __name__ == "__main__":
    main()
