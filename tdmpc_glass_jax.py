"""TD-MPC-Glass in JAX on MuJoCo Playground (MJX): TD-MPC2 plus Glass, one self-contained file.

TD-MPC2 exactly as in `tdmpc2_jax.py` (faithful to the official code by default), plus Glass: learnable
prototypes and a prototype-to-cluster assignment trained with the 2D structural entropy (Li & Pan, 2016) of the
prototype transition graph of the world model's latent rollouts, with balance and temporal terms, a warm-up / every-k /
off-step schedule gated inside jit, and cluster diagnostics at every evaluation. With every Glass weight 0 (or
`--glass-off-step 0`) a run is the TD-MPC2 run of the same seed; with `--glass-stopgrad-graph` (default) Glass trains
only its own parameters, so the agent stays the TD-MPC2 agent while the shared gradient clip does not bind.
Extras, off by default and not part of Glass: latent action smoothing in the policy loss and an eval-time
planner/actor arbitration column, two experiments of the predecessor code (helios-rl).
Every formula, the recipes of the predecessor runs and the logged metrics: docs/glass.md.
"""

import dataclasses
import errno
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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from importlib import metadata
from pathlib import Path
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


@dataclass
class Args:
    """The whole configuration: the training fields, then the run flags. Fields left unset are filled in at run time
    by `resolve_args`, right after the env loads; `args.json` and `--dry-run` show the resolved values."""

    env_id: str = "HopperHop"
    """MuJoCo Playground environment id (DM Control suite names such as HopperHop, CartpoleBalance)"""
    seed: int = 1
    """RNG seed of the run"""

    # Training schedule (every step count is in environment steps, action repeat included)
    total_steps: int = 4_000_000
    """total environment steps (the run ends at the first log point at or past it)"""
    num_envs: int = 256
    """number of MJX environments stepped together"""
    k_update: int = 256
    """gradient updates per vector step (UTD per agent step = k_update / num_envs; the official rate is 1)"""
    action_repeat: int = 2
    """env steps per agent step (2 is the official DMC protocol)"""
    episode_length: Optional[int] = None
    """episode length in env steps (unset = the environment's own, 1000 for DM Control)"""
    impl: Optional[Literal["jax", "warp"]] = None
    """MJX backend (unset = warp when a GPU is present, jax otherwise); the two are different simulations"""
    naconmax: Optional[int] = None
    """warp only: contact pool shared by a device's envs (unset = Playground's, as roomy per env as its 2048 envs)"""
    njmax: Optional[int] = None
    """warp only: constraint rows per env (unset = Playground's)"""
    seed_steps: Optional[int] = None
    """env steps of uniform random actions first, in whole vector steps (unset = max(1000, 5 episodes) agent steps)"""
    pretrain_updates: Optional[int] = None
    """updates right after the seed steps (unset = what the UTD rule runs over the seed steps, official)"""
    eval_freq: int = 100_000
    """env steps between evaluations (each runs at the first log point at or past a multiple of it, and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, run once with the policy mean and once with MPPI"""
    log_freq: int = 10_000
    """env steps between progress lines and TensorBoard points (one jitted chunk of vector steps)"""
    collect_policy: Literal["mppi", "pi"] = "mppi"
    """how training data is collected: MPPI (official) or a policy sample plus Gaussian noise (helios-rl)"""
    collect_noise: float = 0.3
    """std of the Gaussian noise added to policy samples with --collect-policy pi"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in transitions"""

    # Model (official model sizes; single dims can be overridden)
    model_size: int = 5
    """official model size in millions of parameters: 1, 5, 19, 48 or 317"""
    enc_dim: Optional[int] = None
    """encoder hidden width (unset = from --model-size)"""
    mlp_dim: Optional[int] = None
    """hidden width of dynamics, reward, Q and policy MLPs (unset = from --model-size)"""
    latent_dim: Optional[int] = None
    """latent state size (unset = from --model-size)"""
    num_enc_layers: Optional[int] = None
    """encoder layers (unset = from --model-size)"""
    num_q: Optional[int] = None
    """Q-functions in the ensemble (unset = from --model-size)"""
    simnorm_dim: int = 8
    """SimNorm group size"""
    num_bins: int = 101
    """two-hot bins for reward and Q"""
    vmin: float = -10.0
    """lowest two-hot bin (symlog space)"""
    vmax: float = 10.0
    """highest two-hot bin (symlog space)"""
    dropout: float = 0.01
    """dropout after the first layer of each Q-function"""

    # Optimisation
    lr: float = 3e-4
    """learning rate"""
    enc_lr_scale: float = 0.3
    """encoder learning rate multiplier"""
    grad_clip_norm: float = 20.0
    """global gradient-norm clip (world model and policy separately)"""
    batch_size: int = 256
    """sequences per gradient update"""
    horizon: int = 3
    """rollout and planning horizon H"""
    rho: float = 0.5
    """temporal weight rho^t of the rollout losses"""
    tau: float = 0.01
    """Polyak rate of the target Q-functions and of the Q scale"""
    consistency_coef: float = 20.0
    """latent consistency loss weight"""
    reward_coef: float = 0.1
    """reward loss weight"""
    value_coef: float = 0.1
    """value loss weight"""
    entropy_coef: float = 1e-4
    """policy entropy weight"""
    log_std_min: float = -10.0
    """policy log-std lower bound"""
    log_std_max: float = 2.0
    """policy log-std upper bound"""
    discount: Optional[float] = None
    """discount (unset = the official heuristic from the episode length)"""

    # Planning (MPPI)
    num_samples: int = 512
    """action sequences per MPPI iteration"""
    num_elites: int = 64
    """elite sequences"""
    num_pi_trajs: int = 24
    """sequences proposed by the policy prior"""
    iterations: Optional[int] = None
    """MPPI iterations (unset = 6, +2 when the action has 20 or more dims)"""
    min_std: float = 0.05
    """lower bound of the sampling std"""
    max_std: float = 2.0
    """initial sampling std and its upper bound"""
    temperature: float = 0.5
    """MPPI temperature"""

    # Glass (defaults: the base recipe of the predecessor code glass-jax / helios-rl; all step counts in env steps)
    glass_lambda_se: float = 5e-3
    """weight of the 2D structural entropy H2(A, S) of the prototype transition graph"""
    glass_lambda_balance: float = 1e-2
    """weight of the one-sided balance hinges on cluster and prototype mass"""
    glass_lambda_temporal: float = 1e-3
    """weight of the cluster-level temporal term mean ||S^T c_src - sg(S^T c_next)||^2"""
    glass_lambda_temp_stability: float = 0.0
    """weight of the temp-stability term mean(1 - cos(c_src S, c_next S))"""
    glass_proto_temperature: float = 0.7
    """softmax temperature of the cosine assignment of latents to prototypes"""
    glass_assign_temperature: float = 1.0
    """softmax temperature of the prototype-to-cluster assignment S = softmax(assign_logits / T)"""
    glass_assign_init_scale: float = 0.5
    """std of the initial assign_logits (0 would start S at the uniform point, where H2 has no gradient)"""
    glass_num_prototypes: int = 16
    """prototypes N (nodes of the transition graph)"""
    glass_num_clusters: int = 8
    """clusters K of the prototype partition"""
    glass_every_k_updates: int = 4
    """apply the Glass loss on every k-th gradient update"""
    glass_warmup_steps: int = 100_000
    """no Glass loss before this env step"""
    glass_off_step: Optional[int] = None
    """no Glass loss from this env step on (unset = never; 0 = Glass off, the run is the TD-MPC2 run)"""
    glass_stopgrad_graph: bool = True
    """stop the gradient into the rollout latents: Glass trains only its prototypes and assign_logits"""
    glass_num_super_clusters: Optional[int] = None
    """hierarchical Glass: group the K clusters into this many super-clusters (unset = off)"""
    glass_lambda_super_se: float = 0.0
    """weight of the super-cluster H2(A, S_super) (needs --glass-num-super-clusters)"""
    glass_lambda_super_balance: float = 0.0
    """weight of the one-sided hinge on super-cluster mass (needs --glass-num-super-clusters)"""

    # Extras, off by default: two experiments of the predecessor code that are not part of Glass
    latent_smooth_coef: float = 0.0
    """policy-loss weight of latent action smoothing mean ||tanh mu_pi(z_t+1) - tanh mu_pi(z_t)||^2, t < H"""
    latent_smooth_start_step: int = 0
    """env step from which latent action smoothing applies"""
    arbitration_margin: Optional[float] = None
    """eval: also report return_arb = MPPI's return if it beats pi's by this margin, else pi's (unset = off)"""

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
    """env steps between full-state checkpoints (unset = --eval-freq; 0 = none); one is also written at the end"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in {run_dir}/checkpoints (older ones are deleted)"""
    keep_every: int = 0
    """also keep every checkpoint at a multiple of this many env steps (0 = none; a multiple of --checkpoint-every)"""
    save_model: bool = False
    """write the final checkpoint even with --checkpoint-every 0"""
    resume: Optional[str] = None
    """run folder to continue from its newest complete checkpoint (only run flags and --total-steps may change)"""
    init_from: Optional[str] = None
    """RUN_DIR[:STEP]: a new run from that checkpoint's whole state (STEP unset: the newest); state sizes fixed"""
    dry_run: bool = False
    """print the resolved config as one JSON object and exit, writing nothing"""
    evaluate: Optional[str] = None
    """run folder whose checkpoint to evaluate instead of training (to {run_dir}/evaluations/step{N}.json)"""
    evaluate_step: Optional[int] = None
    """with --evaluate: the env step of the checkpoint (unset = the newest complete one)"""
    dump_rollouts: bool = False
    """with --evaluate: also write per step obs, latent, action, reward, prototype, cluster to rollouts_step{N}.npz"""
    capture_video: bool = False
    """record eval videos with each frame's cluster, glass/clusters_step{N}.png (--evaluate: also prototype pictures)"""
    video_episodes: int = 1
    """with --capture-video: episodes recorded per mode (the second is {mode}_step{N}_episode1.mp4, and so on)"""
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


MODEL_SIZES = {  # official TD-MPC2 configs: enc_dim, mlp_dim, latent_dim, num_enc_layers, num_q
    1: (256, 384, 128, 2, 2),
    5: (256, 512, 512, 2, 5),
    19: (1024, 1024, 768, 3, 5),
    48: (1792, 1792, 768, 4, 5),
    317: (4096, 4096, 1376, 5, 8),
}


class UserError(Exception):
    """A mistake in the command line or the environment: printed as one line, exit code 2."""


# Glass takes its randomness from jax.random.fold_in(<a key TD-MPC2 already has>, GLASS_KEY_DATA), never from the
# main split sequence: with Glass off every TD-MPC2 key, and so the whole run, is unchanged.
GLASS_KEY_DATA = 0x61A55


# ---------------------------------------------------------------------------------------------------------------------
# Environment: MuJoCo Playground, vectorised with vmap, action repeat and auto-reset inside jit
# ---------------------------------------------------------------------------------------------------------------------
def default_impl() -> str:
    """warp is Playground's GPU backend; on a CPU the pure-JAX backend is far faster."""
    return "warp" if any(d.platform == "gpu" for d in jax.devices()) else "jax"


# warp's per-env overflow flags (mujoco_warp's OverflowType). A full contact pool or constraint table drops contacts
# or rows, so the physics is wrong from then on; the iteration limits only end a step with an unconverged solver,
# which Playground's ports (few solver iterations, for speed) reach routinely.
WARP_ITERATION_LIMITS = 1 << 9 | 1 << 10  # ITERATIONS, LS_ITERATIONS
WARP_CAPACITY = ((1 << 12) - 1) & ~WARP_ITERATION_LIMITS
PLAYGROUND_BATCH = 2048  # envs of Playground's own DM Control training, for which its naconmax is chosen


def load_env(env_id: str, impl: Optional[str], episode_length: Optional[int] = None, worlds: int = 1,
             naconmax: Optional[int] = None, njmax: Optional[int] = None):
    """The Playground env. Under warp, `worlds` envs (all seeds of one device) share one contact pool: it is sized
    to give each env at least the room Playground's own batch gives it."""
    from mujoco_playground import registry  # imported here so that importing this file stays cheap

    if env_id not in registry.ALL_ENVS:
        dmc = ", ".join(registry.dm_control_suite.ALL_ENVS)
        raise UserError(f"unknown env id {env_id!r}; DM Control ids: {dmc} (see registry.ALL_ENVS for the rest)")
    overrides = {"impl": impl or default_impl()}
    if episode_length is not None:
        overrides["episode_length"] = episode_length
    if min(naconmax or 0, njmax or 0) < 0:
        raise UserError(f"--naconmax and --njmax must not be negative, got {naconmax} and {njmax}")
    if overrides["impl"] == "warp":
        import warp

        warp.config.log_level = warp.LOG_WARNING  # no line per kernel module loaded; warnings still print
        default = registry.get_default_config(env_id)
        per_env = math.ceil(default.naconmax / PLAYGROUND_BATCH)
        overrides["naconmax"] = naconmax if naconmax is not None else max(default.naconmax, per_env * worlds)
        overrides["njmax"] = njmax if njmax is not None else default.njmax
    env = registry.load(env_id, config_overrides=overrides)
    if overrides["impl"] == "warp":  # iteration limits are counted and reported once by us, not printed per env step
        opt = env._mjx_model.opt
        env._mjx_model = env._mjx_model.replace(opt=opt.replace(_impl=opt._impl.replace(
            warn_overflow=opt._impl.warn_overflow & ~WARP_ITERATION_LIMITS)))
    return env


def observation(env_state) -> jax.Array:
    """Flat observation; Playground's dict observations (locomotion) use their 'state' entry."""
    obs = env_state.obs
    return obs["state"] if isinstance(obs, dict) else obs


def finite_or_zero(x: jax.Array) -> jax.Array:
    """A diverged simulation can return NaN/inf observations and rewards; they must not poison the replay buffer."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def where_done(done: jax.Array, fresh, state):
    """Per env, the Playground state `fresh` where `done`, else `state`. The physics is merged with MJX's Data.where
    (per env, under vmap): warp's Data holds a contact pool shared by the whole batch, without a per-env axis."""

    def one_env(d, new, old):
        rest = jax.tree.map(lambda a, b: jnp.where(d, a, b), new.replace(data=None), old.replace(data=None))
        return rest.replace(data=old.data.where(d, new.data))

    return jax.vmap(one_env)(done, fresh, state)


class VectorEnv:
    """`num` copies of a Playground env; one `step` is one agent step of `action_repeat` env steps."""

    def __init__(self, env, action_repeat: int):
        self.env = env
        self.action_repeat = action_repeat
        self.impl = env._config.impl
        self.episode_length = env._config.episode_length  # env steps
        self.obs_dim = int(np.prod(observation(jax.eval_shape(env.reset, jax.random.key(0))).shape))
        self.action_dim = env.action_size
        self.max_agent_steps = math.ceil(self.episode_length / action_repeat)
        self.naconmax = env._config.naconmax if self.impl == "warp" else None
        self.njmax = env._config.njmax if self.impl == "warp" else None

    def reset(self, key: jax.Array, num: int):
        return jax.vmap(self.env.reset)(jax.random.split(key, num))

    def step(self, env_state, action: jax.Array):
        """Repeat `action`; returns the new state, the summed reward and whether the env signalled done. Under warp
        the state's overflow flags are those of this agent step alone (`warp_flags`)."""
        if self.impl == "warp":  # the flags are sticky: cleared here, so that they say what this step did
            data = env_state.data
            env_state = env_state.replace(data=data.replace(_impl=data._impl.replace(
                overflow=jnp.zeros_like(data._impl.overflow))))

        def one_env(state, act):
            def repeat(carry, _):
                state, reward, done = carry
                state = self.env.step(state, act)
                return (state, reward + state.reward, jnp.maximum(done, state.done)), None

            (state, reward, done), _ = jax.lax.scan(
                repeat, (state, jnp.zeros(()), jnp.zeros(())), None, length=self.action_repeat
            )
            return state, reward, done > 0

        return jax.vmap(one_env)(env_state, action)

    def warp_flags(self, env_state) -> dict:
        """Under warp, what the last step did to the physics: any capacity overflow (its flags, or-ed over envs) and
        how many envs hit a solver iteration limit; empty under jax."""
        if self.impl != "warp":
            return {}
        flags = env_state.data._impl.overflow
        return {"warp_overflow": jax.lax.reduce(flags & WARP_CAPACITY, np.int32(0), jax.lax.bitwise_or, (0,)),
                "warp_unconverged": jnp.sum(flags & WARP_ITERATION_LIMITS > 0)}

    def reset_where(self, env_state, finished: jax.Array, key: jax.Array):
        """Fresh random initial states for finished envs; skipped when none finished (DMC episodes end together).
        Under warp the reset runs at every step: its kernels cannot sit in a lax.cond that vmap (over seeds) turns
        into a select (JAX's custom_vmap refuses the batched constants)."""
        reset_finished = lambda: where_done(finished, self.reset(key, finished.shape[0]), env_state)
        if self.impl == "warp":
            return reset_finished()
        return jax.lax.cond(finished.any(), reset_finished, lambda: env_state)


# ---------------------------------------------------------------------------------------------------------------------
# One resolved config: every run-time default filled in once, right after the env loads
# ---------------------------------------------------------------------------------------------------------------------
def discount_heuristic(episode_length: int) -> float:
    """Official TD-MPC2 discount from the episode length in agent steps: (f-1)/f with f = length/5, clipped."""
    frac = episode_length / 5
    return float(min(max((frac - 1) / frac, 0.95), 0.995))


# Glass's own refusals, checked in resolve_args together with TD-MPC2's.
GLASS_POSITIVE = ["glass_proto_temperature", "glass_assign_temperature", "glass_num_prototypes", "glass_num_clusters",
                  "glass_every_k_updates"]
GLASS_NONNEGATIVE = ["glass_lambda_se", "glass_lambda_balance", "glass_lambda_temporal", "glass_lambda_temp_stability",
                     "glass_lambda_super_se", "glass_lambda_super_balance", "glass_assign_init_scale",
                     "glass_warmup_steps", "glass_off_step", "latent_smooth_coef", "latent_smooth_start_step",
                     "arbitration_margin"]


def glass_checks(args: Args) -> list[tuple[bool, str]]:
    """(holds, the line that refuses it) for each rule between Glass's flags."""
    return [
        (args.glass_num_clusters <= args.glass_num_prototypes,
         f"--glass-num-clusters ({args.glass_num_clusters}) must not exceed --glass-num-prototypes "
         f"({args.glass_num_prototypes})"),
        (args.glass_off_step in (None, 0) or args.glass_off_step > args.glass_warmup_steps,
         f"--glass-off-step ({args.glass_off_step}) must be above --glass-warmup-steps ({args.glass_warmup_steps}), "
         "or 0 to switch Glass off"),
        (args.glass_num_super_clusters is None or 2 <= args.glass_num_super_clusters <= args.glass_num_clusters,
         f"--glass-num-super-clusters must be between 2 and --glass-num-clusters ({args.glass_num_clusters}), "
         f"got {args.glass_num_super_clusters}"),
        (args.glass_num_super_clusters is not None
         or args.glass_lambda_super_se == args.glass_lambda_super_balance == 0,
         "--glass-lambda-super-se and --glass-lambda-super-balance need --glass-num-super-clusters"),
    ]


def resolve_args(args: Args, venv) -> Args:
    """Fill every unset field from the model size and the env (`venv`: impl, episode_length, action_dim,
    max_agent_steps) and refuse impossible settings, before anything is compiled."""
    if args.model_size not in MODEL_SIZES:
        raise UserError(f"--model-size must be one of {sorted(MODEL_SIZES)}, got {args.model_size}")
    if venv.impl != "warp" and (args.naconmax is not None or args.njmax is not None):
        raise UserError("--naconmax and --njmax size warp's contact buffers; they apply to --impl warp only")
    enc, mlp, latent, layers, num_q = MODEL_SIZES[args.model_size]
    fill = lambda value, default: default if value is None else value
    env_steps_per_vector_step = args.num_envs * args.action_repeat
    seed_steps = fill(args.seed_steps, max(1000, 5 * venv.max_agent_steps) * args.action_repeat)
    seed_vector_steps = math.ceil(seed_steps / env_steps_per_vector_step) if env_steps_per_vector_step > 0 else 0
    args = dataclasses.replace(
        args,
        impl=venv.impl,
        naconmax=getattr(venv, "naconmax", None),
        njmax=getattr(venv, "njmax", None),
        episode_length=venv.episode_length,
        enc_dim=fill(args.enc_dim, enc),
        mlp_dim=fill(args.mlp_dim, mlp),
        latent_dim=fill(args.latent_dim, latent),
        num_enc_layers=fill(args.num_enc_layers, layers),
        num_q=fill(args.num_q, num_q),
        discount=fill(args.discount, discount_heuristic(venv.max_agent_steps)),
        iterations=fill(args.iterations, 6 + 2 * (venv.action_dim >= 20)),
        seed_steps=seed_vector_steps * env_steps_per_vector_step,
        pretrain_updates=fill(args.pretrain_updates, seed_vector_steps * args.k_update),
        checkpoint_every=fill(args.checkpoint_every, args.eval_freq),
    )
    positive = ["num_seeds", "total_steps", "num_envs", "k_update", "action_repeat", "eval_freq", "eval_episodes",
                "log_freq", "buffer_size", "enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "simnorm_dim",
                "batch_size", "horizon", "num_samples", "num_elites", "lr", "grad_clip_norm", "temperature", "max_std",
                "min_std", "episode_length", "seed_steps", "iterations", "discount", "keep_checkpoints", "video_every",
                "video_episodes", "video_height", "video_width"]
    for name in positive + GLASS_POSITIVE:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    nonnegative = ["pretrain_updates", "num_pi_trajs", "collect_noise", "entropy_coef", "dropout", "checkpoint_every",
                   "keep_every"]
    for name in nonnegative + GLASS_NONNEGATIVE:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    checks = [
        (args.num_q >= 2, f"--num-q must be at least 2 (targets use two random heads), got {args.num_q}"),
        (args.num_bins >= 2, f"--num-bins must be at least 2, got {args.num_bins}"),
        (args.vmin < args.vmax, f"--vmin ({args.vmin}) must be below --vmax ({args.vmax})"),
        (args.latent_dim % args.simnorm_dim == 0,
         f"--latent-dim ({args.latent_dim}) must be a multiple of --simnorm-dim ({args.simnorm_dim})"),
        (args.num_elites <= args.num_samples,
         f"--num-elites ({args.num_elites}) must not exceed --num-samples ({args.num_samples})"),
        (args.num_pi_trajs < args.num_samples,
         f"--num-pi-trajs ({args.num_pi_trajs}) must be below --num-samples ({args.num_samples})"),
        (args.min_std <= args.max_std, f"--min-std ({args.min_std}) must not exceed --max-std ({args.max_std})"),
        (args.log_std_min < args.log_std_max, "--log-std-min must be below --log-std-max"),
        (args.batch_size <= args.buffer_size,
         f"--batch-size ({args.batch_size}) is larger than the buffer can hold (--buffer-size {args.buffer_size})"),
        (args.buffer_size // args.num_envs > args.horizon,
         f"--buffer-size ({args.buffer_size}) holds fewer than horizon+1 steps per env with {args.num_envs} envs"),
        (args.discount < 1, f"--discount must be below 1, got {args.discount}"),
        (not args.keep_every or (args.checkpoint_every and args.keep_every % args.checkpoint_every == 0),
         f"--keep-every ({args.keep_every}) must be a multiple of --checkpoint-every ({args.checkpoint_every}): "
         "checkpoints are written only there"),
        (args.evaluate_step is None or args.evaluate is not None, "--evaluate-step needs --evaluate RUN_DIR"),
        (not args.dump_rollouts or args.evaluate is not None, "--dump-rollouts needs --evaluate RUN_DIR"),
        (args.video_episodes <= args.eval_episodes,
         f"--video-episodes ({args.video_episodes}) must not exceed --eval-episodes ({args.eval_episodes})"),
        (seed_vector_steps >= args.horizon,
         f"--seed-steps ({seed_steps}) must cover at least horizon={args.horizon} vector steps "
         f"({args.horizon * env_steps_per_vector_step} env steps) so that the first batch has whole sequences"),
    ]
    for ok, message in checks + glass_checks(args):
        if not ok:
            raise UserError(message)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Math: symlog, two-hot, SimNorm, log-probabilities, running scale (official common/math.py, common/scale.py)
# ---------------------------------------------------------------------------------------------------------------------
def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def two_hot(x, num_bins: int, vmin: float, vmax: float):
    """Scalars -> (..., num_bins): mass 1-off on the bin below symlog(x) and off on the next one."""
    bin_size = (vmax - vmin) / (num_bins - 1)
    pos = (jnp.clip(symlog(x), vmin, vmax) - vmin) / bin_size
    lower = jnp.floor(pos)
    offset = (pos - lower)[..., None]
    lower = lower.astype(jnp.int32)
    return jax.nn.one_hot(lower, num_bins) * (1 - offset) + jax.nn.one_hot(lower + 1, num_bins) * offset


def two_hot_inv(logits, num_bins: int, vmin: float, vmax: float):
    """(..., num_bins) logits -> scalars: symexp of the expected bin value."""
    bins = jnp.linspace(vmin, vmax, num_bins)
    return symexp(jnp.sum(jax.nn.softmax(logits, axis=-1) * bins, axis=-1))


def soft_cross_entropy(logits, target, num_bins: int, vmin: float, vmax: float):
    """Cross-entropy between logits and the two-hot encoding of scalar targets."""
    return -jnp.sum(two_hot(target, num_bins, vmin, vmax) * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def simnorm(x, simnorm_dim: int):
    """Simplicial normalisation (TD-MPC2 paper, §3.1): softmax within consecutive groups of `simnorm_dim` features."""
    groups = x.reshape(*x.shape[:-1], -1, simnorm_dim)
    return jax.nn.softmax(groups, axis=-1).reshape(x.shape)


def squashed_gaussian_log_prob(eps, log_std, action):
    """Log-prob of a = tanh(mu + eps*std) as in the official 2023 code (the one behind the published curves):
    the Gaussian term is multiplied by the action dimension, then the tanh correction is subtracted."""
    action_dim = eps.shape[-1]
    gaussian = jnp.sum(-0.5 * eps**2 - log_std, axis=-1) - 0.5 * jnp.log(2 * jnp.pi)
    return action_dim * gaussian - jnp.sum(jnp.log(jax.nn.relu(1 - action**2) + 1e-6), axis=-1)


def running_scale_update(scale, q, tau: float):
    """RunningScale: lerp towards max(p95 - p5, 1) of a batch of Q-values (linear-interpolated percentiles)."""
    p5, p95 = jnp.percentile(q, jnp.array([5.0, 95.0]), method="linear")
    return scale + tau * (jnp.maximum(p95 - p5, 1.0) - scale)


# ---------------------------------------------------------------------------------------------------------------------
# Glass math: soft prototype assignment, prototype transition graph, 2D structural entropy, balance, diagnostics
# (every formula, with worked values: docs/glass.md, "The Glass loss")
# ---------------------------------------------------------------------------------------------------------------------
def unit_rows(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def soft_assign(z, prototypes, temperature: float):
    """(M, latent) latents -> (M, N): softmax over prototypes of cos(z, mu_n) / temperature. Cosine rather than a
    distance keeps the logits in [-1, 1] / temperature at any latent size."""
    return jax.nn.softmax(unit_rows(z) @ unit_rows(prototypes).T / temperature, axis=-1)


def transition_graph(c_src, c_next):
    """Soft prototype transition counts c_src^T c_next -> row-stochastic P (N, N) and the undirected A = (P + P^T)/2.
    The 1e-4 keeps every prototype a node with positive volume even when no latent is assigned to it."""
    counts = c_src.T @ c_next + 1e-4
    P = counts / counts.sum(axis=-1, keepdims=True)
    return P, 0.5 * (P + P.T)


def log2_clipped(p):
    return jnp.log2(jnp.clip(p, 1e-8, 1.0))


def structural_entropy_2d(A, S):
    """2D structural entropy in bits of the graph A (N, N) under the soft partition S (N, K) (rows: probabilities):
    -sum_k (g_k/2m) log2(V_k/2m) + H1 + sum_k (V_k/2m) log2(V_k/2m), V = d^T S the cluster volumes,
    g_k = V_k - (S^T A S)_kk the weight leaving cluster k, H1 the 1D structural entropy -sum_i (d_i/2m) log2(d_i/2m).
    For a hard partition this is the two-level encoding-tree entropy of Li & Pan, "Structural Information and
    Dynamical Complexity of Networks", IEEE Trans. Inf. Theory 62(6), 2016; S relaxes it to soft memberships."""
    degree = A.sum(axis=-1)
    two_m = degree.sum()
    volume = degree @ S
    cut = volume - jnp.einsum("ik,ij,jk->k", S, A, S)
    p_vol, p_cut, p_node = volume / two_m, cut / two_m, degree / two_m
    h1 = -jnp.sum(p_node * log2_clipped(p_node))
    return -jnp.sum(p_cut * log2_clipped(p_vol)) + h1 + jnp.sum(p_vol * log2_clipped(p_vol))


def mass_hinge(mass):
    """sum relu(mass - 2/len)^2: zero unless one of the len entries holds more than twice its fair share. One-sided,
    so it stops collapse without pinning the partition to uniform, where H2 has no gradient."""
    return jnp.sum(jax.nn.relu(mass - 2.0 / mass.shape[-1]) ** 2)


def balance_hinge(S, c_src):
    """Balance term: hinge on the cluster masses (column mean of S) plus on the prototype usage (batch mean of c)."""
    return mass_hinge(S.mean(axis=0)) + mass_hinge(c_src.mean(axis=0))


def partition(glass_params, args: Args):
    """The soft partition S (N, K): row n is prototype n's distribution over the K clusters."""
    return jax.nn.softmax(glass_params["assign_logits"] / args.glass_assign_temperature, axis=-1)


def glass_graph(glass_params, z_src, z_next, args: Args) -> dict:
    """The Glass graph of one batch: assignments c_src, c_next (M, N), P and A (N, N), the partition S (N, K) and,
    with super-clusters, the combined partition S_super = S softmax(L_sup / T) (N, Ks). z_next never carries a
    gradient (the graph must not chase its own targets); z_src only without --glass-stopgrad-graph."""
    z_next = jax.lax.stop_gradient(z_next)
    if args.glass_stopgrad_graph:
        z_src = jax.lax.stop_gradient(z_src)
    c_src = soft_assign(z_src, glass_params["prototypes"], args.glass_proto_temperature)
    c_next = soft_assign(z_next, glass_params["prototypes"], args.glass_proto_temperature)
    P, A = transition_graph(c_src, c_next)
    S = partition(glass_params, args)
    graph = {"c_src": c_src, "c_next": c_next, "P": P, "A": A, "S": S}
    if args.glass_num_super_clusters is not None:
        graph["S_super"] = S @ jax.nn.softmax(glass_params["super_assign_logits"] / args.glass_assign_temperature, -1)
    return graph


def glass_loss(graph: dict, args: Args):
    """L_glass = l_se H2(A, S) + l_bal balance + l_tmp temporal + l_ts temp-stability, plus with super-clusters
    l_sse H2(A, S_super) + l_sbal super hinge. H2 is the 2D structural entropy of Li & Pan (IEEE Trans. Inf. Theory
    2016); the other terms are the predecessor code's (glass-jax / helios-rl). Returns (loss, parts); the parts are
    unweighted. `graph` is glass_graph's output."""
    g = graph
    s_src, s_next = g["c_src"] @ g["S"], g["c_next"] @ g["S"]  # cluster-level assignments (M, K)
    parts = {
        "se": structural_entropy_2d(g["A"], g["S"]),
        "balance": balance_hinge(g["S"], g["c_src"]),
        "temporal": jnp.mean(jnp.sum((s_src - jax.lax.stop_gradient(s_next)) ** 2, axis=-1)),
        "temp_stability": jnp.mean(1.0 - jnp.sum(unit_rows(s_src) * unit_rows(s_next), axis=-1)),
    }
    loss = (args.glass_lambda_se * parts["se"] + args.glass_lambda_balance * parts["balance"]
            + args.glass_lambda_temporal * parts["temporal"]
            + args.glass_lambda_temp_stability * parts["temp_stability"])
    if "S_super" in g:
        parts["super_se"] = structural_entropy_2d(g["A"], g["S_super"])
        parts["super_balance"] = mass_hinge(g["S_super"].mean(axis=0))
        loss = (loss + args.glass_lambda_super_se * parts["super_se"]
                + args.glass_lambda_super_balance * parts["super_balance"])
    return loss, parts


def glass_diagnostics(S, P) -> dict:
    """Active clusters #{k: mass_k > 0.05/K}, cluster-mass entropy (nats), max cluster mass and the cut mass
    sum_ij P_ij [argmax S_i != argmax S_j] / N: P's N rows each sum to 1, so this is the fraction of transitions
    that cross a cluster boundary, in [0, 1]."""
    mass = S.mean(axis=0)
    label = jnp.argmax(S, axis=-1)
    return {
        "active_clusters": jnp.sum(mass > 0.05 / S.shape[-1]),
        "cluster_entropy": -jnp.sum(mass * jnp.log(jnp.clip(mass, 1e-8, 1.0))),
        "max_mass": mass.max(),
        "cut_mass": jnp.sum(P * (label[:, None] != label[None, :])) / P.shape[0],
    }


def cluster_label(z, prototypes, S):
    """Cluster of each latent: argmax_k S[n*, k] for its most similar prototype n* = argmax_n cos(z, mu_n)."""
    nearest = jnp.argmax(unit_rows(z) @ unit_rows(prototypes).T, axis=-1)
    return jnp.argmax(S[nearest], axis=-1)


def glass_enabled(args: Args) -> bool:
    """Decided in Python: when False the loss is built without any Glass op, so the traced program is TD-MPC2's."""
    weights = [args.glass_lambda_se, args.glass_lambda_balance, args.glass_lambda_temporal,
               args.glass_lambda_temp_stability, args.glass_lambda_super_se, args.glass_lambda_super_balance]
    return any(w > 0 for w in weights) and args.glass_off_step != 0


def glass_active(args: Args, env_step):
    """Whether Glass is on at `env_step` (traced or not): enabled and warm-up <= env_step < off-step."""
    on = glass_enabled(args) & (env_step >= args.glass_warmup_steps)
    if args.glass_off_step is not None:
        on = on & (env_step < args.glass_off_step)
    return on


def glass_schedule(args: Args, env_step, update_index):
    """Traced gate of the Glass loss: active at env_step and on every k-th update (no recompilation)."""
    return glass_active(args, env_step) & (update_index % args.glass_every_k_updates == 0)


# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# World model: encoder, latent dynamics, reward, Q ensemble and the policy prior (official common/world_model.py)
# ---------------------------------------------------------------------------------------------------------------------
def trunc_normal_init(key, shape, dtype=jnp.float32):
    """torch.nn.init.trunc_normal_(std=0.02) as the official code uses it: truncated at +-2 absolute, i.e. +-100 std."""
    return 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, dtype)


def mish(x):
    """Mish, x * tanh(softplus(x)), with one exp instead of jax.nn.mish's exp, log1p and tanh: with e = exp(x),
    tanh(log(1 + e)) = n / (n + 2), n = e * (e + 2). The same function to float32 rounding, about 4x cheaper on a CPU,
    where the activations of an update cost as much as its matmuls. From x = 20 on the ratio is 1 in float32, so
    clamping there keeps n finite without changing the value."""
    e = jnp.exp(jnp.minimum(x, 20.0))
    n = e * (e + 2)
    return x * (n / (n + 2))


class MLP(nn.Module):
    """NormedLinear layers (Dense -> Dropout -> LayerNorm -> Mish), then the output layer."""

    hidden_dims: Sequence[int]
    out_dim: int
    simnorm_dim: int = 0
    """> 0: the output layer is NormedLinear with SimNorm (encoder, dynamics); 0: a plain linear output"""
    dropout: float = 0.0
    """dropout after the first layer (Q-functions)"""
    zero_output: bool = False
    """zero-initialised output weights (reward and Q heads)"""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, kernel_init=trunc_normal_init)(x)
            if i == 0 and self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = mish(nn.LayerNorm(epsilon=1e-5)(x))
        out_init = nn.initializers.zeros if self.zero_output else trunc_normal_init
        x = nn.Dense(self.out_dim, kernel_init=out_init)(x)
        if self.simnorm_dim:
            x = simnorm(nn.LayerNorm(epsilon=1e-5)(x), self.simnorm_dim)
        return x


class WorldModel:
    """The TD-MPC2 world model (paper §3.1) as pure functions of explicit parameters: encoder h, latent dynamics d,
    reward R, the Q ensemble and, as in the official `WorldModel`, the policy prior p.

    World-model params: {"encoder", "dynamics", "reward", "qs", "glass"} (Q heads stacked on a leading axis; Glass's
    prototypes and assign_logits share the world model's optimiser and clip); the policy prior has its own params and
    optimiser."""

    def __init__(self, args: Args, obs_dim: int, action_dim: int):
        self.args, self.obs_dim, self.action_dim = args, obs_dim, action_dim
        hidden = (args.mlp_dim, args.mlp_dim)
        enc_hidden = (args.enc_dim,) * max(args.num_enc_layers - 1, 1)
        self.encoder = MLP(enc_hidden, args.latent_dim, simnorm_dim=args.simnorm_dim)
        self.dynamics = MLP(hidden, args.latent_dim, simnorm_dim=args.simnorm_dim)
        self.reward_head = MLP(hidden, args.num_bins, zero_output=True)
        self.q_head = MLP(hidden, args.num_bins, dropout=args.dropout, zero_output=True)
        self.policy = MLP(hidden, 2 * action_dim)

    def init(self, key):
        k_enc, k_dyn, k_rew, k_q, k_pi = jax.random.split(key, 5)
        obs = jnp.zeros((1, self.obs_dim))
        z = jnp.zeros((1, self.args.latent_dim))
        za = jnp.zeros((1, self.args.latent_dim + self.action_dim))
        wm_params = {
            "encoder": self.encoder.init(k_enc, obs)["params"],
            "dynamics": self.dynamics.init(k_dyn, za)["params"],
            "reward": self.reward_head.init(k_rew, za)["params"],
            "qs": jax.vmap(lambda k: self.q_head.init(k, za)["params"])(jax.random.split(k_q, self.args.num_q)),
            "glass": self.glass_init(jax.random.fold_in(key, GLASS_KEY_DATA)),
        }
        return wm_params, self.policy.init(k_pi, z)["params"]

    def glass_init(self, key):
        """prototypes = simnorm(N(0, 1)), on the latent's own simplices; assign_logits = init_scale * N(0, 1)."""
        args = self.args
        num_prototypes, num_clusters = args.glass_num_prototypes, args.glass_num_clusters
        k_proto, k_assign, k_super = jax.random.split(key, 3)
        params = {
            "prototypes": simnorm(jax.random.normal(k_proto, (num_prototypes, args.latent_dim)), args.simnorm_dim),
            "assign_logits": args.glass_assign_init_scale * jax.random.normal(k_assign, (num_prototypes, num_clusters)),
        }
        if args.glass_num_super_clusters is not None:
            params["super_assign_logits"] = args.glass_assign_init_scale * jax.random.normal(
                k_super, (num_clusters, args.glass_num_super_clusters))
        return params


    def encode(self, wm_params, obs):
        return self.encoder.apply({"params": wm_params["encoder"]}, obs)

    def next(self, wm_params, z, action):
        return self.dynamics.apply({"params": wm_params["dynamics"]}, jnp.concatenate([z, action], -1))

    def reward(self, wm_params, z, action):
        return self.reward_head.apply({"params": wm_params["reward"]}, jnp.concatenate([z, action], -1))

    def q_logits(self, q_params, z, action, dropout_key=None):
        """Logits of every head in `q_params`: (heads, ..., num_bins). Dropout only when a key is given.

        On a CPU the heads run one after another, elsewhere vmapped; the numbers are the same (dropout masks
        included), but XLA's CPU backend runs the separate 2-D matmuls faster than the batched ones of vmap."""
        za = jnp.concatenate([z, action], -1)
        num_heads = jax.tree.leaves(q_params)[0].shape[0]
        keys = None if dropout_key is None else jax.random.split(dropout_key, num_heads)

        def head(params, key):
            if key is None:
                return self.q_head.apply({"params": params}, za)
            return self.q_head.apply({"params": params}, za, train=True, rngs={"dropout": key})

        if jax.default_backend() != "cpu":
            return jax.vmap(head)(q_params, keys)
        heads = [jax.tree.map(lambda p, i=i: p[i], q_params) for i in range(num_heads)]
        return jnp.stack([head(p, None if keys is None else keys[i]) for i, p in enumerate(heads)])

    def q_two_random(self, q_params, z, action, key, dropout_key=None):
        """Values of two distinct, randomly chosen Q heads (the official 'min' and 'avg' use these)."""
        args = self.args
        heads = jax.random.choice(key, args.num_q, (2,), replace=False)
        pair = jax.tree.map(lambda p: p[heads], q_params)
        q = two_hot_inv(self.q_logits(pair, z, action, dropout_key), args.num_bins, args.vmin, args.vmax)
        return q[0], q[1]

    def pi(self, pi_params, z, key):
        """Policy prior: returns (tanh(mu), a sample tanh(mu + eps*std), its log-probability)."""
        args = self.args
        mu, raw_log_std = jnp.split(self.policy.apply({"params": pi_params}, z), 2, axis=-1)
        log_std = args.log_std_min + 0.5 * (args.log_std_max - args.log_std_min) * (jnp.tanh(raw_log_std) + 1)
        eps = jax.random.normal(key, mu.shape)
        action = jnp.tanh(mu + eps * jnp.exp(log_std))
        return jnp.tanh(mu), action, squashed_gaussian_log_prob(eps, log_std, action)


@struct.dataclass
class AgentState:
    wm_params: dict
    target_qs: dict
    pi_params: dict
    wm_opt_state: optax.OptState
    pi_opt_state: optax.OptState
    scale: jax.Array
    """RunningScale of the Q-values in the policy loss"""
    updates: jax.Array
    """gradient updates so far (the Glass schedule's every-k counter)"""


def make_optimizers(args: Args, wm_params: dict):
    """Adam with the encoder at lr*enc_lr_scale, after one global-norm clip over the world model; policy separate."""
    labels = {name: jax.tree.map(lambda _, n=name: "encoder" if n == "encoder" else "rest", params)
              for name, params in wm_params.items()}
    wm_tx = optax.chain(
        optax.clip_by_global_norm(args.grad_clip_norm),
        optax.multi_transform(
            {"encoder": optax.adam(args.lr * args.enc_lr_scale, eps=1e-8), "rest": optax.adam(args.lr, eps=1e-8)},
            labels,
        ),
    )
    pi_tx = optax.chain(optax.clip_by_global_norm(args.grad_clip_norm), optax.adam(args.lr, eps=1e-5))
    return wm_tx, pi_tx


def init_agent(model: WorldModel, wm_tx, pi_tx, key) -> AgentState:
    wm_params, pi_params = model.init(key)
    return AgentState(
        wm_params=wm_params,
        target_qs=jax.tree.map(jnp.copy, wm_params["qs"]),
        pi_params=pi_params,
        wm_opt_state=wm_tx.init(wm_params),
        pi_opt_state=pi_tx.init(pi_params),
        scale=jnp.ones(()),
        updates=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Losses (paper §3.1; official tdmpc2.py: _td_target, _update, update_pi)
# ---------------------------------------------------------------------------------------------------------------------
def td_targets(model: WorldModel, agent: AgentState, next_z, reward, terminated, key):
    """TD target q_t = r_t + gamma * min of two random target heads at (z', a' ~ pi(z')), z' = h(o_{t+1}) from the
    online encoder (paper §3.1, the value target of the model objective; official `_td_target`)."""
    k_pi, k_heads = jax.random.split(key)
    _, next_action, _ = model.pi(agent.pi_params, next_z, k_pi)
    q1, q2 = model.q_two_random(agent.target_qs, next_z, next_action, k_heads)
    return reward + model.args.discount * (1.0 - terminated) * jnp.minimum(q1, q2)


def latent_rollout(model: WorldModel, wm_params, z0, actions):
    """The latents the dynamics predicts from z_0 under the batch's actions: z_{t+1} = d(z_t, a_t), (H, B, latent).
    Unrolled (H is small): XLA then fuses across the steps and their backward pass, about 5% of an update on a CPU."""

    def step(z, action):
        z = model.next(wm_params, z, action)
        return z, z

    return jax.lax.scan(step, z0, actions, unroll=True)[1]


def world_model_loss(model: WorldModel, wm_params, obs, action, reward, td_target, next_z, dropout_key, glass_gate):
    """The model objective of paper §3.1: over the H-step latent rollout from z_0 = h(o_0), each step weighted rho^t,
    the joint-embedding (consistency) MSE to sg(h(o_{t+1})), the reward cross-entropy and the value cross-entropy of
    every Q head against the TD target; divided by H (and the value loss also by the number of heads). Plus the
    Glass loss on the rollout latents (z_0..z_H-1 -> z_1..z_H) where the traced `glass_gate` is open."""
    args = model.args
    horizon = action.shape[0]
    rho = args.rho ** jnp.arange(horizon)
    z0 = model.encode(wm_params, obs[0])
    z_pred = latent_rollout(model, wm_params, z0, action)  # (H, B, latent)
    zs = jnp.concatenate([z0[None], z_pred])  # (H+1, B, latent)

    consistency = jnp.sum(rho * jnp.mean((z_pred - next_z) ** 2, axis=(1, 2))) / horizon
    ce = partial(soft_cross_entropy, num_bins=args.num_bins, vmin=args.vmin, vmax=args.vmax)
    reward_ce = ce(model.reward(wm_params, zs[:-1], action), reward)  # (H, B)
    reward_loss = jnp.sum(rho * reward_ce.mean(axis=1)) / horizon
    q_ce = ce(model.q_logits(wm_params["qs"], zs[:-1], action, dropout_key), td_target[None])  # (num_q, H, B)
    value_loss = jnp.sum(rho * q_ce.mean(axis=2).sum(axis=0)) / (horizon * args.num_q)
    total = args.consistency_coef * consistency + args.reward_coef * reward_loss + args.value_coef * value_loss
    info = {"consistency_loss": consistency, "reward_loss": reward_loss, "value_loss": value_loss}
    if glass_enabled(args):
        # lax.cond: a closed gate skips the Glass forward and backward pass instead of multiplying it by 0.
        z_src, z_next = (x.reshape(-1, x.shape[-1]) for x in (zs[:-1], zs[1:]))
        glass = jax.lax.cond(glass_gate,
                             lambda: glass_loss(glass_graph(wm_params["glass"], z_src, z_next, args), args)[0],
                             lambda: jnp.zeros(()))
        total = total + glass
        info["glass_loss"] = glass
    return total, (zs, info)


def policy_loss(model: WorldModel, pi_params, wm_params, zs, scale, key, env_step):
    """The policy prior objective of paper §3.1 (maximum-entropy, Q scaled by the running scale S):
    mean_t rho^t * mean_B(entropy_coef * log_pi - Q/S), Q = mean of two random online heads (with dropout); plus the
    extra latent action smoothing c * mean ||tanh mu_pi(z_t+1) - tanh mu_pi(z_t)||^2 over z_0..z_H-1 from its start
    step when c > 0."""
    args = model.args
    k_pi, k_heads, k_dropout = jax.random.split(key, 3)
    mean_action, action, log_prob = model.pi(pi_params, zs, k_pi)
    q1, q2 = model.q_two_random(wm_params["qs"], zs, action, k_heads, k_dropout)
    q = 0.5 * (q1 + q2)  # (H+1, B)
    scale = running_scale_update(scale, jax.lax.stop_gradient(q[0]), args.tau)
    rho = args.rho ** jnp.arange(zs.shape[0])
    loss = jnp.mean(rho * jnp.mean(args.entropy_coef * log_prob - q / scale, axis=1))
    info = {"pi_loss": loss, "pi_log_prob": log_prob.mean(), "pi_scale": scale}
    if args.latent_smooth_coef > 0:
        # Along the detached rollout latents z_0..z_H-1 (not z_H), as the predecessor code does; the mean action is
        # already computed, so this costs no extra forward pass.
        rollout_action = mean_action[:-1]
        smooth = jnp.mean(jnp.sum((rollout_action[1:] - rollout_action[:-1]) ** 2, axis=-1))
        loss = loss + jnp.where(env_step >= args.latent_smooth_start_step, args.latent_smooth_coef, 0.0) * smooth
        info = {**info, "pi_loss": loss, "pi_smooth_loss": smooth}
    return loss, (scale, info)


# ---------------------------------------------------------------------------------------------------------------------
# Planner: MPPI over latent rollouts with policy-prior proposals (paper §3.2; official tdmpc2.py: plan)
# ---------------------------------------------------------------------------------------------------------------------
def estimate_value(model: WorldModel, agent: AgentState, z, actions, key):
    """Return of a latent trajectory (paper §3.2): G = sum_t gamma^t R(z_t, a_t) + gamma^H * mean of two random
    Q heads at (z_H, pi(z_H)). z: (N, latent), actions: (H, N, A)."""
    args = model.args

    def step(carry, act):
        z, value, disc = carry
        r = two_hot_inv(model.reward(agent.wm_params, z, act), args.num_bins, args.vmin, args.vmax)
        return (model.next(agent.wm_params, z, act), value + disc * r, disc * args.discount), None

    (z, value, disc), _ = jax.lax.scan(step, (z, jnp.zeros(z.shape[0]), jnp.ones(())), actions)
    k_pi, k_heads = jax.random.split(key)
    _, action, _ = model.pi(agent.pi_params, z, k_pi)
    q1, q2 = model.q_two_random(agent.wm_params["qs"], z, action, k_heads)
    return value + disc * 0.5 * (q1 + q2)


def plan(model: WorldModel, agent: AgentState, z, prev_mean, is_first, key, eval_mode: bool):
    """MPPI (Williams et al. 2015, as TD-MPC uses it; paper §3.2) for one latent state z (latent,): policy-prior
    trajectories plus Gaussian samples around a mean warm-started from the previous step, refined over `iterations`
    rounds of score-weighted elite averaging. Returns (action, mean plan to warm-start the next step)."""
    args = model.args
    horizon, action_dim = args.horizon, model.action_dim
    k_pi, k_iters, k_select, k_noise = jax.random.split(key, 4)

    def pi_rollout(z, k):
        _, act, _ = model.pi(agent.pi_params, z, k)
        return model.next(agent.wm_params, z, act), act

    z_pi = jnp.broadcast_to(z, (args.num_pi_trajs, z.shape[-1]))
    _, pi_actions = jax.lax.scan(pi_rollout, z_pi, jax.random.split(k_pi, horizon))  # (H, num_pi, A)

    z_all = jnp.broadcast_to(z, (args.num_samples, z.shape[-1]))
    shifted = jnp.concatenate([prev_mean[1:], jnp.zeros((1, action_dim))])
    mean = jnp.where(is_first, jnp.zeros_like(prev_mean), shifted)
    std = jnp.full((horizon, action_dim), args.max_std)

    def iteration(carry, k):
        mean, std = carry
        k_sample, k_value = jax.random.split(k)
        noise = jax.random.normal(k_sample, (horizon, args.num_samples - args.num_pi_trajs, action_dim))
        sampled = jnp.clip(mean[:, None] + std[:, None] * noise, -1, 1)
        actions = jnp.concatenate([pi_actions, sampled], axis=1)  # (H, num_samples, A)
        value = jnp.nan_to_num(estimate_value(model, agent, z_all, actions, k_value), nan=0.0)
        elite_value, elite_idx = jax.lax.top_k(value, args.num_elites)
        elite_actions = actions[:, elite_idx]  # (H, num_elites, A)
        score = jax.nn.softmax(args.temperature * (elite_value - elite_value.max()))
        weights = score[None, :, None]
        mean = jnp.sum(weights * elite_actions, axis=1) / (score.sum() + 1e-9)
        var = jnp.sum(weights * (elite_actions - mean[:, None]) ** 2, axis=1) / (score.sum() + 1e-9)
        std = jnp.clip(jnp.sqrt(var), args.min_std, args.max_std)
        return (mean, std), (elite_value, elite_actions)

    (mean, std), (elite_values, elite_actions) = jax.lax.scan(
        iteration, (mean, std), jax.random.split(k_iters, args.iterations)
    )
    # Pick one elite sequence of the last iteration with probability equal to its score.
    chosen = jax.random.categorical(k_select, args.temperature * (elite_values[-1] - elite_values[-1].max()))
    action = elite_actions[-1][0, chosen]
    if not eval_mode:
        action = action + std[0] * jax.random.normal(k_noise, (action_dim,))
    return jnp.clip(action, -1, 1), mean


def act_pi(model: WorldModel, agent: AgentState, obs, key, eval_mode: bool):
    """Policy-prior actions for a batch of observations: the mean in evaluation; in training a sample plus
    N(0, collect_noise) (the `--collect-policy pi` option)."""
    k_pi, k_noise = jax.random.split(key)
    mean_action, sample, _ = model.pi(agent.pi_params, model.encode(agent.wm_params, obs), k_pi)
    if eval_mode:
        return mean_action
    return jnp.clip(sample + model.args.collect_noise * jax.random.normal(k_noise, sample.shape), -1, 1)


def act_mppi(model: WorldModel, agent: AgentState, obs, plan_mean, is_first, key, eval_mode: bool):
    """MPPI actions for a batch of observations, one plan per env; returns (actions, plan means)."""
    z = model.encode(agent.wm_params, obs)
    plan_one = partial(plan, model, agent, eval_mode=eval_mode)
    return jax.vmap(plan_one)(z, plan_mean, is_first, jax.random.split(key, obs.shape[0]))


# ---------------------------------------------------------------------------------------------------------------------
# Replay buffer on device: (rows, num_envs) ring; sequences of H+1 observations never cross an episode boundary
# ---------------------------------------------------------------------------------------------------------------------
@struct.dataclass
class ReplayBuffer:
    obs: jax.Array  # (rows, E, obs_dim) observation before the action
    next_obs: jax.Array  # (rows, E, obs_dim) observation after it (the final one at an episode's end)
    action: jax.Array  # (rows, E, A)
    reward: jax.Array  # (rows, E)
    terminated: jax.Array  # (rows, E) 1 where the env terminated (no bootstrap); 0 on time-limit truncation
    episode_step: jax.Array  # (rows, E) agent step of the transition within its episode
    ptr: jax.Array  # next row to write
    size: jax.Array  # rows written so far (<= rows)


def buffer_init(rows: int, num_envs: int, obs_dim: int, action_dim: int) -> ReplayBuffer:
    zeros = lambda *shape: jnp.zeros((rows, num_envs, *shape))
    return ReplayBuffer(
        obs=zeros(obs_dim), next_obs=zeros(obs_dim), action=zeros(action_dim), reward=zeros(), terminated=zeros(),
        episode_step=jnp.zeros((rows, num_envs), jnp.int32),
        ptr=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


def buffer_add(buf: ReplayBuffer, obs, action, reward, next_obs, terminated, episode_step) -> ReplayBuffer:
    i = buf.ptr
    rows = buf.obs.shape[0]
    return buf.replace(
        obs=buf.obs.at[i].set(obs), next_obs=buf.next_obs.at[i].set(next_obs), action=buf.action.at[i].set(action),
        reward=buf.reward.at[i].set(reward), terminated=buf.terminated.at[i].set(terminated),
        episode_step=buf.episode_step.at[i].set(episode_step), ptr=(i + 1) % rows, size=jnp.minimum(buf.size + 1, rows),
    )


def valid_starts(buf: ReplayBuffer, horizon: int) -> jax.Array:
    """(rows, E) mask of rows that start H transitions of one episode, written in order (not across the ring head)."""
    rows = buf.obs.shape[0]
    start = jnp.arange(rows)
    end = (start + horizon - 1) % rows
    since_head = (buf.ptr - start) % rows  # 1..H-1: the sequence would run from the newest row into the oldest
    in_order = (start < buf.size) & (end < buf.size) & ((since_head == 0) | (since_head >= horizon))
    same_episode = buf.episode_step[end] == buf.episode_step + (horizon - 1)
    return in_order[:, None] & same_episode


def buffer_sample(buf: ReplayBuffer, valid_cumsum, key, batch_size: int, horizon: int):
    """Uniform over valid starts: obs (H+1, B, obs_dim), action (H, B, A), reward and terminated (H, B)."""
    num_envs = buf.obs.shape[1]
    u = jax.random.randint(key, (batch_size,), 0, valid_cumsum[-1])
    flat = jnp.searchsorted(valid_cumsum, u, side="right")
    start, env = flat // num_envs, flat % num_envs
    rows = (start[None] + jnp.arange(horizon)[:, None]) % buf.obs.shape[0]  # (H, B)
    obs = jnp.concatenate([buf.obs[start, env][None], buf.next_obs[rows, env]])
    return obs, buf.action[rows, env], buf.reward[rows, env], buf.terminated[rows, env]


# ---------------------------------------------------------------------------------------------------------------------
# Update: one gradient step of the world model and of the policy prior (official tdmpc2.py: _update)
# ---------------------------------------------------------------------------------------------------------------------
def update(model: WorldModel, wm_tx, pi_tx, agent: AgentState, batch, key, env_step):
    """One gradient update; `env_step` (traced) is the env step the training has reached, for the schedules."""
    obs, action, reward, terminated = batch
    k_target, k_dropout, k_pi = jax.random.split(key, 3)

    # Compute targets
    next_z = model.encode(agent.wm_params, obs[1:])
    td_target = td_targets(model, agent, next_z, reward, terminated, k_target)

    # Latent rollout, predictions and losses (inside `world_model_loss`), then the model update
    wm_grad_fn = jax.value_and_grad(partial(world_model_loss, model), has_aux=True)
    glass_gate = glass_schedule(model.args, env_step, agent.updates)
    (wm_loss, (zs, info)), wm_grads = wm_grad_fn(agent.wm_params, obs, action, reward, td_target, next_z, k_dropout,
                                                 glass_gate)
    updates, wm_opt_state = wm_tx.update(wm_grads, agent.wm_opt_state, agent.wm_params)
    wm_params = optax.apply_updates(agent.wm_params, updates)

    # Update policy, on the detached rollout latents and with the just-updated Q-functions
    pi_grad_fn = jax.value_and_grad(partial(policy_loss, model), has_aux=True)
    zs = jax.lax.stop_gradient(zs)
    (_, (scale, pi_info)), pi_grads = pi_grad_fn(agent.pi_params, wm_params, zs, agent.scale, k_pi, env_step)
    updates, pi_opt_state = pi_tx.update(pi_grads, agent.pi_opt_state, agent.pi_params)
    pi_params = optax.apply_updates(agent.pi_params, updates)

    # Update target Q-functions (Polyak averaging)
    agent = AgentState(
        wm_params=wm_params,
        target_qs=optax.incremental_update(wm_params["qs"], agent.target_qs, model.args.tau),
        pi_params=pi_params,
        wm_opt_state=wm_opt_state,
        pi_opt_state=pi_opt_state,
        scale=scale,
        updates=agent.updates + 1,
    )
    info = {**info, **pi_info, "total_loss": wm_loss, "grad_norm": optax.tree.norm(wm_grads)}
    return agent, info


# ---------------------------------------------------------------------------------------------------------------------
# Training loop: collect one vector step -> store -> the schedule's updates, scanned into jitted chunks
# ---------------------------------------------------------------------------------------------------------------------
def updates_at(vector_step, seed_vector_steps: int, args: Args):
    """The official schedule (trainer/online_trainer.py), per vector step: no updates while seeding (uniform random
    actions), the pretraining burst of `pretrain_updates` right after the last seed step, then `k_update` per vector
    step. `vector_step` may be traced: all three phases are one compiled program."""
    after_seeding = jnp.where(vector_step == seed_vector_steps - 1, args.pretrain_updates, args.k_update)
    return jnp.where(vector_step < seed_vector_steps - 1, 0, after_seeding)


@struct.dataclass
class TrainCarry:
    agent: AgentState
    buffer: ReplayBuffer
    env_state: object
    episode_step: jax.Array  # (E,) agent steps into the current episode
    episode_return: jax.Array  # (E,)
    plan_mean: jax.Array  # (E, H, A) MPPI warm start
    vector_step: jax.Array  # vector steps taken so far
    key: jax.Array


@struct.dataclass
class EvalCarry:
    env_state: object
    plan_mean: jax.Array  # (episodes, H, A) MPPI warm start of the MPPI half
    alive: jax.Array  # (2 * episodes,) False once an env signalled done
    total_return: jax.Array  # (2 * episodes,)
    t: jax.Array  # agent steps into the episode


class Trainer:
    """The jitted pieces of the training loop for one env and one resolved config."""

    def __init__(self, args: Args, venv: VectorEnv):
        self.args, self.venv = args, venv
        self.seed_vector_steps = args.seed_steps // (args.num_envs * args.action_repeat)
        self.model = WorldModel(args, venv.obs_dim, venv.action_dim)
        self.wm_tx, self.pi_tx = make_optimizers(args, jax.eval_shape(self.model.init, jax.random.key(0))[0])
        self.update = partial(update, self.model, self.wm_tx, self.pi_tx)

    def init(self, key) -> TrainCarry:
        args, venv = self.args, self.venv
        k_agent, k_env, k_carry = jax.random.split(key, 3)
        return TrainCarry(
            agent=init_agent(self.model, self.wm_tx, self.pi_tx, k_agent),
            buffer=buffer_init(args.buffer_size // args.num_envs, args.num_envs, venv.obs_dim, venv.action_dim),
            env_state=venv.reset(k_env, args.num_envs),
            episode_step=jnp.zeros(args.num_envs, jnp.int32),
            episode_return=jnp.zeros(args.num_envs),
            plan_mean=jnp.zeros((args.num_envs, args.horizon, venv.action_dim)),
            vector_step=jnp.zeros((), jnp.int32),
            key=k_carry,
        )

    def run_updates(self, agent: AgentState, buffer: ReplayBuffer, key, num_updates, env_step):
        """`num_updates` (may be traced) gradient updates on buffer batches at env step `env_step`; returns the mean
        of each logged value."""
        valid_cumsum = jnp.cumsum(valid_starts(buffer, self.args.horizon).reshape(-1))
        sample = partial(buffer_sample, buffer, valid_cumsum,
                         batch_size=self.args.batch_size, horizon=self.args.horizon)

        def one_update(i, carry):
            agent, info_sum = carry
            k_sample, k_update = jax.random.split(jax.random.fold_in(key, i))
            agent, info = self.update(agent, sample(k_sample), k_update, env_step)
            return agent, jax.tree.map(jnp.add, info_sum, info)

        info_shapes = jax.eval_shape(lambda k: self.update(agent, sample(k), k, env_step)[1], key)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), info_shapes)
        agent, info_sum = jax.lax.fori_loop(0, num_updates, one_update, (agent, zeros))
        return agent, jax.tree.map(lambda x: x / jnp.maximum(num_updates, 1), info_sum)

    def vector_step(self, carry: TrainCarry, _):
        """One agent step in every env (uniform random while seeding), stored in the buffer, then the schedule's
        updates."""
        args, venv = self.args, self.venv
        key, k_act, k_reset, k_update = jax.random.split(carry.key, 4)
        obs = observation(carry.env_state)
        seeding = carry.vector_step < self.seed_vector_steps

        def random_action():
            return jax.random.uniform(k_act, (args.num_envs, venv.action_dim), minval=-1, maxval=1), carry.plan_mean

        def policy_action():
            if args.collect_policy == "pi":
                return act_pi(self.model, carry.agent, obs, k_act, eval_mode=False), carry.plan_mean
            is_first = carry.episode_step == 0
            return act_mppi(self.model, carry.agent, obs, carry.plan_mean, is_first, k_act, eval_mode=False)

        action, plan_mean = jax.lax.cond(seeding, random_action, policy_action)
        env_state, reward, terminated = venv.step(carry.env_state, action)
        reward, next_obs = finite_or_zero(reward), finite_or_zero(observation(env_state))
        buffer = buffer_add(carry.buffer, obs, action, reward, next_obs, terminated, carry.episode_step)

        episode_return = carry.episode_return + reward
        finished = terminated | (carry.episode_step + 1 >= venv.max_agent_steps)
        stats = {"returns_sum": jnp.sum(jnp.where(finished, episode_return, 0.0)), "episodes": finished.sum(),
                 **venv.warp_flags(env_state)}
        num_updates = updates_at(carry.vector_step, self.seed_vector_steps, args)
        env_step = (carry.vector_step + 1) * args.num_envs * args.action_repeat  # including the step just stored
        agent, info = self.run_updates(carry.agent, buffer, k_update, num_updates, env_step)
        carry = TrainCarry(
            agent=agent,
            buffer=buffer,
            env_state=venv.reset_where(env_state, finished, k_reset),
            episode_step=jnp.where(finished, 0, carry.episode_step + 1),
            episode_return=jnp.where(finished, 0.0, episode_return),
            plan_mean=plan_mean,
            vector_step=carry.vector_step + 1,
            key=key,
        )
        return carry, (stats, info)

    def chunk(self, carry: TrainCarry, num_vector_steps: int):
        """Scan of `num_vector_steps` vector steps; per-step stats and loss means come back stacked."""
        return jax.lax.scan(self.vector_step, carry, None, length=num_vector_steps)

    def evaluate(self, agent: AgentState, key, record: bool = False, dump: bool = False, gallery: bool = False):
        """Undiscounted returns of `eval_episodes` full episodes with the policy mean and with MPPI (no noise), as
        ((episodes,), (episodes,)); both sets of episodes step together as one batch of envs. Then a dict (None when
        neither is asked for: the compiled program is the training loop's plain one): with `record`, "poses" of the
        first `video_episodes` episodes of each mode, (T + 1, 2 * video_episodes) per field of RENDER_FIELDS plus
        `alive` and `cluster` (the Glass cluster of each frame's latent), for `Videos` and `write_cluster_figure`;
        with `dump`, the "rollout": per step (T, 2 * episodes) the observation, latent, action, reward, whether the
        episode was still running, the nearest prototype `c` and its cluster; and the partition "S" the labels used.
        `gallery` (only --evaluate --capture-video asks for it) is `dump` plus, per step and episode, the "cos" to
        every prototype and the render "poses" of the state the latent was encoded from, for `write_prototype_gallery`
        and `write_cluster_time_figure`; the training loop never traces it."""
        venv, num, shown = self.venv, self.args.eval_episodes, self.args.video_episodes
        dump = dump or gallery
        k_reset, k_steps = jax.random.split(key)
        recorded = jnp.concatenate([jnp.arange(shown), num + jnp.arange(shown)])  # pi episodes, then MPPI ones
        glass = agent.wm_params["glass"]
        S = partition(glass, self.args) if record or dump else None  # prototypes and S exist whether Glass is on or not

        def poses(env_state, alive):  # None without record: nothing extra is traced
            if not record:
                return None
            fields = {name: getattr(env_state.data, name)[recorded] for name in RENDER_FIELDS}
            z = self.model.encode(agent.wm_params, observation(env_state)[recorded])
            return {**fields, "alive": alive[recorded], "cluster": cluster_label(z, glass["prototypes"], S)}

        def step(carry: EvalCarry, k):
            k_pi, k_mppi = jax.random.split(k)
            obs = observation(carry.env_state)
            action_pi = act_pi(self.model, agent, obs[:num], k_pi, eval_mode=True)
            is_first = jnp.full(num, carry.t == 0)
            action_mppi, plan_mean = act_mppi(self.model, agent, obs[num:], carry.plan_mean, is_first, k_mppi,
                                              eval_mode=True)
            action = jnp.concatenate([action_pi, action_mppi])
            env_state, reward, done = venv.step(carry.env_state, action)
            rollout = None
            if dump:
                z = self.model.encode(agent.wm_params, obs)
                cosine = unit_rows(z) @ unit_rows(glass["prototypes"]).T
                nearest = jnp.argmax(cosine, axis=-1)
                rollout = {"obs": obs, "z": z, "action": action, "reward": reward, "alive": carry.alive,
                           "c": nearest, "cluster": jnp.argmax(S[nearest], axis=-1)}
                if gallery:  # the pose obs came from, so a gallery frame shows the state its latent encodes
                    rollout["cos"] = cosine
                    rollout["poses"] = {name: getattr(carry.env_state.data, name) for name in RENDER_FIELDS}
            return EvalCarry(
                env_state=env_state,
                plan_mean=plan_mean,
                alive=carry.alive & ~done,
                total_return=carry.total_return + reward * carry.alive,
                t=carry.t + 1,
            ), (poses(env_state, carry.alive), rollout)  # a frame for each step the episode was still running

        init = EvalCarry(
            env_state=venv.reset(k_reset, 2 * num),
            plan_mean=jnp.zeros((num, self.args.horizon, venv.action_dim)),
            alive=jnp.ones(2 * num, bool),
            total_return=jnp.zeros(2 * num),
            t=jnp.zeros((), jnp.int32),
        )
        final, (frames, rollout) = jax.lax.scan(step, init, jax.random.split(k_steps, venv.max_agent_steps))
        returns = final.total_return[:num], final.total_return[num:]
        if not (record or dump):
            return returns, None
        extras = {"S": S} if not dump else {"S": S, "rollout": rollout}
        if record:
            start = poses(init.env_state, init.alive)
            extras["poses"] = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), start, frames)
        return returns, extras

    def glass_report(self, agent: AgentState, buffer: ReplayBuffer, key, env_step):
        """Glass at `env_step` on one buffer batch of rollout latents, as the loss sees them, whether or not the
        schedule has Glass on: (whether Glass is active at env_step, whether the buffer holds a batch, scalars: the
        unweighted loss parts, the weighted loss and the diagnostics, the graph's P, A and S matrices)."""
        args, model, params = self.args, self.model, agent.wm_params
        valid_cumsum = jnp.cumsum(valid_starts(buffer, args.horizon).reshape(-1))
        obs, action, _, _ = buffer_sample(buffer, valid_cumsum, key, args.batch_size, args.horizon)
        z0 = model.encode(params, obs[0])
        zs = jnp.concatenate([z0[None], latent_rollout(model, params, z0, action)])  # (H+1, B, latent)
        z_src, z_next = (x.reshape(-1, x.shape[-1]) for x in (zs[:-1], zs[1:]))
        graph = glass_graph(params["glass"], z_src, z_next, args)
        loss, parts = glass_loss(graph, args)
        scalars = {**parts, "loss": loss, **glass_diagnostics(graph["S"], graph["P"])}
        matrices = {k: graph[k] for k in ("P", "A", "S", "S_super") if k in graph}
        return glass_active(args, env_step), valid_cumsum[-1] > 0, scalars, matrices


# ---------------------------------------------------------------------------------------------------------------------
# train(): resolve the config, then alternate jitted training chunks with evaluations, logs and checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def train(args: Args) -> list[Path]:
    args, venv, run_dirs = setup(args)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(args), indent=2))
        return []
    trainer, mesh = Trainer(args, venv), seed_mesh(args.num_seeds)
    videos = Videos.open(venv, args) if args.capture_video else None
    env_steps_per_vector_step = args.num_envs * args.action_repeat
    chunk_vector_steps = max(1, min(args.log_freq, args.eval_freq) // env_steps_per_vector_step)
    train_chunk = over_seeds(partial(trainer.chunk, num_vector_steps=chunk_vector_steps), mesh, donate=True)
    evaluate = evaluation_programs(trainer, mesh)
    k_eval, k_init = seed_keys(args, mesh)
    arbitrate = args.arbitration_margin is not None
    # Glass's diagnostics batch: drawn with the step's eval key folded with GLASS_KEY_DATA, so it too is the same
    # however often the run was resumed.
    glass_report = over_seeds(
        lambda agent, buffer, key, step: trainer.glass_report(
            agent, buffer, jax.random.fold_in(jax.random.fold_in(key, step), GLASS_KEY_DATA), step),
        mesh, in_axes=(0, 0, 0, None))

    runs = SeedRuns(args, mesh, run_dirs)
    shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    carry, loop, returns = runs.start(over_seeds(trainer.init, mesh), k_init, shapes)
    print(f"{args.env_id} ({backend(args)}): obs {venv.obs_dim}, action {venv.action_dim}, discount "
          f"{args.discount:.4f}; {env_steps_per_vector_step} env steps per vector step, {args.k_update} updates each; "
          f"{args.seed_steps} seed steps, then {args.pretrain_updates} updates; {seeds_on_devices(args, mesh)}; "
          f"run folder{'s' if len(runs.dirs) > 1 else ''} {', '.join(map(str, runs.dirs))}", flush=True)
    if args.resume is not None:
        print(f"resumed from step {loop['step']}", flush=True)
    elif args.init_from is not None:
        changed = ", ".join(f"{name} {c['before']} -> {c['after']}" for name, c in runs.init_from["changed"].items())
        print(f"continued from {runs.init_from['run_dir']} at step {loop['step']:,} ({changed or 'no flag changed'})",
              flush=True)
    step, progress, stop = loop["step"], Progress(args, loop), StopSignal()
    try:
        while True:
            finished = step >= args.total_steps
            if stop.signum is None and (step >= loop["next_eval"] or finished):
                record = args.capture_video and (step // args.eval_freq) % args.video_every == 0
                per_episode, recorded = evaluate[record](carry.agent, k_eval, step)
                for i, (pi, mppi) in local_seed_rows(per_episode).items():
                    returns[i] = {"pi": float(np.mean(pi)), "mppi": float(np.mean(mppi))}
                    if arbitrate:
                        returns[i]["arb"] = returns[i][arbitrated_mode(returns[i], args)]
                runs.log_eval(step, progress.wall_time(), returns)
                if recorded is not None:  # drawn here, outside the jitted programs
                    for i, seed_recorded in local_seed_rows(recorded).items():
                        seed_recorded = jax.device_get(seed_recorded)
                        if videos is not None:  # None when no OpenGL backend works; the figure needs none
                            videos.write(runs.dirs[i] / "videos", step, seed_recorded["poses"])
                        write_cluster_figure(runs.dirs[i] / "glass" / f"clusters_step{step}.png", step,
                                             seed_recorded, args)
                runs.log_glass(step, glass_report(carry.agent, carry.buffer, k_eval, step))
                loop["next_eval"] = next_multiple(step, args.eval_freq)
            if runs.checkpoint_due(step, loop, finished, stop.signum is not None):
                loop.update(step=step, wall_time=progress.wall_time())
                print(runs.save(step, carry, loop, returns), flush=True)
            if finished or stop.signum is not None:
                break
            tick = time.time()
            carry, (stats, info) = train_chunk(carry)
            per_seed = {i: jax.device_get(row) for i, row in local_seed_rows((stats, info)).items()}  # waits
            chunk_start, step = step, step + chunk_vector_steps * env_steps_per_vector_step
            check_chunk(per_seed, chunk_start, args, progress.warned)
            progress.add(chunk_start, step, time.time() - tick)
            training = np.arange(chunk_start, step, env_steps_per_vector_step) >= args.seed_steps
            runs.log_chunk(step, per_seed, training, progress.sps())
            print(f"step {step:,}/{args.total_steps:,} | {progress.line(step)} | last eval: {format_returns(returns)}",
                  flush=True)
        runs.check_written()  # the last checkpoint is on disk before the run says it is done
    finally:
        stop.restore()
        runs.close()
    if stop.signum is not None:
        print(f"stopped at step {step}; resume with: python {Path(__file__).name} --resume {runs.dirs[0]}", flush=True)
        raise Preempted(stop.signum)
    print(f"done: {step:,} env steps in {format_time(progress.wall_time())}; final eval: "
          f"{format_returns(returns)}; results in {', '.join(map(str, runs.dirs))}", flush=True)
    return runs.dirs


def evaluation_programs(trainer: Trainer, mesh, dump: bool = False, gallery: bool = False) -> dict:
    """record -> the jitted evaluation over seeds, (agent, eval key, step) -> (per-episode returns, extras). The key
    depends only on the step: evaluations are the same however often the run was resumed, and --evaluate gives them
    again. With record, the extras hold the poses of the first episodes of each mode (for videos and clusters); with
    dump, the whole rollouts (--dump-rollouts); with gallery (--evaluate --capture-video), the rollouts with every
    episode's poses and cosines too."""
    return {record: over_seeds(lambda agent, key, step, record=record: trainer.evaluate(
        agent, jax.random.fold_in(key, step), record, dump, gallery), mesh, in_axes=(0, 0, None))
        for record in (False, True)}


EVALUATION_FLAGS = ("evaluate", "evaluate_step", "eval_episodes", "dump_rollouts", "capture_video", "video_episodes",
                    "video_height", "video_width")


def evaluate_run(cli: Args) -> Path:
    """--evaluate RUN_DIR: the agent of one checkpoint, evaluated as the training loop evaluated it at that step
    (same program, same key: with the run's --eval-episodes the means are that step's eval.csv row). Writes
    {run_dir}/evaluations/step{N}.json (with --capture-video or --dump-rollouts, also its "glass" record of
    `glass_visits`), with --capture-video videos/, clusters_step{N}.png, prototypes_step{N}.png and
    cluster_time_step{N}.png, with --dump-rollouts rollouts_step{N}.npz, and nothing else."""
    run_dir = Path(cli.evaluate)
    config, _ = saved_config(run_dir, "--evaluate")
    given = given_flags(cli)
    if refused := sorted(given - set(EVALUATION_FLAGS)):
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in EVALUATION_FLAGS[1:])
        raise UserError(f"--evaluate: --{refused[0].replace('_', '-')} is not an evaluation flag; with --evaluate "
                        f"only {allowed} may be given")
    changed = {name: getattr(cli, name) for name in given}
    if config.impl == "warp" and changed.get("eval_episodes", config.eval_episodes) != config.eval_episodes:
        changed["naconmax"] = None  # sized again for the evaluation's env count
    # one seed, the folder's own; the saved resume/run flags do not apply to an evaluation
    config = dataclasses.replace(config, num_seeds=1, resume=None, init_from=None, dry_run=False, distributed=False,
                                 track=False)
    args, venv, _ = setup(dataclasses.replace(config, **changed))
    trainer, mesh = Trainer(args, venv), seed_mesh(1)
    carry_shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    step, stored, _ = stored_checkpoint(run_dir, args.evaluate_step, carry_shapes, "--evaluate")
    carry = seed_carries(mesh, [stored], carry_shapes)
    # --capture-video also asks for every episode's poses and cosines (the gallery): extra outputs only, the returns
    # are computed as in the training loop's program and equal its eval.csv row (tested)
    evaluate = evaluation_programs(trainer, mesh, dump=args.dump_rollouts, gallery=args.capture_video)
    evaluate = evaluate[args.capture_video]
    per_episode, extras = evaluate(carry.agent, seed_keys(args, mesh)[0], step)
    extras = None if extras is None else jax.device_get(local_seed_rows(extras)[0])
    (per_episode,) = local_seed_rows(per_episode).values()
    modes = {mode: episode_statistics(returns) for mode, returns in zip(("pi", "mppi"), per_episode, strict=True)}
    if args.arbitration_margin is not None:  # the mode that the training loop's arb column would have taken
        modes["arb"] = modes[arbitrated_mode({mode: stats["mean"] for mode, stats in modes.items()}, args)]
    for mode, stats in modes.items():
        interval = "-" if stats["ci95"] is None else "[{:.1f}, {:.1f}]".format(*stats["ci95"])
        print(f"{run_dir} step {step:,}: {mode} {stats['mean']:.1f} (std {stats['std']:.1f}, 95% CI {interval}, "
              f"{args.eval_episodes} episodes)", flush=True)
    folder = run_dir / "evaluations"
    folder.mkdir(exist_ok=True)
    rollout = None if extras is None else extras.get("rollout")
    visits = None if rollout is None else glass_visits(rollout, extras["S"], args.eval_episodes)
    if visits is not None:
        print(f"{run_dir} step {step:,}: running frames nearest each prototype (pi and mppi): "
              f"{' '.join(map(str, visits['prototype_wins']))}", flush=True)
    if args.capture_video:  # the videos and the gallery need OpenGL, the other figures do not
        title = f"{run_dir.name}, env step {step:,} (pi and mppi, {args.eval_episodes} episodes each)"
        if (videos := Videos.open(venv, args)) is not None:
            videos.write(folder / "videos", step, extras["poses"])
            write_prototype_gallery(folder / f"prototypes_step{step}.png", title, rollout, extras["S"],
                                    visits["prototype_wins"], videos)
        write_cluster_figure(folder / f"clusters_step{step}.png", step, extras, args)
        write_cluster_time_figure(folder / f"cluster_time_step{step}.png", title, visits,
                                  {mode: modes[mode]["returns"] for mode in ("pi", "mppi")})
    if args.dump_rollouts:
        path = folder / f"rollouts_step{step}.npz"
        dumped = {name: x for name, x in rollout.items() if name not in GALLERY_FIELDS}
        write_npz(path, rollout_arrays(dumped, args.eval_episodes))
        print(f"wrote {path}: per mode {args.eval_episodes} episodes x {venv.max_agent_steps} steps of "
              f"{', '.join(dumped)}", flush=True)
    record = {"run_dir": str(run_dir), "step": step, "episodes": args.eval_episodes, "modes": modes,
              **({} if visits is None else {"glass": visits}), "metadata": run_metadata()}
    atomic_write(folder / f"step{step}.json", json.dumps(record, indent=2).encode())
    print(f"wrote {folder / f'step{step}.json'}", flush=True)
    return folder / f"step{step}.json"


def arbitrated_mode(means: dict, args: Args) -> str:
    """MPPI when its mean beats pi's by --arbitration-margin, else pi; chosen on the episodes it reports, so (like
    best-any) an optimistic number."""
    return "mppi" if means["mppi"] > means["pi"] + args.arbitration_margin else "pi"


def rollout_arrays(rollout: dict, episodes: int) -> dict:
    """--dump-rollouts: the evaluation's per-step arrays, (T, 2 * episodes, ...), as "{mode}_{name}" arrays of
    (episodes, T, ...); `alive` marks the steps each episode was still running."""
    halves = {"pi": slice(None, episodes), "mppi": slice(episodes, None)}
    return {f"{mode}_{name}": np.swapaxes(x[:, half], 0, 1) for mode, half in halves.items()
            for name, x in rollout.items()}


def stored_checkpoint(run_dir: Path, step: Optional[int], carry_shapes, flag: str) -> tuple[int, dict, dict]:
    """(step, stored carry, loop) of a run folder's complete checkpoint at `step` (unset = the newest), read without
    changing anything there: a training run may still be writing that folder."""
    step = complete_checkpoint(run_dir, step, flag)
    try:
        stored, loop = Checkpoints(run_dir, keep=1, read_only=True).restore(step, carry_shapes)
    except Exception as e:  # noqa: BLE001 (whatever a damaged file raises)
        raise UserError(f"{flag} {run_dir}: checkpoint step {step} cannot be read ({first_line(e)})") from None
    return step, stored, loop


def complete_checkpoint(run_dir: Path, step: Optional[int], flag: str) -> int:
    """`step` (unset: the newest) if the run folder holds a complete checkpoint there; else one line naming those it
    holds."""
    steps = Checkpoints(run_dir, keep=1, read_only=True).manager.all_steps()
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


def setup(args: Args) -> tuple[Args, VectorEnv, Optional[list[Path]]]:
    """The resolved config (the saved one when resuming), the env and the run folders of a resumed batch."""
    if args.distributed:
        start_distributed()
    run_dirs = None
    if args.resume is not None and args.init_from is not None:
        raise UserError("--init-from starts a new run from a checkpoint, --resume continues a run: give one of them")
    if args.resume is not None:
        args, run_dirs = resume_config(args)
    elif args.init_from is not None:
        args = continuation_config(args)
    if args.capture_video and sys.platform == "linux":
        os.environ.setdefault("MUJOCO_GL", "egl")  # Mesa's EGL renders without a display, on CPU-only machines too
    worlds = max(args.num_envs, 2 * args.eval_episodes) * max(1, args.num_seeds // jax.device_count())
    env = load_env(args.env_id, args.impl, args.episode_length, worlds, args.naconmax, args.njmax)
    venv = VectorEnv(env, args.action_repeat)
    return resolve_args(args, venv), venv, run_dirs


def next_multiple(step: int, every: int) -> int:
    """The first multiple of `every` past `step`: the next evaluation or checkpoint point."""
    return (step // every + 1) * every


def check_chunk(per_seed: dict, chunk_start: int, args: Args, warned: set):
    """Stop at a warp capacity overflow or a non-finite loss, naming the env step and the seed."""
    env_steps_per_vector_step = args.num_envs * args.action_repeat
    for i, (stats, info) in per_seed.items():
        check_warp_flags(stats, chunk_start, args, i, warned)
        if (bad := first_nonfinite(info)) is not None:
            name, index = bad
            seed = f" (seed {args.seed + i})" if args.num_seeds > 1 else ""
            at_step = chunk_start + (index + 1) * env_steps_per_vector_step
            raise UserError(f"non-finite losses/{name} at env step {at_step}{seed}; stopping (checkpoints written so "
                            "far are intact)")


class Progress:
    """Wall time, and SPS and ETA over the timed training chunks (not seeding, not the pretraining burst, not the
    first chunk after a start, which compiles). With several seeds, SPS counts one seed's env steps."""

    def __init__(self, args: Args, loop: dict):
        self.args, self.start_step = args, loop["step"]
        self.start_time = time.time() - loop["wall_time"]
        self.steps, self.seconds, self.warned = 0, 0.0, set()  # warned: warnings printed once per run

    def wall_time(self) -> float:
        return time.time() - self.start_time

    def add(self, chunk_start: int, chunk_end: int, seconds: float):
        if chunk_start >= self.args.seed_steps and chunk_start > self.start_step:
            self.steps, self.seconds = self.steps + chunk_end - chunk_start, self.seconds + seconds

    def sps(self) -> Optional[float]:
        return self.steps / self.seconds if self.seconds else None

    def line(self, step: int) -> str:
        speed = speed_and_eta(self.steps, self.seconds, self.args.total_steps - step)
        if self.args.num_seeds > 1 and self.seconds:
            speed = speed.replace(" |", f" per seed ({self.sps() * self.args.num_seeds:,.0f} in all) |", 1)
        return speed


# ---------------------------------------------------------------------------------------------------------------------
# Seeds as a batch axis: one jitted program over a leading seed axis, laid over every device (and every host)
# ---------------------------------------------------------------------------------------------------------------------
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


def seed_keys(args: Args, mesh) -> tuple[jax.Array, jax.Array]:
    """(evaluation keys, init keys), one per seed, laid over the mesh: seed s draws exactly the keys a solo run of
    seed s draws, and so does --evaluate of its folder."""
    keys = [jax.random.key_data(jax.random.split(jax.random.key(args.seed + i))) for i in range(args.num_seeds)]
    keys = jax.random.wrap_key_data(seed_sharded(mesh, np.stack(keys)))
    return keys[:, 0], keys[:, 1]


def seeds_on_devices(args: Args, mesh) -> str:
    per_device = args.num_seeds // mesh.size
    hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    return f"{args.num_seeds} seed{'s' if args.num_seeds > 1 else ''}, {per_device} per device on {mesh.size} " \
           f"device{'s' if mesh.size > 1 else ''}{hosts}"


def over_seeds(fn, mesh, in_axes=0, donate: bool = False):
    """jit(fn) over a leading seed axis of the arguments whose in_axes is 0 (None: shared by all seeds), sharded over
    the mesh so that each device runs its own seeds with no communication. A device with several seeds vmaps `fn`;
    a device with one runs `fn` itself, so that --num-seeds 1 is, bit for bit, the solo run (XLA's batched kernels,
    and its programs for several devices, round differently)."""
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
    """Seed index -> that seed's slice of a seed-sharded pytree, for the seeds whose devices this process holds."""
    leaves, treedef = jax.tree.flatten(tree)
    rows = {}
    for n, leaf in enumerate(leaves):
        for shard in leaf.addressable_shards:
            first = shard.index[0].start or 0
            for j in range(shard.data.shape[0]):
                rows.setdefault(first + j, [None] * len(leaves))[n] = shard.data[j]
    return {i: jax.tree.unflatten(treedef, row) for i, row in sorted(rows.items())}


def format_returns(returns: dict) -> str:
    """'pi 91.7, mppi 90.9'; with several seeds 'pi 91.7/85.2, mppi 90.9/88.0' (one value per seed)."""
    seeds = [r for _, r in sorted(returns.items()) if r]
    if not seeds:
        return "-"
    return ", ".join(f"{mode} " + "/".join(f"{r[mode]:.1f}" for r in seeds) for mode in seeds[0])


# ---------------------------------------------------------------------------------------------------------------------
# Run folder, checkpoints, eval.csv and formatting
# ---------------------------------------------------------------------------------------------------------------------
class SeedRuns:
    """The run folders of a batch of seeds, one per seed as if it had run alone (args.json with its own seed,
    eval.csv, TensorBoard events, checkpoints, the glass/ graphs). A process writes only the folders of the seeds its
    devices hold."""

    def __init__(self, args: Args, mesh, dirs: Optional[list[Path]] = None):
        self.args, self.mesh = args, mesh
        self.dirs = dirs or new_run_dirs(args)
        held = seed_sharding(mesh).addressable_devices_indices_map((args.num_seeds,)).values()
        self.local = sorted({i for index in held for i in range(args.num_seeds)[index[0]]})
        for i in self.local:
            prepare_run_dir(self.dirs[i])
        self.checkpoints = {i: Checkpoints(self.dirs[i], args.keep_checkpoints, args.keep_every) for i in self.local}
        self.writers, self.eval_logs, self.tracked = {}, {}, {}
        self.init_from = None  # a continuation's record of where it started (args.json's init_from)

    def start(self, init, keys, carry_shapes) -> tuple:
        """(carry, loop counters, last returns per seed) of a new run, of a continuation's source checkpoint, or of
        the newest step that every seed of a resumed batch can restore; then opens the logs."""
        if self.args.resume is None and self.args.init_from is None:
            self.open(resume_step=None)  # jitted init: its outputs match the chunk's, nothing compiles twice
            loop = {"step": 0, "next_eval": 0, "next_checkpoint": self.args.checkpoint_every, "wall_time": 0.0}
            return init(keys), loop, {i: {} for i in self.local}
        if self.args.resume is None:
            return self.continue_from(carry_shapes)
        step = None
        while True:
            restored = {i: c.restore_newest(carry_shapes, at_most=step) for i, c in self.checkpoints.items()}
            steps = {loop["step"] for _, loop in restored.values()}
            if len(steps) == 1:
                break
            step = min(steps)  # a seed's newest checkpoint was damaged: the whole batch goes back to its step
        (step,) = steps
        if step >= self.args.total_steps:
            raise UserError(f"--resume: the run already reached step {step:,}; pass a larger --total-steps to "
                            "extend it")
        for c in self.checkpoints.values():
            c.delete_after(step)
        carry = seed_carries(self.mesh, [state for state, _ in restored.values()], carry_shapes)
        returns = {i: seed_loop.pop("returns") for i, (_, seed_loop) in restored.items()}  # the rest is common
        self.open(resume_step=step)
        return carry, next(iter(restored.values()))[1], returns

    def continue_from(self, carry_shapes) -> tuple:
        """--init-from: the source run's checkpoint starts this new run, whose steps go on from its step."""
        source, step = init_from_source(self.args.init_from)
        step, stored, loop = stored_checkpoint(source, step, carry_shapes, "--init-from")
        self.init_from = continuation_record(self.args, source, step)
        every = self.args.checkpoint_every
        loop.update(next_eval=next_multiple(step, self.args.eval_freq),
                    next_checkpoint=next_multiple(step, every) if every else 0)
        returns = {0: loop.pop("returns")}
        self.open(resume_step=None)
        return seed_carries(self.mesh, [stored], carry_shapes), loop, returns

    def open(self, resume_step: Optional[int]):
        from tensorboardX import SummaryWriter

        metadata = run_metadata()
        arbitration = ["return_arb"] if self.args.arbitration_margin is not None else []
        columns = ["step", "wall_time", "return_pi", "return_mppi", *arbitration]
        for i in self.local:
            config = dataclasses.asdict(dataclasses.replace(self.args, seed=self.args.seed + i))
            batch = {"seed_index": i, "run_dirs": [d.name for d in self.dirs]}
            if resume_step is not None:  # a resumed continuation keeps the record of where it started
                self.init_from = json.loads((self.dirs[i] / "args.json").read_text()).get("init_from")
            config["init_from"] = self.init_from
            atomic_write(self.dirs[i] / "args.json",
                         json.dumps({**config, "batch": batch, "metadata": metadata}, indent=2).encode())
            # Events past the checkpoint (written before an interruption) are hidden: the curves continue without
            # repeats.
            writer = SummaryWriter(str(self.dirs[i]), purge_step=None if resume_step is None else resume_step + 1)
            if resume_step is None:
                table = "\n".join(f"|{k}|{v}|" for k, v in config.items())
                writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
            self.writers[i] = writer
            if self.args.track:
                self.tracked[i] = start_tracking(self.args, self.dirs[i], config)
            self.eval_logs[i] = EvalLog(self.dirs[i] / "eval.csv", columns, resume_step)
            glass_dir = self.dirs[i] / "glass"
            glass_dir.mkdir(exist_ok=True)
            if resume_step is not None:  # like eval.csv's rows: graphs of evaluations past the checkpoint are redone
                for path in [*glass_dir.glob("P_S_step*.npz"), *glass_dir.glob("clusters_step*.png")]:
                    if int(path.stem.rpartition("_step")[2]) > resume_step:
                        path.unlink()

    def scalars(self, i: int, step: int, values: dict):
        """Seed i's scalars at `step`, to TensorBoard (and to Weights & Biases with --track)."""
        for name, value in values.items():
            self.writers[i].add_scalar(name, value, step)
        if i in self.tracked:
            self.tracked[i].log(values, step=step)

    def log_eval(self, step: int, wall_time: float, returns: dict):
        for i in self.local:
            self.eval_logs[i].write(step, round(wall_time, 2), *returns[i].values())
            self.scalars(i, step, {f"eval/return_{mode}": value for mode, value in returns[i].items()})

    def log_glass(self, step: int, report):
        """Glass at an evaluation (`Trainer.glass_report` over the seeds): each seed's into its own folder."""
        for i, seed_report in local_seed_rows(report).items():
            write_glass_report(self.dirs[i], partial(self.scalars, i, step), seed_report, step)

    def log_chunk(self, step: int, per_seed: dict, training: np.ndarray, sps: Optional[float]):
        """After a chunk: speed, training episodes' return, and each loss averaged over the chunk's training vector
        steps; and whether the last checkpoint was written."""
        for i, (stats, info) in per_seed.items():
            values = {} if sps is None else {"charts/SPS": sps}
            if episodes := int(stats["episodes"].sum()):
                values["charts/episodic_return"] = float(stats["returns_sum"].sum()) / episodes
            if "warp_unconverged" in stats:
                values["charts/warp_unconverged"] = float(stats["warp_unconverged"].mean()) / self.args.num_envs
            if training.any():
                values.update({f"losses/{name}": float(np.mean(v[training])) for name, v in info.items()})
            self.scalars(i, step, values)
            self.checkpoints[i].check_written()

    def checkpoint_due(self, step: int, loop: dict, finished: bool, stopping: bool) -> bool:
        """At the --checkpoint-every points, at the end (with --save-model too) and on a stop signal; once a step."""
        every = self.args.checkpoint_every
        due = (every and (step >= loop["next_checkpoint"] or finished)) or (finished and self.args.save_model)
        if not (due or stopping) or step == self.checkpoints[self.local[0]].latest_step():
            return False
        if every:
            loop["next_checkpoint"] = max(loop["next_checkpoint"], next_multiple(step, every))
        return True

    def check_written(self):
        for checkpoints in self.checkpoints.values():
            checkpoints.check_written(wait=True)

    def save(self, step: int, carry, loop: dict, returns: dict) -> str:
        tick = time.time()
        sizes = []
        for i, seed_carry in local_seed_rows(carry).items():
            self.writers[i].flush()  # every event up to this step is on disk before the checkpoint claims it
            sizes.append(self.checkpoints[i].save(step, seed_carry, {**loop, "returns": returns[i]}))
        size = f"{sizes[0] / 1e6:.1f} MB" + (f" x {len(sizes)} seeds" if len(sizes) > 1 else "")
        return f"checkpoint step {step}: {size}, {time.time() - tick:.2f} s (written in the background)"

    def close(self):
        for writer in [*self.writers.values(), *self.eval_logs.values()]:
            writer.close()
        for checkpoints in self.checkpoints.values():
            checkpoints.close()
        for run in self.tracked.values():
            run.finish()


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
    seeds = [args.seed + i for i in range(args.num_seeds)]
    if args.run_dir is not None:
        return [Path(args.run_dir)] if args.num_seeds == 1 else [Path(f"{args.run_dir}__{s}") for s in seeds]
    stamp = int(time.time())
    if jax.process_count() > 1:  # every host names the folders alike
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return [Path(f"runs/{args.env_id}__{args.exp_name}__{s}__{stamp}") for s in seeds]


def prepare_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run folder {run_dir} is not writable: {e.strerror}") from None
    return run_dir


def atomic_write(path: Path, data: bytes):
    """Write to a temp file in the same folder, then rename: a killed run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_metadata() -> dict:
    versions = {}
    for package in ["jax", "jaxlib", "flax", "optax", "mujoco", "mujoco-mjx", "playground", "tyro", "numpy"]:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        cwd = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        git_commit = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git_commit = None
    return {"script": Path(__file__).name, "versions": versions, "git_commit": git_commit,
            "command": " ".join(sys.argv)}


class Checkpoints:
    """Full training state at a step: the whole jitted carry (networks, optimiser states, buffer, env states, MPPI
    warm starts, RNG key, counters) plus the host loop's counters, in {run_dir}/checkpoints/{step}/ with orbax. Orbax
    writes in a background thread while training goes on, into a temporary folder that it renames when complete, and
    keeps the newest `keep`. All of Glass's state is in the carry: its prototypes and assign_logits in the world-model
    params (and optimiser state), its every-k update counter in the agent; the schedule is a function of the env
    step."""

    def __init__(self, run_dir: Path, keep: int, keep_every: int = 0, read_only: bool = False):
        import orbax.checkpoint as ocp  # imported here so that importing this file stays cheap

        self.ocp, self.run_dir, self.pending = ocp, run_dir, None  # pending: (step, bytes) of the write in flight
        # read_only (--evaluate, which never saves): a training run may be writing this folder, so nothing there is
        # created or cleaned up; else a killed save's temporary folder is cleaned up
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None, create=not read_only,
                                               cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, carry, loop: dict) -> int:
        """Starts writing one seed's carry; returns its size in bytes."""
        self.check_written(wait=True)  # orbax finishes the previous write first; a failed one is reported here
        # host copies: the next chunk may overwrite the carry's buffers
        state = jax.tree.map(lambda x: np.array(to_storable(x)), carry)
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), loop=args.JsonSave(loop)))
        self.pending = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
        return self.pending[1]

    def check_written(self, wait: bool = False):
        """Stop the run in one line if the last background write failed (most often: the disk is full). Without
        `wait`, a write still in flight is left to a later check."""
        if self.pending is None or (not wait and self.manager.is_saving_in_progress()):
            return
        (step, size), self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (orbax re-raises whatever its writer thread raised)
            self.manager.reload()
            intact = [s for s in self.manager.all_steps() if s != step]
            newest = f"step {max(intact)}" if intact else "none"
            free = shutil.disk_usage(self.run_dir).free
            raise UserError(f"checkpoint step {step} could not be written to {self.run_dir / 'checkpoints'} "
                            f"({first_line(e)}): it needs about {size / 1e6:.1f} MB, that disk has {free / 1e6:.1f} MB "
                            f"free; newest intact checkpoint: {newest}; stopping (free space, then --resume "
                            f"{self.run_dir})") from None

    def restore_newest(self, carry_shapes, at_most: Optional[int] = None):
        """(stored carry, loop) of the newest checkpoint at or before `at_most` that reads back whole; a damaged one
        (a file cut short or corrupted) is moved to checkpoints_damaged/ with a warning and the one before it is
        tried. `from_storable` turns the stored carry back into a carry."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if at_most is not None and step > at_most:
                continue
            try:
                return self.restore(step, carry_shapes)
            except Exception as e:  # noqa: BLE001 (whatever a damaged file raises, the previous checkpoint is next)
                damaged = self.run_dir / "checkpoints_damaged"
                damaged.mkdir(exist_ok=True)
                os.replace(self.run_dir / "checkpoints" / str(step), damaged / str(step))
                self.manager.reload()
                print(f"warning: checkpoint step {step} is damaged ({first_line(e)}); moved to {damaged}, trying the "
                      "previous one", flush=True)
                continue
        raise UserError(f"--resume: no usable checkpoint in {self.run_dir / 'checkpoints'}")

    def restore(self, step: int, carry_shapes) -> tuple:
        """(stored carry as numpy arrays, loop) of the checkpoint at `step`."""
        args = self.ocp.args
        restored = self.manager.restore(step, args=args.Composite(
            state=args.StandardRestore(jax.eval_shape(partial(jax.tree.map, to_storable), carry_shapes)),
            loop=args.JsonRestore()))
        return jax.tree.map(np.asarray, restored.state), restored.loop

    def delete_after(self, step: int):
        """Drop checkpoints past `step` (another seed of the batch could not go as far), so that they are rewritten."""
        for later in [s for s in self.manager.all_steps() if s > step]:
            self.manager.delete(later)

    def close(self):
        """Waits for a write in flight. A failure was reported by check_written, or an error is on its way out."""
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass


def to_storable(x):
    """What orbax can store of a carry leaf (traceable, so that eval_shape gives the stored shapes): typed PRNG keys
    as their raw data, empty arrays (MJX's actuator state of an env without actuator dynamics) as one placeholder."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return jnp.zeros(1, x.dtype) if x.size == 0 else x


def from_storable(stored, like):
    if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(stored)
    return jnp.zeros(like.shape, like.dtype) if math.prod(like.shape) == 0 else stored


def seed_carries(mesh, rows: list, carry_shapes):
    """The carries of the local seeds on their devices, from their stored checkpoints (one row per seed)."""
    stored = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    stored = jax.tree.map(partial(jax.make_array_from_process_local_data, seed_sharding(mesh)), stored)
    return over_seeds(lambda x: jax.tree.map(from_storable, x, carry_shapes), mesh)(stored)


# The flags that size or define the stored state: a continuation (--init-from) cannot change them.
STATE_FLAGS = ("env_id", "seed", "num_seeds", "num_envs", "action_repeat", "impl", "naconmax", "njmax", "buffer_size",
               "model_size", "enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "simnorm_dim", "num_bins",
               "horizon", "glass_num_prototypes", "glass_num_clusters", "glass_num_super_clusters")


def continuation_config(cli: Args) -> Args:
    """--init-from RUN_DIR[:STEP]: the source run's config, resolved as it ran, with the flags given now; those that
    size or define the stored state are refused. The continuation trains one seed, the source folder's, from the
    step it names (`init_from` holds it from here on, also when STEP was left to the newest checkpoint)."""
    source, step = init_from_source(cli.init_from)
    config, _ = saved_config(source, "--init-from")
    step = complete_checkpoint(source, step, "--init-from")
    config = dataclasses.replace(config, num_seeds=1, run_dir=None, resume=None, dry_run=False, distributed=False)
    given = given_flags(cli)
    for name in sorted(given & set(STATE_FLAGS)):
        if getattr(cli, name) != getattr(config, name):
            raise UserError(f"--init-from: --{name.replace('_', '-')} {getattr(cli, name)} differs from the source "
                            f"run's {getattr(config, name)}, and the checkpoint's state was made with it")
    config = dataclasses.replace(config, **{name: getattr(cli, name) for name in given - {"init_from"}},
                                 init_from=f"{source}:{step}")
    if step >= config.total_steps:
        raise UserError(f"--init-from: that checkpoint is at step {step:,}; pass a --total-steps past it")
    return config


def init_from_source(value: str) -> tuple[Path, Optional[int]]:
    """RUN_DIR[:STEP] -> (folder, step or None for the newest checkpoint)."""
    folder, _, step = value.rpartition(":")
    return (Path(folder), int(step)) if folder and step.isdigit() else (Path(value), None)


def continuation_record(args: Args, source: Path, step: int) -> dict:
    """args.json's init_from: the source folder, its step, and every flag whose value differs from the source run's
    (before/after), so that a continuation is never mistaken for a run from scratch."""
    config, _ = saved_config(source, "--init-from")
    bookkeeping = {"init_from", "run_dir", "resume", "dry_run", "num_seeds"}
    changed = {f.name: {"before": getattr(config, f.name), "after": getattr(args, f.name)}
               for f in dataclasses.fields(Args)
               if f.name not in bookkeeping and getattr(config, f.name) != getattr(args, f.name)}
    return {"run_dir": str(source), "step": step, "changed": changed}


def resume_config(cli: Args) -> tuple[Args, list[Path]]:
    """The config saved in `cli.resume`'s args.json and the run folders of its batch of seeds (any seed's folder
    restarts the whole batch). Of the flags given now, only those that cannot change the algorithm may differ."""
    run_dir = Path(cli.resume)
    config, batch = saved_config(run_dir, "--resume")
    dirs = [run_dir.parent / name for name in batch["run_dirs"]]  # siblings: the batch may have been moved
    dirs[batch["seed_index"]] = run_dir  # or this folder renamed
    for folder in dirs:
        if not any(p.name.isdigit() for p in (folder / "checkpoints").glob("*")):
            raise UserError(f"--resume {run_dir}: no checkpoint in {folder} (was it run with --checkpoint-every 0?)")
    config = dataclasses.replace(config, seed=config.seed - batch["seed_index"])  # the batch's first seed
    may_change = {"resume", "total_steps", "checkpoint_every", "keep_checkpoints", "keep_every", "save_model",
                  "dry_run", "distributed", "track", "wandb_project_name", "wandb_entity"}
    given = given_flags(cli)
    for name in sorted(given - may_change):
        if getattr(cli, name) != getattr(config, name):
            raise UserError(f"--resume: --{name.replace('_', '-')} {getattr(cli, name)} differs from the run's "
                            f"{getattr(config, name)}; only --total-steps and the checkpoint flags may change when "
                            "resuming")
    changed = {name: getattr(cli, name) for name in given & may_change}
    return dataclasses.replace(config, **changed), dirs


def given_flags(cli: Args) -> set[str]:
    """The Args fields a run was given: those named on the command line, even when set to their default value
    (`--eval-episodes 10` for a run that evaluated 4 episodes), and those whose value differs from the default (how
    a caller in Python gives them)."""
    fields = {f.name for f in dataclasses.fields(Args)}
    named = {token[2:].partition("=")[0].replace("-", "_") for token in sys.argv[1:] if token.startswith("--")}
    named |= {name.removeprefix("no_") for name in named}  # a boolean's --no-flag names the flag
    default = Args()
    return (named & fields) | {name for name in fields if getattr(cli, name) != getattr(default, name)}


def saved_config(run_dir: Path, flag: str) -> tuple[Args, dict]:
    """The config in a run folder's args.json (with that folder's own seed) and its batch: the seed index and the
    folder names of the seeds trained with it."""
    script = Path(__file__).name
    if not (run_dir / "args.json").is_file():
        what = "no such folder" if not run_dir.is_dir() else "no args.json there"
        raise UserError(f"{flag} {run_dir}: {what} (expected a run folder of {script})")
    saved = json.loads((run_dir / "args.json").read_text())
    if isinstance(saved.get("init_from"), dict):  # a continuation: the flag's value again, its record stays on disk
        saved["init_from"] = f"{saved['init_from']['run_dir']}:{saved['init_from']['step']}"
    known = {f.name for f in dataclasses.fields(Args)}
    if saved.get("metadata", {}).get("script", script) != script or not set(saved) - {"metadata", "batch"} <= known:
        raise UserError(f"{flag} {run_dir}: that folder is a run of another script, not of {script}")
    batch = saved.get("batch", {"seed_index": 0, "run_dirs": [run_dir.name]})
    return Args(**{k: v for k, v in saved.items() if k in known}), batch


class Preempted(Exception):
    """Raised after the checkpoint a SIGTERM or SIGINT asked for; exit code 0 for SIGTERM, 130 for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 0 if signum == signal.SIGTERM else 130


class StopSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) let the current chunk finish and the loop write a checkpoint; a second
    signal exits at once."""

    def __init__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: finishing the current chunk, then checkpointing "
              "(send it again to exit at once)", flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


RENDER_FIELDS = ("qpos", "qvel", "mocap_pos", "mocap_quat", "xfrc_applied")  # what MuJoCo needs to draw a state


class Videos:
    """Evaluation episodes drawn from their recorded poses with MuJoCo's offscreen renderer (as Playground's
    env.render does, without its progress bar) and written as mp4 with mediapy, at the agent's control rate. Every
    frame carries its latent's Glass cluster: a band across the top reading "cluster k" and a border, in k's colour."""

    def __init__(self, mj_model, renderer, fps: float, num_clusters: int):
        import mujoco

        self.mujoco, self.model, self.renderer, self.fps = mujoco, mj_model, renderer, fps
        self.data = mujoco.MjData(mj_model)
        self.num_clusters = num_clusters

    @classmethod
    def open(cls, venv: VectorEnv, args: Args) -> Optional["Videos"]:
        """None, after one warning line, when no OpenGL backend works: training goes on without video."""
        try:
            import mujoco

            renderer = mujoco.Renderer(venv.env.mj_model, height=args.video_height, width=args.video_width)
        except Exception as e:  # noqa: BLE001 (a missing GL library raises anything from ImportError to RuntimeError)
            print(f"warning: --capture-video: no OpenGL backend works (MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
                  f"{first_line(e)}); going on without videos or prototype gallery (the cluster figures are still "
                  "drawn)", flush=True)
            return None
        import imageio_ffmpeg
        import mediapy

        if shutil.which("ffmpeg") is None:
            mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())  # the ffmpeg binary that comes with the package
        return cls(venv.env.mj_model, renderer, fps=1 / (venv.env.dt * args.action_repeat),
                   num_clusters=args.glass_num_clusters)

    def frames(self, poses: dict, column: int) -> list[np.ndarray]:
        frames = []
        for t in range(len(poses["alive"])):
            if not poses["alive"][t, column]:
                break  # the episode ended at the previous frame
            pose = {name: poses[name][t, column] for name in RENDER_FIELDS}
            frames.append(self.labelled(self.render(pose), int(poses["cluster"][t, column])))
        return frames

    def render(self, pose: dict) -> np.ndarray:
        """(height, width, 3) uint8: one state, drawn from its RENDER_FIELDS values."""
        for name in RENDER_FIELDS:
            getattr(self.data, name)[:] = pose[name]
        self.mujoco.mj_forward(self.model, self.data)
        self.renderer.update_scene(self.data, camera=-1)
        return self.renderer.render()

    def labelled(self, frame: np.ndarray, cluster: int) -> np.ndarray:
        height, width = frame.shape[:2]
        band = max(10, round(height / 10))
        frame[:band] = cluster_band(cluster, self.num_clusters, width, band)
        color = np.round(cluster_colors(self.num_clusters)[cluster] * 255).astype(np.uint8)
        edge = max(1, height // 60)
        frame[-edge:], frame[:, :edge], frame[:, -edge:] = color, color, color
        return frame

    def write(self, folder: Path, step: int, poses: dict):
        """One mp4 per recorded episode: the columns of `poses` are the pi episodes, then as many MPPI ones."""
        import mediapy

        folder.mkdir(exist_ok=True)
        per_mode = poses["alive"].shape[1] // 2
        for column in range(2 * per_mode):
            mode, episode = ["pi", "mppi"][column // per_mode], column % per_mode
            path = folder / (f"{mode}_step{step}.mp4" if episode == 0 else f"{mode}_step{step}_episode{episode}.mp4")
            tmp = path.with_name(f"{path.stem}.tmp.mp4")  # ffmpeg picks the format from the suffix
            mediapy.write_video(tmp, self.frames(poses, column), fps=self.fps)
            os.replace(tmp, path)


def cluster_colors(num_clusters: int) -> np.ndarray:
    """(K, 3) RGB in [0, 1]: cluster k's colour in the videos and in the cluster figure (tab10, tab20, then turbo)."""
    from matplotlib import colormaps

    if num_clusters <= 20:
        return np.array(colormaps["tab10" if num_clusters <= 10 else "tab20"].colors)[:num_clusters]
    return colormaps["turbo"](np.linspace(0, 1, num_clusters))[:, :3]


@lru_cache(maxsize=64)
def cluster_band(cluster: int, num_clusters: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: "cluster k" on k's colour, drawn once per cluster and frame size by matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    color = cluster_colors(num_clusters)[cluster]
    fig = Figure(figsize=((width + 0.01) / 100, (height + 0.01) / 100), dpi=100, facecolor=color)  # exact pixels
    canvas = FigureCanvasAgg(fig)
    text_color = "black" if color @ [0.299, 0.587, 0.114] > 0.5 else "white"  # luma: the readable one
    fig.text(4 / width, 0.5, f"cluster {cluster}", color=text_color, fontsize=0.6 * height * 72 / 100,
             fontweight="bold", ha="left", va="center")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def episode_frames(alive: np.ndarray) -> int:
    """Frames of a recorded episode: up to the first step where it no longer ran (as `Videos.frames` stops)."""
    return int(np.argmin(alive)) if not alive.all() else len(alive)


def write_cluster_figure(path: Path, step: int, recorded: dict, args: Args):
    """glass/clusters_step{N}.png: the partition S, the cluster transitions P of the recorded episodes (their hard
    labels, the ones on the video frames) and each mode's cluster sequence as a coloured strip."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    first = [0, recorded["poses"]["alive"].shape[1] // 2]  # the first recorded episode of each mode
    poses = {name: recorded["poses"][name][:, first] for name in ("cluster", "alive")}
    K, S, labels = args.glass_num_clusters, recorded["S"], poses["cluster"]
    colors = cluster_colors(K)
    lengths = [episode_frames(poses["alive"][:, m]) for m in range(2)]
    counts = np.zeros((K, K))
    for m, n in enumerate(lengths):
        np.add.at(counts, (labels[: n - 1, m], labels[1:n, m]), 1)
    visits = np.bincount(np.concatenate([labels[:n, m] for m, n in enumerate(lengths)]), minlength=K)
    with np.errstate(invalid="ignore"):
        transitions = counts / counts.sum(axis=1, keepdims=True)  # NaN rows: clusters left by no transition

    fig = Figure(figsize=(11, 6.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1])
    state = "Glass on" if glass_active(args, step) else "Glass off at this step: prototypes and S as they stand"
    fig.suptitle(f"Glass clusters at env step {step:,} ({state})")

    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    ax = axes[0]
    image = ax.imshow(S, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.scatter(S.argmax(axis=1), np.arange(len(S)), marker="x", color="white", s=14)
    ax.set(title="Partition S (x: the cluster a prototype's frames get)", xlabel="cluster k", ylabel="prototype n",
           xticks=range(K), yticks=range(0, len(S), max(1, len(S) // 16)))
    fig.colorbar(image, ax=ax, label="S[n, k] = P(cluster k | prototype n)")

    ax = axes[1]
    image = ax.imshow(np.ma.masked_invalid(transitions), cmap=colormaps["magma"].with_extremes(bad="0.85"),
                      vmin=0, vmax=1, interpolation="nearest")
    if K <= 10:
        for (i, j), value in np.ndenumerate(transitions):
            if counts[i, j]:  # the transitions that happened; blank cells: none
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 else "white")
    ax.set(title="P: cluster transitions t -> t+1 in the recorded episodes\n"
                 "(pi and mppi, hard labels; gray rows: no transition from that cluster)",
           xlabel="next cluster", ylabel="cluster (frames in it)", xticks=range(K), yticks=range(K),
           yticklabels=[f"{k} ({visits[k]})" for k in range(K)])
    fig.colorbar(image, ax=ax, label="P(next cluster | cluster)")

    ax = axes[2]
    frame = np.arange(len(labels))
    strip = np.ma.masked_array(labels.T, mask=frame[None] >= np.array(lengths)[:, None])  # after the episode: blank
    image = ax.imshow(strip, aspect="auto", cmap=ListedColormap(colors).with_extremes(bad="white"),
                      vmin=-0.5, vmax=K - 0.5, interpolation="nearest")
    ax.set(title="Cluster of each frame's latent (the colour of the video's band)",
           xlabel="frame (0: the initial state, then one per agent step)", yticks=[0, 1],
           yticklabels=[f"pi ({lengths[0]})", f"mppi ({lengths[1]})"])
    fig.colorbar(image, ax=ax, label="cluster", ticks=range(K), aspect=8)
    for ticks in (axes[0].get_xticklabels(), axes[1].get_xticklabels(), axes[1].get_yticklabels()):
        for tick, color in zip(ticks, colors, strict=True):  # cluster ids in their colours, as on the videos
            tick.set(color=color, fontweight="bold")
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=80)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, data.getvalue())


GALLERY_FRAMES = 4  # frames per prototype in the gallery
GALLERY_FIELDS = ("cos", "poses")  # what the gallery adds to the evaluation's rollout; not dumped (same npz keys)


def glass_visits(rollout: dict, S: np.ndarray, episodes: int) -> dict:
    """step{N}.json's "glass": over the running steps of all evaluated episodes (pi, then mppi), each prototype's
    cluster (argmax of its S row) and its "wins" (the steps whose latent has it as nearest prototype, dumped `c`);
    per mode and episode the running steps and the fraction of them in each cluster (dumped `cluster`)."""
    alive, (num_prototypes, num_clusters) = rollout["alive"], S.shape
    record = {"prototype_cluster": S.argmax(axis=1).tolist(),
              "prototype_wins": np.bincount(rollout["c"][alive], minlength=num_prototypes).tolist(),
              "running_steps": {}, "cluster_time": {}}
    for mode, columns in [("pi", range(episodes)), ("mppi", range(episodes, 2 * episodes))]:
        running = [alive[:, e] for e in columns]  # alive[0] is all True: no episode has zero running steps
        record["running_steps"][mode] = [int(r.sum()) for r in running]
        record["cluster_time"][mode] = [
            (np.bincount(rollout["cluster"][r, e], minlength=num_clusters) / r.sum()).tolist()
            for e, r in zip(columns, running, strict=True)]
    return record


def gallery_picks(cos: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """(N, k, 2): (step, episode column) of the k running steps whose latents are most cosine-similar to each of the
    N prototypes, best first (ties: the earlier step, then column), from cos (T, episodes, N) and alive (T, episodes).
    Every prototype gets its k, whether or not it is the nearest prototype of any of them."""
    steps, columns, num_prototypes = cos.shape
    scores = np.where(alive[..., None], cos, -np.inf).reshape(steps * columns, num_prototypes)
    best = np.argsort(-scores, axis=0, kind="stable")[: min(k, int(alive.sum()))]  # (k, N) flat indices
    return np.stack(np.unravel_index(best.T, (steps, columns)), axis=-1)


def write_prototype_gallery(path: Path, title: str, rollout: dict, S: np.ndarray, wins: list[int], videos: "Videos",
                            k: int = GALLERY_FRAMES):
    """evaluations/prototypes_step{N}.png: a row per prototype with the k running frames (of every evaluated
    episode, both modes) whose latents are closest to it by cosine, drawn from their poses with the videos' band of
    the frame's own cluster; each frame names its mode, episode, step and cosine, each row the prototype, its
    cluster and its wins (frames it is the nearest prototype of, from `glass_visits`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cos, alive, clusters = rollout["cos"], rollout["alive"], rollout["cluster"]
    episodes, (num_prototypes, num_clusters) = alive.shape[1] // 2, S.shape
    picks, colors = gallery_picks(cos, alive, k), cluster_colors(num_clusters)
    frame_height, frame_width = videos.renderer.height, videos.renderer.width
    # inches: a label column, then k frames of cell_w each with a one-line title above
    label_w, cell_w, pad, title_h, top = 1.5, 1.9, 0.08, 0.22, 0.75
    cell_h = cell_w * frame_height / frame_width
    width, height = label_w + k * (cell_w + pad), top + num_prototypes * (cell_h + title_h) + 0.1
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}: prototype gallery\nrow n: the {k} running frames whose latent is closest to prototype n "
                 "by cosine (band: the frame's own cluster)", fontsize=10, y=1 - 0.1 / height, va="top")
    for n in range(num_prototypes):
        row_top = height - top - n * (cell_h + title_h)
        cluster = int(S[n].argmax())
        fig.text((label_w - 0.15) / width, (row_top - title_h - cell_h / 2) / height,
                 f"prototype {n}\ncluster {cluster}\nwon {wins[n]}", ha="right", va="center", fontsize=9,
                 fontweight="bold", color=colors[cluster])
        for j, (t, column) in enumerate(picks[n]):
            ax = fig.add_axes(((label_w + j * (cell_w + pad)) / width, (row_top - title_h - cell_h) / height,
                               cell_w / width, cell_h / height))
            pose = {name: rollout["poses"][name][t, column] for name in RENDER_FIELDS}
            ax.imshow(videos.labelled(videos.render(pose), int(clusters[t, column])))
            ax.set_axis_off()
            mode, episode = ("pi", "mppi")[column // episodes], column % episodes
            ax.set_title(f"{mode} ep {episode} t {t}  cos {cos[t, column, n]:.3f}", fontsize=7, pad=2)
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=80)
    atomic_write(path, data.getvalue())


def write_cluster_time_figure(path: Path, title: str, visits: dict, returns: dict):
    """evaluations/cluster_time_step{N}.png: a panel per cluster k, each evaluated episode's return against the
    fraction of its running steps spent in k (from `glass_visits`); pi and mppi in their own markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fractions = {mode: np.array(visits["cluster_time"][mode]) for mode in returns}  # (episodes, K)
    num_clusters = fractions["pi"].shape[1]
    colors, columns = cluster_colors(num_clusters), min(num_clusters, 4)
    rows = -(-num_clusters // columns)
    fig = Figure(figsize=(max(2.6 * columns + 0.6, 7.0), 2.2 * rows + 1.3), layout="constrained")  # room for the title
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= num_clusters:
            ax.set_axis_off()
            continue
        ax.scatter(fractions["pi"][:, k], returns["pi"], s=36, marker="o", color=colors[k], edgecolor="black",
                   linewidth=0.6, label="pi", zorder=3)
        ax.scatter(fractions["mppi"][:, k], returns["mppi"], s=40, marker="^", facecolor="none", edgecolor="black",
                   linewidth=1.0, label="mppi", zorder=3)
        ax.set_title(f"cluster {k}", color=colors[k], fontweight="bold", fontsize=10)
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        for spine in ax.spines.values():
            spine.set(color=colors[k], linewidth=1.5)
    axes[0].legend(fontsize=8, loc="best")
    fig.supxlabel("fraction of the episode's running steps in cluster k")
    fig.supylabel("episode return")
    fig.suptitle(f"{title}\nepisode return against the time spent in each cluster (one marker per episode)")
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=80)
    atomic_write(path, data.getvalue())


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


def write_glass_report(run_dir: Path, log_scalars, report, step: int):
    """glass/active (1 while the schedule has Glass on, else 0) at every evaluation; the other glass/<name> scalars
    and glass/P_S_step{step}.npz once the buffer holds whole sequences (every evaluation but the one at step 0)."""
    active, available, scalars, matrices = jax.device_get(report)
    log_scalars({"glass/active": float(active)})
    if not available:
        return
    log_scalars({f"glass/{name}": float(value) for name, value in scalars.items()})
    data = io.BytesIO()
    np.savez(data, **matrices)
    atomic_write(run_dir / "glass" / f"P_S_step{step}.npz", data.getvalue())


def quiet_failed_checkpoint_writes():
    """A failed background write (a full disk) is reported by Checkpoints.check_written in one line; without this,
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


def write_npz(path: Path, arrays: dict):
    data = io.BytesIO()
    np.savez_compressed(data, **arrays)
    atomic_write(path, data.getvalue())


def first_line(error: Exception) -> str:
    """An exception as one short line, for one-line warnings and errors."""
    text = str(error).strip()
    return text.splitlines()[0][:150] if text else type(error).__name__


def backend(args: Args) -> str:
    """'jax', or 'warp, naconmax 50000, njmax 50': the backend a run used, for its first printed line."""
    return args.impl if args.impl != "warp" else f"warp, naconmax {args.naconmax}, njmax {args.njmax}"


def check_warp_flags(stats: dict, chunk_start: int, args: Args, seed_index: int, warned: set):
    """Stop at a warp capacity overflow (contacts or constraint rows were dropped: the physics is wrong from then on);
    say once that the solver hit its iteration limit (a step ends unconverged, as Playground's settings allow)."""
    if "warp_overflow" not in stats:
        return
    seed = f" (seed {args.seed + seed_index})" if args.num_seeds > 1 else ""
    env_steps_per_vector_step = args.num_envs * args.action_repeat
    if (overflowed := np.flatnonzero(stats["warp_overflow"])).size:
        index = int(overflowed[0])
        bits, at_step = int(stats["warp_overflow"][index]), chunk_start + (index + 1) * env_steps_per_vector_step
        what = (f"constraint rows (raise --njmax, now {args.njmax} per env)" if bits & 3 else
                f"contacts (raise --naconmax, now {args.naconmax} for all envs of a device)")
        raise UserError(f"warp overflow (flags {bits:#x}) at env step {at_step}{seed}: the env batch ran out of room "
                        f"for {what}; stopping (checkpoints written so far are intact)")
    if "unconverged" not in warned and stats["warp_unconverged"].any():
        warned.add("unconverged")
        share = stats["warp_unconverged"].mean() / args.num_envs
        print(f"note: warp's constraint solver hit its iteration limit in {share:.1%} of this chunk's agent steps"
              f"{seed}; such steps end unconverged, as Playground's solver settings allow (logged as "
              "charts/warp_unconverged; docs/tdmpc2.md#mjx-backends-jax-and-warp)", flush=True)


def first_nonfinite(info: dict) -> Optional[tuple[str, int]]:
    """(loss name, index of the first vector step) where a logged loss stopped being finite, else None."""
    for name, values in info.items():
        bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
        if bad.size:
            return name, int(bad[0])
    return None


def speed_and_eta(timed_steps: int, timed_seconds: float, steps_left: int) -> str:
    """'SPS n | ETA h:mm:ss' over the training chunks timed so far ('-' before the first one)."""
    if not timed_seconds:
        return "SPS - | ETA -"
    sps = timed_steps / timed_seconds
    return f"SPS {sps:,.0f} | ETA {format_time(max(steps_left, 0) / sps)}"  # the last chunk may overshoot the total


def format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    import tyro

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
