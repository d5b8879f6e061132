"""tdmpc2_jax.py: math against hand-computed numbers, MPPI on a toy model, the replay buffer, the CLI, determinism
and learning on CartpoleBalance."""

import json
import math
import re
import shutil
import subprocess
import sys
from functools import lru_cache, partial
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    DMC_ENV,
    TINY_TDMPC2,
    TWO_DEVICES,
    assert_resume_is_exact,
    damage_newest_checkpoint,
    learning_run,
    read_eval,
    read_video,
    run_script,
    script_env,
    sigterm_then_resume,
    unused_args_fields,
)
from scipy import stats

import tdmpc2_jax as T

BINS = dict(num_bins=101, vmin=-10.0, vmax=10.0)  # bin width 0.2, bin i at -10 + 0.2 i
# Networks and planner small enough that an in-process training chunk compiles and runs in seconds.
TINY_NETS = dict(model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16, batch_size=8, num_samples=16, num_elites=2,
                 num_pi_trajs=2, iterations=1, buffer_size=2000)


# --- pure math ---
def test_symlog_symexp_hand_values():
    e = math.e
    np.testing.assert_allclose(T.symlog(jnp.array([0.0, e - 1, -(e**2 - 1)])), [0.0, 1.0, -2.0], atol=1e-6)
    np.testing.assert_allclose(T.symexp(jnp.array([0.0, 1.0, -2.0])), [0.0, e - 1, -(e**2 - 1)], rtol=1e-6)
    x = jnp.array([-123.4, -1.5, 0.01, 7.0, 2500.0])
    np.testing.assert_allclose(T.symexp(T.symlog(x)), x, rtol=1e-5)


@pytest.mark.parametrize(
    "symlog_value, masses",
    [
        (0.0, {50: 1.0}),  # exactly on the middle bin
        (0.3, {51: 0.5, 52: 0.5}),  # halfway between 0.2 and 0.4
        (-0.05, {49: 0.25, 50: 0.75}),  # a quarter of the way from 0.0 down to -0.2
        (9.95, {99: 0.25, 100: 0.75}),
        (50.0, {100: 1.0}),  # clipped to vmax
        (-50.0, {0: 1.0}),  # clipped to vmin
    ],
)
def test_two_hot_exact_bin_masses(symlog_value, masses):
    x = math.copysign(math.expm1(abs(symlog_value)), symlog_value)  # symexp by hand
    expected = np.zeros(101)
    for i, m in masses.items():
        expected[i] = m
    np.testing.assert_allclose(T.two_hot(jnp.array(x), **BINS), expected, atol=1e-4)


def test_two_hot_round_trip_and_cross_entropy():
    x = jnp.array([-800.0, -3.3, -0.01, 0.0, 0.7, 42.0, 1000.0])
    target = T.two_hot(x, **BINS)
    np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-6)
    logits = jnp.log(target + 1e-30)
    np.testing.assert_allclose(T.two_hot_inv(logits, **BINS), x, rtol=1e-4, atol=1e-5)
    # Cross-entropy of a distribution with itself is its entropy: 0 for one bin, ln 2 for two equal halves.
    ce = T.soft_cross_entropy(jnp.log(T.two_hot(jnp.array([0.0, math.expm1(0.3)]), **BINS) + 1e-30),
                              jnp.array([0.0, math.expm1(0.3)]), **BINS)
    np.testing.assert_allclose(ce, [0.0, math.log(2)], atol=1e-4)


def test_mish_matches_its_definition_in_float64():
    """Our one-exp Mish against x * tanh(log(1 + e^x)) in float64, across the range, and its gradient against the
    derivative tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2), sp = softplus(x); finite far out on both sides."""
    x = np.array([-100.0, -30.0, -5.0, -1.0, -0.1, 0.0, 0.1, 1.0, 2.5, 5.0, 19.0, 21.0, 30.0, 1e4])
    softplus = np.logaddexp(0.0, x)
    np.testing.assert_allclose(T.mish(jnp.float32(x)), x * np.tanh(softplus), rtol=2e-6, atol=1e-30)
    expected_grad = np.tanh(softplus) + x / (1 + np.exp(-x)) * (1 - np.tanh(softplus) ** 2)
    grad = jax.vmap(jax.grad(T.mish))(jnp.float32(x))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-30)
    assert T.mish(jnp.float32(0.0)) == 0.0 and T.mish(jnp.float32(1e4)) == 1e4


def test_simnorm_groups():
    x = jnp.array([0.0, math.log(3.0), 5.0, 5.0, 1.0, 2.0, 3.0, 4.0])
    out = np.asarray(T.simnorm(x, 2))
    np.testing.assert_allclose(out[:4], [0.25, 0.75, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(out.reshape(4, 2).sum(-1), 1.0, rtol=1e-6)
    z = T.simnorm(jax.random.normal(jax.random.key(0), (3, 64)), 8)
    np.testing.assert_allclose(z.reshape(3, 8, 8).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("agent_steps, gamma", [(500, 0.99), (1000, 0.995), (10, 0.95), (250, 0.98)])
def test_discount_heuristic(agent_steps, gamma):
    assert T.discount_heuristic(agent_steps) == pytest.approx(gamma)


def test_running_scale_known_batches():
    # 0..20: p5 = 1, p95 = 19 -> range 18; S = 1 + 0.01 (18 - 1)
    assert float(T.running_scale_update(1.0, jnp.arange(21.0), 0.01)) == pytest.approx(1.17)
    # two values: positions 0.05 and 0.95 interpolate to 0.5 and 9.5 -> range 9
    assert float(T.running_scale_update(2.0, jnp.array([10.0, 0.0]), 0.5)) == pytest.approx(2.0 + 0.5 * (9 - 2))
    # a range below 1 is floored at 1
    assert float(T.running_scale_update(1.0, jnp.array([0.1, 0.2, 0.3]), 0.01)) == pytest.approx(1.0)


def test_squashed_log_prob_2023_formula():
    # One action dim: the 2023 formula is the true tanh-Gaussian density (up to the 1e-6 inside the log).
    mu, log_std, eps = 0.3, -0.7, 0.8
    u = mu + eps * math.exp(log_std)
    a = math.tanh(u)
    direct = stats.norm.logpdf(u, mu, math.exp(log_std)) - math.log(1 - a**2 + 1e-6)
    got = T.squashed_gaussian_log_prob(jnp.array([eps]), jnp.array([log_std]), jnp.array([a]))
    assert float(got) == pytest.approx(direct, rel=1e-5)
    # Two dims: the Gaussian part is multiplied by A = 2 and the 0.5 log(2 pi) is counted once before that.
    eps2, log_std2 = np.array([0.5, -1.0]), np.array([-1.0, 0.5])
    a2 = np.tanh(np.array([0.1, -0.2]) + eps2 * np.exp(log_std2))
    by_hand = 2 * (-0.125 + 1.0 - 0.5 - 0.5 - 0.5 * math.log(2 * math.pi)) - np.sum(np.log(1 - a2**2 + 1e-6))
    got2 = T.squashed_gaussian_log_prob(jnp.array(eps2), jnp.array(log_std2), jnp.array(a2))
    assert float(got2) == pytest.approx(by_hand, rel=1e-5)


def test_first_nonfinite_names_loss_and_step():
    info = {"consistency_loss": np.array([0.1, 0.2, 0.3]), "value_loss": np.array([1.0, np.nan, np.inf])}
    assert T.first_nonfinite(info) == ("value_loss", 1)
    assert T.first_nonfinite({"a": np.ones(3)}) is None


# --- MPPI on a toy world model: reward -(a - 0.5)^2, static latent, zero policy and values ----------------------------
class ToyModel:
    """Same interface as tdmpc2_jax.WorldModel; the optimal first action is 0.5."""

    def __init__(self, **planner):
        base = dict(horizon=3, num_samples=256, num_elites=32, num_pi_trajs=0, iterations=6, min_std=0.05,
                    max_std=2.0, temperature=0.5, num_q=2, discount=0.99, **BINS)
        self.args = SimpleNamespace(**{**base, **planner})
        self.action_dim = 1

    def reward(self, params, z, action):
        return jnp.log(T.two_hot(-((action[..., 0] - 0.5) ** 2), **BINS) + 1e-30)

    def next(self, params, z, action):
        return z

    def pi(self, params, z, key):
        zeros = jnp.zeros(z.shape[:-1] + (1,))
        return zeros, zeros, zeros[..., 0]

    def q_two_random(self, params, z, action, key, dropout_key=None):
        return jnp.zeros(z.shape[0]), jnp.zeros(z.shape[0])


def toy_plan(model, key, eval_mode=True):
    agent = SimpleNamespace(wm_params={"qs": None}, pi_params=None)
    plan = jax.jit(lambda k: T.plan(model, agent, jnp.zeros(4), jnp.zeros((3, 1)), True, k, eval_mode))
    return plan(key)


def test_mppi_moves_towards_optimum():
    keys = jax.random.split(jax.random.key(0), 5)
    actions = np.asarray(jax.vmap(lambda k: toy_plan(ToyModel(), k)[0])(keys))[:, 0]
    assert (abs(actions - 0.5) < 0.15).all(), actions
    _, mean = toy_plan(ToyModel(), jax.random.key(0))
    assert abs(float(mean[0, 0]) - 0.5) < 0.1  # the planned mean of every step goes there, not only the action


def test_mppi_picks_elites_by_score():
    # At a huge temperature the score is one-hot on the best elite: its first action is the best of ~1500 samples.
    model = ToyModel(temperature=1e6, iterations=6)
    action, _ = toy_plan(model, jax.random.key(1))
    assert abs(float(action[0]) - 0.5) < 0.01
    # With one elite the mean is that elite, and it beats the sampling mean 0 it started from.
    action, mean = toy_plan(ToyModel(num_elites=1, iterations=1), jax.random.key(2))
    assert float(action[0]) == pytest.approx(float(mean[0, 0]), abs=1e-6)
    assert abs(float(action[0]) - 0.5) < 0.5


def test_mppi_exploration_noise_only_in_training():
    model = ToyModel(iterations=3)
    eval_action, _ = toy_plan(model, jax.random.key(3), eval_mode=True)
    train_action, _ = toy_plan(model, jax.random.key(3), eval_mode=False)
    assert float(eval_action[0]) != float(train_action[0])


# --- replay buffer ---
def test_buffer_sequences_never_straddle_a_reset():
    rows, num_envs, horizon = 23, 3, 3
    episode_lengths = np.array([4, 5, 7])  # per env; the ring (23 rows) wraps twice over 60 writes
    buf = T.buffer_init(rows, num_envs, obs_dim=2, action_dim=1)
    episode_step = np.zeros(num_envs, int)
    episode_id = np.arange(num_envs) * 1000
    for _ in range(60):
        obs = np.stack([episode_id, episode_step], -1).astype(np.float32)
        next_obs = obs + np.array([0, 1], np.float32)
        buf = T.buffer_add(buf, obs, np.zeros((num_envs, 1)), episode_step.astype(np.float32), next_obs,
                           np.zeros(num_envs), episode_step)
        episode_step = episode_step + 1
        done = episode_step >= episode_lengths
        episode_id = np.where(done, episode_id + 1, episode_id)
        episode_step = np.where(done, 0, episode_step)

    valid = np.asarray(T.valid_starts(buf, horizon))
    # By hand: an episode of length L offers L - H + 1 starts; the ring holds the last 23 steps per env, so the
    # oldest episode is cut (its first steps overwritten) and the newest may be unfinished.
    assert valid.sum() > 0
    cumsum = jnp.cumsum(valid.reshape(-1))
    sample = jax.jit(T.buffer_sample, static_argnums=(3, 4))
    seen = set()
    for i in range(20):
        obs, _, reward, _ = sample(buf, cumsum, jax.random.key(i), 256, horizon)
        obs = np.asarray(obs)
        assert (obs[..., 0] == obs[:1, :, 0]).all(), "a sequence mixes two episodes"
        assert (np.diff(obs[..., 1], axis=0) == 1).all(), "steps within a sequence are not consecutive"
        np.testing.assert_array_equal(np.asarray(reward), obs[:-1, :, 1])
        seen.update(map(tuple, obs[0]))
    assert len(seen) == valid.sum()  # every valid start gets sampled, and nothing else


def test_every_args_field_is_used():
    assert unused_args_fields("tdmpc2_jax.py") == []


# --- the resolved config and the official protocol ---

@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_size=7), "--model-size must be one of"),
        (dict(num_elites=600), "--num-elites (600) must not exceed --num-samples (512)"),
        (dict(num_pi_trajs=512), "--num-pi-trajs (512) must be below --num-samples"),
        (dict(batch_size=2_000_000), "larger than the buffer can hold"),
        (dict(total_steps=0), "--total-steps must be positive"),
        (dict(num_envs=-4), "--num-envs must be positive"),
        (dict(latent_dim=100), "must be a multiple of --simnorm-dim"),
        (dict(seed_steps=1000), "--seed-steps (1000) must cover at least horizon=3 vector steps (1536 env steps)"),
    ],
)
def test_resolve_args_refuses_impossible_settings(overrides, message):
    with pytest.raises(T.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T.resolve_args(T.Args(**overrides), DMC_ENV)


def test_unwritable_run_folder_refused():
    with pytest.raises(T.UserError, match="run folder /proc/not_writable is not writable"):
        T.prepare_run_dir(Path("/proc/not_writable"))


def test_resolve_args_fills_model_size_and_env_defaults():
    args = T.resolve_args(T.Args(model_size=1, mlp_dim=64), DMC_ENV)
    assert (args.enc_dim, args.mlp_dim, args.latent_dim, args.num_enc_layers, args.num_q) == (256, 64, 128, 2, 2)
    assert (args.impl, args.episode_length, args.discount, args.iterations) == ("jax", 1000, 0.99, 6)
    # 256 envs x action repeat 2 = 512 env steps per vector step: the official 5 episodes (5,000 env steps) round
    # up to 10 vector steps = 5,120 env steps, followed by 10 x k_update = 2,560 pretraining updates.
    assert (args.seed_steps, args.pretrain_updates) == (5120, 2560)
    assert T.resolve_args(T.Args(), SimpleNamespace(**{**vars(DMC_ENV), "action_dim": 21})).iterations == 8


def test_one_env_one_update_resolves_to_the_official_protocol():
    """Official DMC protocol (trainer/online_trainer.py): 2,500 agent steps (5 episodes of 500) of uniform random
    actions = 5,000 env steps, then 2,500 pretraining updates, then one update per agent step."""
    args = T.resolve_args(T.Args(num_envs=1, k_update=1), DMC_ENV)
    assert (args.seed_steps, args.pretrain_updates) == (5000, 2500)
    seed_vector_steps = args.seed_steps // 2
    schedule = [int(T.updates_at(v, seed_vector_steps, args)) for v in [0, 2498, 2499, 2500, 9999]]
    assert schedule == [0, 0, 2500, 1, 1]


def test_official_protocol_end_to_end():
    """--num-envs 1 --k-update 1 on 50-agent-step episodes: seeding is max(1000, 5 episodes) = 1,000 agent steps,
    i.e. 20 whole episodes; the 1,000-update burst comes after the last of them; then one update per agent step.
    The Adam step count of the policy optimiser counts the updates."""
    venv = T.VectorEnv(T.load_env("CartpoleBalance", "jax", episode_length=100), action_repeat=2)
    args = T.resolve_args(T.Args(env_id="CartpoleBalance", num_envs=1, k_update=1, **TINY_NETS), venv)
    assert (args.seed_steps, args.pretrain_updates) == (2000, 1000)
    trainer = T.Trainer(args, venv)
    chunk = jax.jit(partial(trainer.chunk, num_vector_steps=5))
    carry = jax.jit(trainer.init)(jax.random.key(0))
    updates = lambda carry: int(optax.tree_utils.tree_get(carry.agent.pi_opt_state, "count"))
    for _ in range(199):
        carry, _ = chunk(carry)
    assert int(carry.vector_step) == 995 and updates(carry) == 0
    carry, _ = chunk(carry)  # vector steps 995-999: the last seed steps, then the burst
    assert updates(carry) == 1000
    np.testing.assert_array_equal(np.asarray(carry.buffer.episode_step[:1000, 0]), np.tile(np.arange(50), 20))
    carry, _ = chunk(carry)
    assert updates(carry) == 1005


def test_nan_reward_is_not_stored(monkeypatch):
    """A diverged simulation can return a NaN reward: the run goes on, the buffer and the losses stay finite."""
    env = T.load_env("CartpoleBalance", "jax", episode_length=100)
    real_step = env.step
    monkeypatch.setattr(env, "step", lambda state, action: real_step(state, action).replace(reward=jnp.nan))
    venv = T.VectorEnv(env, action_repeat=2)
    args = T.resolve_args(T.Args(env_id="CartpoleBalance", num_envs=2, k_update=2, seed_steps=40, **TINY_NETS), venv)
    trainer = T.Trainer(args, venv)
    carry = jax.jit(trainer.init)(jax.random.key(0))
    assert np.isnan(venv.step(carry.env_state, jnp.zeros((2, 1)))[1]).all()  # the env does return NaN rewards
    carry, (_, info) = jax.jit(partial(trainer.chunk, num_vector_steps=20))(carry)
    assert int(carry.buffer.size) == 20 and np.isfinite(np.asarray(carry.buffer.reward)).all()
    assert T.first_nonfinite(jax.device_get(info)) is None


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_script("tdmpc2_jax.py", "--env-id", "CartpoleBalance", "--dry-run", "--run-dir", str(tmp_path / "x"))
    config = json.loads(proc.stdout)
    assert config["seed_steps"] == 5120 and config["pretrain_updates"] == 2560 and config["discount"] == 0.99
    assert (config["impl"], config["latent_dim"], config["iterations"]) == ("jax", 512, 6)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_speed_and_eta_count_only_timed_chunks():
    assert T.speed_and_eta(0, 0.0, 1000) == "SPS - | ETA -"
    assert T.speed_and_eta(2000, 4.0, 3600 * 500) == "SPS 500 | ETA 1:00:00"
    assert T.speed_and_eta(2000, 4.0, -1120) == "SPS 500 | ETA 0:00:00"  # the last chunk ran past --total-steps


def test_cli_help_lists_flags():
    out = run_script("tdmpc2_jax.py", "--help").stdout
    for flag in ["--env-id", "--k-update", "--model-size", "--collect-policy", "--action-repeat", "--impl",
                 "--seed-steps", "--eval-freq", "--save-model", "--checkpoint-every", "--discount"]:
        assert flag in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "HopperHopp"], "unknown env id 'HopperHopp'; DM Control ids: AcrobotSwingup"),
        (["--num-elites", "600"], "must not exceed --num-samples"),
        (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such folder"),
    ],
)
def test_cli_bad_input_one_line_error(flags, message):
    proc = run_script("tdmpc2_jax.py", "--env-id", "CartpoleBalance", *flags, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- runs ---
def test_tiny_run_writes_run_folder(tdmpc2_tiny_run):
    record = json.loads((tdmpc2_tiny_run / "args.json").read_text())
    assert record["env_id"] == "CartpoleBalance" and record["exp_name"] == "tiny" and record["seed"] == 1
    assert record["metadata"]["versions"]["jax"] and record["latent_dim"] == 16 and record["discount"] == 0.95
    rows = read_eval(tdmpc2_tiny_run)
    assert list(rows[0]) == ["step", "wall_time", "return_pi", "return_mppi"]
    assert [int(r["step"]) for r in rows] == [0, 400, 800]
    assert all(np.isfinite(float(r[c])) for r in rows for c in ("return_pi", "return_mppi"))
    assert list(tdmpc2_tiny_run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tdmpc2_tiny_run / "checkpoints").iterdir()) == ["400", "800"]  # every eval but 0


def restore_checkpoint(run_dir):
    """(carry, loop state) of the run folder's newest checkpoint, as --resume reads it."""
    args, _ = T.resume_config(T.Args(resume=str(run_dir)))
    trainer = T.Trainer(args, T.VectorEnv(T.load_env(args.env_id, args.impl, args.episode_length), args.action_repeat))
    checkpoints = T.Checkpoints(run_dir, args.keep_checkpoints)
    shapes = jax.eval_shape(trainer.init, jax.random.key(0))
    stored, loop = checkpoints.restore_newest(shapes)
    checkpoints.close()
    return jax.tree.map(T.from_storable, stored, shapes), loop


def test_nan_loss_stops_run_and_keeps_last_checkpoint(tmp_path):
    """A learning rate of 1e30 blows the networks up on the first updates. Seeding (env steps 0-200, no pretraining
    burst) is finite and checkpointed; the next chunk must stop the run with one line naming the loss and the step."""
    run_dir = tmp_path / "nan"
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--lr", "1e30", "--pretrain-updates", "0", "--eval-freq", "200",
                      "--run-dir", str(run_dir), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1
    match = re.fullmatch(r"error: non-finite losses/(\w+) at env step (\d+); stopping \(.*\)", message)
    assert match and 200 < int(match[2]) <= 400, message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["200"]  # no temporary folder left
    carry, loop = restore_checkpoint(run_dir)
    assert loop["step"] == 200 and int(carry.vector_step) == 25
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(carry.agent) if np.issubdtype(x.dtype, np.floating))


# --- resume ---
def test_same_seed_same_returns_and_resume_is_exact(tdmpc2_tiny_run, tmp_path):
    """The tiny run's config to 1600 env steps, in a new run, evaluates at 0, 400 and 800 what the tiny run did (same
    seed, same returns; the total changes nothing before it), and the tiny run resumed to 1600 writes the rest."""
    flags = [*TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny"]
    assert_resume_is_exact("tdmpc2_jax.py", flags, tmp_path, half=800, full=1600, halves_run=tdmpc2_tiny_run)


def test_sigterm_checkpoints_then_resume_finishes(tmp_path):
    sigterm_then_resume("tdmpc2_jax.py", [*TINY_TDMPC2, "--log-freq", "200"], tmp_path / "run", total=3200)
    assert len([p for p in (tmp_path / "run" / "checkpoints").iterdir()]) == 2  # --keep-checkpoints 2


def test_resume_skips_a_damaged_checkpoint(tdmpc2_tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tdmpc2_tiny_run, run_dir)
    assert damage_newest_checkpoint(run_dir) == 800
    out = run_script("tdmpc2_jax.py", "--resume", str(run_dir), "--total-steps", "1200").stdout
    assert re.search(r"^warning: checkpoint step 800 is damaged \(.+\); moved to .+, trying the previous one$", out,
                     re.MULTILINE)
    assert "resumed from step 400\n" in out and (run_dir / "checkpoints_damaged" / "800").is_dir()
    # Step 800 reached again from the checkpoint at 400: the same evaluation as the uninterrupted run's.
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    assert strip(read_eval(run_dir)) == strip(read_eval(tdmpc2_tiny_run)) + strip(read_eval(run_dir)[3:])
    assert [row["step"] for row in read_eval(run_dir)] == ["0", "400", "800", "1200"]


def test_resume_refuses_bad_folders_and_changed_flags(tdmpc2_tiny_run, tmp_path):
    resume = lambda folder, **flags: T.resume_config(T.Args(resume=str(folder), **flags))[0]
    with pytest.raises(T.UserError, match="--lr 0.001 differs from the run's 0.0003; only --total-steps"):
        resume(tdmpc2_tiny_run, lr=0.001)
    with pytest.raises(T.UserError, match="no such folder"):
        resume(tmp_path / "missing")
    with pytest.raises(T.UserError, match="no args.json there"):
        resume(tmp_path)
    (tmp_path / "copy").mkdir()
    shutil.copy(tdmpc2_tiny_run / "args.json", tmp_path / "copy")
    with pytest.raises(T.UserError, match="no checkpoint in .*copy"):
        resume(tmp_path / "copy")
    glass_run = json.loads((tdmpc2_tiny_run / "args.json").read_text())
    (tmp_path / "copy" / "args.json").write_text(json.dumps({**glass_run, "glass_weight": 1.0}))
    with pytest.raises(T.UserError, match="a run of another script, not of tdmpc2_jax.py"):
        resume(tmp_path / "copy")
    # What may change: the total and the checkpoint flags.
    args, dirs = T.resume_config(T.Args(resume=str(tdmpc2_tiny_run), total_steps=1600, keep_checkpoints=3, seed=1))
    assert (args.total_steps, args.keep_checkpoints, dirs) == (1600, 3, [tdmpc2_tiny_run])


@pytest.mark.slow
def test_learns_cartpole_balance(tmp_path):
    learning_run("tdmpc2_jax.py", tmp_path / "run")


# --- seeds as a batch axis ---
@lru_cache(maxsize=1)
def seed_trainer() -> T.Trainer:
    """The tiny trainer of the seed-batch tests, built once: its jitted programs then compile once per process."""
    venv = T.VectorEnv(T.load_env("CartpoleBalance", "jax", episode_length=100), action_repeat=2)
    args = T.resolve_args(T.Args(env_id="CartpoleBalance", num_envs=2, k_update=2, seed_steps=80, **TINY_NETS), venv)
    return T.Trainer(args, venv)


def seed_batch_chunk(seeds: list[int], mesh=None):
    """The carry after seeding (20 vector steps), the pretraining burst and 4 training vector steps, for `seeds`
    trained as one batch over `mesh` (default: this process's first device)."""
    trainer = seed_trainer()
    mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seed",))
    key_data = [jax.random.key_data(jax.random.split(jax.random.key(s))) for s in seeds]
    keys = jax.random.wrap_key_data(T.seed_sharded(mesh, np.stack(key_data)))
    carry = T.over_seeds(trainer.init, mesh)(keys[:, 1])
    carry, _ = T.over_seeds(partial(trainer.chunk, num_vector_steps=24), mesh)(carry)
    return jax.tree.map(lambda x: np.asarray(T.to_storable(x)), carry)


@lru_cache(maxsize=1)
def solo_programs():
    """The unbatched init and chunk (a single run's programs before --num-seeds existed), jitted once for all seeds."""
    trainer = seed_trainer()
    return jax.jit(trainer.init), jax.jit(partial(trainer.chunk, num_vector_steps=24))


def solo_chunk(seed: int):
    """The same without any seed axis."""
    init, chunk = solo_programs()
    carry, _ = chunk(init(jax.random.split(jax.random.key(seed))[1]))
    return jax.tree.map(lambda x: np.asarray(T.to_storable(x)), carry)


@pytest.mark.xdist_group("seed_programs")  # one worker compiles the solo programs once for both
def test_one_seed_batch_is_the_unbatched_program():
    batch, solo = seed_batch_chunk([3]), solo_chunk(3)
    jax.tree.map(lambda b, s: np.testing.assert_array_equal(b[0], s), batch, solo)


@pytest.mark.xdist_group("seed_programs")
def test_batch_of_two_seeds_is_each_solo_run_up_to_rounding():
    """XLA's batched kernels round differently from the unbatched ones: the seeding phase (env steps, buffer) is
    exact; after 25 rounds of updates the parameters agree to float32 rounding."""
    batch, solo = seed_batch_chunk([3, 4]), solo_chunk(4)
    np.testing.assert_array_equal(batch.buffer.obs[1, :21], solo.buffer.obs[:21])  # 20 random-action steps
    np.testing.assert_array_equal(batch.buffer.action[1, :20], solo.buffer.action[:20])
    np.testing.assert_allclose(batch.buffer.obs[1], solo.buffer.obs, rtol=1e-5, atol=1e-6)  # MPPI's steps after
    differences = []
    for b, s in zip(jax.tree.leaves(batch.agent.wm_params), jax.tree.leaves(solo.agent.wm_params), strict=True):
        np.testing.assert_allclose(b[1], s, rtol=1e-4, atol=1e-6)
        differences.append(np.abs(b[1] - s).max())
    print(f"largest parameter difference, batch of 2 vs solo: {max(differences):.1e}")


def test_two_devices_reproduce_the_one_device_batch_up_to_rounding():
    """The same batch of two seeds, vmapped on one device and sharded one seed per device. XLA compiles the two
    programs differently, so they agree to rounding, not bit for bit: the seeding phase is exact, and after 26 rounds
    of updates every parameter is within 5e-5 (measured: 1.2e-5), a sixth of one Adam step (lr 3e-4). Adam divides
    each gradient by its running size, so a rounding difference in a near-zero gradient moves a parameter by up to a
    step."""
    code = """if True:
        import jax, numpy as np
        from test_tdmpc2 import seed_batch_chunk
        assert jax.device_count() == 2
        one = seed_batch_chunk([3, 4])
        two = seed_batch_chunk([3, 4], jax.sharding.Mesh(np.array(jax.devices()), ("seed",)))
        np.testing.assert_array_equal(one.buffer.action[:, :20], two.buffer.action[:, :20])
        for a, b in zip(jax.tree.leaves(one.agent.wm_params), jax.tree.leaves(two.agent.wm_params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)
        """
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env={**script_env(), **TWO_DEVICES},
                   check=True, timeout=600)


@pytest.mark.xdist_group("two_device_batch")
def test_seed_batch_on_two_devices_writes_solo_folders_and_resumes(tdmpc2_two_device_batch, tmp_path):
    """--num-seeds 2 over two devices: one run folder per seed with its own seed in args.json; one --resume from
    either folder continues both, exactly as the uninterrupted batch; an odd count is refused in one line."""
    stdout, whole = tdmpc2_two_device_batch
    assert "2 seeds, 1 per device on 2 devices" in stdout
    flags = [*TINY_TDMPC2, "--num-seeds", "2"]
    run_script("tdmpc2_jax.py", *flags, "--total-steps", "400", "--run-dir", str(tmp_path / "halves"), env=TWO_DEVICES)
    run_script("tdmpc2_jax.py", "--resume", str(tmp_path / "halves__2"), "--total-steps", "800", env=TWO_DEVICES)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    for seed in (1, 2):
        config = json.loads((whole.with_name(f"whole__{seed}") / "args.json").read_text())
        assert (config["seed"], config["num_seeds"], config["batch"]["seed_index"]) == (seed, 2, seed - 1)
        assert strip(read_eval(tmp_path / f"halves__{seed}")) == strip(read_eval(whole.with_name(f"whole__{seed}")))
    assert read_eval(whole.with_name("whole__1")) != read_eval(whole.with_name("whole__2"))
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--num-seeds", "3", check=False, env=TWO_DEVICES)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --num-seeds 3 is not a multiple of the 2 devices; the nearest that is: 4")


# --- videos ---
def test_capture_video_writes_decodable_mp4s_and_changes_no_number(tdmpc2_tiny_run, tmp_path):
    run_dir = tmp_path / "video"
    run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny", "--run-dir", str(run_dir),
               "--capture-video", "--video-every", "2", "--video-height", "48", "--video-width", "64")
    # Evaluations at 0, 400 and 800 env steps; every second one (0 and 800) is recorded, in both modes.
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == [
        "mppi_step0.mp4", "mppi_step800.mp4", "pi_step0.mp4", "pi_step800.mp4"]
    meta, frames = read_video(run_dir / "videos" / "mppi_step800.mp4")
    assert meta["fps"] == 50  # CartpoleBalance: 0.01 s control step x action repeat 2
    assert frames.shape == (51, 48, 64, 3)  # the initial state and one frame per agent step of the 50-step episode
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    assert strip(read_eval(run_dir)) == strip(read_eval(tdmpc2_tiny_run))  # recording changes no number


def test_evaluation_without_video_returns_only_the_returns():
    """Without --capture-video the evaluation program has the same outputs as before videos existed: the two
    modes' per-episode returns."""
    venv = T.VectorEnv(T.load_env("CartpoleBalance", "jax", episode_length=100), action_repeat=2)
    args = T.resolve_args(T.Args(env_id="CartpoleBalance", num_envs=2, k_update=2, seed_steps=80, **TINY_NETS), venv)
    trainer = T.Trainer(args, venv)
    agent = jax.eval_shape(trainer.init, jax.random.key(0)).agent
    plain, nothing = jax.eval_shape(trainer.evaluate, agent, jax.random.key(1))
    assert nothing is None
    assert [(x.shape, x.dtype) for x in plain] == [((args.eval_episodes,), jnp.float32)] * 2  # per episode
    _, extras = jax.eval_shape(partial(trainer.evaluate, record=True), agent, jax.random.key(1))
    poses = extras["poses"]
    assert poses["qpos"].shape == (51, 2, 2) and poses["alive"].shape == (51, 2)
