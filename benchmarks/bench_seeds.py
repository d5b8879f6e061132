"""Seeds as a batch axis against one process per seed: wall time and compile time, measured in one run.

    python benchmarks/bench_seeds.py                  # 4 seeds of the tiny CartpoleBalance config, 3 rounds
    python benchmarks/bench_seeds.py --seeds 4 --rounds 1 --total-steps 4000
    python benchmarks/bench_seeds.py --memory       # XLA's memory accounting of the default HopperHop chunk per seed

Each round runs, in turn, `tdmpc2_jax.py --num-seeds N` once and `tdmpc2_jax.py --seed s` for the N seeds one after
the other, as users run them, each process with an empty compilation cache (so compile time is included, as on a
fresh machine). Prints the wall time of both and their ratio; then, in this process, the time to compile the training
chunk once for the batch against once for one seed (which N solo processes pay N times). Numbers go into
docs/tdmpc2.md by hand.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tdmpc2 import cpu_name  # noqa: E402

TINY = [
    "--env-id", "CartpoleBalance", "--impl", "jax", "--model-size", "1", "--enc-dim", "32", "--mlp-dim", "32",
    "--latent-dim", "16", "--num-envs", "4", "--k-update", "2", "--batch-size", "16", "--num-samples", "32",
    "--num-elites", "4", "--num-pi-trajs", "4", "--iterations", "2", "--episode-length", "100", "--seed-steps", "200",
    "--eval-episodes", "2", "--buffer-size", "4000", "--log-freq", "400",
]


def run(flags: list[str], folder: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    tick = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "tdmpc2_jax.py"), *flags, "--run-dir", str(folder)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - tick, out


def compile_seconds(num_seeds: int) -> float:
    """Time to compile the tiny config's training chunk for a batch of `num_seeds`, in this process."""
    import jax

    import tdmpc2_jax as T

    venv = T.VectorEnv(T.load_env("CartpoleBalance", "jax", episode_length=100), action_repeat=2)
    args = T.resolve_args(T.Args(env_id="CartpoleBalance", impl="jax", model_size=1, enc_dim=32, mlp_dim=32,
                                 latent_dim=16, num_envs=4, k_update=2, batch_size=16, num_samples=32, num_elites=4,
                                 num_pi_trajs=4, iterations=2, seed_steps=200, buffer_size=4000), venv)
    trainer = T.Trainer(args, venv)
    carry = jax.eval_shape(jax.vmap(trainer.init), jax.random.split(jax.random.key(0), num_seeds))
    chunk = T.over_seeds(partial(trainer.chunk, num_vector_steps=50), T.seed_mesh(num_seeds), donate=True)
    tick = time.perf_counter()
    chunk.lower(carry).compile()
    return time.perf_counter() - tick


def memory_per_seed(env_id: str, seeds: tuple[int, ...] = (1, 2)) -> None:
    """XLA's own accounting of the default config's training chunk (one vector step) compiled for 1 and 2 seeds:
    the carry (arguments: parameters, optimiser states, buffer, env states) and the temporary buffers (activations of
    the 256 updates and of MPPI for 256 envs), and what one more seed adds."""
    import jax

    import tdmpc2_jax as T

    venv = T.VectorEnv(T.load_env(env_id, "jax"), action_repeat=2)
    args = T.resolve_args(T.Args(env_id=env_id, impl="jax"), venv)
    trainer = T.Trainer(args, venv)
    sizes = {}
    for n in seeds:
        carry = jax.eval_shape(jax.vmap(trainer.init), jax.random.split(jax.random.key(0), n))
        chunk = T.over_seeds(partial(trainer.chunk, num_vector_steps=1), T.seed_mesh(n), donate=True)
        memory = chunk.lower(carry).compile().memory_analysis()
        sizes[n] = (memory.argument_size_in_bytes, memory.temp_size_in_bytes)
        carry_gb, temp_gb = sizes[n][0] / 1e9, sizes[n][1] / 1e9
        print(f"{env_id} defaults, {n} seed(s): carry {carry_gb:.2f} GB, temporaries {temp_gb:.2f} GB", flush=True)
    a, b = seeds
    per_seed = [(sizes[b][k] - sizes[a][k]) / (b - a) for k in (0, 1)]
    print(f"one more seed adds: carry {per_seed[0] / 1e9:.2f} GB, temporaries {per_seed[1] / 1e9:.2f} GB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total-steps", type=int, default=2000)
    parser.add_argument("--memory", action="store_true", help="only XLA's memory accounting of the default config")
    parser.add_argument("--env-id", default="HopperHop", help="env of --memory")
    cli = parser.parse_args()
    if cli.memory:
        return memory_per_seed(cli.env_id)
    flags = [*TINY, "--total-steps", str(cli.total_steps), "--eval-freq", str(cli.total_steps)]
    batch, solo = [], []
    print(f"tdmpc2_jax.py, tiny CartpoleBalance config, {cli.total_steps:,} env steps per seed, {cli.seeds} seeds; "
          f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cli.rounds):
            seconds, out = run([*flags, "--num-seeds", str(cli.seeds)], Path(tmp) / f"batch{r}")
            batch.append(seconds)
            assert re.search(rf"{cli.seeds} seeds, {cli.seeds} per device", out), out
            seconds = 0.0
            for s in range(cli.seeds):
                seconds += run([*flags, "--seed", str(1 + s)], Path(tmp) / f"solo{r}_{s}")[0]
            solo.append(seconds)
            print(f"round {r + 1}: --num-seeds {cli.seeds} {batch[-1]:.1f} s; {cli.seeds} solo runs {solo[-1]:.1f} s",
                  flush=True)
    print(f"--num-seeds {cli.seeds}: median {np.median(batch):.1f} s, min {min(batch):.1f} s")
    print(f"{cli.seeds} solo runs in turn: median {np.median(solo):.1f} s, min {min(solo):.1f} s")
    print(f"solo / batch: median {np.median(np.array(solo) / np.array(batch)):.2f}x")
    once, single = compile_seconds(cli.seeds), compile_seconds(1)
    print(f"compiling the training chunk: {once:.1f} s once for {cli.seeds} seeds; {single:.1f} s for one seed, "
          f"{cli.seeds} x {single:.1f} = {cli.seeds * single:.1f} s for {cli.seeds} solo processes")


if __name__ == "__main__":
    main()
