"""PPO on MuJoCo Playground's DM Control suite: the Brax PPO that Playground itself uses, in one file.

Defaults are read at run time from Playground's own table
(`mujoco_playground.config.dm_control_suite_params.brax_ppo_config(env_id)`); every field can be overridden by a flag.
The algorithm follows `brax/training/agents/ppo/{train,losses,networks}.py` (Brax 0.12-0.14): tanh-normal policy,
running observation normaliser, reward scaling, GAE with truncation masking recomputed per minibatch, clipped
surrogate, one Adam. By default a run has exactly the iterations and evaluation points of Brax's `ppo.train` for the
same config. One whole PPO iteration (rollout + epochs x minibatches) is one jitted function of `lax.scan`s, and
`--num-seeds N` trains N independent seeds as one batch, laid over every device (and with --distributed every
host), one run folder per seed.

Formulas, implementation details with their Brax sources, logged metrics and measured speed: docs/ppo.md.

    python ppo_playground.py --env-id CartpoleBalance
    python ppo_playground.py --env-id PendulumSwingup --num-seeds 4 --impl jax
    python ppo_playground.py --env-id CartpoleBalance --num-seeds 8 --distributed   # on each of several hosts
    python ppo_playground.py --env-id AcrobotSwingup --dry-run     # print the resolved config, run nothing
    python ppo_playground.py --resume runs/CartpoleBalance__ppo_playground__1__1764590000   # continue a run
    python ppo_playground.py --env-id CartpoleBalance --capture-video   # videos/deterministic_step{N}.mp4 per eval
    python ppo_playground.py --evaluate runs/CartpoleBalance__ppo_playground__1__1764590000   # its newest checkpoint
    python ppo_playground.py --init-from runs/CartpoleBalance__ppo_playground__1__1764590000:9830400 --entropy-cost 0
"""

import dataclasses
import errno
import functools
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct


@dataclasses.dataclass
class Args:
    """PPO on a Playground DM Control env: the training fields, then the run flags. Flags shown as None take
    Playground's value for the env (else Brax's); `args.json` and `--dry-run` show the resolved values."""

    env_id: str = "CartpoleBalance"
    """DM Control suite environment of MuJoCo Playground"""
    seed: int = 1
    """seed of the first run; run i of `--num-seeds` uses seed + i"""
    impl: Optional[Literal["jax", "warp"]] = None
    """MJX backend (unset = warp when a GPU is present, jax otherwise); the two are different simulations"""
    naconmax: Optional[int] = None
    """warp only: contact pool shared by a device's envs (unset = Playground's, as roomy per env as its 2048 envs)"""
    njmax: Optional[int] = None
    """warp only: constraint rows per env (unset = Playground's)"""
    step_rounding: Literal["brax", "iteration"] = "brax"
    """brax: the iterations and eval points of Brax's ppo.train (60M runs 88.5M); iteration: ceil(total / iteration)"""

    # Algorithm specific arguments (None = Playground's value for this env_id, or Brax's default)
    total_steps: Optional[int] = None
    """environment steps to train (Brax's num_timesteps), rounded up as --step-rounding says"""
    num_envs: Optional[int] = None
    """number of parallel training environments"""
    episode_length: Optional[int] = None
    """episode length in environment steps (truncation)"""
    action_repeat: Optional[int] = None
    """environment steps per agent step"""
    unroll_length: Optional[int] = None
    """agent steps per sequence"""
    batch_size: Optional[int] = None
    """sequences per minibatch"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch (one iteration collects batch_size x num_minibatches sequences)"""
    num_updates_per_batch: Optional[int] = None
    """epochs over each collected batch"""
    discounting: Optional[float] = None
    """discount factor"""
    learning_rate: Optional[float] = None
    """Adam learning rate (constant)"""
    entropy_cost: Optional[float] = None
    """weight of the entropy bonus"""
    reward_scaling: Optional[float] = None
    """multiplier applied to rewards in the loss"""
    normalize_observations: Optional[bool] = None
    """running mean/std observation normaliser"""
    num_evals: Optional[int] = None
    """evaluations over the run, the one at step 0 included (Brax skips it when num_evals is 1)"""
    num_resets_per_eval: Optional[int] = None
    """hard resets of all training envs between two evaluations (0: never)"""
    clipping_epsilon: Optional[float] = None
    """PPO ratio clipping epsilon (Brax default 0.3)"""
    gae_lambda: Optional[float] = None
    """GAE lambda (Brax default 0.95)"""
    vf_loss_coefficient: Optional[float] = None
    """value loss coefficient (Brax default 0.5)"""
    normalize_advantage: Optional[bool] = None
    """normalise advantages per minibatch (Brax default True)"""
    max_grad_norm: Optional[float] = None
    """global-norm gradient clipping (Brax default: none)"""
    num_eval_envs: Optional[int] = None
    """evaluation episodes, run in parallel (Brax default 128)"""
    policy_hidden_sizes: tuple[int, ...] = (32, 32, 32, 32)
    """hidden layers of the policy MLP (Brax's make_ppo_networks default)"""
    value_hidden_sizes: tuple[int, ...] = (256, 256, 256, 256, 256)
    """hidden layers of the value MLP (Brax's make_ppo_networks default)"""

    # Filled in at run time by `resolve_args` and `setup` (not flags)
    observation_size: tyro.conf.Suppress[int] = 0
    """size of the env's observation vector"""
    action_size: tyro.conf.Suppress[int] = 0
    """size of the env's action vector"""
    steps_per_iteration: tyro.conf.Suppress[int] = 0
    """env steps per PPO iteration: batch_size x num_minibatches x unroll_length x action_repeat"""
    iterations_per_epoch: tyro.conf.Suppress[int] = 0
    """PPO iterations between hard resets (Brax's training epoch)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """PPO iterations of the run (see --step-rounding)"""
    total_steps_resolved: tyro.conf.Suppress[int] = 0
    """env steps the run takes: num_iterations x steps_per_iteration"""
    eval_steps: tyro.conf.Suppress[tuple[int, ...]] = ()
    """env steps after which the policy is evaluated (0: before training)"""

    # Run: folder, logs, checkpoints and resume, seeds, videos, tracking (none of these change the training math)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    num_seeds: int = 1
    """seeds seed, seed+1, ... trained together in one jitted program, laid over every device; one run folder each"""
    distributed: bool = False
    """several hosts: jax.distributed.initialize() from JAX's environment variables; each host trains its seeds"""
    run_dir: Optional[str] = None
    """run folder (unset = runs/{env_id}__{exp_name}__{seed}__{unix_time}); several seeds add __{seed}"""
    checkpoint_every: Optional[int] = None
    """env steps between full-state checkpoints (unset = each evaluation; 0 = none); one is also written at the end"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in {run_dir}/checkpoints (older ones are deleted)"""
    keep_every: int = 0
    """also keep each checkpoint at a multiple of this many env steps (0 = none; a multiple of checkpoint spacing)"""
    save_model: bool = False
    """write the final checkpoint even with --checkpoint-every 0"""
    resume: Optional[str] = None
    """run folder to continue from its newest complete checkpoint (only run flags and --total-steps may change)"""
    init_from: Optional[str] = None
    """RUN_DIR[:STEP]: a new run in its own folder from that checkpoint's whole state (unset STEP = the newest)"""
    evaluate: Optional[str] = None
    """run folder whose checkpoint is evaluated as training evaluated it, to {run_dir}/evaluations/step{N}.json"""
    evaluate_step: Optional[int] = None
    """with --evaluate: the checkpoint's env step (unset = the newest complete one)"""
    dump_rollouts: bool = False
    """with --evaluate: also write each step's observation, action and reward to rollouts_step{N}.npz"""
    dry_run: bool = False
    """print the resolved config as one JSON object and exit, writing nothing"""
    capture_video: bool = False
    """record the first deterministic eval episode to videos/deterministic_step{N}.mp4 in the run folder"""
    video_episodes: int = 1
    """with --capture-video: episodes recorded per mode (--evaluate records both modes; training the deterministic)"""
    video_every: int = 1
    """with --capture-video: record every this many evaluations"""
    video_height: int = 240
    """video frame height in pixels"""
    video_width: int = 320
    """video frame width in pixels"""
    track: bool = False
    """also log every TensorBoard scalar to Weights & Biases (pip install -e ".[track]"; one W&B run per seed)"""
    wandb_project_name: str = "tdmpc2-mjx"
    """the Weights & Biases project of --track"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases team or user of --track (unset = your default entity)"""


# Values Brax's ppo.train uses for fields Playground's DM Control table leaves unset.
BRAX_DEFAULTS = dict(
    clipping_epsilon=0.3,
    gae_lambda=0.95,
    vf_loss_coefficient=0.5,
    normalize_advantage=True,
    max_grad_norm=None,
    num_eval_envs=128,
)
# Playground's field name -> ours, where they differ.
RENAMED = {"num_timesteps": "total_steps"}


class UserError(Exception):
    """A mistake in the command line: printed as one line `error: ...`, exit code 2."""


def playground_defaults(env_id: str) -> dict:
    """Playground's Brax PPO settings for env_id (in our field names), with its PendulumSwingup defect fixed."""
    from mujoco_playground.config import dm_control_suite_params  # imported here: importing this file stays cheap

    config = dm_control_suite_params.brax_ppo_config(env_id).to_dict()
    # Defect 1: the table's override tests the name "PendulumSwingUp" (capital U), which is not a registered env,
    # so PendulumSwingup silently runs with action_repeat 1 and 16 epochs. We apply what was intended.
    if env_id == "PendulumSwingup":
        config.update(action_repeat=4, num_updates_per_batch=4)
    config = {RENAMED.get(k, k): v for k, v in config.items()}
    known = {f.name for f in dataclasses.fields(Args)}
    if unknown := sorted(set(config) - known):
        print(f"warning: Playground's config for {env_id} sets {', '.join(unknown)}, which this script does not "
              "implement; ignored", file=sys.stderr)
    return {k: v for k, v in config.items() if k in known}


def iteration_schedule(args: Args) -> tuple[int, int, tuple[int, ...]]:
    """(iterations_per_epoch, num_iterations, eval_iterations): Brax's ppo.train loop, or the plain ceil budget.

    Brax (ppo/train.py) runs max(num_evals - 1, 1) evaluation blocks, each of max(num_resets_per_eval, 1) training
    epochs of ceil(T / (blocks x epochs x S)) iterations, hard-resets the training envs after every epoch when
    num_resets_per_eval > 0, and evaluates before training (only when num_evals > 1) and after every block."""
    num_blocks = max(args.num_evals - 1, 1)
    epochs_per_block = max(args.num_resets_per_eval, 1)
    iterations_per_epoch = math.ceil(args.total_steps / (num_blocks * epochs_per_block * args.steps_per_iteration))
    if args.step_rounding == "brax":
        num_iterations = num_blocks * epochs_per_block * iterations_per_epoch
        later = [k * epochs_per_block * iterations_per_epoch for k in range(1, num_blocks + 1)]
    else:  # evaluations spread as evenly as whole iterations allow, the last one at the end
        num_iterations = math.ceil(args.total_steps / args.steps_per_iteration)
        later = sorted({math.ceil(k * num_iterations / num_blocks) for k in range(1, num_blocks + 1)})
        if len(later) < num_blocks:
            print(f"note: {num_iterations} iterations leave room for {len(later)} of the {num_blocks} evaluations "
                  "after step 0 (at most one per iteration); use --step-rounding brax to get all of them",
                  file=sys.stderr)
    return iterations_per_epoch, num_iterations, tuple([0] * (args.num_evals > 1) + later)


def resolve_args(args: Args) -> Args:
    """Fill every None field from Playground/Brax, validate, and compute the iteration schedule (no env needed).

    Raises UserError on bad input."""
    from mujoco_playground._src import dm_control_suite

    if args.env_id not in dm_control_suite.ALL_ENVS:
        raise UserError(f"unknown env id {args.env_id!r}; valid DM Control ids: {', '.join(dm_control_suite.ALL_ENVS)}")
    defaults = {**BRAX_DEFAULTS, **playground_defaults(args.env_id)}
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.impl is None:
        args.impl = "warp" if any(d.platform == "gpu" for d in jax.devices()) else "jax"
    if args.impl != "warp" and (args.naconmax is not None or args.njmax is not None):
        raise UserError("--naconmax and --njmax size warp's contact buffers; they apply to --impl warp only")
    if min(args.naconmax or 0, args.njmax or 0) < 0:
        raise UserError(f"--naconmax and --njmax must not be negative, got {args.naconmax} and {args.njmax}")

    positive = ["num_seeds", "total_steps", "num_envs", "episode_length", "action_repeat", "unroll_length",
                "batch_size", "num_minibatches", "num_updates_per_batch", "num_evals", "num_eval_envs", "video_every",
                "video_episodes", "video_height", "video_width"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0 or args.keep_checkpoints < 1:
        raise UserError("need --checkpoint-every >= 0 and --keep-checkpoints >= 1")
    if args.evaluate_step is not None and args.evaluate is None:
        raise UserError("--evaluate-step needs --evaluate RUN_DIR")
    if args.dump_rollouts and args.evaluate is None:
        raise UserError("--dump-rollouts needs --evaluate RUN_DIR")
    if args.video_episodes > args.num_eval_envs:
        raise UserError(f"--video-episodes ({args.video_episodes}) must not exceed --num-eval-envs "
                        f"({args.num_eval_envs})")
    if args.num_resets_per_eval < 0:
        raise UserError(f"--num-resets-per-eval must be >= 0, got {args.num_resets_per_eval}")
    if args.learning_rate <= 0 or not 0 < args.discounting <= 1 or not 0 <= args.gae_lambda <= 1:
        raise UserError("need --learning-rate > 0, 0 < --discounting <= 1 and 0 <= --gae-lambda <= 1")
    if any(h <= 0 for h in args.policy_hidden_sizes + args.value_hidden_sizes):
        raise UserError("hidden layer sizes must be positive")
    sequences = args.batch_size * args.num_minibatches
    if sequences % args.num_envs:
        envs_ok = [n for n in range(1, sequences + 1) if sequences % n == 0 and n <= 4 * args.num_envs][-3:]
        step = args.num_envs // math.gcd(args.num_envs, args.num_minibatches)
        raise UserError(
            f"batch_size x num_minibatches = {args.batch_size} x {args.num_minibatches} = {sequences} is not "
            f"divisible by num_envs = {args.num_envs}; use --num-envs in {envs_ok} (divisors of {sequences}) "
            f"or a --batch-size that is a multiple of {step}")

    args.steps_per_iteration = sequences * args.unroll_length * args.action_repeat
    args.iterations_per_epoch, args.num_iterations, eval_iterations = iteration_schedule(args)
    args.total_steps_resolved = args.num_iterations * args.steps_per_iteration
    args.eval_steps = tuple(i * args.steps_per_iteration for i in eval_iterations)
    spacing = checkpoint_spacing(args)
    if args.keep_every < 0 or args.keep_every and (spacing is None or args.keep_every % spacing):
        raise UserError(keep_every_refusal(args, spacing))
    return args


def checkpoint_spacing(args: Args) -> Optional[int]:
    """Env steps between checkpoints such that each of its multiples that the run reaches holds one (orbax's
    keep_period keeps the multiples of --keep-every, so that must be one of them); None where there is none."""
    if args.checkpoint_every == 0:
        return None
    if args.checkpoint_every is not None:  # the first iteration at or past each multiple: both must divide the step
        return math.lcm(args.checkpoint_every, args.steps_per_iteration)
    later = [s for s in args.eval_steps if s > 0]  # one checkpoint per evaluation
    return later[0] if all(s == (k + 1) * later[0] for k, s in enumerate(later)) else None


def keep_every_refusal(args: Args, spacing: Optional[int]) -> str:
    if args.keep_every < 0:
        return f"--keep-every must not be negative, got {args.keep_every}"
    if args.checkpoint_every == 0:
        return f"--keep-every ({args.keep_every}) keeps checkpoints, but --checkpoint-every 0 writes none but the last"
    if spacing is None:
        return (f"--keep-every ({args.keep_every}) needs evenly spaced checkpoints, and the evaluations (where they "
                "are written by default) are not: set --checkpoint-every")
    return (f"--keep-every ({args.keep_every}) must be a multiple of the checkpoint spacing ({spacing} env steps): "
            "checkpoints are written only there")


def setup(args: Args):
    """Resolve every run-time value of args once, right after the env loads: (resolved args, env)."""
    args = resolve_args(args)
    env = make_env(args)
    args = dataclasses.replace(args, observation_size=env.observation_size, action_size=env.action_size)
    if args.impl == "warp":
        args = dataclasses.replace(args, naconmax=env._config.naconmax, njmax=env._config.njmax)
    return args, env


# ---------------------------------------------------------------------------------------------------------------
# Environment: Playground env, vmapped over num_envs, with Brax's episode wrapper (action repeat, truncation at
# episode_length) and Playground's auto-reset to the cached first state of each env.
# ---------------------------------------------------------------------------------------------------------------
# warp's per-env overflow flags (mujoco_warp's OverflowType). A full contact pool or constraint table drops contacts
# or rows, so the physics is wrong from then on; the iteration limits only end a step with an unconverged solver,
# which Playground's ports (few solver iterations, for speed) reach routinely.
WARP_ITERATION_LIMITS = 1 << 9 | 1 << 10  # ITERATIONS, LS_ITERATIONS
WARP_CAPACITY = ((1 << 12) - 1) & ~WARP_ITERATION_LIMITS
PLAYGROUND_BATCH = 2048  # envs of Playground's own DM Control training, for which its naconmax is chosen


def make_env(args: Args):
    """The Playground env. Under warp, all envs of a device (every seed's, training or evaluation) share one contact
    pool: it is sized to give each env at least the room Playground's own batch gives it."""
    from mujoco_playground import registry  # imported here: importing this file stays cheap

    overrides = {"impl": args.impl}
    if args.impl == "warp":
        import warp

        warp.config.log_level = warp.LOG_WARNING  # no line per kernel module loaded; warnings still print
        default = registry.get_default_config(args.env_id)
        worlds = max(args.num_envs, 2 * args.num_eval_envs) * max(1, args.num_seeds // jax.device_count())
        per_env = math.ceil(default.naconmax / PLAYGROUND_BATCH)
        overrides["naconmax"] = args.naconmax if args.naconmax is not None else max(default.naconmax, per_env * worlds)
        overrides["njmax"] = args.njmax if args.njmax is not None else default.njmax
    env = registry.load(args.env_id, config_overrides=overrides)
    if args.impl == "warp":  # iteration limits are counted and reported once by us, not printed per env step
        opt = env._mjx_model.opt
        env._mjx_model = env._mjx_model.replace(opt=opt.replace(_impl=opt._impl.replace(
            warn_overflow=opt._impl.warn_overflow & ~WARP_ITERATION_LIMITS)))
    return env


@struct.dataclass
class EnvState:
    inner: Any  # batched playground State
    first_data: Any  # cached reset state that finished episodes return to
    first_obs: jax.Array
    steps: jax.Array  # env steps into the current episode
    episode_return: jax.Array  # undiscounted, unscaled return so far


@struct.dataclass
class StepOut:
    reward: jax.Array
    done: jax.Array
    truncation: jax.Array
    finished_return: jax.Array  # return of the episode that ended at this step, else 0
    warp_flags: Optional[jax.Array] = None  # warp only: each env's overflow flags of this step


def env_reset(env, key: jax.Array, num: int) -> EnvState:
    inner = jax.vmap(env.reset)(jax.random.split(key, num))
    return EnvState(
        inner=inner,
        first_data=inner.data,
        first_obs=inner.obs,
        steps=jnp.zeros(num, jnp.int32),
        episode_return=jnp.zeros(num),
    )


def env_step(env, args: Args, state: EnvState, action: jax.Array, reset_done: bool = True) -> tuple[EnvState, StepOut]:
    """One agent step (action_repeat env steps) of every env. Finished episodes return to their cached first state,
    unless `reset_done` is False (a recorded evaluation: its episode's last frame is where it ended)."""
    def physics_step(inner, _):
        inner = jax.vmap(env.step)(inner, action)
        return inner, inner.reward

    inner = state.inner.replace(done=jnp.zeros_like(state.inner.done))
    if args.impl == "warp":  # warp's overflow flags are sticky: cleared here, so that they say what this step did
        inner = inner.replace(data=inner.data.replace(_impl=inner.data._impl.replace(
            overflow=jnp.zeros_like(inner.data._impl.overflow))))
    if args.action_repeat == 1:
        inner, reward = physics_step(inner, None)
    else:  # like Brax, the inner env keeps stepping even if it is done in the middle of the repeat
        inner, rewards = jax.lax.scan(physics_step, inner, None, length=args.action_repeat)
        reward = rewards.sum(0)
    steps = state.steps + args.action_repeat
    timeout = steps >= args.episode_length
    done = jnp.where(timeout, 1.0, inner.done)
    truncation = jnp.where(timeout, 1.0 - inner.done, 0.0)
    episode_return = state.episode_return + reward

    def where_done(d, first_data, first_obs, data, obs):  # one env; MJX's Data.where, as warp's Data holds a
        return data.where(d, first_data), jax.tree.map(lambda a, b: jnp.where(d, a, b), first_obs, obs)  # shared pool

    warp_flags = inner.data._impl.overflow if args.impl == "warp" else None  # read before a reset clears them
    if reset_done:
        data, obs = jax.vmap(where_done)(done > 0, state.first_data, state.first_obs, inner.data, inner.obs)
        inner = inner.replace(data=data, obs=obs)
    inner = inner.replace(reward=reward, done=done)
    new_state = state.replace(
        inner=inner, steps=jnp.where(done > 0, 0, steps), episode_return=jnp.where(done > 0, 0.0, episode_return))
    return new_state, StepOut(reward, done, truncation, episode_return * done, warp_flags)


# ---------------------------------------------------------------------------------------------------------------
# Networks (brax/training/networks.py MLP with make_ppo_networks' defaults)
# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    hidden_sizes: tuple[int, ...]
    out_size: int

    @nn.compact
    def __call__(self, x):
        for size in self.hidden_sizes:
            x = nn.swish(nn.Dense(size, kernel_init=nn.initializers.lecun_uniform())(x))
        return nn.Dense(self.out_size, kernel_init=nn.initializers.lecun_uniform())(x)


def policy_net(args: Args) -> MLP:
    """Outputs [loc, raw_scale] of a tanh-normal."""
    return MLP(tuple(args.policy_hidden_sizes), 2 * args.action_size)


def value_net(args: Args) -> MLP:
    return MLP(tuple(args.value_hidden_sizes), 1)


# ---------------------------------------------------------------------------------------------------------------
# Pure math (docs/ppo.md, "Formulas")
# ---------------------------------------------------------------------------------------------------------------
def compute_gae(truncation, termination, rewards, values, bootstrap_value, lambda_, discount):
    """GAE with Brax's truncation masking, time-major [T, B]. Returns (vs, advantages), both stop-gradient.

    Generalised advantage estimation, Schulman et al. 2016 ("High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", eq. 16), as `brax/training/agents/ppo/losses.py` compute_gae computes it: nothing is
    bootstrapped across a truncation, and the advantage is the one-step TD error bootstrapping on the next
    lambda-return vs_{t+1} (not vs_t - V_t; docs/ppo.md, "GAE as Brax computes it")."""
    values_next = jnp.concatenate([values[1:], bootstrap_value[None]], axis=0)
    not_trunc = 1.0 - truncation
    not_term = 1.0 - termination
    deltas = (rewards + discount * not_term * values_next - values) * not_trunc

    def backward(acc, xs):
        delta, not_term_t, not_trunc_t = xs
        acc = delta + discount * not_term_t * not_trunc_t * lambda_ * acc
        return acc, acc

    _, vs_minus_v = jax.lax.scan(backward, jnp.zeros_like(bootstrap_value), (deltas, not_term, not_trunc),
                                 reverse=True)
    vs = vs_minus_v + values
    vs_next = jnp.concatenate([vs[1:], bootstrap_value[None]], axis=0)
    advantages = (rewards + discount * not_term * vs_next - values) * not_trunc
    return jax.lax.stop_gradient(vs), jax.lax.stop_gradient(advantages)


def tanh_log_det_jacobian(x):
    """log |d tanh(x)/dx| = log(1 - tanh(x)^2), computed stably."""
    return 2.0 * (jnp.log(2.0) - x - jax.nn.softplus(-2.0 * x))


def policy_dist(policy_out, min_std: float = 0.001):
    """Split the policy output into the Gaussian's loc and scale = softplus(raw) + min_std."""
    loc, raw_scale = jnp.split(policy_out, 2, axis=-1)
    return loc, jax.nn.softplus(raw_scale) + min_std


def tanh_normal_log_prob(raw_action, loc, scale):
    """log-density of tanh(raw_action) under tanh(N(loc, scale)), summed over action dims (change of variables;
    `brax/training/distribution.py` NormalTanhDistribution)."""
    z = (raw_action - loc) / scale
    gaussian = -0.5 * z**2 - jnp.log(scale) - 0.5 * jnp.log(2.0 * jnp.pi)
    return jnp.sum(gaussian - tanh_log_det_jacobian(raw_action), axis=-1)


def tanh_normal_entropy(key, loc, scale):
    """One-sample entropy estimate of tanh(N(loc, scale)): Gaussian entropy + log|det J| at one sample (Brax)."""
    gaussian = 0.5 + 0.5 * jnp.log(2.0 * jnp.pi) + jnp.log(scale)
    x = loc + scale * jax.random.normal(key, loc.shape)
    return jnp.sum(gaussian + tanh_log_det_jacobian(x), axis=-1)


@struct.dataclass
class Normalizer:
    count: jax.Array
    mean: jax.Array
    summed_variance: jax.Array
    std: jax.Array


def init_normalizer(obs_size: int) -> Normalizer:
    return Normalizer(jnp.zeros((), jnp.int32), jnp.zeros(obs_size), jnp.zeros(obs_size), jnp.ones(obs_size))


def update_normalizer(state: Normalizer, obs) -> Normalizer:
    """Batched Welford update over every observation in obs [..., D]; std clipped to [1e-6, 1e6]
    (`brax/training/acme/running_statistics.py` update)."""
    obs = obs.reshape(-1, obs.shape[-1])
    count = state.count + obs.shape[0]
    diff_old = obs - state.mean
    mean = state.mean + diff_old.sum(0) / count.astype(jnp.float32)
    summed_variance = state.summed_variance + (diff_old * (obs - mean)).sum(0)
    std = jnp.clip(jnp.sqrt(jnp.maximum(summed_variance, 0.0) / count.astype(jnp.float32)), 1e-6, 1e6)
    return Normalizer(count, mean, summed_variance, std)


def normalize(state: Normalizer, obs):
    return (obs - state.mean) / state.std


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------
def ppo_loss(params, normalizer: Normalizer, batch: dict, key, args: Args):
    """PPO loss of one minibatch of sequences [B, T]; values and GAE are recomputed with the current networks.

    Clipped surrogate objective of Schulman et al. 2017 ("Proximal Policy Optimization Algorithms", eq. 7), an
    unclipped squared value loss and an entropy bonus (eq. 9), with GAE advantages (Schulman et al. 2016), as
    `brax/training/agents/ppo/losses.py` compute_ppo_loss computes them."""
    bootstrap_obs = batch["bootstrap_obs"]  # [B, D]: observation after each sequence's last step
    batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), {k: v for k, v in batch.items() if k != "bootstrap_obs"})
    obs = normalize(normalizer, batch["obs"])
    loc, scale = policy_dist(policy_net(args).apply(params["policy"], obs))
    value_apply = functools.partial(value_net(args).apply, params["value"])
    values = value_apply(obs)[..., 0]
    bootstrap_value = value_apply(normalize(normalizer, bootstrap_obs))[..., 0]

    rewards = batch["reward"] * args.reward_scaling
    truncation = batch["truncation"]
    termination = batch["done"] * (1.0 - truncation)
    vs, advantages = compute_gae(truncation, termination, rewards, values, bootstrap_value,
                                 args.gae_lambda, args.discounting)
    if args.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    log_prob = tanh_normal_log_prob(batch["raw_action"], loc, scale)
    ratio = jnp.exp(log_prob - batch["log_prob"])
    clipped = jnp.clip(ratio, 1.0 - args.clipping_epsilon, 1.0 + args.clipping_epsilon)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))
    v_loss = 0.5 * args.vf_loss_coefficient * jnp.mean((vs - values) ** 2)
    entropy = jnp.mean(tanh_normal_entropy(key, loc, scale))
    entropy_loss = -args.entropy_cost * entropy
    total_loss = policy_loss + v_loss + entropy_loss
    metrics = dict(
        total_loss=total_loss,
        policy_loss=policy_loss,
        v_loss=v_loss,
        entropy_loss=entropy_loss,
        entropy=entropy,
        approx_kl=jnp.mean(batch["log_prob"] - log_prob),
        clipfrac=jnp.mean(jnp.abs(ratio - 1.0) > args.clipping_epsilon),
    )
    return total_loss, metrics


def make_optimizer(args: Args):
    adam = optax.adam(args.learning_rate)
    return adam if args.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(args.max_grad_norm), adam)


# ---------------------------------------------------------------------------------------------------------------
# Training iteration: rollout (scan over unrolls of scans over steps) -> normaliser update -> epochs x minibatches
# ---------------------------------------------------------------------------------------------------------------
@struct.dataclass
class PPOState:
    """Everything one seed carries from one PPO iteration to the next."""

    params: dict
    opt_state: Any
    normalizer: Normalizer
    env_state: EnvState
    key: jax.Array


@struct.dataclass
class SGDState:
    """What the epoch and minibatch scans update."""

    params: dict
    opt_state: Any


def init_ppo_state(args: Args, key, env_state: EnvState) -> PPOState:
    """Networks, optimiser and normaliser of one seed; env_state comes from `reset_training_envs`."""
    k_policy, k_value, key = jax.random.split(key, 3)
    dummy = jnp.zeros((1, args.observation_size))
    params = {"policy": policy_net(args).init(k_policy, dummy), "value": value_net(args).init(k_value, dummy)}
    return PPOState(
        params=params,
        opt_state=make_optimizer(args).init(params),
        normalizer=init_normalizer(args.observation_size),
        env_state=env_state,
        key=key,
    )


def actor_step(env, args: Args, params, normalizer, env_state: EnvState, key):
    """One agent step of all training envs with the stochastic policy."""
    obs = env_state.inner.obs
    loc, scale = policy_dist(policy_net(args).apply(params["policy"], normalize(normalizer, obs)))
    raw_action = loc + scale * jax.random.normal(key, loc.shape)
    env_state, step = env_step(env, args, env_state, jnp.tanh(raw_action))
    transition = dict(
        obs=obs,
        raw_action=raw_action,
        log_prob=tanh_normal_log_prob(raw_action, loc, scale),
        reward=step.reward,
        done=step.done,
        truncation=step.truncation,
        finished_return=step.finished_return,
    )
    if step.warp_flags is not None:
        transition["warp_flags"] = step.warp_flags
    return env_state, transition


def collect_rollout(env, args: Args, ts: PPOState, key):
    """batch_size x num_minibatches sequences of unroll_length steps, as [sequences, T, ...]."""
    num_unrolls = args.batch_size * args.num_minibatches // args.num_envs

    def unroll(env_state, key):
        step = functools.partial(actor_step, env, args, ts.params, ts.normalizer)
        env_state, data = jax.lax.scan(step, env_state, jax.random.split(key, args.unroll_length))
        # The observation after the last step bootstraps the sequence (Brax's next_observation[-1]; it is the
        # cached reset observation if the episode just ended, which the GAE masks out).
        return env_state, (data, env_state.inner.obs)

    env_state, (data, bootstrap_obs) = jax.lax.scan(unroll, ts.env_state, jax.random.split(key, num_unrolls))
    # [unrolls, T, envs, ...] -> [unrolls * envs, T, ...]
    data = jax.tree.map(lambda x: jnp.swapaxes(x, 1, 2).reshape((-1, args.unroll_length) + x.shape[3:]), data)
    data["bootstrap_obs"] = bootstrap_obs.reshape((-1,) + bootstrap_obs.shape[2:])
    return env_state, data


def sgd_epoch(args: Args, normalizer, data, state: SGDState, key) -> tuple[SGDState, dict]:
    """One pass over the batch: a fresh permutation of the sequences split into num_minibatches minibatches."""
    k_perm, k_loss = jax.random.split(key)
    perm = jax.random.permutation(k_perm, args.batch_size * args.num_minibatches)
    minibatches = jax.tree.map(lambda x: x[perm].reshape((args.num_minibatches, -1) + x.shape[1:]), data)
    optimizer = make_optimizer(args)
    grad_fn = jax.grad(ppo_loss, has_aux=True)

    def minibatch_step(state: SGDState, xs):
        batch, key = xs
        grads, metrics = grad_fn(state.params, normalizer, batch, key, args)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return SGDState(optax.apply_updates(state.params, updates), opt_state), metrics

    keys = jax.random.split(k_loss, args.num_minibatches)
    return jax.lax.scan(minibatch_step, state, (minibatches, keys))


def training_iteration(env, args: Args, ts: PPOState) -> tuple[PPOState, dict]:
    """One PPO iteration of one seed (vmapped over seeds and jitted in `train`)."""
    key, k_rollout, k_sgd = jax.random.split(ts.key, 3)
    env_state, data = collect_rollout(env, args, ts, k_rollout)
    finished_return, done = data.pop("finished_return"), data["done"]
    warp_flags = data.pop("warp_flags", None)
    # The rollout used the old normaliser; the SGD uses the one updated with this iteration's observations.
    normalizer = update_normalizer(ts.normalizer, data["obs"]) if args.normalize_observations else ts.normalizer
    epoch = functools.partial(sgd_epoch, args, normalizer, data)
    sgd_state, losses = jax.lax.scan(
        epoch, SGDState(ts.params, ts.opt_state), jax.random.split(k_sgd, args.num_updates_per_batch))
    metrics = jax.tree.map(jnp.mean, losses)
    metrics["episodes"] = done.sum()
    metrics["episodic_return"] = finished_return.sum() / jnp.maximum(done.sum(), 1.0)
    if warp_flags is not None:  # any capacity overflow of the rollout; the share of env steps left unconverged
        metrics["warp_overflow"] = jax.lax.reduce(warp_flags.reshape(-1) & WARP_CAPACITY, np.int32(0),
                                                  jax.lax.bitwise_or, (0,))
        metrics["warp_unconverged"] = jnp.mean(warp_flags & WARP_ITERATION_LIMITS > 0)
    ts = PPOState(
        params=sgd_state.params,
        opt_state=sgd_state.opt_state,
        normalizer=normalizer,
        env_state=env_state,
        key=key,
    )
    return ts, metrics


def reset_training_envs(env, args: Args, key) -> tuple[EnvState, jax.Array]:
    """Hard reset of every training env to a fresh random state (Brax, after each training epoch)."""
    key, k_env = jax.random.split(key)
    return env_reset(env, k_env, args.num_envs), key


def init_carry(env, args: Args, key) -> dict:
    """One seed's whole training state before iteration 1: its PPOState, the key of the hard resets and the key of
    the evaluations. What a checkpoint holds, and (through jax.eval_shape) the structure a restore fills in."""
    k_env, k_eval, k_train = jax.random.split(key, 3)
    env_state, k_env = reset_training_envs(env, args, k_env)
    return dict(ts=init_ppo_state(args, k_train, env_state), k_env=k_env, k_eval=k_eval)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@struct.dataclass
class EvalCarry:
    env_state: EnvState
    episode_return: jax.Array  # summed unscaled reward up to each env's first done
    active: jax.Array  # 1 until the env's first done, then 0


RENDER_FIELDS = ("qpos", "qvel", "mocap_pos", "mocap_quat", "xfrc_applied")  # what MuJoCo needs to draw a state


def evaluate(env, args: Args, params, normalizer, key, record: bool = False, dump: bool = False):
    """Undiscounted returns of num_eval_envs full episodes, (num_eval_envs,) per mode: (stochastic policy,
    deterministic tanh(loc)); their means (taken on the host) are eval.csv's.

    Both modes run in one batch of 2 x num_eval_envs envs (the first half samples, the second takes the mode). With
    `record` or `dump` the returns come with a dict (without either the compiled program is the one without video):
    with `record`, "poses" of the first `video_episodes` episodes of each mode, (T + 1, 2 * video_episodes) per field
    of RENDER_FIELDS plus `alive`, for `Videos` to draw afterwards; with `dump`, the "rollout": per step
    (T, 2 * num_eval_envs) the observation, action, reward and whether the episode was still running."""
    n = args.num_eval_envs
    deterministic = jnp.arange(2 * n) >= n
    policy = policy_net(args)
    k_reset, k_act = jax.random.split(key)
    recorded = np.concatenate([np.arange(args.video_episodes), n + np.arange(args.video_episodes)])  # by mode

    def poses(env_state: EnvState, active):  # None without record: nothing extra is traced
        if not record:
            return None
        fields = {name: getattr(env_state.inner.data, name)[recorded] for name in RENDER_FIELDS}
        return {**fields, "alive": active[recorded] > 0}

    def step(carry: EvalCarry, k):
        obs = normalize(normalizer, carry.env_state.inner.obs)
        loc, scale = policy_dist(policy.apply(params["policy"], obs))
        sample = loc + scale * jax.random.normal(k, loc.shape)
        action = jnp.tanh(jnp.where(deterministic[:, None], loc, sample))
        # Returns count each episode until its first done, so what a finished env does next never matters: a
        # recorded evaluation lets it run on, and its last frame shows where the episode ended, not the reset state.
        env_state, out = env_step(env, args, carry.env_state, action, reset_done=not record)
        rollout = None if not dump else {"obs": carry.env_state.inner.obs, "action": action, "reward": out.reward,
                                         "alive": carry.active > 0}
        return EvalCarry(env_state, carry.episode_return + out.reward * carry.active,
                         carry.active * (1.0 - out.done)), (poses(env_state, carry.active), rollout)

    init = EvalCarry(env_reset(env, k_reset, 2 * n), jnp.zeros(2 * n), jnp.ones(2 * n))
    num_steps = args.episode_length // args.action_repeat
    final, (frames, rollout) = jax.lax.scan(step, init, jax.random.split(k_act, num_steps))
    returns = final.episode_return[:n], final.episode_return[n:]
    if not (record or dump):
        return returns
    extras = {} if not dump else {"rollout": rollout}
    if record:  # a frame for the reset state and one for each step the episode was still running
        start = poses(init.env_state, init.active)
        extras["poses"] = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), start, frames)
    return returns, extras


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
LOSS_NAMES = ("total_loss", "policy_loss", "v_loss", "entropy_loss", "entropy", "approx_kl", "clipfrac")


def train(args: Args) -> list[Path]:
    """Train args.num_seeds seeds as one batch laid over every device, and write one run folder per seed (with
    several processes, each writes its own seeds' folders); returns the folders of the whole batch.

    With --resume, continue the batch of the given run folder from its newest checkpoint, in the same folders. With
    --dry-run, print the resolved config of the first run (its args.json without the metadata) as one JSON object
    and return []."""
    if args.distributed:
        start_distributed()  # before anything asks JAX for its devices
    args = continuation_config(args) if args.init_from is not None else args
    args, dirs = resume_config(args) if args.resume is not None else (args, None)
    if args.capture_video and sys.platform == "linux":  # before MuJoCo is imported: it picks its backend then
        os.environ.setdefault("MUJOCO_GL", "egl")  # Mesa's EGL renders without a display, on CPU-only machines too
    args, env = setup(args)
    dirs = dirs or new_run_dirs(args)
    if args.dry_run:
        print(json.dumps(run_config(args, 0), indent=2))
        return []
    start, mesh = time.time(), seed_mesh(args.num_seeds)
    runs = SeedRuns(args, mesh, dirs)
    carry, loop = runs.start(env)
    print(run_summary(args, mesh), flush=True)
    ts = carry.pop("ts")  # carry keeps the two keys
    iteration_fn = over_seeds(functools.partial(training_iteration, env, args), mesh, donate=True)
    iteration_fn = iteration_fn.lower(ts).compile()
    reset_fn = over_seeds(functools.partial(reset_training_envs, env, args), mesh)
    evaluate_fn = evaluation_programs(env, args, mesh)
    videos = Videos.open(env, args) if args.capture_video else None
    print(f"compiled the training iteration in {time.time() - start:.1f} s", flush=True)

    def run_eval(step: int, iteration: int):
        record = videos is not None and args.eval_steps.index(step) % args.video_every == 0
        returns = evaluate_fn[record](ts.params, ts.normalizer, carry["k_eval"], iteration)
        returns, extras = returns if record else (returns, None)
        means = {i: tuple(float(np.mean(r)) for r in modes) for i, modes in local_seed_rows(returns).items()}
        runs.log_eval(step, progress.wall_time(), means)
        if extras is not None:  # drawn here, outside the jitted programs
            for i, seed_poses in local_seed_rows(extras["poses"]).items():
                videos.write(runs.dirs[i] / "videos", step, seed_poses, modes=("deterministic",))

    first, progress, stop, stopped = loop["iteration"] + 1, Progress(args, loop), StopSignal(), False
    try:
        if first == 1 and 0 in args.eval_steps:
            run_eval(0, 0)
        for iteration in range(first, args.num_iterations + 1):
            tick = time.time()
            ts, metrics = iteration_fn(ts)
            metrics = local_seed_rows(metrics)  # waits for the iteration
            progress.add(time.time() - tick)
            if args.num_resets_per_eval > 0 and iteration % args.iterations_per_epoch == 0:
                env_state, carry["k_env"] = reset_fn(carry["k_env"])
                ts = ts.replace(env_state=env_state)
            step = iteration * args.steps_per_iteration
            for i, seed_metrics in metrics.items():
                check_warp_flags(seed_metrics, step, args, i, progress.warned)
            runs.log_iteration(step, metrics, progress.sps(step))
            if evaluated := step in args.eval_steps:
                run_eval(step, iteration)
            if line := progress.line(step, iteration, metrics, evaluated):
                print(line, flush=True)
            if checkpoint_due(args, step) or stop.signum is not None:
                loop = dict(iteration=iteration, train_time=progress.train_time, wall_time=progress.wall_time())
                print(runs.save(step, dict(carry, ts=ts), loop), flush=True)
            if stop.signum is not None and iteration < args.num_iterations:  # (in the last one: the run ends)
                stopped = True
                break
    finally:
        stop.restore()
        runs.close()
    if stopped:
        print(f"stopped at step {step}; resume with: python {Path(__file__).name} --resume {runs.dirs[runs.local[0]]}",
              flush=True)
        raise Preempted(stop.signum)
    print(f"done in {time.time() - start:.1f} s; runs: {', '.join(str(runs.dirs[i]) for i in runs.local)}")
    return runs.dirs


def evaluation_programs(env, args: Args, mesh, dump: bool = False) -> dict:
    """record -> the jitted evaluation over seeds, (params, normalizer, eval key, iteration) -> per-episode returns
    (and with record or dump the extras of `evaluate`). The key depends only on the iteration: evaluations are the
    same however often the run was resumed, and --evaluate gives them again. Each compiles at its first call."""
    return {record: over_seeds(lambda params, normalizer, key, iteration, record=record: evaluate(
        env, args, params, normalizer, jax.random.fold_in(key, iteration), record, dump), mesh,
        in_axes=(0, 0, 0, None)) for record in (False, True)}


def run_summary(args: Args, mesh) -> str:
    """The run's first line: env, backend, the rounded schedule, the seeds' layout."""
    return (f"{args.env_id} ({backend(args)}): {args.num_iterations} iterations x {args.steps_per_iteration:,} env "
            f"steps = {args.total_steps_resolved:,} env steps (requested {args.total_steps:,}; --step-rounding "
            f"{args.step_rounding}); {len(args.eval_steps)} evaluations; hard reset every "
            f"{args.iterations_per_epoch} iteration(s)" + ("" if args.num_resets_per_eval > 0 else " disabled") +
            f"; {seeds_on_devices(args, mesh)}")


class Progress:
    """Wall time (eval.csv's, continued across resumes), training time (the compiled iterations only, so SPS
    excludes compilation and evaluation), and one progress line at most every 5 s and at each evaluation."""

    def __init__(self, args: Args, loop: dict):
        self.args, self.first = args, loop["iteration"] + 1
        self.start_time, self.loop_start = time.time() - loop["wall_time"], time.time()
        self.train_time, self.last_line = loop["train_time"], -math.inf
        self.warned = set()  # warnings printed once per run

    def wall_time(self) -> float:
        return time.time() - self.start_time

    def add(self, seconds: float):
        self.train_time += seconds

    def sps(self, step: int) -> float:
        return step / max(self.train_time, 1e-9)  # per seed

    def line(self, step: int, iteration: int, metrics: dict, evaluated: bool) -> Optional[str]:
        if not evaluated and time.time() - self.last_line <= 5.0:
            return None
        self.last_line = time.time()
        iterations_done, sps = iteration - self.first + 1, self.sps(step)
        eta = (time.time() - self.loop_start) / iterations_done * (self.args.num_iterations - iteration)
        v_loss = np.mean([m["v_loss"] for m in metrics.values()])
        return (f"step {step:,}/{self.args.total_steps_resolved:,} | SPS {sps:,.0f} per seed "
                f"({sps * self.args.num_seeds:,.0f} total) | v_loss {v_loss:.3f} | ETA {eta:.0f} s")


# ---------------------------------------------------------------------------------------------------------------
# Seeds as a batch axis: one jitted program over a leading seed axis, laid over every device (and every host)
# ---------------------------------------------------------------------------------------------------------------
def start_distributed():
    try:
        jax.distributed.initialize()  # coordinator, process count and id from JAX's environment variables
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--distributed: could not reach a coordinator ({first_line(e)}); set "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM / "
                        "Open MPI") from None


def seed_mesh(num_seeds: int):
    """A 1-D device mesh with axis "seed": every device (of every host) gets num_seeds / devices seeds. One seed
    cannot be split, so it runs on the first device."""
    devices = jax.devices()
    if num_seeds == 1:
        devices = devices[:1]
    elif num_seeds % len(devices):
        nearest = max(len(devices), round(num_seeds / len(devices)) * len(devices))
        raise UserError(f"--num-seeds {num_seeds} is not a multiple of the {len(devices)} devices; the nearest that "
                        f"is: {nearest}")
    return jax.sharding.Mesh(np.array(devices), ("seed",))


def seed_sharding(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


def seed_sharded(mesh, host_array: np.ndarray) -> jax.Array:
    """A host array with a leading seed axis, laid over the mesh (each process passes the whole array)."""
    return jax.make_array_from_callback(host_array.shape, seed_sharding(mesh), lambda index: host_array[index])


def local_seeds(num_seeds: int, mesh) -> list[int]:
    """Indices of the seeds that this process's devices hold."""
    held = seed_sharding(mesh).addressable_devices_indices_map((num_seeds,)).values()
    return sorted({i for index in held for i in range(num_seeds)[index[0]]})


def seeds_on_devices(args: Args, mesh) -> str:
    per_device = args.num_seeds // mesh.size
    hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    return f"{args.num_seeds} seed{'s' if args.num_seeds > 1 else ''}, {per_device} per device on {mesh.size} " \
           f"device{'s' if mesh.size > 1 else ''}{hosts}"


def over_seeds(fn, mesh, in_axes=0, donate: bool = False):
    """jit(fn) over a leading seed axis of the arguments whose in_axes is 0 (None: shared by all seeds), sharded over
    the mesh so that each device runs its own seeds with no communication. A device with several seeds vmaps `fn`;
    a device with one runs `fn` itself, the program of a solo run (XLA rounds the two differently; docs/ppo.md,
    "Seeds over devices and hosts")."""
    P = jax.sharding.PartitionSpec

    def local(*xs):  # this device's seeds
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(xs)
        seeds = {jax.tree.leaves(x)[0].shape[0] for x, a in zip(xs, axes, strict=True) if a == 0}
        if seeds == {1}:
            squeezed = [x if a is None else jax.tree.map(lambda y: y[0], x) for x, a in zip(xs, axes, strict=True)]
            return jax.tree.map(lambda y: y[None], fn(*squeezed))
        # warp's shared leaves (contact pool) get no seed axis inside vmap; outside, every leaf has one
        (num,) = seeds
        xs = [x if a is None else tree_map_shared(lambda y: y[0], x) for x, a in zip(xs, axes, strict=True)]
        return tree_map_shared(lambda y: jnp.broadcast_to(y, (num, *y.shape)), jax.vmap(fn, in_axes=axes)(*xs))

    in_specs = tuple(P() if a is None else P("seed") for a in in_axes) if isinstance(in_axes, tuple) else P("seed")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P("seed"), check_vma=False)
    return jax.jit(sharded, donate_argnums=0 if donate else ())


def tree_map_shared(fn, tree):
    """`fn` applied to the leaves of warp's Data that all envs of a batch share (its contact pool and counters, which
    vmap passes through unbatched); the other leaves unchanged."""
    from mujoco.mjx.warp.types import DATA_NON_VMAP

    def leaf(path, x):
        names = [getattr(key, "name", None) for key in path]
        return fn(x) if names[-2:-1] == ["_impl"] and names[-1] in DATA_NON_VMAP else x

    return jax.tree_util.tree_map_with_path(leaf, tree)


def local_seed_rows(tree) -> dict:
    """Seed index -> that seed's slice of a seed-sharded pytree, copied to host memory (numpy), for the seeds whose
    devices this process holds."""
    leaves, treedef = jax.tree.flatten(tree)
    rows = {}
    for n, leaf in enumerate(leaves):
        for shard in leaf.addressable_shards:
            first, data = shard.index[0].start or 0, np.array(shard.data)  # a copy: the buffer may be donated
            for j in range(data.shape[0]):
                rows.setdefault(first + j, [None] * len(leaves))[n] = data[j]
    # JAX replicates zero-size arrays over the devices: those give rows of every seed, which only they fill.
    return {i: jax.tree.unflatten(treedef, row) for i, row in sorted(rows.items()) if not any(x is None for x in row)}


# ---------------------------------------------------------------------------------------------------------------
# Videos: recorded evaluation episodes, drawn after the jitted evaluation
# ---------------------------------------------------------------------------------------------------------------
class Videos:
    """Evaluation episodes drawn from their recorded poses with MuJoCo's offscreen renderer (as Playground's
    env.render does, without its progress bar) and written as mp4 with mediapy, at the agent's control rate."""

    def __init__(self, mj_model, renderer, fps: float):
        import mujoco

        self.mujoco, self.model, self.renderer, self.fps = mujoco, mj_model, renderer, fps
        self.data = mujoco.MjData(mj_model)

    @classmethod
    def open(cls, env, args: Args) -> Optional["Videos"]:
        """None, after one warning line, when no OpenGL backend works: training goes on without video."""
        try:
            import mujoco

            renderer = mujoco.Renderer(env.mj_model, height=args.video_height, width=args.video_width)
        except Exception as e:  # noqa: BLE001 (a missing GL library raises anything from ImportError to RuntimeError)
            print(f"warning: --capture-video: no OpenGL backend works (MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                  f"{first_line(e)}); training goes on without video", flush=True)
            return None
        import imageio_ffmpeg
        import mediapy

        if shutil.which("ffmpeg") is None:
            mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())  # the ffmpeg binary that comes with the package
        return cls(env.mj_model, renderer, fps=1 / (env.dt * args.action_repeat))  # env.dt: one env step

    def frames(self, poses: dict, column: int) -> list[np.ndarray]:
        frames = []
        for t in range(len(poses["alive"])):
            if not poses["alive"][t, column]:
                break  # the episode ended at the previous frame
            for name in RENDER_FIELDS:
                getattr(self.data, name)[:] = poses[name][t, column]
            self.mujoco.mj_forward(self.model, self.data)
            self.renderer.update_scene(self.data, camera=-1)
            frames.append(self.renderer.render())
        return frames

    def write(self, folder: Path, step: int, poses: dict, modes=("stochastic", "deterministic")):
        """One mp4 per recorded episode of `modes`: the columns of `poses` are the stochastic episodes, then as many
        deterministic ones."""
        import mediapy

        folder.mkdir(exist_ok=True)
        per_mode = poses["alive"].shape[1] // 2
        for column in range(2 * per_mode):
            mode, episode = ["stochastic", "deterministic"][column // per_mode], column % per_mode
            if mode not in modes:
                continue
            path = folder / (f"{mode}_step{step}.mp4" if episode == 0 else f"{mode}_step{step}_episode{episode}.mp4")
            tmp = path.with_name(f"{path.stem}.tmp.mp4")  # ffmpeg picks the format from the suffix
            mediapy.write_video(tmp, self.frames(poses, column), fps=self.fps)
            os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Run folder helpers
# ---------------------------------------------------------------------------------------------------------------
def run_config(args: Args, seed_index: int) -> dict:
    """The resolved config of run `seed_index` (its seed is seed + seed_index): its args.json without the metadata,
    and for run 0 what --dry-run prints."""
    config = dataclasses.asdict(args)
    for name in ("dry_run", "resume", "init_from", "distributed", "evaluate", "evaluate_step"):  # how it is started
        del config[name]
    return config | dict(seed=args.seed + seed_index, seed_index=seed_index)


def run_metadata() -> dict:
    """Package versions, git commit and command line, stored under "metadata" in args.json."""
    versions = {}
    for name in ["jax", "jaxlib", "flax", "optax", "mujoco", "mujoco-mjx", "playground", "brax", "numpy", "tyro"]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"script": Path(__file__).name, "versions": versions, "git_commit": commit, "command": " ".join(sys.argv)}


def start_tracking(args: Args, run_dir: Path, config: dict):
    """A Weights & Biases run for one seed's folder, named like it. Scalars are logged to it directly rather than
    synced from the event files (CleanRL's sync_tensorboard), which follows one writer per process, not one per seed."""
    try:
        import wandb
    except ImportError:
        raise UserError('--track needs Weights & Biases: pip install -e ".[track]"') from None
    return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name, config=config,
                      dir=str(run_dir), reinit="create_new", save_code=True)


def new_run_dirs(args: Args) -> list[Path]:
    """The folders of a new batch; refused if one already holds a run's checkpoints."""
    seeds = [args.seed + i for i in range(args.num_seeds)]
    if args.run_dir is not None:
        dirs = [Path(args.run_dir)] if args.num_seeds == 1 else [Path(f"{args.run_dir}__{s}") for s in seeds]
        if used := [str(d) for d in dirs if (d / "checkpoints").exists()]:
            raise UserError(f"{used[0]} already holds a run's checkpoints; continue it with --resume, or choose "
                            "another --run-dir")
        return dirs
    stamp = int(time.time())
    if jax.process_count() > 1:  # every host names the folders alike
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return [Path("runs") / f"{args.env_id}__{args.exp_name}__{s}__{stamp}" for s in seeds]


# Flags that may differ from the run's args.json when resuming; every other one would change the run.
RESUME_FLAGS = {"resume", "total_steps", "checkpoint_every", "keep_checkpoints", "keep_every", "save_model", "dry_run",
                "distributed", "track", "wandb_project_name", "wandb_entity"}


def given_flags(cli: Args) -> set[str]:
    """The Args fields a run was given: those named on the command line, even when set to their default value
    (`--eval-episodes 10` for a run that evaluated 4 episodes), and those whose value differs from the default (how
    a caller in Python gives them)."""
    fields = {f.name for f in dataclasses.fields(Args)}
    named = {token[2:].partition("=")[0].replace("-", "_") for token in sys.argv[1:] if token.startswith("--")}
    named |= {name.removeprefix("no_") for name in named}  # a boolean's --no-flag names the flag
    default = Args()
    return (named & fields) | {name for name in fields if getattr(cli, name) != getattr(default, name)}


def resume_config(cli: Args) -> tuple[Args, list[Path]]:
    """The config of the run in folder cli.resume, with the flags of RESUME_FLAGS that the command line sets, and
    the run folders of its batch. Reads only; raises UserError when the folder cannot be resumed with these flags.

    Raising --total-steps extends the run with more evaluation blocks of the same length (num_evals grows), so the
    hard-reset period and the spacing of evaluations stay those of the run (docs/ppo.md, "Resume and preemption")."""
    script, run_dir = Path(__file__).name, Path(cli.resume)
    if not (run_dir / "args.json").is_file():
        raise UserError(f"--resume: {run_dir} is not a run folder (no args.json)" if run_dir.is_dir()
                        else f"--resume: no folder {run_dir}")
    saved = json.loads((run_dir / "args.json").read_text())
    saved.pop("init_from", None)  # a continuation's record of its start (SeedRuns.open keeps it)
    other = saved.pop("metadata", {}).get("script", script)
    names, seed_index = saved.pop("batch_run_dirs", None), saved.pop("seed_index", 0)
    fields = {f.name for f in dataclasses.fields(Args)}
    if other != script or set(saved) - fields:
        raise UserError(f"--resume: {run_dir} is a run folder of {other if other != script else 'another script'}, "
                        f"not of {script}")
    given = given_flags(cli)
    for name in sorted((fields - RESUME_FLAGS) & given):
        new, old = json.loads(json.dumps(getattr(cli, name))), saved.get(name)  # tuples as lists, as in args.json
        if new != old:
            new, old = (" ".join(map(str, v)) if isinstance(v, list) else v for v in (new, old))  # as typed
            raise UserError(f"--resume: --{name.replace('_', '-')} {new} differs from the run's {old}; only "
                            "--total-steps, --checkpoint-every, --keep-checkpoints may change when resuming")
    args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    args.seed -= seed_index  # the batch's first seed
    args.save_model |= cli.save_model
    args.resume, args.dry_run, args.distributed = cli.resume, cli.dry_run, cli.distributed
    for name in ("track", "wandb_project_name", "wandb_entity", "checkpoint_every", "keep_checkpoints", "keep_every"):
        if name in given:  # as given now, else as the run had them
            setattr(args, name, getattr(cli, name))
    if cli.total_steps is not None and cli.total_steps != args.total_steps:
        args.total_steps = cli.total_steps
        if args.num_evals > 1:  # whole blocks of the run's length: K and the evaluation spacing stay
            block = args.total_steps_resolved // (args.num_evals - 1)
            num_evals = 1 + math.ceil(args.total_steps / block)
            print(f"--total-steps {args.total_steps:,}: --num-evals {args.num_evals} -> {num_evals} keeps the "
                  f"{block:,} env steps between evaluations", flush=True)
            args.num_evals = num_evals

    names = names or [run_dir.name]
    if run_dir.name not in names:
        raise UserError(f"--resume: {run_dir}'s args.json names the batch's folders {', '.join(names)}, not it")
    dirs = [run_dir.parent / name for name in names]
    for d in dirs:
        if not any(p.name.isdigit() for p in (d / "checkpoints").glob("*")):
            raise UserError(f"--resume: {d} has no checkpoints")
    return args, dirs


# Flags the stored state was made with: its arrays' shapes and structure, or the simulation it steps.
STATE_FLAGS = ("env_id", "impl", "num_envs", "policy_hidden_sizes", "value_hidden_sizes", "naconmax", "njmax")
# Derived from the flags (not flags themselves), and how a run is started: left out of init_from's "changed".
NOT_FLAGS = ("observation_size", "action_size", "steps_per_iteration", "iterations_per_epoch", "num_iterations",
             "total_steps_resolved", "eval_steps", "init_from", "run_dir", "resume", "dry_run", "distributed",
             "evaluate", "evaluate_step", "num_seeds")


def continuation_config(cli: Args) -> Args:
    """--init-from RUN_DIR[:STEP]: the source folder's config, as it ran, with the flags given now; those that the
    stored state cannot take are refused. The continuation trains one seed, the source folder's, from the step it
    names (`init_from` holds it from here on, also when STEP was left to the newest checkpoint)."""
    if cli.resume is not None:
        raise UserError("--init-from starts a new run from a checkpoint, --resume continues a run: give one of them")
    source, step = init_from_source(cli.init_from)
    config = saved_config(source, "--init-from")
    step = complete_checkpoint(source, step, "--init-from")
    config = dataclasses.replace(config, num_seeds=1, run_dir=None, evaluate=None, evaluate_step=None)
    given = given_flags(cli)
    if cli.num_seeds != 1:
        raise UserError("--init-from continues one seed, the source folder's: --num-seeds must be 1")
    for name in sorted(given):
        before, after = getattr(config, name), getattr(cli, name)
        # a clipping threshold may change, but clipping on or off changes the optimiser state's structure
        clipping = name == "max_grad_norm" and (before is None) != (after is None)
        if name in STATE_FLAGS and after != before or clipping:
            before, after = (" ".join(map(str, v)) if isinstance(v, tuple) else v for v in (before, after))  # as typed
            raise UserError(f"--init-from: --{name.replace('_', '-')} {after} differs from the source run's "
                            f"{before}, and the checkpoint's state was made with it")
    return dataclasses.replace(config, **{name: getattr(cli, name) for name in given - {"init_from"}},
                               init_from=f"{source}:{step}")


def init_from_source(value: str) -> tuple[Path, Optional[int]]:
    """RUN_DIR[:STEP] -> (folder, step or None for the newest checkpoint)."""
    folder, _, step = value.rpartition(":")
    return (Path(folder), int(step)) if folder and step.isdigit() else (Path(value), None)


def continuation_record(args: Args, source: Path, step: int) -> dict:
    """args.json's init_from: the source folder, its step, and every flag whose value differs from the source run's
    (before/after, as in args.json), so that a continuation is never mistaken for a run from scratch."""
    config = saved_config(source, "--init-from")

    def as_json(value):  # tuples as lists, as args.json holds them
        return json.loads(json.dumps(value))

    changed = {f.name: {"before": as_json(getattr(config, f.name)), "after": as_json(getattr(args, f.name))}
               for f in dataclasses.fields(Args)
               if f.name not in NOT_FLAGS and as_json(getattr(config, f.name)) != as_json(getattr(args, f.name))}
    return {"run_dir": str(source), "step": step, "changed": changed}


def checkpoint_due(args: Args, step: int) -> bool:
    """Whether the iteration that ends at `step` writes a checkpoint: at every evaluation by default, at the first
    iteration at or past each multiple of --checkpoint-every, and at the end (with 0: only with --save-model)."""
    every = args.checkpoint_every
    if step == args.total_steps_resolved:
        return every != 0 or args.save_model
    if every is None:
        return step in args.eval_steps
    return every > 0 and step // every > (step - args.steps_per_iteration) // every


class SeedRuns:
    """The run folders of a batch of seeds, one per seed as if it had run alone (args.json with its own seed,
    eval.csv, TensorBoard events, checkpoints). A process writes only the folders of the seeds its devices hold."""

    def __init__(self, args: Args, mesh, dirs: list[Path]):
        self.args, self.mesh, self.dirs = args, mesh, dirs
        self.local = local_seeds(args.num_seeds, mesh)
        self.writers, self.eval_logs, self.tracked, self.managers = {}, {}, {}, {}
        self.init_from = None  # a continuation's record of where it started (args.json's init_from)

    def start(self, env) -> tuple[dict, dict]:
        """(carry, loop counters) of a new run, or of the newest step that every seed of a resumed batch restores
        (read before anything is written: a refused resume leaves the folders as they were); then opens the logs."""
        args = self.args
        if args.init_from is not None:
            return self.continue_from(env)
        if args.resume is None:
            keys = seed_sharded(self.mesh, np.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)]))
            self.open(resume_step=None)
            return over_seeds(functools.partial(init_carry, env, args), self.mesh)(keys), dict(
                iteration=0, train_time=0.0, wall_time=0.0)
        step, stored, loop = restore_batch(env, args, [self.dirs[i] for i in self.local])
        if step > args.total_steps_resolved:
            raise UserError(f"--resume: the run is at step {step}, past --total-steps {args.total_steps} "
                            f"({args.total_steps_resolved} with rounding)")
        carry = jax.tree.map(functools.partial(jax.make_array_from_process_local_data, seed_sharding(self.mesh)),
                             stored)
        # Through the sharded program, so that its arrays are laid out as the training programs' outputs are (JAX
        # replicates zero-size ones), and the iteration compiled for them accepts what it returns.
        carry = over_seeds(lambda c: c, self.mesh)(carry)
        print(f"resumed from step {step}", flush=True)
        self.open(resume_step=step)
        return carry, loop

    def continue_from(self, env) -> tuple[dict, dict]:
        """--init-from: (carry, loop counters) of the source checkpoint's seed, its steps going on from there."""
        source, step = init_from_source(self.args.init_from)
        step, stored, loop = stored_checkpoint(env, self.args, source, step, "--init-from")
        if step >= self.args.total_steps_resolved:
            raise UserError(f"--init-from: that checkpoint is at step {step:,}; pass a --total-steps past it")
        if step % self.args.steps_per_iteration:
            raise UserError(f"--init-from: step {step:,} is not a whole number of iterations of "
                            f"{self.args.steps_per_iteration:,} env steps; change --batch-size, --num-minibatches, "
                            "--unroll-length or --action-repeat so that it is")
        stored = jax.tree.map(lambda x: x[None], stored)  # the one seed of the new batch
        carry = jax.tree.map(functools.partial(jax.make_array_from_process_local_data, seed_sharding(self.mesh)),
                             stored)
        carry = over_seeds(lambda c: c, self.mesh)(carry)  # laid out as the training programs' outputs (see start)
        self.init_from = continuation_record(self.args, source, step)
        changed = ", ".join(f"{name} {c['before']} -> {c['after']}" for name, c in self.init_from["changed"].items())
        print(f"continued from {source} at step {step:,} ({changed or 'no flag changed'})", flush=True)
        self.open(resume_step=None)
        return carry, dict(loop, iteration=step // self.args.steps_per_iteration)

    def open(self, resume_step: Optional[int]):
        import orbax.checkpoint as ocp  # imported here: importing this file stays cheap
        from tensorboardX import SummaryWriter

        # Orbax writes each step to a temporary folder and renames it when complete; synchronously, as PPO's state
        # is small. keep_period: the multiples of --keep-every stay besides the newest --keep-checkpoints.
        options = ocp.CheckpointManagerOptions(max_to_keep=self.args.keep_checkpoints, enable_async_checkpointing=False,
                                               keep_period=self.args.keep_every or None)
        meta = run_metadata()
        for i in self.local:
            run_dir, config = self.dirs[i], run_config(self.args, i)
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {**config, "batch_run_dirs": [d.name for d in self.dirs], "metadata": meta}
            if resume_step is not None and self.init_from is None:  # a resumed continuation keeps its record
                self.init_from = json.loads((run_dir / "args.json").read_text()).get("init_from")
            if self.init_from is not None:
                record["init_from"] = self.init_from
            atomic_write(run_dir / "args.json", json.dumps(record, indent=2).encode())
            # TensorBoard drops the events after the checkpoint step, which the resumed run writes again.
            self.writers[i] = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
            self.writers[i].add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in config.items()))
            if self.args.track:
                self.tracked[i] = start_tracking(self.args, run_dir, config)
            self.eval_logs[i] = EvalLog(run_dir / "eval.csv", ["step", "wall_time", "return", "return_deterministic"],
                                        resume_step)
            self.managers[i] = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)

    def scalars(self, i: int, step: int, values: dict):
        """Seed i's scalars at `step`, to TensorBoard (and to Weights & Biases with --track)."""
        for name, value in values.items():
            self.writers[i].add_scalar(name, value, step)
        if i in self.tracked:
            self.tracked[i].log(values, step=step)

    def log_iteration(self, step: int, metrics: dict, sps: float):
        for i, seed_metrics in metrics.items():
            values = {"charts/SPS": sps, **{f"losses/{name}": float(seed_metrics[name]) for name in LOSS_NAMES}}
            if "warp_unconverged" in seed_metrics:
                values["charts/warp_unconverged"] = float(seed_metrics["warp_unconverged"])
            if seed_metrics["episodes"] > 0:
                values["charts/episodic_return"] = float(seed_metrics["episodic_return"])
            self.scalars(i, step, values)

    def log_eval(self, step: int, wall_time: float, returns: dict):
        """`returns`: seed index -> (stochastic, deterministic) mean return."""
        for i, (ret, ret_det) in returns.items():
            self.eval_logs[i].write(step, round(wall_time, 2), float(ret), float(ret_det))
            self.scalars(i, step, {"eval/return": float(ret), "eval/return_deterministic": float(ret_det)})
        ret, ret_det = (np.array([r[k] for r in returns.values()]) for k in (0, 1))
        print(f"eval step={step:,} return={np.array2string(ret, precision=1)} "
              f"deterministic={np.array2string(ret_det, precision=1)}", flush=True)

    def save(self, step: int, carry: dict, loop: dict) -> str:
        """Seed i's slice of the seed-sharded carry goes to folder i (each folder is self-contained), with the loop
        counters. A failed write (most often: the disk is full) stops the run in one line."""
        import orbax.checkpoint as ocp

        tick = time.time()
        for writer in self.writers.values():  # every event up to this step is on disk before the checkpoint says so
            writer.flush()
        for i, seed_carry in local_seed_rows(carry).items():  # host copies: the device carry is donated next iteration
            state = without_empty_arrays(seed_carry)
            try:
                self.managers[i].save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                    loop=ocp.args.JsonSave(loop)))
            except Exception as e:  # noqa: BLE001 (orbax raises whatever the writer raised)
                raise checkpoint_not_written(self.managers[i], step, state, e) from None
        size = sum(f.stat().st_size for m in self.managers.values()
                   for f in (Path(m.directory) / str(step)).rglob("*") if f.is_file())
        return f"checkpoint step {step}: {size / 1e6:.1f} MB in {time.time() - tick:.2f} s"

    def close(self):
        for i in self.local:
            for closeable in (self.writers.get(i), self.eval_logs.get(i), self.managers.get(i)):
                if closeable is not None:
                    closeable.close()
        for run in self.tracked.values():
            run.finish()


def checkpoint_not_written(manager, step: int, state, error: Exception) -> UserError:
    """The one line that stops a run whose checkpoint write failed: the disk, the step, the space it needed, the
    newest intact checkpoint."""
    manager.reload()
    intact = [s for s in manager.all_steps() if s != step]
    newest = f"step {max(intact)}" if intact else "none"
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    folder = Path(manager.directory)
    free = shutil.disk_usage(folder).free
    return UserError(f"checkpoint step {step} could not be written to {folder} ({first_line(error)}): it needs about "
                     f"{size / 1e6:.1f} MB, that disk has {free / 1e6:.1f} MB free; newest intact checkpoint: "
                     f"{newest}; stopping (free space, then --resume {folder.parent})")


def restore_batch(env, args: Args, dirs: list[Path]) -> tuple[int, dict, dict]:
    """(step, numpy carry stacked over the seeds of `dirs`, loop state) of the newest checkpoint step that every
    folder of the batch restores (`dirs`: this process's folders; with several processes, the oldest of their
    steps). Newer steps that fail in any folder (truncated, corrupt, missing) are moved to checkpoints_damaged/ in
    all of them, with one warning line each; with several processes, steps newer than another process's are
    deleted."""
    import orbax.checkpoint as ocp

    # The restore target is the structure the init function builds (PRNG keys here are raw uint32 arrays).
    target = jax.eval_shape(functools.partial(init_carry, env, args), jax.random.PRNGKey(0))
    restore_args = ocp.args.Composite(state=ocp.args.StandardRestore(without_empty_arrays(target)),
                                      loop=ocp.args.JsonRestore())
    steps = sorted({int(p.name) for d in dirs for p in (d / "checkpoints").glob("*") if p.name.isdigit()})
    step, restored = restorable_step(dirs, steps, restore_args)
    if jax.process_count() > 1:  # every process must continue from one step
        from jax.experimental import multihost_utils

        oldest = int(np.min(multihost_utils.process_allgather(np.int64(step))))
        if oldest < step:
            restored = [ocp.CheckpointManager((d / "checkpoints").absolute()).restore(oldest, args=restore_args)
                        for d in dirs]
            for later in [s for s in steps if oldest < s]:
                for d in dirs:
                    shutil.rmtree(d / "checkpoints" / str(later), ignore_errors=True)
            step = oldest
    states = [jax.tree.map(lambda t, x: np.zeros(t.shape, t.dtype) if x is None else x, target, r.state)
              for r in restored]
    # Orbax checks the tree structure but returns arrays in their saved shapes (and casts dtypes): check the shapes.
    for (path, t), x in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(states[0]), strict=True):
        if t.shape != x.shape:
            raise UserError(f"--resume: checkpoint step {step} does not fit the run's config: "
                            f"{jax.tree_util.keystr(path)} has shape {x.shape}, the config gives {t.shape}")
    return step, jax.tree.map(lambda *xs: np.stack(xs), *states), restored[0].loop


def restorable_step(dirs: list[Path], steps: list[int], restore_args) -> tuple[int, list]:
    """(step, what each folder restored) of the newest of `steps` that every folder restores; the newer ones are
    moved aside as damaged."""
    import orbax.checkpoint as ocp

    failed = []
    for step in reversed(steps):
        try:
            restored = [ocp.CheckpointManager((d / "checkpoints").absolute()).restore(step, args=restore_args)
                        for d in dirs]
            break
        except Exception as e:  # whatever orbax or the file system raises, the step is unusable
            failed.append((step, first_line(e)))
    else:  # none restores: rather a config that does not fit them than all damaged, so nothing is moved
        raise UserError(f"--resume: no checkpoint in {dirs[0] / 'checkpoints'} can be restored (step {failed[0][0]}: "
                        f"{failed[0][1]})")
    for bad, reason in failed:
        print(f"warning: checkpoint step {bad} is damaged ({reason}); moved to checkpoints_damaged/, using the "
              "previous one", file=sys.stderr, flush=True)
        for d in dirs:
            if (d / "checkpoints" / str(bad)).exists():
                (d / "checkpoints_damaged").mkdir(exist_ok=True)
                os.replace(d / "checkpoints" / str(bad), d / "checkpoints_damaged" / str(bad))
    return step, restored


def without_empty_arrays(tree):
    """Orbax refuses zero-size arrays (MJX data has some, e.g. `act` of a model without activations); they hold
    no data, so they are stored as None and rebuilt from the restore target's shape."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


# ---------------------------------------------------------------------------------------------------------------
# Trained agents: --evaluate RUN_DIR [--evaluate-step N], a checkpoint's policy evaluated as training evaluated it
# ---------------------------------------------------------------------------------------------------------------
EVALUATION_FLAGS = ("evaluate", "evaluate_step", "num_eval_envs", "dump_rollouts", "capture_video", "video_episodes",
                    "video_height", "video_width")


def evaluate_run(cli: Args) -> Path:
    """--evaluate RUN_DIR: the policy of one checkpoint, evaluated as the training loop evaluated it at that step
    (same program, same key: with the run's --num-eval-envs the means are that step's eval.csv row). Writes
    {run_dir}/evaluations/step{N}.json (videos/ with --capture-video, rollouts_step{N}.npz with --dump-rollouts)
    and nothing else."""
    run_dir = Path(cli.evaluate)
    config = saved_config(run_dir, "--evaluate")
    given = given_flags(cli)
    if refused := sorted(given - set(EVALUATION_FLAGS)):
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in EVALUATION_FLAGS[1:])
        raise UserError(f"--evaluate: --{refused[0].replace('_', '-')} is not an evaluation flag; with --evaluate "
                        f"only {allowed} may be given")
    changed = {name: getattr(cli, name) for name in given}
    if config.impl == "warp" and changed.get("num_eval_envs", config.num_eval_envs) != config.num_eval_envs:
        changed["naconmax"] = None  # sized again for the evaluation's env count
    # the saved run flags do not apply to an evaluation; a video only when asked for now
    run_flags = dict(resume=None, init_from=None, dry_run=False, distributed=False, track=False, capture_video=False)
    config = dataclasses.replace(config, **{**run_flags, **changed})
    if config.capture_video and sys.platform == "linux":  # before MuJoCo is imported: it picks its backend then
        os.environ.setdefault("MUJOCO_GL", "egl")
    args, env = setup(config)
    step, stored, loop = stored_checkpoint(env, args, run_dir, args.evaluate_step, "--evaluate")
    # The folder's seed, copied to the batch's seed count: the program is the training loop's (a device with several
    # seeds vmaps the evaluation, one with one does not, and XLA rounds the two differently).
    copies = args.num_seeds if args.num_seeds % jax.device_count() == 0 else 1
    mesh = seed_mesh(copies)
    params, normalizer, k_eval = (jax.tree.map(lambda x: seed_sharded(mesh, np.stack([x] * copies)), tree)
                                  for tree in (stored["ts"].params, stored["ts"].normalizer, stored["k_eval"]))
    evaluate_fn = evaluation_programs(env, args, mesh, dump=args.dump_rollouts)[args.capture_video]
    out = evaluate_fn(params, normalizer, k_eval, loop["iteration"])
    returns, extras = out if args.capture_video or args.dump_rollouts else (out, None)
    extras = None if extras is None else jax.device_get(local_seed_rows(extras)[0])
    per_episode = local_seed_rows(returns)[0]
    modes = {mode: episode_statistics(r) for mode, r in zip(("stochastic", "deterministic"), per_episode, strict=True)}
    for mode, stats in modes.items():
        interval = "-" if stats["ci95"] is None else "[{:.1f}, {:.1f}]".format(*stats["ci95"])
        print(f"{run_dir} step {step:,}: {mode} {stats['mean']:.1f} (std {stats['std']:.1f}, 95% CI {interval}, "
              f"{args.num_eval_envs} episodes)", flush=True)
    folder = run_dir / "evaluations"
    folder.mkdir(exist_ok=True)
    if args.capture_video and (videos := Videos.open(env, args)) is not None:
        videos.write(folder / "videos", step, extras["poses"])
    if args.dump_rollouts:
        path = folder / f"rollouts_step{step}.npz"
        write_npz(path, rollout_arrays(extras["rollout"], args.num_eval_envs))
        print(f"wrote {path}: per mode {args.num_eval_envs} episodes x {len(extras['rollout']['reward'])} steps of "
              f"{', '.join(extras['rollout'])}", flush=True)
    record = {"run_dir": str(run_dir), "step": step, "episodes": args.num_eval_envs, "modes": modes,
              "metadata": run_metadata()}
    atomic_write(folder / f"step{step}.json", json.dumps(record, indent=2).encode())
    print(f"wrote {folder / f'step{step}.json'}", flush=True)
    return folder / f"step{step}.json"


def rollout_arrays(rollout: dict, episodes: int) -> dict:
    """--dump-rollouts: the evaluation's per-step arrays, (T, 2 * episodes, ...), as "{mode}_{name}" arrays of
    (episodes, T, ...); `alive` marks the steps each episode was still running."""
    halves = {"stochastic": slice(None, episodes), "deterministic": slice(episodes, None)}
    return {f"{mode}_{name}": np.swapaxes(x[:, half], 0, 1) for mode, half in halves.items()
            for name, x in rollout.items()}


def saved_config(run_dir: Path, flag: str) -> Args:
    """The config in a run folder's args.json, with that folder's own seed."""
    script = Path(__file__).name
    if not (run_dir / "args.json").is_file():
        what = "no such folder" if not run_dir.is_dir() else "no args.json there"
        raise UserError(f"{flag} {run_dir}: {what} (expected a run folder of {script})")
    saved = json.loads((run_dir / "args.json").read_text())
    saved.pop("init_from", None)  # a continuation's record of its start, not a flag value
    known = {f.name for f in dataclasses.fields(Args)}
    batch = {"metadata", "batch_run_dirs", "seed_index"}
    if saved.get("metadata", {}).get("script", script) != script or not set(saved) - batch <= known:
        raise UserError(f"{flag} {run_dir}: that folder is a run of another script, not of {script}")
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


def read_only_checkpoints(run_dir: Path):
    """The run folder's checkpoints, opened to read: a training run may be writing that folder, so nothing there is
    created or cleaned up."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def stored_checkpoint(env, args: Args, run_dir: Path, step: Optional[int], flag: str) -> tuple[int, dict, dict]:
    """(step, numpy carry, loop) of a run folder's complete checkpoint at `step` (unset = the newest), read without
    changing anything there."""
    import orbax.checkpoint as ocp

    step = complete_checkpoint(run_dir, step, flag)
    manager = read_only_checkpoints(run_dir)
    target = jax.eval_shape(functools.partial(init_carry, env, args), jax.random.PRNGKey(0))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(without_empty_arrays(target)), loop=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (whatever a damaged file raises)
        raise UserError(f"{flag} {run_dir}: checkpoint step {step} cannot be read ({first_line(e)})") from None
    state = jax.tree.map(lambda t, x: np.zeros(t.shape, t.dtype) if x is None else x, target, restored.state)
    for (path, t), x in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(state), strict=True):
        if t.shape != x.shape:
            raise UserError(f"{flag} {run_dir}: checkpoint step {step} does not fit the run's config: "
                            f"{jax.tree_util.keystr(path)} has shape {x.shape}, the config gives {t.shape}")
    return step, state, restored.loop


def complete_checkpoint(run_dir: Path, step: Optional[int], flag: str) -> int:
    """`step` (unset: the newest) if the run folder holds a complete checkpoint there; else one line naming those it
    holds."""
    checkpoints = run_dir / "checkpoints"
    steps = list(read_only_checkpoints(run_dir).all_steps()) if checkpoints.is_dir() else []
    step = max(steps, default=None) if step is None else step
    if step not in steps:
        have = ", ".join(map(str, sorted(steps))) or "none (was it run with --checkpoint-every 0?)"
        raise UserError(f"{flag} {run_dir}: no checkpoint at step {step}; complete checkpoints: {have}")
    return step


def episode_statistics(returns: np.ndarray) -> dict:
    """Per-episode returns, their mean (as eval.csv's), sample std and Student-t 95% interval of the mean."""
    from scipy import stats

    returns, mean = np.asarray(returns), float(np.mean(returns))  # float32 as the training loop averages them
    std = float(np.std(returns.astype(np.float64), ddof=1)) if len(returns) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(returns) - 1)) * std / math.sqrt(len(returns)) if len(returns) > 1 else None
    return {"returns": returns.tolist(), "mean": mean, "std": std,
            "ci95": None if half is None else [mean - half, mean + half]}


class EvalLog:
    """eval.csv, appended and flushed row by row; a resumed run first drops the rows past its checkpoint (and a row
    cut short by a kill)."""

    def __init__(self, path: Path, columns: list[str], resume_step: Optional[int] = None):
        if resume_step is None:
            atomic_write(path, (",".join(columns) + "\n").encode())
        else:
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines[1:] if line.endswith("\n") and int(line.split(",")[0]) <= resume_step]
            atomic_write(path, "".join(lines[:1] + kept).encode())
        self.file = open(path, "a")

    def write(self, *values):
        self.file.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


class Preempted(Exception):
    """Raised after the checkpoint a SIGTERM or SIGINT asked for; exit code 0 for SIGTERM, 130 for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 0 if signum == signal.SIGTERM else 130


class StopSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) let the current iteration finish and the loop write a checkpoint; a
    second signal exits at once."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: finishing the current iteration, then checkpointing "
              "(send it again to exit at once)", flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def backend(args: Args) -> str:
    """'jax', or 'warp, naconmax 50000, njmax 50': the backend a run used, for its first printed line."""
    return args.impl if args.impl != "warp" else f"warp, naconmax {args.naconmax}, njmax {args.njmax}"


def check_warp_flags(metrics: dict, step: int, args: Args, seed_index: int, warned: set):
    """Stop at a warp capacity overflow (contacts or constraint rows were dropped: the physics is wrong from then on);
    say once that the solver hit its iteration limit (a step ends unconverged, as Playground's settings allow)."""
    if "warp_overflow" not in metrics:
        return
    seed = f" (seed {args.seed + seed_index})" if args.num_seeds > 1 else ""
    if bits := int(metrics["warp_overflow"]):
        what = (f"constraint rows (raise --njmax, now {args.njmax} per env)" if bits & 3 else
                f"contacts (raise --naconmax, now {args.naconmax} for all envs of a device)")
        raise UserError(f"warp overflow (flags {bits:#x}) in the iteration ending at env step {step}{seed}: the env "
                        f"batch ran out of room for {what}; stopping (checkpoints written so far are intact)")
    if "unconverged" not in warned and metrics["warp_unconverged"] > 0:
        warned.add("unconverged")
        print(f"note: warp's constraint solver hit its iteration limit in {float(metrics['warp_unconverged']):.1%} "
              f"of this iteration's agent steps{seed}; such steps end unconverged, as Playground's solver settings "
              "allow (logged as charts/warp_unconverged; docs/tdmpc2.md#mjx-backends-jax-and-warp)", flush=True)


def first_line(error: Exception) -> str:
    """An exception as one short line, for one-line warnings and errors."""
    text = str(error).strip()
    return text.splitlines()[0][:150] if text else type(error).__name__


def write_npz(path: Path, arrays: dict):
    data = io.BytesIO()
    np.savez_compressed(data, **arrays)
    atomic_write(path, data.getvalue())


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a killed run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def quiet_failed_checkpoint_writes():
    """A failed checkpoint write (a full disk) is reported by checkpoint_not_written in one line; without this,
    orbax also logs it with tracebacks from its threads, and its sibling writes then fail unretrieved or call back
    into orbax's closed event loop. Installed once, by the command line entry point."""
    logging.getLogger("absl").addFilter(lambda record: not (record.exc_info and "orbax" in record.pathname))
    unretrieved = "exception was never retrieved"
    logging.getLogger("asyncio").addFilter(lambda record: unretrieved not in record.getMessage())

    def without_closed_loop_errors(hook):
        def report(*details):  # excepthook gets (type, error, traceback), unraisablehook one record
            error = details[1] if len(details) == 3 else details[0].exc_value
            if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
                hook(*details)
        return report

    sys.excepthook, sys.unraisablehook = map(without_closed_loop_errors, (sys.excepthook, sys.unraisablehook))


if __name__ == "__main__":
    quiet_failed_checkpoint_writes()
    try:
        cli = tyro.cli(Args)
        evaluate_run(cli) if cli.evaluate is not None else train(cli)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the disk of the run folder filled up or went away while writing logs
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise
        print(f"error: {e.strerror} while writing {e.filename}; stopping (checkpoints written so far are intact)",
              file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        sys.exit(e.exit_code)
