"""se_ib_tdmpc2.py: the SE / IB losses against hand-computed values, finite gradients, wiring into the world-model
loss, the CLI, bit-for-bit parity with tdmpc2_jax.py when the regularisers are off (alone and with --num-seeds), exact
resume with them on, the symbol pictures of --capture-video, and learning on CartpoleBalance."""

import dataclasses
import json
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    DMC_ENV,
    TINY_TDMPC2,
    TWO_DEVICES,
    assert_png,
    assert_resume_is_exact,
    learning_run,
    read_eval,
    read_tb_scalars,
    run_script,
    unused_args_fields,
)

import se_ib_tdmpc2 as S
import tdmpc2_jax as T

# The 1D SE worked example of docs/se_ib.md. flow = sourceᵀ target / 4 = [[.37, .13], [.13, .37]], so both modules
# have volume 1 (total 2) and cut 1 - 2 * .37 = .26: L = -2 * (.26 / 2) * ln(1 / 2) = .26 ln 2.
WORKED_SOURCE = [[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]]
WORKED_TARGET = [[0.8, 0.2], [0.9, 0.1], [0.1, 0.9], [0.2, 0.8]]


def cycle(next_module, rounds: int = 3):
    """One-hot (source, target) rows where module a always goes to next_module[a], each module used `rounds` times."""
    m = len(next_module)
    source = np.tile(np.eye(m), (rounds, 1))
    return jnp.array(source), jnp.array(source[:, next_module])


# --- pure math ---
def test_module_assignment_averages_groups():
    z = jnp.array([[0.5, 0.5, 1.0, 0.0, 0.0, 1.0], [0.2, 0.8, 0.2, 0.8, 0.2, 0.8]])  # 3 groups of 2
    np.testing.assert_allclose(S.module_assignment(z, 2), [[0.5, 0.5], [0.2, 0.8]], rtol=1e-6)
    assert S.module_assignment(jnp.zeros((3, 5, 16)), 8).shape == (3, 5, 8)


def test_se_1d_worked_example():
    got = float(S.se_loss_1d(jnp.array(WORKED_SOURCE), jnp.array(WORKED_TARGET)))
    assert got == pytest.approx(0.180218, abs=1e-6)
    assert got == pytest.approx(0.26 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_se_1d_persistent_is_zero_and_always_switching_is_log_m(m):
    # Staying in the module: no cut anywhere, so no cost.
    assert float(S.se_loss_1d(*cycle(list(range(m))))) == 0.0
    # a -> a+1 with every module used evenly: volume 2/m of total 2, all of it cut -> -sum_a (1/m) ln(1/m) = ln m.
    shift = [(a + 1) % m for a in range(m)]
    assert float(S.se_loss_1d(*cycle(shift))) == pytest.approx(math.log(m), rel=1e-6)


def test_se_2d_one_super_module_is_1d():
    # One super-module has no cut and the whole volume: the first term vanishes and the second is the 1D loss.
    k1, k2 = jax.random.split(jax.random.key(0))
    source = jax.nn.softmax(jax.random.normal(k1, (40, 8)))
    target = jax.nn.softmax(jax.random.normal(k2, (40, 8)))
    for s, t in [(source, target), (jnp.array(WORKED_SOURCE), jnp.array(WORKED_TARGET))]:
        assert float(S.se_loss_2d(s, t, 1)) == pytest.approx(float(S.se_loss_1d(s, t)), rel=1e-6)


def test_se_2d_hand_values():
    # 4 modules, super-modules {0,1} and {2,3}. Each module has volume 1/2 of total 2 and is fully cut.
    # Switching inside the super-modules (0<->1, 2<->3): the super-modules have V = 1, no cut, so only the second term
    # is left: -4 * (1/4) ln((1/2) / 1) = ln 2, half of the 1D value ln 4.
    within = cycle([1, 0, 3, 2])
    assert float(S.se_loss_2d(*within, 2)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(S.se_loss_1d(*within)) == pytest.approx(math.log(4), rel=1e-6)
    # Switching across them (0<->2, 1<->3): the super-modules are fully cut too, -2 * (1/2) ln(1/2) = ln 2 more.
    across = cycle([2, 3, 0, 1])
    assert float(S.se_loss_2d(*across, 2)) == pytest.approx(2 * math.log(2), rel=1e-6)
    # One module per super-module: ln(volume_a / V_a) = 0 and the super-level term is the 1D loss.
    s, t = jnp.array(WORKED_SOURCE), jnp.array(WORKED_TARGET)
    assert float(S.se_loss_2d(s, t, 2)) == pytest.approx(0.26 * math.log(2), rel=1e-6)


def test_kl_to_uniform_hand_values():
    simnorm_dim = 8
    uniform = jnp.full((5, 32), 1 / simnorm_dim)
    np.testing.assert_allclose(S.kl_to_uniform(uniform, simnorm_dim), 0.0, atol=1e-6)
    # Every group puts all mass on symbol 3: ln 8, less 7 * 1e-8 * (ln 8 - ln 1e8) = 1.1e-6 from the 1e-8 clamp.
    one_hot = jnp.tile(jnp.eye(simnorm_dim)[3], (5, 4))
    np.testing.assert_allclose(S.kl_to_uniform(one_hot, simnorm_dim), math.log(simnorm_dim), atol=2e-6)
    # Two groups of 2: [.75, .25] has KL .75 ln 1.5 + .25 ln .5 = 0.130812 to uniform, [.5, .5] has 0.
    z = jnp.array([0.75, 0.25, 0.5, 0.5])
    np.testing.assert_allclose(S.kl_to_uniform(z, 2), [0.130812, 0.0], atol=1e-6)


def test_ib_worked_example():
    # docs/se_ib.md: H = 2, rho = .5, one row of two groups of 2. z_0 = enc(o_0) has IB (0.130812 + 0) / 2 = 0.065406;
    # the targets enc(o_1) (uniform, IB 0, weight 1) and enc(o_2) (one-hot, IB ln 2, weight .5):
    # (0.065406 + 0 + .5 ln 2) / 3 = 0.137327.
    z0 = jnp.array([[0.75, 0.25, 0.5, 0.5]])
    next_z = jnp.array([[[0.5, 0.5, 0.5, 0.5]], [[1.0, 0.0, 1.0, 0.0]]])
    assert float(S.ib_loss(z0, next_z, 0.5, 2)) == pytest.approx(0.137327, abs=1e-6)
    # Only z_0 carries a gradient: the targets are the encoder's outputs without gradient, as in the consistency loss.
    grad_z0, grad_next = jax.grad(S.ib_loss, argnums=(0, 1))(z0, next_z, 0.5, 2)
    assert np.abs(np.asarray(grad_z0)).sum() > 0
    np.testing.assert_array_equal(grad_next, 0.0)


def test_usage_entropy_hand_values():
    assert float(S.usage_entropy(jnp.tile(jnp.eye(8), (1, 2)), 8)) == pytest.approx(math.log(8), rel=1e-6)
    assert float(S.usage_entropy(jnp.tile(jnp.eye(8)[5], (6, 2)), 8)) == 0.0
    # Rows using modules {0} and {0, 1} equally: usage [3/4, 1/4].
    z = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    by_hand = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(S.usage_entropy(z, 2)) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("kind", ["one_hot", "uniform"])
def test_gradients_finite_at_one_hot_and_uniform(kind):
    simnorm_dim = 4
    if kind == "one_hot":
        zs = jnp.tile(jnp.eye(simnorm_dim), (4, 3, 1)).reshape(4, 3, 16)  # (H+1, B, latent): zero probabilities
    else:
        zs = jnp.full((4, 3, 16), 1 / simnorm_dim)
    source = S.module_assignment(zs[:-1], simnorm_dim).reshape(-1, simnorm_dim)
    target = S.module_assignment(zs[1:], simnorm_dim).reshape(-1, simnorm_dim)
    grads = [
        jax.grad(S.ib_loss)(zs[0], zs[1:], 0.5, simnorm_dim),
        *jax.grad(S.se_loss_1d, argnums=(0, 1))(source, target),
        *jax.grad(S.se_loss_2d, argnums=(0, 1))(source, target, 2),
    ]
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    args = dataclasses.replace(S.Args(), simnorm_dim=simnorm_dim, se_coef=0.1, ib_coef=0.1, se_2d=True)
    grad = jax.grad(lambda z: S.module_regularisers(args, z, z[1:])[0])(zs)
    assert np.isfinite(np.asarray(grad)).all()


def test_dominant_symbols_hand_values():
    # Two latents of three groups of 3: the argmax within each group and its probability.
    z = jnp.array([[0.2, 0.7, 0.1, 0.5, 0.3, 0.2, 0.0, 0.1, 0.9],
                   [0.6, 0.2, 0.2, 0.1, 0.1, 0.8, 0.3, 0.4, 0.3]])
    symbol, peak = S.dominant_symbols(z, 3)
    assert symbol.dtype == jnp.int32
    np.testing.assert_array_equal(symbol, [[1, 0, 2], [0, 2, 1]])
    np.testing.assert_allclose(peak, [[0.7, 0.5, 0.9], [0.6, 0.8, 0.4]], rtol=1e-6)
    assert S.dominant_symbols(jnp.zeros((5, 2, 64)), 8)[0].shape == (5, 2, 8)


# --- wiring into the world-model loss ---
class LinearModel:
    """The parts of se_ib_tdmpc2.WorldModel that world_model_loss uses, as one-matrix maps (the real networks take
    half a minute to compile on 2 cores): SimNorm latents, zero reward and Q logits."""

    def __init__(self, args: S.Args):
        self.args = args

    def init(self, key):
        k_enc, k_dyn, k_act = jax.random.split(key, 3)
        latent = self.args.latent_dim
        return {"encoder": jax.random.normal(k_enc, (5, latent)), "action": jax.random.normal(k_act, (2, latent)),
                "dynamics": jax.random.normal(k_dyn, (latent, latent)), "qs": None}

    def encode(self, params, obs):
        return S.simnorm(obs @ params["encoder"], self.args.simnorm_dim)

    def next(self, params, z, action):
        return S.simnorm(z @ params["dynamics"] + action @ params["action"], self.args.simnorm_dim)

    def reward(self, params, z, action):
        return jnp.zeros(z.shape[:-1] + (self.args.num_bins,))

    def q_logits(self, q_params, z, action, dropout_key=None):
        return jnp.zeros((self.args.num_q,) + z.shape[:-1] + (self.args.num_bins,))


def world_model_loss_at(args: S.Args):
    """(loss, (zs, info)), grads of world_model_loss on fixed random data, and the consistency targets next_z."""
    model = LinearModel(args)
    params = model.init(jax.random.key(0))
    k_obs, k_act = jax.random.split(jax.random.key(1))
    obs = jax.random.normal(k_obs, (args.horizon + 1, 6, 5))
    action = jax.random.uniform(k_act, (args.horizon, 6, 2), minval=-1, maxval=1)
    zeros = jnp.zeros((args.horizon, 6))
    next_z = model.encode(params, obs[1:])
    loss = lambda p: S.world_model_loss(model, p, obs, action, zeros, zeros, next_z, None)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params), next_z


def ib_by_hand(z0, next_z, rho: float, simnorm_dim: int) -> float:
    """docs/se_ib.md's IB in plain numpy: mean KL to uniform of enc(o_0)'s groups plus the rho^t-weighted ones of the
    targets, over H+1."""
    def kl(z):
        p = np.maximum(np.asarray(z, np.float64).reshape(*z.shape[:-1], -1, simnorm_dim), 1e-8)
        return float(np.mean(np.sum(p * np.log(p * simnorm_dim), axis=-1)))

    horizon = len(next_z)
    return (kl(z0) + sum(rho**t * kl(next_z[t]) for t in range(horizon))) / (horizon + 1)


def test_regularisers_added_to_world_model_loss():
    base = S.resolve_args(S.Args(latent_dim=16), DMC_ENV)
    ((off, (zs, info_off)), grads_off), next_z = world_model_loss_at(base)
    assert "se" not in info_off and "ib" not in info_off
    for se_2d in [False, True]:
        args = dataclasses.replace(base, se_coef=0.3, ib_coef=0.2, se_2d=se_2d, num_super_modules=4)
        ((on, (zs_on, info)), grads), _ = world_model_loss_at(args)
        np.testing.assert_array_equal(zs_on, zs)  # same parameters and data, same rollout
        # SE from the rollout: source = steps 0..H-1, target = steps 1..H, flattened over steps and batch.
        assignment = S.module_assignment(zs, 8)
        source, target = assignment[:-1].reshape(-1, 8), assignment[1:].reshape(-1, 8)
        se = S.se_loss_2d(source, target, 4) if se_2d else S.se_loss_1d(source, target)
        assert float(info["se"]) == pytest.approx(float(se), rel=1e-5)
        # IB from the encoder latent z_0 = zs[0] and the consistency targets, weighted rho^t (rho = .5), over H+1.
        assert float(info["ib"]) == pytest.approx(ib_by_hand(zs[0], next_z, 0.5, 8), rel=1e-5)
        assert float(on) == pytest.approx(float(off) + 0.3 * float(se) + 0.2 * float(info["ib"]), rel=1e-5)
        for name in ["encoder", "dynamics"]:  # SE shapes both the encoder and the dynamics
            assert not np.allclose(grads[name], grads_off[name])
    # IB alone reaches only the encoder: its latents are z_0 and the targets, none of them from the dynamics.
    ((_, (_, info)), grads), _ = world_model_loss_at(dataclasses.replace(base, ib_coef=0.2))
    assert "se" not in info
    assert not np.allclose(grads["encoder"], grads_off["encoder"])
    np.testing.assert_allclose(grads["dynamics"], grads_off["dynamics"], rtol=1e-6, atol=1e-9)


def test_off_traces_the_tdmpc2_graph():
    # With both coefficients 0 the regularisers are skipped at trace time: the jaxpr is tdmpc2_jax.py's.
    def jaxpr(module):
        args = module.resolve_args(module.Args(model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16), DMC_ENV)
        model = module.WorldModel(args, obs_dim=5, action_dim=2)
        wm_params, _ = jax.eval_shape(model.init, jax.random.key(0))
        obs, action = jnp.zeros((4, 6, 5)), jnp.zeros((3, 6, 2))
        fn = lambda p: module.world_model_loss(model, p, obs, action, jnp.zeros((3, 6)), jnp.zeros((3, 6)),
                                               jnp.zeros((3, 6, 16)), jax.random.key(2))[0]
        return str(jax.make_jaxpr(jax.grad(fn))(wm_params))

    assert jaxpr(S) == jaxpr(T)


# --- CLI ---
def test_every_args_field_is_used():
    assert unused_args_fields("se_ib_tdmpc2.py") == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(se_coef=-0.1), "--se-coef must not be negative, got -0.1"),
        (dict(ib_coef=-1.0), "--ib-coef must not be negative, got -1.0"),
        (dict(se_2d=True), "--se-2d needs a positive --se-coef"),
        (dict(se_2d=True, se_coef=0.1, num_super_modules=3), "--num-super-modules (3) must divide --simnorm-dim (8)"),
        (dict(num_super_modules=0), "--num-super-modules must be positive"),
    ],
)
def test_resolve_args_refuses_bad_regulariser_settings(overrides, message):
    with pytest.raises(S.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        S.resolve_args(S.Args(**overrides), DMC_ENV)


def test_resolve_args_accepts_dividing_super_modules():
    args = S.resolve_args(S.Args(se_coef=0.1, se_2d=True, num_super_modules=4), DMC_ENV)
    assert (args.se_coef, args.se_2d, args.num_super_modules) == (0.1, True, 4)


def test_cli_help_and_one_line_error():
    out = run_script("se_ib_tdmpc2.py", "--help").stdout
    for flag in ["--se-coef", "--ib-coef", "--se-2d", "--no-se-2d", "--num-super-modules", "--k-update"]:
        assert flag in out
    proc = run_script("se_ib_tdmpc2.py", "--se-2d", "--ib-coef", "0.1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --se-2d needs a positive --se-coef (it chooses which SE loss is used)"


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_script("se_ib_tdmpc2.py", "--env-id", "CartpoleBalance", "--se-coef", "0.1", "--se-2d", "--dry-run",
                      "--run-dir", str(tmp_path / "x"))
    config = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    assert (config["se_coef"], config["ib_coef"], config["se_2d"], config["num_super_modules"]) == (0.1, 0.0, True, 2)
    assert config["seed_steps"] == 5120 and config["discount"] == 0.99 and config["latent_dim"] == 512
    assert not list(tmp_path.iterdir())


# --- runs ---
def test_off_is_tdmpc2_bit_for_bit(tdmpc2_tiny_run, tmp_path):
    run_dir = tmp_path / "se_ib_off"
    run_script("se_ib_tdmpc2.py", *TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny", "--run-dir", str(run_dir))
    returns = lambda rows: [(r["step"], r["return_pi"], r["return_mppi"]) for r in rows]
    assert returns(read_eval(run_dir)) == returns(read_eval(tdmpc2_tiny_run))
    ours, theirs = read_tb_scalars(run_dir), read_tb_scalars(tdmpc2_tiny_run)
    loss_tags = sorted(t for t in theirs if t.startswith("losses/"))
    assert "losses/consistency_loss" in loss_tags and "losses/pi_loss" in loss_tags
    assert sorted(t for t in ours if t.startswith("losses/")) == loss_tags  # no losses/se or losses/ib when off
    for tag in loss_tags:
        assert ours[tag] == theirs[tag], tag
    # The module-usage diagnostic is logged at every eval after the first chunk, within [0, ln 8].
    entropy = ours["se/module_entropy"]
    assert [step for step, _ in entropy] == [400, 800]
    assert all(0 <= value <= math.log(8) + 1e-6 for _, value in entropy)


@pytest.mark.xdist_group("two_device_batch")  # with test_tdmpc2's test of the same batch: its run is made once
def test_seed_batch_on_two_devices_is_tdmpc2s_and_logs_module_entropy_per_seed(tdmpc2_two_device_batch, tmp_path):
    """--num-seeds 2 over two devices: with the regularisers off every seed's eval.csv is tdmpc2_jax.py's batch's;
    with SE on, each seed's TensorBoard gets its own se/module_entropy, computed inside the seed-batched program."""
    _, tdmpc2 = tdmpc2_two_device_batch
    flags = [*TINY_TDMPC2, "--num-seeds", "2", "--checkpoint-every", "0"]
    run_script("se_ib_tdmpc2.py", *flags, "--run-dir", str(tmp_path / "off"), env=TWO_DEVICES)
    run_script("se_ib_tdmpc2.py", *flags, "--se-coef", "0.01", "--total-steps", "400", "--run-dir",
               str(tmp_path / "se"), env=TWO_DEVICES)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    entropies = []
    for seed in (1, 2):
        assert strip(read_eval(tmp_path / f"off__{seed}")) == strip(read_eval(tdmpc2.with_name(f"whole__{seed}")))
        scalars = read_tb_scalars(tmp_path / f"se__{seed}")
        assert [step for step, _ in scalars["se/module_entropy"]] == [400]  # after the first chunk
        assert all(0 <= value <= math.log(8) + 1e-6 for _, value in scalars["se/module_entropy"])
        assert "losses/se" in scalars
        entropies.append(scalars["se/module_entropy"])
    assert entropies[0] != entropies[1]  # each seed's own agent and buffer


# --- symbol pictures (--capture-video) ---
TINY_EVAL = dict(model_size=1, enc_dim=16, mlp_dim=16, latent_dim=16, simnorm_dim=4, batch_size=8, num_samples=16,
                 num_elites=2, num_pi_trajs=2, iterations=1, buffer_size=2000, eval_episodes=1)


def tiny_trainer(module):
    venv = module.VectorEnv(module.load_env("CartpoleBalance", "jax", episode_length=60), action_repeat=2)
    args = module.Args(env_id="CartpoleBalance", num_envs=2, k_update=2, seed_steps=80, **TINY_EVAL)
    return module.Trainer(module.resolve_args(args, venv), venv)


def tiny_agent(trainer):
    return jax.jit(partial(S.init_agent, trainer.model, trainer.wm_tx, trainer.pi_tx))(jax.random.key(0))


def test_evaluation_without_video_traces_the_tdmpc2_program():
    # The symbols are added only when recording: the plain evaluation is tdmpc2_jax.py's, op for op.
    trainer, theirs = tiny_trainer(S), tiny_trainer(T)
    agent = tiny_agent(trainer)
    key = jax.random.key(1)
    assert str(jax.make_jaxpr(trainer.evaluate)(agent, key)) == str(jax.make_jaxpr(theirs.evaluate)(agent, key))


def test_recorded_evaluation_returns_each_frames_dominant_symbols(tmp_path):
    trainer = tiny_trainer(S)
    agent = tiny_agent(trainer)
    key = jax.random.key(1)
    _, extras = jax.device_get(jax.jit(partial(trainer.evaluate, record=True))(agent, key))
    recorded = extras["poses"]
    # 30 agent steps (60 physics steps, action repeat 2) plus the initial state; 16 / 4 = 4 groups; pi and MPPI.
    assert recorded["symbol"].shape == (31, 2, 4) and recorded["symbol"].dtype == np.int32
    assert recorded["peak"].shape == (31, 2, 4)
    assert ((recorded["symbol"] >= 0) & (recorded["symbol"] < 4)).all()
    # Frame 0 by hand: the first env of each mode after the evaluation's reset, encoded, argmax of each group of 4.
    k_reset, _ = jax.random.split(key)
    obs = S.observation(jax.jit(trainer.venv.reset, static_argnums=1)(k_reset, 2))  # env 0 is pi's, env 1 MPPI's
    groups = np.asarray(trainer.model.encode(agent.wm_params, obs)).reshape(2, 4, 4)
    np.testing.assert_array_equal(recorded["symbol"][0], groups.argmax(-1))
    np.testing.assert_allclose(recorded["peak"][0], groups.max(-1), rtol=1e-6)
    # The picture of it: a valid PNG written atomically into symbols/.
    S.write_symbol_picture(tmp_path / "symbols", 400, recorded, 4)
    assert [p.name for p in (tmp_path / "symbols").iterdir()] == ["symbols_step400.png"]
    assert_png(tmp_path / "symbols" / "symbols_step400.png")
    # --dump-rollouts: the dominant symbols of every step's latent, for every evaluated episode.
    _, dumped = jax.eval_shape(partial(trainer.evaluate, dump=True), agent, key)
    episodes = 2 * trainer.args.eval_episodes
    assert dumped["rollout"]["symbol"].shape == (30, episodes, 4) and dumped["rollout"]["z"].shape == (30, episodes, 16)


def test_capture_video_writes_a_symbol_picture_per_recorded_evaluation_and_a_checkpoint_continues(tmp_path):
    """Training with --capture-video draws the symbol pictures; then, on that run: --evaluate --dump-rollouts gives
    the step's eval.csv means again and dumps each step's dominant symbols (the argmax within each SimNorm group of the
    dumped latent); --init-from its first checkpoint, nothing changed, writes the source's later eval rows."""
    run_dir = tmp_path / "video"
    run_script("se_ib_tdmpc2.py", *TINY_TDMPC2, "--se-coef", "0.01", "--run-dir", str(run_dir), "--capture-video",
               "--video-every", "2", "--video-height", "48", "--video-width", "64")
    # Evaluations at 0, 400 and 800 env steps; every second one (0 and 800) is recorded.
    pictures = sorted(p.name for p in (run_dir / "symbols").iterdir())
    assert pictures == ["symbols_step0.png", "symbols_step800.png"]
    for name in pictures:
        assert_png(run_dir / "symbols" / name)

    run_script("se_ib_tdmpc2.py", "--evaluate", str(run_dir), "--dump-rollouts")
    record = json.loads((run_dir / "evaluations" / "step800.json").read_text())
    final = read_eval(run_dir)[-1]
    with np.load(run_dir / "evaluations" / "rollouts_step800.npz") as dump:
        for mode in ["pi", "mppi"]:
            assert f"{record['modes'][mode]['mean']:.6g}" == final[f"return_{mode}"], mode
            z, symbol, alive = dump[f"{mode}_z"], dump[f"{mode}_symbol"], dump[f"{mode}_alive"]
            assert z.shape == (2, 50, 16) and symbol.shape == (2, 50, 2)  # 16 = 2 SimNorm groups of 8
            np.testing.assert_array_equal(symbol, z.reshape(2, 50, 2, 8).argmax(-1))
            np.testing.assert_allclose((dump[f"{mode}_reward"] * alive).sum(1), record["modes"][mode]["returns"],
                                       rtol=1e-5)

    continued = tmp_path / "continued"
    run_script("se_ib_tdmpc2.py", "--init-from", f"{run_dir}:400", "--run-dir", str(continued))
    returns = lambda rows: [(r["step"], r["return_pi"], r["return_mppi"]) for r in rows]
    assert returns(read_eval(continued)) == returns(read_eval(run_dir)[2:])  # the row at 800
    assert json.loads((continued / "args.json").read_text())["init_from"] == {
        "run_dir": str(run_dir), "step": 400, "changed": {}}


# --- resume ---
def test_resume_is_exact(tmp_path):
    # Regularisers on: their losses and se/module_entropy (its key folded off the step's eval key) must continue too.
    flags = [*TINY_TDMPC2, "--se-coef", "0.01", "--ib-coef", "0.01"]
    assert_resume_is_exact("se_ib_tdmpc2.py", flags, tmp_path, half=400, full=800)  # as Glass's: after seeding


def test_resume_refuses_other_scripts_runs_and_changed_regularisers(tmp_path):
    resume = lambda folder, **flags: S.resume_config(S.Args(resume=str(folder), **flags))[0]
    (tmp_path / "checkpoints" / "800").mkdir(parents=True)
    tdmpc2_run = {**dataclasses.asdict(T.Args()), "metadata": {"script": "tdmpc2_jax.py"}}
    (tmp_path / "args.json").write_text(json.dumps(tdmpc2_run))
    with pytest.raises(S.UserError, match="a run of another script, not of se_ib_tdmpc2.py"):
        resume(tmp_path)
    se_run = {**dataclasses.asdict(S.Args(se_coef=0.01)), "metadata": {"script": "se_ib_tdmpc2.py"}}
    (tmp_path / "args.json").write_text(json.dumps(se_run))
    with pytest.raises(S.UserError, match="--se-coef 0.1 differs from the run's 0.01; only --total-steps"):
        resume(tmp_path, se_coef=0.1)
    assert resume(tmp_path, total_steps=1600).se_coef == 0.01


@pytest.mark.slow
def test_learns_cartpole_balance_with_se(tmp_path):
    run_dir = tmp_path / "run"
    learning_run("se_ib_tdmpc2.py", run_dir, "--se-coef", "0.01")
    scalars = read_tb_scalars(run_dir)
    se = [value for _, value in scalars["losses/se"]]
    print(f"losses/se {se}; se/module_entropy {scalars['se/module_entropy']}")
    assert all(np.isfinite(se)) and "losses/ib" not in scalars
