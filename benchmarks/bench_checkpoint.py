"""Cost of tdmpc2_jax.py's full-state checkpoints: size, time to write and time to read back.

    python benchmarks/bench_checkpoint.py                  # default HopperHop run (256 envs, 1M-transition buffer)
    python benchmarks/bench_checkpoint.py --buffer-size 100000 --model-size 1

Builds the training carry of the given config with `Trainer.init` and replaces every float in it (buffer, parameters,
optimiser moments) by random numbers, as after training (a fresh carry's zeros would compress). Then writes and
restores it through the same `Checkpoints` class the script uses, `--repeats` times, in a temporary folder. Prints the
size; the median and min times of what training waits for, of the whole background write and of the read; and the
share of one evaluation interval that a checkpoint per evaluation costs at a given training speed. Numbers go into
docs/tdmpc2.md by hand; nothing here is asserted.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tdmpc2 import cpu_name  # noqa: E402

import tdmpc2_jax as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="HopperHop")
    parser.add_argument("--model-size", type=int, default=5)
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--env-steps-per-s", type=float, default=737.0,
                        help="training speed for the interval share (default: the H200's, docs/tdmpc2.md)")
    cli = parser.parse_args()

    venv = T.VectorEnv(T.load_env(cli.env_id, "jax"), action_repeat=2)
    args = T.resolve_args(T.Args(env_id=cli.env_id, impl="jax", model_size=cli.model_size, num_envs=cli.num_envs,
                                 buffer_size=cli.buffer_size), venv)
    trainer = T.Trainer(args, venv)
    carry = jax.jit(trainer.init)(jax.random.key(0))
    noise = lambda x, k: jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    leaves, treedef = jax.tree.flatten(carry)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    carry = jax.tree.unflatten(treedef, [noise(x, k) for x, k in zip(leaves, keys, strict=True)])
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))
    print(f"{cli.env_id}, model size {cli.model_size}, {cli.num_envs} envs, buffer {cli.buffer_size:,} transitions; "
          f"CPU: {cpu_name()}, JAX {jax.__version__}")
    print(f"in memory: buffer {nbytes(carry.buffer) / 1e6:.1f} MB, agent {nbytes(carry.agent) / 1e6:.1f} MB, "
          f"env states {nbytes(carry.env_state) / 1e6:.1f} MB")

    shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    blocking, writes, reads = [], [], []
    folder = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        checkpoints = T.Checkpoints(folder, keep=2)
        for i in range(cli.repeats):
            tick = time.perf_counter()
            size = checkpoints.save(i + 1, carry, {"step": i + 1})
            blocking.append(time.perf_counter() - tick)  # what training waits for; the rest runs in the background
            checkpoints.manager.wait_until_finished()
            writes.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            restored, _ = checkpoints.restore_newest(shapes)
            jax.block_until_ready(restored)
            reads.append(time.perf_counter() - tick)
        stored = lambda tree: jax.tree.leaves(jax.tree.map(T.to_storable, tree))
        assert all(np.array_equal(a, b) for a, b in zip(stored(restored), stored(carry), strict=True))
        checkpoints.close()
    finally:
        shutil.rmtree(folder)
    interval = args.eval_freq / cli.env_steps_per_s
    print(f"checkpoint: {size / 1e6:.1f} MB")
    for name, times in [("training waits", blocking), ("whole write", writes), ("read", reads)]:
        print(f"{name}: median {np.median(times):.2f} s, min {min(times):.2f} s")
    print(f"one checkpoint per evaluation ({args.eval_freq:,} env steps = {interval:.0f} s at "
          f"{cli.env_steps_per_s:,.0f} env steps/s): training waits {np.median(blocking) / interval:.1%} of the "
          f"interval; the whole write lasts {np.median(writes) / interval:.1%} of it")


if __name__ == "__main__":
    main()
