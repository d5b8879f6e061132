"""Where the time of one TD-MPC2 update and one MPPI plan goes: each piece jitted and timed alone, with XLA's FLOPs.

    python benchmarks/profile_tdmpc2.py                  # model sizes 1 and 5, 9 timed calls per piece
    python benchmarks/profile_tdmpc2.py --sizes 5 --repeats 15

The pieces are the official defaults' shapes (batch 256, horizon 3, 512 MPPI samples, 6 iterations; obs 24, action 6):
forward passes of each network on the batch's latents, the TD target, the two losses forward and with their gradients,
the optimiser steps, the whole update; one `estimate_value` over 512 samples (one MPPI iteration's model work) and the
whole plan. The pieces are jitted separately, so they do not add up exactly to the whole (XLA fuses across them).
Every time is the median and the minimum over `--repeats` calls after one compiling call, each after PAUSE_S of idle
time (the previous call's worker threads stop spinning); GFLOP/s = XLA's cost-analysis FLOPs / the minimum time.
XLA counts the body of a loop once: the whole plan's FLOPs are about `iterations` times what the table shows (its
6 iterations are a `lax.scan`). On a shared machine, compare pieces within one run only. Nothing is asserted.
"""

import argparse
import sys
import time
import types
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tdmpc2_jax as T  # noqa: E402

OBS_DIM, ACTION_DIM, BATCH = 24, 6, 256
PAUSE_S = 0.1


def measure(fn, args, repeats: int):
    """(median s, min s, GFLOP) of the jitted fn(*args) after one compiling call."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        time.sleep(PAUSE_S)
        tick = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - tick)
    return float(np.median(times)), float(np.min(times)), flops / 1e9


def pieces(size: int):
    """name -> (function, arguments) at one model size."""
    task = types.SimpleNamespace(impl="jax", episode_length=1000, action_dim=ACTION_DIM, max_agent_steps=500)
    args = T.resolve_args(T.Args(model_size=size), task)
    model = T.WorldModel(args, OBS_DIM, ACTION_DIM)
    wm_tx, pi_tx = T.make_optimizers(args, jax.eval_shape(model.init, jax.random.key(0))[0])
    agent = T.init_agent(model, wm_tx, pi_tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    h = args.horizon
    obs = jnp.asarray(rng.standard_normal((h + 1, BATCH, OBS_DIM)), jnp.float32)
    action = jnp.asarray(rng.uniform(-1, 1, (h, BATCH, ACTION_DIM)), jnp.float32)
    reward = jnp.asarray(rng.standard_normal((h, BATCH)), jnp.float32)
    terminated = jnp.zeros((h, BATCH))
    key = jax.random.key(1)
    wm = agent.wm_params
    z = model.encode(wm, obs)  # (H+1, B, latent)
    td = T.td_targets(model, agent, z[1:], reward, terminated, key)
    wm_loss = partial(T.world_model_loss, model)
    pi_loss = partial(T.policy_loss, model)
    wm_grad = jax.value_and_grad(wm_loss, has_aux=True)
    pi_grad = jax.value_and_grad(pi_loss, has_aux=True)
    grads = jax.tree.map(jnp.ones_like, wm)
    pi_grads = jax.tree.map(jnp.ones_like, agent.pi_params)

    def wm_step(agent, grads):
        updates, state = wm_tx.update(grads, agent.wm_opt_state, agent.wm_params)
        return optax.apply_updates(agent.wm_params, updates), state

    def pi_step(agent, grads):
        updates, state = pi_tx.update(grads, agent.pi_opt_state, agent.pi_params)
        return optax.apply_updates(agent.pi_params, updates), state

    samples = jnp.asarray(rng.uniform(-1, 1, (h, args.num_samples, ACTION_DIM)), jnp.float32)
    z_all = jnp.broadcast_to(z[0, 0], (args.num_samples, z.shape[-1]))
    plan_mean = jnp.zeros((1, h, ACTION_DIM))
    batch = (obs, action, reward, terminated)
    return {
        "update: encode, (H+1)*B obs": (model.encode, (wm, obs)),
        "update: dynamics, H*B": (model.next, (wm, z[:-1], action)),
        "update: reward, H*B": (model.reward, (wm, z[:-1], action)),
        "update: Q ensemble, all heads, H*B": (model.q_logits, (wm["qs"], z[:-1], action)),
        "update: policy prior, (H+1)*B": (model.pi, (agent.pi_params, z, key)),
        "update: TD target": (partial(T.td_targets, model), (agent, z[1:], reward, terminated, key)),
        "update: model loss, forward": (wm_loss, (wm, obs, action, reward, td, z[1:], key)),
        "update: model loss + gradient": (wm_grad, (wm, obs, action, reward, td, z[1:], key)),
        "update: policy loss, forward": (pi_loss, (agent.pi_params, wm, z, agent.scale, key)),
        "update: policy loss + gradient": (pi_grad, (agent.pi_params, wm, z, agent.scale, key)),
        "update: Adam steps (model, policy)": (lambda a, g, pg: (wm_step(a, g), pi_step(a, pg)),
                                               (agent, grads, pi_grads)),
        "update: whole": (partial(T.update, model, wm_tx, pi_tx), (agent, batch, key)),
        "plan: estimate_value, 512 samples": (partial(T.estimate_value, model), (agent, z_all, samples, key)),
        "plan: whole (encode + 6 iterations)": (partial(T.act_mppi, model, eval_mode=False),
                                                (agent, obs[0, :1], plan_mean, jnp.zeros(1, bool), key)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5], choices=[1, 5, 19, 48, 317])
    parser.add_argument("--repeats", type=int, default=9)
    cli = parser.parse_args(argv)
    if cli.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    from bench_tdmpc2 import cpu_name

    print(f"machine: {cpu_name()}; jax {jax.__version__}; {cli.repeats} timed calls per piece")
    print("\n| size | piece | median ms | min ms | GFLOP | GFLOP/s at min |\n|---|---|---:|---:|---:|---:|")
    for size in cli.sizes:
        for name, (fn, args) in pieces(size).items():
            med, low, gflop = measure(fn, args, cli.repeats)
            print(f"| {size} | {name} | {1e3 * med:.1f} | {1e3 * low:.1f} | {gflop:.2f} | {gflop / low:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
