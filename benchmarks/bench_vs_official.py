"""Speed of tdmpc2_jax.py against the official TD-MPC2 (eager PyTorch on the CPU), measured side by side in one run.

    python benchmarks/bench_vs_official.py --official-src /tmp/tdmpc2_official_b67b21c [/tmp/tdmpc2_official_main ...]

Each `--official-src` is a checkout of github.com/nicklashansen/tdmpc2 (the October-2023 release b67b21c, or current
main, which also needs `tensordict`); it is copied and patched to run on a CPU as benchmarks/check_vs_official.py does
(device strings, Adam `capturable=False`, torch.compile off). Torch runs with 2 threads.

Times one update (batch 256, horizon 3) and one MPPI plan for one observation (encode included; 512 samples,
6 iterations, horizon 3) at model sizes 1 and 5, with the default config on both sides (dropout 0.01; real random
draws). Every contender is called once per round, in turn, after three warm-up calls each: the rounds interleave the
contenders, so a busy shared machine slows all of them alike. Each timed call follows PAUSE_S of idle time, so that the
previous contender's spinning worker threads do not steal the cores. Prints ms per call, median and min over the
rounds, official / ours, and the load average before and after. Nothing is asserted; the numbers go into
docs/fidelity.md with the machine.
"""

import argparse
import inspect
import os
import sys
import time
import types
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_vs_official as C  # noqa: E402  (the official loader, config and adapter)
from bench_tdmpc2 import cpu_name  # noqa: E402

T = C.T


# ---------------------------------------------------------------------------------------------------------------------
# Adapter: every access to tdmpc2_jax.py is in this section
# ---------------------------------------------------------------------------------------------------------------------
def ours(size: int, batch):
    """(update(), plan()) closures over our agent at one model size, default config."""
    task = types.SimpleNamespace(impl="jax", episode_length=2 * C.EPISODE_LENGTH, action_dim=C.ACTION_DIM,
                                 max_agent_steps=C.EPISODE_LENGTH)
    args = T.resolve_args(T.Args(model_size=size), task)
    model = T.WorldModel(args, C.OBS_DIM, C.ACTION_DIM)
    wm_tx, pi_tx = T.make_optimizers(args, jax.eval_shape(model.init, jax.random.key(0))[0])
    state = {"agent": T.init_agent(model, wm_tx, pi_tx, jax.random.key(0)), "key": jax.random.key(1)}
    update_fn = jax.jit(partial(T.update, model, wm_tx, pi_tx))
    plan_fn = jax.jit(partial(T.act_mppi, model, eval_mode=False))
    obs, action, reward = (jnp.asarray(x) for x in batch)
    train_batch = (obs, action, reward, jnp.zeros(reward.shape))
    plan_mean = jnp.zeros((1, args.horizon, C.ACTION_DIM))

    def update():
        state["key"], key = jax.random.split(state["key"])
        state["agent"], info = update_fn(state["agent"], train_batch, key)
        jax.block_until_ready(info)

    def plan():
        state["key"], key = jax.random.split(state["key"])
        jax.block_until_ready(plan_fn(state["agent"], obs[0, :1], plan_mean, jnp.zeros(1, bool), key))

    return update, plan


# ---------------------------------------------------------------------------------------------------------------------
# The official agents
# ---------------------------------------------------------------------------------------------------------------------
def official(loaded, size: int, batch):
    torch = loaded.torch
    cfg = C.official_cfg(loaded, size, dropout=loaded.config["dropout"])
    cfg.episodic, cfg.mpc = False, True  # main's options; the 2023 release reads neither
    torch.manual_seed(0)
    agent = loaded.module.TDMPC2(cfg)
    obs, action, reward = (torch.from_numpy(x) for x in batch)
    terminated = torch.zeros_like(reward[..., None])
    sample = (obs, action, reward[..., None], None)
    if "terminated" in inspect.signature(loaded.module.TDMPC2._td_target).parameters:  # main samples 5 tensors
        sample = (obs, action, reward[..., None], terminated, None)
    buffer = types.SimpleNamespace(sample=lambda: sample)
    first = [True]  # the 2023 release has no previous mean before its first plan

    def update():
        agent.update(buffer)

    def plan():
        agent.act(obs[0, 0], t0=first[0], eval_mode=False)
        first[0] = False

    return update, plan


PAUSE_S = 0.3  # idle time before each timed call: the previous contender's worker threads stop spinning


def time_rounds(contenders: dict, rounds: int, warmup: int = 3) -> dict:
    """name -> list of seconds per call; `warmup` calls each (our compile, TorchScript's profiling runs), then `rounds`
    rounds calling each contender once."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(PAUSE_S)
            tick = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tick)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", type=Path, nargs="+", required=True,
                        help="one or more checkouts of nicklashansen/tdmpc2")
    parser.add_argument("--labels", nargs="+", help="a name per checkout (default: the folder names)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5], choices=[1, 5, 19, 48, 317])
    parser.add_argument("--rounds", type=int, default=7)
    cli = parser.parse_args(argv)
    labels = cli.labels or [p.name for p in cli.official_src]
    if len(labels) != len(cli.official_src):
        print("error: --labels needs one name per --official-src", file=sys.stderr)
        return 2
    try:
        loaded = {label: C.load_official(src) for label, src in zip(labels, cli.official_src, strict=True)}
    except C.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch = next(iter(loaded.values())).torch
    print(f"machine: {cpu_name()}; jax {jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads; obs {C.OBS_DIM}, action {C.ACTION_DIM}, batch 256, horizon 3, 512 samples, 6 iterations; "
          f"{cli.rounds} rounds; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for size in cli.sizes:
        cfg = C.official_cfg(next(iter(loaded.values())), size)
        batch = C.make_batch(rng, cfg)
        agents = {"ours": ours(size, batch)}
        for label, lib in loaded.items():
            agents[label] = official(lib, size, batch)
        for what, index in [("update", 0), ("plan", 1)]:
            times = time_rounds({name: fns[index] for name, fns in agents.items()}, cli.rounds)
            ms = {name: (1e3 * np.median(t), 1e3 * np.min(t)) for name, t in times.items()}
            for name in loaded:
                rows.append((size, what, name, ms["ours"], ms[name]))
                (o_med, o_min), (t_med, t_min) = ms["ours"], ms[name]
                print(f"size {size} {what:6s} ours {o_med:7.1f} ms (min {o_min:7.1f}) | {name} {t_med:7.1f} ms "
                      f"(min {t_min:7.1f}) | official/ours {t_med / o_med:.2f} (min {t_min / o_min:.2f})", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("\n| size | call | ours: median (min) ms | official | official: median (min) ms | "
          "official / ours: median (min) |")
    print("|---|---|---|---|---|---|")
    for size, what, name, (o_med, o_min), (t_med, t_min) in rows:
        print(f"| {size} | {what} | {o_med:.0f} ({o_min:.0f}) | {name} | {t_med:.0f} ({t_min:.0f}) | "
              f"{t_med / o_med:.2f} ({t_min / o_min:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
