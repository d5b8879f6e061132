"""One GPU measurement session: every number only a GPU can give, in one command of at most 9 minutes.

    python benchmarks/gpu_session.py --out $OUT --official-2023 build/gpu/official_b67b21c \
        --official-main build/gpu/official_main                      # on one GPU (docs/fidelity.md, "GPU session")
    python benchmarks/gpu_session.py --smoke --out /tmp/gpu_smoke    # the same code at tiny sizes on a CPU

Parts, in this order, each in its own process under its own time budget (a stuck compile costs only its part; each
part's peak GPU memory is its own; in the official part, where torch and JAX share the GPU, JAX allocates on demand):
- tdmpc2: raw env stepping; the training chunk at the defaults (--num-envs 256 --k-update 256) and at --k-update 128,
  each as env steps/s and ms per vector step with its compile time; one update; one MPPI plan for 1 and 256 envs
  (HopperHop, model size 5; `tdmpc2_size1` repeats it at size 1 last, if time is left);
- official: the official TD-MPC2 (the 2023 release b67b21c; current main with compile=true) against ours: one update
  and one plan at sizes 1 and 5, interleaved, as official / ours;
- seeds: the default chunk with --num-seeds 5 (env steps/s summed over seeds, GPU memory) against tdmpc2's one seed;
- glass: Glass at the recipe (--k-update 128 --glass-off-step 1000000, warm-up 100k) in its three phases (before the
  warm-up, on, after the off step: one compiled program, the phase set through the carry's step counter) against
  TD-MPC2 at --k-update 128;
- ppo: Playground's PPO settings on a DM Control task: training env steps/s and raw stepping at the same num_envs.
Then estimates of a 4M-env-step HopperHop run (1 and 5 seeds, TD-MPC2 and Glass at the recipe) from those numbers.

Writes OUT/gpu_session.json and OUT/gpu_session.md (the table for the docs: device, versions, date, command) after
every part, atomically, so a killed session still leaves what it measured; each part's own log is OUT/parts/. What
was not measured is listed with the reason. Timings are medians of a few calls after a compiling one; nothing here
is asserted (tests/test_gpu_session.py checks the --smoke output's shape).
"""

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PARTS = ["tdmpc2", "official", "seeds", "glass", "ppo", "tdmpc2_size1"]
TOTAL_STEPS = 4_000_000  # env steps of the run the estimates are for (the default --total-steps)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU session and its CPU smoke run."""

    env_id: str
    episode_length: int | None  # None: the env's own (1000 env steps on DM Control)
    num_envs: int
    k_update: int  # the default
    k_recipe: int  # Glass's recipe, and TD-MPC2 beside it
    num_seeds: int
    vector_steps: int  # per timed chunk call
    repeats: int
    buffer_size: int
    seed_steps: int | None  # None: the official max(1000, 5 episodes) agent steps
    model: dict  # overrides of the model-size dims (smoke only)
    glass_warmup: int
    glass_off: int
    ppo_env_id: str
    ppo: dict  # overrides of Playground's PPO settings (smoke only)
    ppo_iterations: int
    official_sizes: tuple
    official_rounds: int
    deadline_s: float  # the whole session
    budgets: dict  # part -> seconds
    min_part_s: float  # a part gets no process with less than this left
    skip: dict = dataclasses.field(default_factory=dict)  # part -> why this mode does not run it


FULL = Sizes(
    env_id="HopperHop", episode_length=None, num_envs=256, k_update=256, k_recipe=128, num_seeds=5, vector_steps=2,
    repeats=3, buffer_size=200_000, seed_steps=None, model={}, glass_warmup=100_000, glass_off=1_000_000,
    ppo_env_id="CartpoleBalance", ppo={}, ppo_iterations=3, official_sizes=(1, 5), official_rounds=5,
    # Budgets: one chunk compiled in ~60 s on an H200 (docs/tdmpc2.md); tdmpc2 compiles two (and an update and two
    # plans), the others one each; they add up to the deadline, so the size-1 repeat runs on what the others left.
    deadline_s=540, budgets=dict(tdmpc2=210, official=75, seeds=90, glass=95, ppo=70, tdmpc2_size1=120),
    min_part_s=30,
)
# Tiny sizes. The compile dominates on a CPU (~30 s per training chunk even at these sizes), so the smoke run compiles
# each distinct program once: one seed in the seeds part (the tdmpc2 part's program, from the compilation cache the
# parent shares between the parts), --k-update equal in both chunks, and no size-1 repeat.
SMOKE = Sizes(
    env_id="CartpoleBalance", episode_length=100, num_envs=2, k_update=2, k_recipe=2, num_seeds=1, vector_steps=2,
    repeats=2, buffer_size=400, seed_steps=16,
    model=dict(enc_dim=16, mlp_dim=16, latent_dim=16, num_q=2, batch_size=8, num_samples=16, num_elites=4,
               num_pi_trajs=2, iterations=1),
    glass_warmup=60, glass_off=120, ppo_env_id="CartpoleBalance",
    ppo=dict(num_envs=4, batch_size=4, num_minibatches=2, unroll_length=4, num_updates_per_batch=1,
             policy_hidden_sizes=(8, 8), value_hidden_sizes=(8, 8), num_eval_envs=2),
    ppo_iterations=2, official_sizes=(1,), official_rounds=2,
    deadline_s=290, budgets={part: 290 for part in PARTS}, min_part_s=10,  # only the deadline: CPU speed varies
    skip={"tdmpc2_size1": "smoke run: the tdmpc2 part's code at another model size"},
)


class UserError(Exception):
    """Bad input: one line `error: ...`, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------------
# One part's log: rows as they are measured, written after each (a killed part keeps its rows)
# ---------------------------------------------------------------------------------------------------------------------
class PartLog:
    def __init__(self, path: Path):
        self.path = path
        self.data = {"rows": [], "skipped": [], "notes": [], "done": False}

    def row(self, **row):
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def skip(self, what: str, why: str):
        self.data["skipped"].append({"what": what, "why": why})
        print(f"skipped {what}: {why}", flush=True)
        self.write()

    def set(self, **fields):
        self.data.update(fields)
        self.write()

    def write(self):
        atomic_write(self.path, json.dumps(self.data, indent=1))


def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count()}


def peak_memory_bytes():
    """The allocator's peak in this process (GPU); None where the backend keeps no statistics (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def xla_bytes(compiled):
    """XLA's own accounting of one compiled program: arguments + outputs - donated + temporaries (None where the
    backend gives none)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def timed(fn, *args, repeats: int):
    """(first call s, median s, min s) of fn(*args): bench_scale.py's timer, imported only where a part runs (it
    imports JAX and our script)."""
    sys.path.insert(0, str(HERE))
    from bench_scale import timed as bench_scale_timed

    return bench_scale_timed(fn, *args, repeats=repeats)


def call_row(name: str, result, **extra) -> dict:
    first, median, fastest = result
    return dict(name=name, kind="call", ms=1e3 * median, ms_min=1e3 * fastest, first_call_s=first, **extra)


def rate_row(name: str, seconds: list, vector_steps: int, num_envs: int, action_repeat: int, num_seeds: int = 1,
             **extra) -> dict:
    """Env steps/s summed over seeds and ms per vector step, from the median time of `vector_steps` vector steps."""
    import numpy as np

    median = float(np.median(seconds))
    per_vector_step = num_envs * action_repeat * num_seeds
    return dict(name=name, kind="rate", num_envs=num_envs, action_repeat=action_repeat, num_seeds=num_seeds,
                ms_per_vector_step=1e3 * median / vector_steps, env_steps_per_s=per_vector_step * vector_steps / median,
                best_env_steps_per_s=per_vector_step * vector_steps / float(np.min(seconds)), **extra)


# ---------------------------------------------------------------------------------------------------------------------
# The TD-MPC parts: tdmpc2_jax.py and tdmpc_glass_jax.py through their public functions, as in training
# ---------------------------------------------------------------------------------------------------------------------
def load_venv(module, sizes: Sizes, impl: str):
    return module.VectorEnv(module.load_env(sizes.env_id, impl, sizes.episode_length), action_repeat=2)


def trainer_for(module, venv, sizes: Sizes, impl: str, **overrides):
    """A Trainer at the official sizes (the smoke run's tiny ones), no pretraining burst (it would only delay the
    timed steps; the estimates add it back)."""
    args = module.Args(env_id=sizes.env_id, impl=impl, num_envs=sizes.num_envs, buffer_size=sizes.buffer_size,
                       seed_steps=sizes.seed_steps, pretrain_updates=0, **sizes.model)
    args = module.resolve_args(dataclasses.replace(args, **overrides), venv)
    return module.Trainer(args, venv), args


class Chunk:
    """The training chunk exactly as train() builds it (seeds as a leading axis, donated carry), compiled ahead of
    time so that the compile is timed on its own, then run past seeding."""

    def __init__(self, module, trainer, args, sizes: Sizes):
        import jax

        self.module, self.trainer, self.args, self.sizes = module, trainer, args, sizes
        mesh = module.seed_mesh(args.num_seeds)
        self.carry = module.over_seeds(trainer.init, mesh)(jax.random.split(jax.random.key(0), args.num_seeds))
        chunk = module.over_seeds(partial(trainer.chunk, num_vector_steps=sizes.vector_steps), mesh, donate=True)
        tick = time.perf_counter()
        self.compiled = chunk.lower(self.carry).compile()
        self.compile_s = time.perf_counter() - tick
        self.xla_bytes = xla_bytes(self.compiled)
        tick = time.perf_counter()
        self.call()
        self.first_run_s = time.perf_counter() - tick
        while self.vector_step() < trainer.seed_vector_steps + sizes.vector_steps:  # past seeding: all steps update
            self.call()

    def vector_step(self) -> int:
        return int(self.carry.vector_step[0])

    def call(self) -> float:
        import jax

        tick = time.perf_counter()
        self.carry, _ = jax.block_until_ready(self.compiled(self.carry))
        return time.perf_counter() - tick

    def rate(self, name: str, at_vector_step=None, **extra) -> dict:
        """Median of `repeats` calls; with `at_vector_step`, each call starts there (a phase of a schedule)."""
        seconds = []
        for _ in range(self.sizes.repeats):
            if at_vector_step is not None:
                self.carry = self.carry.replace(vector_step=self.carry.vector_step * 0 + at_vector_step)
            seconds.append(self.call())
        a = self.args
        return rate_row(name, seconds, self.sizes.vector_steps, a.num_envs, a.action_repeat, a.num_seeds,
                        k_update=a.k_update, model_size=a.model_size, compile_s=self.compile_s,
                        first_run_s=self.first_run_s, xla_bytes=self.xla_bytes, seed_steps=a.seed_steps, **extra)


def part_tdmpc2(log: PartLog, sizes: Sizes, impl: str, model_size: int):
    import jax
    import jax.numpy as jnp

    import tdmpc2_jax as T

    venv = load_venv(T, sizes, impl)
    if model_size == 5:
        step = jax.jit(venv.step)
        state = venv.reset(jax.random.key(0), sizes.num_envs)
        actions = jax.random.uniform(jax.random.key(1), (sizes.num_envs, venv.action_dim), minval=-1, maxval=1)
        first, median, fastest = timed(step, state, actions, repeats=5 * sizes.repeats)
        log.row(**rate_row("env stepping, random actions", [median], 1, sizes.num_envs, 2), first_call_s=first)

    trainer, args = trainer_for(T, venv, sizes, impl, model_size=model_size, k_update=sizes.k_update)
    chunk = Chunk(T, trainer, args, sizes)
    log.row(**chunk.rate(f"training chunk, --k-update {args.k_update}"), peak_bytes=peak_memory_bytes())

    agent = jax.tree.map(lambda x: x[0], chunk.carry.agent)  # seed 0 of the seed axis
    buffer = jax.tree.map(lambda x: x[0], chunk.carry.buffer)
    valid_cumsum = jnp.cumsum(T.valid_starts(buffer, args.horizon).reshape(-1))
    batch = T.buffer_sample(buffer, valid_cumsum, jax.random.key(1), args.batch_size, args.horizon)
    log.row(**call_row("one update", timed(jax.jit(trainer.update), agent, batch, jax.random.key(2),
                                           repeats=5 * sizes.repeats), model_size=model_size))
    env_state = jax.tree.map(lambda x: x[0], chunk.carry.env_state)
    obs, plan_mean = T.observation(env_state), chunk.carry.plan_mean[0]
    act = jax.jit(lambda agent, o, pm, k: T.act_mppi(trainer.model, agent, o, pm, jnp.zeros(o.shape[0], bool), k,
                                                     eval_mode=False))
    for num in sorted({1, sizes.num_envs}):
        log.row(**call_row(f"MPPI plan, {num} env{'s' if num > 1 else ''}",
                           timed(act, agent, obs[:num], plan_mean[:num], jax.random.key(3), repeats=5 * sizes.repeats),
                           model_size=model_size, num_envs=num))
    if model_size == 5:  # the chunk at Glass's recipe, for the glass part's comparison
        if sizes.k_recipe != sizes.k_update:
            del chunk  # its buffers
            trainer, args = trainer_for(T, venv, sizes, impl, model_size=model_size, k_update=sizes.k_recipe)
            chunk = Chunk(T, trainer, args, sizes)
        log.row(**chunk.rate(f"training chunk, --k-update {args.k_update}"))


def part_seeds(log: PartLog, sizes: Sizes, impl: str):
    import tdmpc2_jax as T

    venv = load_venv(T, sizes, impl)
    trainer, args = trainer_for(T, venv, sizes, impl, k_update=sizes.k_update, num_seeds=sizes.num_seeds)
    chunk = Chunk(T, trainer, args, sizes)
    log.row(**chunk.rate(f"training chunk, --k-update {args.k_update} --num-seeds {args.num_seeds}"),
            peak_bytes=peak_memory_bytes())


def glass_phases(sizes: Sizes, per_vector_step: int, seed_vector_steps: int) -> dict:
    """Phase -> the vector step a timed chunk starts at, so that every one of its steps is in that phase (a chunk's
    update at vector step v sees env step (v + 1) * per_vector_step)."""
    inside = lambda v, end: (v + sizes.vector_steps) * per_vector_step < end
    starts = {"before the warm-up (gate closed)": seed_vector_steps + 1,
              "on (between warm-up and off step)": math.ceil(sizes.glass_warmup / per_vector_step),
              "after the off step": math.ceil(sizes.glass_off / per_vector_step)}
    ends = [sizes.glass_warmup, sizes.glass_off, math.inf]
    return {phase: v for (phase, v), end in zip(starts.items(), ends, strict=True) if inside(v, end)}


def part_glass(log: PartLog, sizes: Sizes, impl: str):
    import tdmpc_glass_jax as G

    venv = load_venv(G, sizes, impl)
    trainer, args = trainer_for(G, venv, sizes, impl, k_update=sizes.k_recipe, glass_warmup_steps=sizes.glass_warmup,
                                glass_off_step=sizes.glass_off)
    chunk = Chunk(G, trainer, args, sizes)
    phases = glass_phases(sizes, args.num_envs * args.action_repeat, trainer.seed_vector_steps)
    for phase in ["before the warm-up (gate closed)", "on (between warm-up and off step)", "after the off step"]:
        if phase not in phases:
            log.skip(f"Glass {phase}", "the phase is shorter than one timed chunk at these sizes")
            continue
        log.row(**chunk.rate(f"Glass chunk, --k-update {args.k_update}, {phase}", at_vector_step=phases[phase]),
                phase=phase, glass_warmup_steps=args.glass_warmup_steps, glass_off_step=args.glass_off_step,
                glass_every_k_updates=args.glass_every_k_updates)


# ---------------------------------------------------------------------------------------------------------------------
# PPO at Playground's settings (ppo_playground.py's functions, one seed vmapped as in training)
# ---------------------------------------------------------------------------------------------------------------------
def part_ppo(log: PartLog, sizes: Sizes, impl: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ppo_playground as P

    args, env = P.setup(P.Args(env_id=sizes.ppo_env_id, impl=impl, **sizes.ppo))
    keys = jnp.stack([jax.random.PRNGKey(args.seed)])
    env_state, _ = jax.jit(jax.vmap(partial(P.reset_training_envs, env, args)))(keys)
    ts = jax.jit(jax.vmap(partial(P.init_ppo_state, args)))(keys, env_state)
    tick = time.perf_counter()
    iteration = jax.jit(jax.vmap(partial(P.training_iteration, env, args)), donate_argnums=0).lower(ts).compile()
    compile_s = time.perf_counter() - tick
    vector_steps = args.batch_size * args.num_minibatches // args.num_envs * args.unroll_length  # per iteration
    settings = {k: getattr(args, k) for k in ["env_id", "batch_size", "num_minibatches", "unroll_length",
                                              "num_updates_per_batch", "steps_per_iteration"]}
    seconds = []
    for i in range(sizes.ppo_iterations + 1):  # the first call is not timed
        tick = time.perf_counter()
        ts, metrics = iteration(ts)
        jax.block_until_ready(metrics)
        if i:
            seconds.append(time.perf_counter() - tick)
    log.row(**rate_row("PPO training iteration", seconds, vector_steps, args.num_envs, args.action_repeat),
            compile_s=compile_s, xla_bytes=xla_bytes(iteration), **settings)

    state = jax.jit(lambda k: P.env_reset(env, k, args.num_envs))(jax.random.PRNGKey(0))

    @jax.jit
    def rollout(state, key):
        def step(state, k):
            action = jax.random.uniform(k, (args.num_envs, env.action_size), minval=-1.0, maxval=1.0)
            state, out = P.env_step(env, args, state, action)
            return state, out.reward
        return jax.lax.scan(step, state, jax.random.split(key, args.unroll_length))

    seconds = []
    for i in range(sizes.ppo_iterations + 1):
        tick = time.perf_counter()
        state, rewards = jax.block_until_ready(rollout(state, jax.random.PRNGKey(1 + i)))
        if i:
            seconds.append(time.perf_counter() - tick)
    log.row(**rate_row("PPO env stepping, random actions", seconds, args.unroll_length, args.num_envs,
                       args.action_repeat), env_id=args.env_id, mean_reward=float(np.mean(rewards)))


# ---------------------------------------------------------------------------------------------------------------------
# The official TD-MPC2 beside ours (its loader and batch from check_vs_official.py, our calls from bench_vs_official.py)
# ---------------------------------------------------------------------------------------------------------------------
def official_calls(C, loaded, size: int, batch, compile_: bool):
    """(update(), plan()) of an official agent with its default config, on the GPU when there is one; each call waits
    for the device."""
    torch = loaded.torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = C.official_cfg(loaded, size, dropout=loaded.config["dropout"])
    cfg.episodic, cfg.mpc, cfg.compile = False, True, compile_  # main's options; the 2023 release reads none of them
    torch.manual_seed(0)
    agent = loaded.module.TDMPC2(cfg)
    obs, action, reward = (torch.from_numpy(x).to(device) for x in batch)
    sample = (obs, action, reward[..., None], None)
    if "terminated" in inspect.signature(loaded.module.TDMPC2._td_target).parameters:  # main samples 5 tensors
        sample = (obs, action, reward[..., None], torch.zeros_like(reward[..., None]), None)
    buffer = SimpleNamespace(sample=lambda: sample)
    first = [True]  # the 2023 release has no previous mean before its first plan

    def update():
        agent.update(buffer)
        sync()

    def plan():
        agent.act(obs[0, 0], t0=first[0], eval_mode=False)  # returns on the host: waits
        first[0] = False

    return update, plan


def interleaved(contenders: dict, rounds: int, warmup: int = 3) -> dict:
    """name -> (warm-up s, median s, min s): `warmup` calls each (our compile; torch.compile's, whose CUDA graphs are
    recorded after its first calls), then the contenders in turn once per round, so drifts of the machine hit them
    alike."""
    import numpy as np

    first = {}
    for name, fn in contenders.items():
        tick = time.perf_counter()
        for _ in range(warmup):
            fn()
        first[name] = time.perf_counter() - tick
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            tick = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tick)
    return {name: (first[name], float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def part_official(log: PartLog, sizes: Sizes, sources: list):
    if importlib.util.find_spec("torch") is None:
        return log.set(skip="torch is not installed in this environment")
    if not sources:
        return log.set(skip="no official source given (--official-2023, --official-main)")
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import bench_vs_official as B
    import check_vs_official as C

    if torch.cuda.is_available():
        C.CPU_PATCHES = []  # the official code runs as released on a GPU: no 'cuda' -> 'cpu', Adam capturable
    log.set(torch=torch.__version__, torch_cuda=torch.version.cuda,
            torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    loaded = {}
    for label, path in sources:
        try:
            loaded[label] = C.load_official(Path(path))
        except C.UserError as e:
            log.skip(f"official {label}", str(e))
    if not loaded:
        return log.set(skip="no official source could be loaded (see skipped)")
    runs = [(label, label == "main" and torch.cuda.is_available()) for label in loaded]
    if "main" in loaded and not torch.cuda.is_available():
        log.set(notes=["main runs without torch.compile: compile=true is timed on a GPU only"])
    batches = {size: C.make_batch(np.random.default_rng(size), C.official_cfg(next(iter(loaded.values())), size))
               for size in sizes.official_sizes}  # the same inputs for both releases
    ours = {}
    for label, compile_ in runs:  # the 2023 release first: a long torch.compile of main must not cost its rows
        for size in sizes.official_sizes:
            ours.setdefault(size, B.ours(size, batches[size]))  # compiled once per size
            try:
                theirs = official_calls(C, loaded[label], size, batches[size], compile_)
                for what, index in [("update", 0), ("plan", 1)]:
                    result = interleaved({"ours": ours[size][index], label: theirs[index]}, sizes.official_rounds)
                    (o_first, o_med, o_min), (t_first, t_med, t_min) = result["ours"], result[label]
                    log.row(name=f"{what}, size {size}, official {label}{' (compile=true)' if compile_ else ''}",
                            kind="versus", size=size, official=label, compile=compile_, ours_ms=1e3 * o_med,
                            ours_ms_min=1e3 * o_min, official_ms=1e3 * t_med, official_ms_min=1e3 * t_min,
                            official_over_ours=t_med / o_med, ours_warmup_s=o_first, official_warmup_s=t_first)
            except Exception as e:  # the official code on a new torch (or torch.compile without a C compiler)
                message = str(e).strip().splitlines()
                log.skip(f"official {label}, size {size}", f"{type(e).__name__}: {message[0][:300] if message else ''}")


# ---------------------------------------------------------------------------------------------------------------------
# The session: one process per part, budgets, the JSON and the Markdown table
# ---------------------------------------------------------------------------------------------------------------------
def versions() -> dict:
    """Package versions without importing them (the parent process must not take the GPU)."""
    names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "mujoco", "mujoco-mjx",
             "playground", "brax", "torch", "tensordict"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def part_env(cli, part: str, cache_dir) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if part == "official":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # JAX beside torch: allocate as needed, not 75% up front
    # A program that two parts share (the carry's init at the same sizes) compiles once; no chunk repeats on a GPU.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    if cli.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
        # Tiny programs compile fast at XLA's lowest optimisation level, and repeated ones come from the cache.
        env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def stop(proc) -> int:
    """End a part's process group (it and anything it started): SIGTERM, then SIGKILL after 10 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def run_part(cli, part: str, budget: float, parts_dir: Path, cache_dir) -> dict:
    """Run one part in its own process for at most `budget` seconds; returns its record for the session JSON."""
    path, log_path = parts_dir / f"{part}.json", parts_dir / f"{part}.log"
    path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-file", str(path),
               *(["--smoke"] if cli.smoke else []), "--impl", cli.impl,
               *(["--official-2023", cli.official_2023] if cli.official_2023 else []),
               *(["--official-main", cli.official_main] if cli.official_main else [])]
    tick = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=part_env(cli, part, cache_dir), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=budget), False
        except subprocess.TimeoutExpired:
            rc, timed_out = stop(proc), True
        finally:
            if proc.poll() is None:  # the session itself is being stopped (SIGTERM, Ctrl-C): not a lingering part
                stop(proc)
    wall = time.perf_counter() - tick
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "skipped": []}
    record = {"budget_s": round(budget, 1), "wall_s": round(wall, 1), **data}
    if data.get("skip"):
        record.update(status="skipped", reason=data.pop("skip"))
    elif timed_out or rc != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        why = (f"over its budget of {budget:.0f} s" if timed_out else
               f"failed (exit code {rc}): {tail[0][:300] if tail else 'no output'}; see parts/{part}.log")
        record.update(status="partial" if data["rows"] else "skipped", reason=why)
    else:
        record["status"] = "measured"
    record.pop("done", None)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_session"),
                        help="folder for gpu_session.json/.md and parts/ (default: $OUT, else runs/gpu_session)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (the test's run)")
    parser.add_argument("--impl", default="jax", choices=["jax", "warp"],
                        help="MJX backend (jax: what a machine without warp-lang has)")
    parser.add_argument("--official-2023", metavar="DIR", help="checkout of nicklashansen/tdmpc2 at b67b21c")
    parser.add_argument("--official-main", metavar="DIR", help="checkout of nicklashansen/tdmpc2 at current main")
    parser.add_argument("--parts", nargs="+", default=PARTS, metavar="PART", help=f"a subset of {', '.join(PARTS)}")
    parser.add_argument("--deadline-s", type=float, help="seconds for the whole session (default 540; smoke 290)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--part-file", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    cli.shown = sys.argv[1:] if argv is None else list(argv)
    sizes = SMOKE if cli.smoke else FULL
    try:
        if cli.part:
            return child(cli, sizes)
        return session(cli, sizes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def child(cli, sizes: Sizes) -> int:
    log = PartLog(Path(cli.part_file))
    if cli.part != "official":
        log.set(**device_info())
    sources = [(label, path) for label, path in [("b67b21c", cli.official_2023), ("main", cli.official_main)] if path]
    run = {"tdmpc2": partial(part_tdmpc2, model_size=5), "tdmpc2_size1": partial(part_tdmpc2, model_size=1),
           "seeds": part_seeds, "glass": part_glass, "ppo": part_ppo}
    if cli.part == "official":
        part_official(log, sizes, sources)
    else:
        run[cli.part](log, sizes, cli.impl)
    log.set(done=True)
    return 0


def session(cli, sizes: Sizes) -> int:
    if unknown := [p for p in cli.parts if p not in PARTS]:
        raise UserError(f"unknown part {unknown[0]!r}; the parts are {', '.join(PARTS)}")
    for flag, path in [("--official-2023", cli.official_2023), ("--official-main", cli.official_main)]:
        if path and not (Path(path) / "tdmpc2" / "tdmpc2.py").is_file():
            raise UserError(f"{flag} {path} is not a checkout of nicklashansen/tdmpc2 (no tdmpc2/tdmpc2.py)")
    deadline_s = sizes.deadline_s if cli.deadline_s is None else cli.deadline_s
    if deadline_s <= 0:
        raise UserError(f"--deadline-s must be positive, got {deadline_s}")
    out = Path(cli.out)
    parts_dir = out / "parts"
    try:
        parts_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {parts_dir} ({e.strerror})") from None
    session = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "command": " ".join(["python benchmarks/gpu_session.py", *cli.shown]),
                        "smoke": cli.smoke, "impl": cli.impl, "commit": git_commit(), "host_cpus": os.cpu_count(),
                        "versions": versions(), "deadline_s": deadline_s, "sizes": dataclasses.asdict(sizes)},
               "parts": {}}
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds run_part: its part stops
    with tempfile.TemporaryDirectory(prefix="gpu_session_cache_") as cache_dir:
        for part in PARTS:
            left = deadline_s - (time.perf_counter() - start)
            if part not in cli.parts or part in sizes.skip:
                session["parts"][part] = {"status": "skipped", "reason": sizes.skip.get(part, "not in --parts")}
            elif left < sizes.min_part_s:
                session["parts"][part] = {"status": "skipped",
                                          "reason": f"{left:.0f} s of the session's {deadline_s:.0f} s left"}
            else:
                print(f"{part}: up to {min(sizes.budgets[part], left):.0f} s", flush=True)
                session["parts"][part] = record = run_part(cli, part, min(sizes.budgets[part], left), parts_dir,
                                                           cache_dir)
                print(f"{part}: {record['status']} in {record['wall_s']} s"
                      f"{' (' + record['reason'] + ')' if record.get('reason') else ''}", flush=True)
            session["derived"] = derived(session["parts"])
            session["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
            atomic_write(out / "gpu_session.json", json.dumps(session, indent=1))
            atomic_write(out / "gpu_session.md", markdown(session))
    print(f"wrote {out / 'gpu_session.json'} and {out / 'gpu_session.md'} in {session['meta']['wall_s']} s")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Ratios and the 4M-env-step estimates, from the rows of the parts
# ---------------------------------------------------------------------------------------------------------------------
def find(parts: dict, part: str, prefix: str):
    rows = parts.get(part, {}).get("rows", [])
    return next((r for r in rows if r["name"].startswith(prefix)), None)


def run_hours(row: dict, total_steps: int, k_update: int, rates=None) -> float:
    """Wall hours of a run of `total_steps` env steps per seed: the compile, the pretraining burst (seed vector steps
    x k updates, each at the chunk's cost per update) and the steps after seeding at the measured rate (`rates`:
    [(env steps, row)] per phase of a schedule). Evaluations and checkpoints are not counted."""
    per_vector_step = row["num_envs"] * row["action_repeat"]
    burst_updates = row["seed_steps"] // per_vector_step * k_update
    seconds = row["compile_s"] + burst_updates * row["ms_per_vector_step"] / 1e3 / k_update
    per_seed = lambda r: r["env_steps_per_s"] / r["num_seeds"]
    for steps, r in rates or [(total_steps - row["seed_steps"], row)]:
        seconds += steps / per_seed(r)
    return seconds / 3600


def derived(parts: dict) -> dict:
    out = {"ratios": [], "estimates": [], "not_derived": []}
    one = find(parts, "tdmpc2", "training chunk, --k-update")
    five = find(parts, "seeds", "training chunk")
    recipe = [r for r in parts.get("tdmpc2", {}).get("rows", []) if r["name"].startswith("training chunk")][1:]
    glass = {r["phase"]: r for r in parts.get("glass", {}).get("rows", [])}
    seeds = lambda n: f"{n} seed{'s' if n > 1 else ''}"
    if one and five:
        out["ratios"].append({"what": f"{seeds(five['num_seeds'])} in one program / 1 seed, env steps/s summed",
                              "ratio": five["env_steps_per_s"] / one["env_steps_per_s"]})
        if one.get("peak_bytes") and five.get("peak_bytes"):
            out["ratios"].append({"what": f"GPU memory peak, {seeds(five['num_seeds'])} / 1 seed",
                                  "ratio": five["peak_bytes"] / one["peak_bytes"]})
    on = glass.get("on (between warm-up and off step)")
    if recipe and on:
        out["ratios"].append({"what": f"Glass on / TD-MPC2 at --k-update {on['k_update']}, ms per vector step",
                              "ratio": on["ms_per_vector_step"] / recipe[0]["ms_per_vector_step"]})
    if one:
        out["estimates"].append({"what": "TD-MPC2, defaults, 1 seed", "hours": run_hours(one, TOTAL_STEPS,
                                                                                        one["k_update"])})
    else:
        out["not_derived"].append("TD-MPC2 estimates: no default chunk measured")
    if five:
        out["estimates"].append({"what": f"TD-MPC2, defaults, {seeds(five['num_seeds'])} in one program",
                                 "hours": run_hours(five, TOTAL_STEPS, five["k_update"])})
    if len(glass) == 3:
        rows = list(glass.values())
        warmup, off = rows[0]["glass_warmup_steps"], rows[0]["glass_off_step"]
        start = rows[0]["seed_steps"]
        phases = [(max(warmup - start, 0), rows[0]), (off - max(warmup, start), rows[1]), (TOTAL_STEPS - off, rows[2])]
        hours = run_hours(rows[0], TOTAL_STEPS, rows[0]["k_update"], phases)
        out["estimates"].append({"what": "Glass at the recipe, 1 seed", "hours": hours})
        if one and five:
            scale = run_hours(five, TOTAL_STEPS, five["k_update"]) / run_hours(one, TOTAL_STEPS, one["k_update"])
            out["estimates"].append({"what": f"Glass at the recipe, {seeds(five['num_seeds'])} in one program "
                                             f"(scaled by TD-MPC2's {seeds(five['num_seeds'])} / 1 seed time, "
                                             "not measured)",
                                     "hours": hours * scale})
    else:
        out["not_derived"].append("Glass estimates: not all three phases measured")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The Markdown table
# ---------------------------------------------------------------------------------------------------------------------
def size(x) -> str:
    return "-" if not x else f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def memory(row: dict) -> str:
    parts = [f"{size(row[k])} {label}" for k, label in [("peak_bytes", "peak"), ("xla_bytes", "XLA")] if row.get(k)]
    return ", ".join(parts) or "-"


def markdown(session: dict) -> str:
    meta, parts = session["meta"], session["parts"]
    info = next((p for p in parts.values() if p.get("device")), {})
    official = parts.get("official", {})
    v = meta["versions"]
    stack = ", ".join(f"{k} {v[k]}" for k in ["jax", "jaxlib", "mujoco-mjx", "playground", "torch", "tensordict"]
                      if k in v)
    lines = [f"# GPU session{' (smoke run: tiny sizes, numbers meaningless)' if meta['smoke'] else ''}", "",
             f"- device: {info.get('device', 'unknown')} ({info.get('platform', '?')}), "
             f"{meta['host_cpus']} CPU cores; MJX impl {meta['impl']}",
             f"- versions: Python {v['python']}, {stack}"
             + (f"; official side: torch {official['torch']} on {official.get('torch_device')}"
                if official.get("torch") else ""),
             f"- date: {meta['date']}; commit {meta['commit']}; wall time {meta.get('wall_s', '?')} s of "
             f"{meta['deadline_s']:.0f}",
             f"- command: `{meta['command']}`", "",
             "| part | measurement | ms per call / vector step | env steps/s | compile s | memory |",
             "|---|---|---:|---:|---:|---:|"]
    for name, part in parts.items():
        for r in part.get("rows", []):
            if r["kind"] == "rate":
                compile_s = r.get("compile_s")
                lines.append(f"| {name} | {r['name']} ({r['num_envs']} envs) | {r['ms_per_vector_step']:,.1f} | "
                             f"{r['env_steps_per_s']:,.0f} | {f'{compile_s:.1f}' if compile_s else '-'} | "
                             f"{memory(r)} |")
            elif r["kind"] == "call":
                lines.append(f"| {name} | {r['name']} | {r['ms']:,.2f} | | {r['first_call_s']:.1f} (first call) | |")
    versus = official.get("rows", [])
    if versus:
        lines += ["", "| official | call | size | ours ms | official ms | official / ours |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in versus:
            label = r["official"] + (" compile=true" if r["compile"] else "")
            lines.append(f"| {label} | {r['name'].split(',')[0]} | {r['size']} | {r['ours_ms']:,.2f} | "
                         f"{r['official_ms']:,.2f} | {r['official_over_ours']:.2f} |")
    d = session.get("derived", {})
    if d.get("ratios"):
        lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {r['what']} | {r['ratio']:.2f} |" for r in d["ratios"]]
    if d.get("estimates"):
        lines += ["", f"Estimated wall time of a {TOTAL_STEPS:,}-env-step {meta['sizes']['env_id']} run per seed "
                  "(compile + pretraining burst + training at the measured rates; evaluations not counted):", "",
                  "| run | hours |", "|---|---:|"]
        lines += [f"| {e['what']} | {e['hours']:.2f} |" for e in d["estimates"]]
    skipped = [(name, p["reason"]) for name, p in parts.items() if p.get("reason")]
    skipped += [(name, f"{s['what']}: {s['why']}") for name, p in parts.items() for s in p.get("skipped", [])]
    skipped += [("derived", why) for why in d.get("not_derived", [])]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {name}: {why}" for name, why in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
