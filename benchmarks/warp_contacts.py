"""How many contacts and constraint rows Playground's DM Control tasks use under MJX's warp backend, against the
fixed capacities Playground sets (`naconmax`: one contact pool shared by every env of a batch; `njmax`: constraint
rows per env).

Per task, a batch of `--num-envs` envs runs `--steps` env steps under uniform random actions (resetting envs as
their episodes end) with capacities far above Playground's, and records the peak contacts per env and the peak
constraint rows of one env. The table then gives the naconmax a batch of 256 envs and of 5 x 256 needs at that peak
against Playground's value. Runs on warp's CPU device (slow: keep the batch small and run one task per process;
the peaks are per env, so they do not depend on the batch size).

    for task in HopperHop WalkerWalk CheetahRun FingerSpin; do
        python benchmarks/warp_contacts.py --tasks $task --num-envs 8 --steps 200
    done
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure(env_id: str, num_envs: int, steps: int, seed: int) -> dict:
    import warp
    from mujoco_playground import registry

    warp.config.log_level = warp.LOG_WARNING  # no line per kernel module loaded
    default = registry.get_default_config(env_id)
    # Room for every contact: the measurement must not overflow itself.
    env = registry.load(env_id, config_overrides={"impl": "warp", "naconmax": 200 * num_envs, "njmax": 400})
    opt = env._mjx_model.opt  # warp's per-env printf for solver iteration limits (1 << 9, 1 << 10) would flood
    env._mjx_model = env._mjx_model.replace(opt=opt.replace(_impl=opt._impl.replace(
        warn_overflow=opt._impl.warn_overflow & ~(1 << 9 | 1 << 10))))

    def run(key):
        k_reset, k_steps = jax.random.split(key)
        state = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))

        def step(state, k):
            k_act, k_new = jax.random.split(k)
            action = jax.random.uniform(k_act, (num_envs, env.action_size), minval=-1, maxval=1)
            state = jax.vmap(env.step)(state, action)
            fresh = jax.vmap(env.reset)(jax.random.split(k_new, num_envs))
            done = state.done > 0
            state = jax.vmap(lambda d, new, old: old.replace(data=old.data.where(d, new.data), done=jnp.where(
                d, new.done, old.done), obs=jnp.where(d, new.obs, old.obs)))(done, fresh, state)
            impl = state.data._impl
            return state, (impl.nacon[0], impl.nefc.max(), jnp.bitwise_or.reduce(impl.overflow))

        return jax.lax.scan(step, state, jax.random.split(k_steps, steps))[1]

    tick = time.time()
    nacon, nefc, overflow = jax.device_get(jax.jit(run)(jax.random.key(seed)))
    peak_per_env = float(nacon.max()) / num_envs
    return {"task": env_id, "naconmax": default.naconmax, "njmax": default.njmax,
            "peak_contacts_per_env": peak_per_env, "peak_contacts_one_env_bound": int(nacon.max()),
            "peak_rows_one_env": int(nefc.max()), "mean_contacts_per_env": float(nacon.mean()) / num_envs,
            "overflow_bits": int(np.bitwise_or.reduce(overflow)), "seconds": time.time() - tick}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["HopperHop", "WalkerWalk", "CheetahRun", "FingerSpin"])
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| task | Playground naconmax / njmax | peak contacts per env (mean) | peak rows of one env | "
          "naconmax needed at 256 envs / 5 x 256 |")
    print("|---|---|---|---|---|")
    for task in args.tasks:
        r = measure(task, args.num_envs, args.steps, args.seed)
        need = [int(np.ceil(r["peak_contacts_per_env"] * n)) for n in (256, 1280)]
        print(f"| {task} | {r['naconmax']:,} / {r['njmax']} | {r['peak_contacts_per_env']:.2f} "
              f"({r['mean_contacts_per_env']:.2f}) | {r['peak_rows_one_env']} | {need[0]:,} / {need[1]:,} |",
              flush=True)


if __name__ == "__main__":
    main()
