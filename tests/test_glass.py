"""tdmpc_glass_jax.py: Glass math against hand-computed graphs, the schedule, parity with tdmpc2_jax.py (Glass off:
the same run; Glass on with stopgrad: the same agent), the extras, a short run's diagnostics, resume, a batch of seeds,
bad input and learning on CartpoleBalance. The worked values are those of docs/glass.md.
"""

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
    read_video,
    run_script,
    unused_args_fields,
)
from PIL import Image

import tdmpc2_jax as T
import tdmpc_glass_jax as G

# Two triangles {0,1,2} and {3,4,5} joined by the edge 2-3, unit weights, no self-loops (docs/glass.md).
TRIANGLES = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5), (2, 3)]


se2d = jax.jit(G.structural_entropy_2d)  # one compile per shape instead of op-by-op dispatch


def graph(edges, n):
    A = np.zeros((n, n))
    for i, j in edges:
        A[i, j] = A[j, i] = 1.0
    return jnp.array(A)


def hard(labels, k):
    return jnp.array(np.eye(k)[labels])


# --- 2D structural entropy ---
def test_structural_entropy_worked_values():
    A = graph(TRIANGLES, 6)
    se = lambda S: float(se2d(A, S))
    # Degrees 2,2,3,3,2,2, 2m = 14: H1 = -(4 (2/14) log2(2/14) + 2 (3/14) log2(3/14)) = 2.556657.
    assert se(jnp.ones((6, 1))) == pytest.approx(2.556657, abs=1e-5)  # one cluster: H2 = H1
    correct, wrong = se(hard([0, 0, 0, 1, 1, 1], 2)), se(hard([0, 0, 1, 0, 1, 1], 2))
    assert correct == pytest.approx(1.699514, abs=1e-5)  # V = 7, 7; g = 1, 1
    assert wrong == pytest.approx(2.270942, abs=1e-5)  # {0,1,3}|{2,4,5}: V = 7, 7; g = 5, 5
    assert correct < wrong
    assert se(jnp.full((6, 2), 0.5)) == pytest.approx(2.056657, abs=1e-5)


def test_structural_entropy_two_disjoint_edges():
    # Edges 0-1 and 2-3: d = 1 each, 2m = 4, H1 = 2 bits. Right split: no cut, p_vol = 1/2 -> 0 + 2 - 1 = 1 bit.
    # Split {0,2}|{1,3}: every edge is cut, g = V = 2 -> -2 (1/2) log2(1/2) + 2 - 1 = 2 bits.
    A = graph([(0, 1), (2, 3)], 4)
    assert float(se2d(A, hard([0, 0, 1, 1], 2))) == pytest.approx(1.0, abs=1e-5)
    assert float(se2d(A, hard([0, 1, 0, 1], 2))) == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_structural_entropy_uniform_partition(k):
    # Uniform S: V_k = 2m/K, (S^T A S)_kk = 2m/K^2, so H2 = H1 - log2 K + (K-1)/K log2 K = H1 - log2(K)/K.
    A = graph(TRIANGLES, 6)
    h1 = float(se2d(A, jnp.ones((6, 1))))
    got = float(se2d(A, jnp.full((6, k), 1.0 / k)))
    assert got == pytest.approx(h1 - math.log2(k) / k, abs=1e-5)


# --- assignment, graph, balance, diagnostics ---
def test_soft_assign_cosine_hand_value():
    prototypes = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    assign = jax.jit(G.soft_assign, static_argnums=2)
    c = assign(jnp.array([[5.0, 0.0], [1.0, 1.0]]), prototypes, 0.5)
    e2 = math.exp(2.0)  # cos = (1, 0) / 0.5 -> logits (2, 0); the second latent is equally close to both
    np.testing.assert_allclose(c, [[e2 / (e2 + 1), 1 / (e2 + 1)], [0.5, 0.5]], rtol=1e-5)
    z = jax.random.normal(jax.random.key(0), (50, 16))
    c = assign(z, jax.random.normal(jax.random.key(1), (7, 16)), 0.7)
    np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-5)


def test_transition_graph_rows_and_symmetry():
    # Hand value: both sources go to prototype 1 -> counts [[0, 1], [0, 1]] + 1e-4, rows normalised.
    transition_graph = jax.jit(G.transition_graph)
    P, A = transition_graph(jnp.eye(2), jnp.array([[0.0, 1.0], [0.0, 1.0]]))
    row = np.array([1e-4, 1.0001]) / 1.0002
    np.testing.assert_allclose(P, [row, row], rtol=1e-5)
    np.testing.assert_allclose(A, [[row[0], 0.5], [0.5, row[1]]], rtol=1e-5)
    k1, k2 = jax.random.split(jax.random.key(2))
    c_src = jax.nn.softmax(jax.random.normal(k1, (40, 6)))
    c_next = jax.nn.softmax(jax.random.normal(k2, (40, 6)))
    P, A = transition_graph(c_src, c_next)
    np.testing.assert_allclose(P.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(A, A.T, rtol=1e-6)  # up to rounding: XLA may fuse P's division differently in P^T


def test_balance_hinge_zero_when_balanced_positive_when_collapsed():
    balanced_S = hard(np.arange(16) % 8, 8)  # two prototypes per cluster: mass 1/8 < 2/8 everywhere
    uniform_c = jnp.full((32, 16), 1 / 16)
    assert float(G.balance_hinge(balanced_S, uniform_c)) == 0.0
    # Everything on cluster 0 and prototype 0: (1 - 2/8)^2 + (1 - 2/16)^2.
    collapsed_S, collapsed_c = hard(np.zeros(16, int), 8), hard(np.zeros(32, int), 16)
    assert float(G.balance_hinge(collapsed_S, collapsed_c)) == pytest.approx(0.75**2 + 0.875**2)
    assert float(G.balance_hinge(collapsed_S, uniform_c)) == pytest.approx(0.75**2)


def test_glass_diagnostics_hand_made():
    S = jnp.array([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.98, 0.01]])
    P = jnp.array([[0.7, 0.2, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.3, 0.6, 0.1], [0.25, 0.25, 0.25, 0.25]])
    d = {k: float(v) for k, v in jax.jit(G.glass_diagnostics)(S, P).items()}
    # Masses (0.495, 0.495, 0.01): the third is below 0.05/3. Labels (0, 0, 1, 1): the rows put 0.1, 0, 0.3 and 0.5
    # on the other cluster, so (0.1 + 0 + 0.3 + 0.5) / 4 prototypes = 0.225 of the transitions cross a boundary.
    assert d["active_clusters"] == 2
    assert d["cluster_entropy"] == pytest.approx(-2 * 0.495 * math.log(0.495) - 0.01 * math.log(0.01), rel=1e-5)
    assert d["max_mass"] == pytest.approx(0.495, rel=1e-5)
    assert d["cut_mass"] == pytest.approx(0.225, rel=1e-5)
    one_cluster = jnp.array([[0.9, 0.1]] * 4)  # nothing crosses a boundary; a permutation P: everything does
    assert float(G.glass_diagnostics(one_cluster, P)["cut_mass"]) == 0.0
    swap = jnp.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert float(G.glass_diagnostics(S, swap)["cut_mass"]) == pytest.approx(1.0)


def test_cluster_label_nearest_prototype_then_partition():
    prototypes = jnp.eye(3, 4)
    S = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    z = jnp.array([[2.0, 0.1, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [0.1, 3.0, 0.0, 0.0]])  # nearest: 0, 2, 1
    np.testing.assert_array_equal(jax.jit(G.cluster_label)(z, prototypes, S), [0, 0, 1])


def test_glass_loss_parts_hand_values():
    # Sharp assignments: c and S are (nearly) one-hot, so s = c S is the identity on the sources and (1, 0) twice on
    # the targets: temporal = mean(0, 2) = 1; temp-stability = mean(1 - 1, 1 - 0) = 1/2.
    args = G.Args(glass_proto_temperature=1e-3, glass_lambda_se=0.5, glass_lambda_balance=2.0,
                  glass_lambda_temporal=3.0, glass_lambda_temp_stability=4.0)
    params = {"prototypes": jnp.eye(2), "assign_logits": jnp.array([[30.0, -30.0], [-30.0, 30.0]])}
    z_src, z_next = jnp.eye(2), jnp.array([[1.0, 0.0], [1.0, 0.0]])
    loss, parts = jax.jit(lambda p, a, b: G.glass_loss(G.glass_graph(p, a, b, args), args))(params, z_src, z_next)
    assert float(parts["temporal"]) == pytest.approx(1.0, abs=1e-4)
    assert float(parts["temp_stability"]) == pytest.approx(0.5, abs=1e-4)
    assert float(parts["balance"]) == pytest.approx(0.0, abs=1e-6)  # masses 1/2 = 2/K exactly: the hinge is off
    # Graph: counts [[1, 0], [1, 0]] + 1e-4 -> P rows ~ (1, 0); A ~ [[1, .5], [.5, 0]]: d = (1.5, .5), 2m = 2.
    # H1 = -(.75 log2 .75 + .25 log2 .25); clusters {0}, {1}: g = (.5, .5) -> H2 = -.25 log2 .75 - .25 log2 .25 + H1
    # + .75 log2 .75 + .25 log2 .25.
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    h2 = -0.25 * math.log2(0.75) - 0.25 * math.log2(0.25) + h1 + 0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)
    assert float(parts["se"]) == pytest.approx(h2, abs=1e-3)
    assert float(loss) == pytest.approx(0.5 * h2 + 3.0 * 1.0 + 4.0 * 0.5, abs=2e-3)


def test_super_cluster_terms_have_their_own_weights():
    # Three prototypes, each its own cluster (S ~ I); every source goes to prototype 0: counts [[1,0,0]] * 3 + 1e-4,
    # so A ~ [[1, .5, .5], [.5, 0, 0], [.5, 0, 0]], d = (2, .5, .5), 2m = 3. All clusters go to super-cluster 0:
    # one super-cluster holds everything, so H2(A, S_super) = H1 and its mass hinge is (1 - 2/3)^2 = 1/9.
    # The flat terms: H2(A, S) = -(1/3 log2 2/3 + 2 (1/6) log2 1/6) (g = (1, .5, .5)), balance 0 (masses 1/3 < 2/3).
    sharp = 30.0 * (2 * jnp.eye(3) - 1)
    params = {"prototypes": jnp.eye(3), "assign_logits": sharp,
              "super_assign_logits": jnp.array([[30.0, -30.0, -30.0]] * 3)}
    z_src, z_next = jnp.eye(3), jnp.array([[1.0, 0.0, 0.0]] * 3)
    weights = dict(glass_lambda_se=0.5, glass_lambda_balance=7.0, glass_lambda_temporal=0.0)
    h1 = -(2 / 3 * math.log2(2 / 3) + 2 / 6 * math.log2(1 / 6))
    se = -(1 / 3 * math.log2(2 / 3) + 2 / 6 * math.log2(1 / 6))

    def loss_and_parts(**overrides):
        args = G.Args(glass_proto_temperature=1e-3, glass_num_super_clusters=3, **weights, **overrides)
        return jax.jit(lambda p: G.glass_loss(G.glass_graph(p, z_src, z_next, args), args))(params)

    loss, parts = loss_and_parts(glass_lambda_super_se=2.0, glass_lambda_super_balance=3.0)
    assert float(parts["super_se"]) == pytest.approx(h1, abs=1e-3)
    assert float(parts["super_balance"]) == pytest.approx(1 / 9, abs=1e-4)
    assert float(parts["se"]) == pytest.approx(se, abs=1e-3) and float(parts["balance"]) == 0.0
    assert float(loss) == pytest.approx(0.5 * se + 2.0 * h1 + 3.0 / 9, abs=5e-3)
    loss_default, _ = loss_and_parts()  # super weights default to 0: the super terms are computed, not added
    assert float(loss_default) == pytest.approx(0.5 * se, abs=1e-3)


def test_stopgrad_graph_blocks_the_latent_gradient():
    z_src = jax.random.normal(jax.random.key(3), (24, 16))
    z_next = jax.random.normal(jax.random.key(4), (24, 16))
    params = G.WorldModel(G.resolve_args(G.Args(latent_dim=16), DMC_ENV), 3, 1).glass_init(jax.random.key(5))
    def grads(stop):  # d loss / d z_src, d loss / d z_next
        args = G.Args(glass_stopgrad_graph=stop)
        loss = lambda a, b: G.glass_loss(G.glass_graph(params, a, b, args), args)[0]
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(z_src, z_next)

    (src_stop, next_stop), (src_free, next_free) = grads(True), grads(False)
    assert float(jnp.abs(src_stop).max()) == 0.0 and float(jnp.abs(src_free).max()) > 0.0
    assert float(jnp.abs(next_stop).max()) == 0.0 and float(jnp.abs(next_free).max()) == 0.0  # z_next: never


def test_schedule_gate():
    args = G.Args(glass_warmup_steps=100, glass_off_step=1000, glass_every_k_updates=4)
    gate = jax.jit(lambda step, i: G.glass_schedule(args, step, i))
    expected = {(99, 0): False, (100, 0): True, (100, 1): False, (500, 8): True, (500, 6): False, (999, 4): True,
                (1000, 0): False, (5000, 4): False}
    for (step, i), on in expected.items():
        assert bool(gate(step, i)) == on, (step, i)
    never_off = G.Args(glass_warmup_steps=0, glass_every_k_updates=1)
    assert bool(G.glass_schedule(never_off, jnp.int32(2**30), 7))
    active = {99: False, 100: True, 999: True, 1000: False}  # the window alone, whatever the update index
    assert {step: bool(G.glass_active(args, jnp.int32(step))) for step in active} == active
    assert not bool(G.glass_active(G.Args(glass_off_step=0), jnp.int32(500_000)))


def test_glass_enabled_is_static_off_with_zero_weights_or_off_step_zero():
    zero = dict(glass_lambda_se=0.0, glass_lambda_balance=0.0, glass_lambda_temporal=0.0)
    assert G.glass_enabled(G.Args())
    assert not G.glass_enabled(G.Args(**zero))
    assert G.glass_enabled(G.Args(**zero, glass_lambda_temp_stability=0.01))
    assert G.glass_enabled(G.Args(**zero, glass_num_super_clusters=2, glass_lambda_super_se=5e-3))
    assert not G.glass_enabled(G.Args(glass_off_step=0))


# --- parity of the update with tdmpc2_jax.py, in process ---
OBS_DIM, ACTION_DIM, CLIP = 5, 1, 20.0
SMALL = dict(model_size=1, enc_dim=32, mlp_dim=32, latent_dim=16, batch_size=16)
GLASS_ON = dict(glass_warmup_steps=100, glass_off_step=1000, glass_every_k_updates=1)


def batches(n):
    def one(key):
        k_obs, k_act, k_rew = jax.random.split(key, 3)
        obs = jax.random.normal(k_obs, (4, 16, OBS_DIM))
        action = jax.random.uniform(k_act, (3, 16, ACTION_DIM), minval=-1, maxval=1)
        return obs, action, jax.random.uniform(k_rew, (3, 16)), jnp.zeros((3, 16))

    return [one(jax.random.fold_in(jax.random.key(11), i)) for i in range(n)]


def make_update(module, **overrides):
    """(jitted update, initial agent) of `module` with the small model; same init key for every module."""
    args = module.resolve_args(module.Args(**SMALL, **overrides), DMC_ENV)
    model = module.WorldModel(args, OBS_DIM, ACTION_DIM)
    wm_tx, pi_tx = module.make_optimizers(args, jax.eval_shape(model.init, jax.random.key(0))[0])
    agent = jax.jit(lambda key: module.init_agent(model, wm_tx, pi_tx, key))(jax.random.key(7))
    return jax.jit(partial(module.update, model, wm_tx, pi_tx)), agent


def run(update, agent, n, *env_step):
    infos = []
    for i, batch in enumerate(batches(n)):
        agent, info = update(agent, batch, jax.random.fold_in(jax.random.key(13), i), *env_step)
        infos.append(jax.device_get(info))
    return agent, infos


def tdmpc2_part(agent):
    wm = {k: v for k, v in agent.wm_params.items() if k != "glass"}
    return jax.device_get((wm, agent.target_qs, agent.pi_params, agent.scale))


@pytest.fixture(scope="module")
def tdmpc2_updates():
    """TD-MPC2's initial agent, its agent after 6 updates and their infos."""
    update, agent = make_update(T)
    after, infos = run(update, agent, 6)
    return tdmpc2_part(agent), tdmpc2_part(after), infos


@pytest.fixture(scope="module")
def glass_update():
    return make_update(G, **GLASS_ON)


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) the tests sharing the compiled updates above
# run in one worker, so each is compiled once.
same_worker = pytest.mark.xdist_group("glass_updates")


@same_worker
def test_initial_agent_is_tdmpc2s(tdmpc2_updates, glass_update):
    """Glass's parameters are drawn from a folded-in key: TD-MPC2's key sequence, so its parameters, are unchanged."""
    jax.tree.map(np.testing.assert_array_equal, tdmpc2_part(glass_update[1]), tdmpc2_updates[0])


@same_worker
def test_stopgrad_glass_agent_equals_tdmpc2_agent(tdmpc2_updates, glass_update):
    """docs/glass.md, "What stopgrad_graph means": with stopgrad_graph the Glass loss reaches only prototypes and
    assign_logits; while the shared clip does not bind, the agent after N updates is exactly the TD-MPC2 agent."""
    _, expected, tdmpc2_infos = tdmpc2_updates
    update, agent = glass_update
    glass_agent, infos = run(update, agent, 6, 500)  # inside [warm-up, off-step): Glass on at every update
    assert all(info["glass_loss"] > 0 for info in infos)
    assert all(info["grad_norm"] < CLIP for info in infos + tdmpc2_infos), "the clip binds: parity does not apply"
    jax.tree.map(np.testing.assert_array_equal, tdmpc2_part(glass_agent), expected)
    assert not np.array_equal(glass_agent.wm_params["glass"]["prototypes"], agent.wm_params["glass"]["prototypes"])


@same_worker
def test_no_stopgrad_glass_changes_the_agent(tdmpc2_updates):
    _, expected, _ = tdmpc2_updates
    update, agent = make_update(G, **GLASS_ON, glass_stopgrad_graph=False)
    glass_agent, _ = run(update, agent, 6, 500)
    encoder = lambda params: params[0]["encoder"]
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), encoder(tdmpc2_part(glass_agent)), encoder(expected))
    assert max(jax.tree.leaves(diff)) > 0


@same_worker
def test_schedule_zero_before_warmup_and_after_off_step_without_recompiling(glass_update):
    update, agent = glass_update
    glass_before = jax.device_get(agent.wm_params["glass"])
    for step in (99, 1000, 50_000):  # warm-up 100, off-step 1000
        after, infos = run(update, agent, 2, step)
        assert all(info["glass_loss"] == 0.0 for info in infos)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.wm_params["glass"]), glass_before)
    after, infos = run(update, agent, 1, 100)
    assert infos[0]["glass_loss"] > 0
    assert update._cache_size() == 1  # one compiled program for every env step


# --- extras ---
def test_latent_smoothing_runs_over_the_rollout_latents_before_the_last():
    """The smoothing term compares the policy's mean actions at z_0..z_H-1 only: a change of z_H leaves it at 0 when
    z_0..z_H-1 are equal, a change of z_1 does not; before its start step it adds nothing to the policy loss."""
    args = G.resolve_args(G.Args(**SMALL, latent_smooth_coef=1.0, latent_smooth_start_step=100), DMC_ENV)
    model = G.WorldModel(args, OBS_DIM, ACTION_DIM)
    wm_params, pi_params = model.init(jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (5, args.latent_dim))  # H + 1 = 4 rollout latents, batch 2
    loss = jax.jit(lambda zs, env_step: G.policy_loss(model, pi_params, wm_params, zs, jnp.ones(()),
                                                      jax.random.key(2), env_step)[1][1])
    smooth = lambda *latents: float(loss(jnp.stack([jnp.stack([x, x]) for x in latents]), 100)["pi_smooth_loss"])
    assert smooth(z[0], z[0], z[0], z[3]) == 0.0
    assert smooth(z[0], z[1], z[0], z[0]) > 0.0
    zs = jnp.stack([jnp.stack([x, x]) for x in (z[0], z[1], z[2], z[3])])
    before, after = loss(zs, 99), loss(zs, 100)
    assert float(after["pi_loss"]) == pytest.approx(float(before["pi_loss"]) + float(after["pi_smooth_loss"]))


def test_every_args_field_is_used():
    assert unused_args_fields("tdmpc_glass_jax.py") == []


# --- bad input ---
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(glass_num_clusters=20), "--glass-num-clusters (20) must not exceed --glass-num-prototypes (16)"),
        (dict(glass_off_step=50_000), "--glass-off-step (50000) must be above --glass-warmup-steps (100000)"),
        (dict(glass_warmup_steps=10, glass_off_step=10), "--glass-off-step (10) must be above"),
        (dict(glass_proto_temperature=0.0), "--glass-proto-temperature must be positive"),
        (dict(glass_assign_temperature=-1.0), "--glass-assign-temperature must be positive"),
        (dict(glass_lambda_se=-1e-3), "--glass-lambda-se must not be negative"),
        (dict(glass_num_super_clusters=9), "--glass-num-super-clusters must be between 2 and --glass-num-clusters (8)"),
        (dict(glass_every_k_updates=0), "--glass-every-k-updates must be positive"),
        (dict(glass_lambda_super_se=5e-3), "--glass-lambda-super-se and --glass-lambda-super-balance need "
                                          "--glass-num-super-clusters"),
        (dict(glass_num_super_clusters=2, glass_lambda_super_balance=-1.0),
         "--glass-lambda-super-balance must not be negative"),
    ],
)
def test_resolve_args_refuses_impossible_glass_settings(overrides, message):
    with pytest.raises(G.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        G.resolve_args(G.Args(**overrides), DMC_ENV)


def test_off_step_zero_is_allowed_with_a_warmup():
    assert G.resolve_args(G.Args(glass_off_step=0), DMC_ENV).glass_off_step == 0


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_script("tdmpc_glass_jax.py", "--env-id", "CartpoleBalance", "--dry-run", "--glass-off-step", "1000000",
                      "--run-dir", str(tmp_path / "x"))
    config = json.loads(proc.stdout)
    assert config["seed_steps"] == 5120 and config["discount"] == 0.99 and config["glass_off_step"] == 1_000_000
    assert (config["glass_num_prototypes"], config["glass_lambda_super_se"]) == (16, 0.0)
    assert not list(tmp_path.iterdir())


def test_cli_bad_glass_input_one_line_error():
    proc = run_script("tdmpc_glass_jax.py", "--glass-num-clusters", "32", check=False)
    assert proc.returncode == 2
    assert "error: --glass-num-clusters (32) must not exceed --glass-num-prototypes (16)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- runs ---
def test_glass_off_run_is_the_tdmpc2_run(tdmpc2_tiny_run, tmp_path):
    run_dir = tmp_path / "off"
    run_script("tdmpc_glass_jax.py", *TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny", "--run-dir", str(run_dir),
               "--glass-off-step", "0")
    returns = lambda rows: [(r["step"], r["return_pi"], r["return_mppi"]) for r in rows]
    assert returns(read_eval(run_dir)) == returns(read_eval(tdmpc2_tiny_run))
    expected = {k: v for k, v in read_tb_scalars(tdmpc2_tiny_run).items() if k.startswith("losses/")}
    got = read_tb_scalars(run_dir)
    assert expected and {k: got.get(k) for k in expected} == expected
    assert "losses/glass_loss" not in got


def test_run_logs_diagnostics_before_during_and_after_glass(tmp_path):
    """`--k-update 128` with the tiny model and Glass on from env step 400 to 600, evaluated every 200 steps, with
    every optional term on so that one run exercises them all: glass/active says where Glass was on, the other
    diagnostics come at every evaluation with whole sequences in the buffer (all but step 0)."""
    run_dir = tmp_path / "run"
    flags = ["--k-update", "128", "--glass-warmup-steps", "400", "--glass-off-step", "600",
             "--glass-num-super-clusters", "2", "--glass-lambda-super-se", "5e-3", "--glass-lambda-super-balance",
             "1e-2", "--latent-smooth-coef", "1e-3", "--arbitration-margin", "10",
             "--total-steps", "600", "--eval-freq", "200"]
    run_script("tdmpc_glass_jax.py", *TINY_TDMPC2, *flags, "--run-dir", str(run_dir))
    rows = read_eval(run_dir)
    assert list(rows[0]) == ["step", "wall_time", "return_pi", "return_mppi", "return_arb"]
    assert [int(r["step"]) for r in rows] == [0, 200, 400, 600]
    for r in rows:
        pi, mppi = float(r["return_pi"]), float(r["return_mppi"])
        assert float(r["return_arb"]) == (mppi if mppi > pi + 10 else pi)
    scalars = read_tb_scalars(run_dir)
    assert scalars["glass/active"] == [(0, 0.0), (200, 0.0), (400, 1.0), (600, 0.0)]
    for name in ["active_clusters", "cluster_entropy", "max_mass", "cut_mass", "se", "balance", "temporal",
                 "temp_stability", "super_se", "super_balance", "loss"]:
        steps = [s for s, _ in scalars[f"glass/{name}"]]
        assert steps == [200, 400, 600] and all(np.isfinite(v) for _, v in scalars[f"glass/{name}"]), name
    assert 1 <= dict(scalars["glass/active_clusters"])[600] <= 8
    assert all(0 <= v <= 1 for _, v in scalars["glass/cut_mass"])
    glass_loss = dict(scalars["losses/glass_loss"])
    assert glass_loss[400] > 0 and "losses/pi_smooth_loss" in scalars
    with np.load(run_dir / "glass" / "P_S_step600.npz") as f:
        assert f["P"].shape == (16, 16) and f["S"].shape == (16, 8) and f["S_super"].shape == (16, 2)
        np.testing.assert_allclose(f["P"].sum(-1), 1.0, rtol=1e-5)


# --- videos and cluster pictures ---
def test_recorded_evaluation_returns_each_frames_cluster():
    """With `record` the evaluation also returns each recorded frame's cluster (an integer per frame and mode) and
    the partition S the labels came from; without it, only the two modes' returns (the program without video)."""
    venv = G.VectorEnv(G.load_env("CartpoleBalance", "jax", episode_length=100), action_repeat=2)
    args = G.resolve_args(G.Args(env_id="CartpoleBalance", num_envs=2, k_update=2, seed_steps=80, num_samples=16,
                                 num_elites=2, num_pi_trajs=2, glass_num_clusters=5, **SMALL), venv)
    trainer = G.Trainer(args, venv)
    agent = jax.eval_shape(trainer.init, jax.random.key(0)).agent
    plain, nothing = jax.eval_shape(trainer.evaluate, agent, jax.random.key(1))
    assert nothing is None
    assert [(x.shape, x.dtype) for x in plain] == [((args.eval_episodes,), jnp.float32)] * 2  # per episode
    _, recorded = jax.eval_shape(partial(trainer.evaluate, record=True), agent, jax.random.key(1))
    poses = recorded["poses"]
    assert poses["cluster"].shape == (51, 2) and jnp.issubdtype(poses["cluster"].dtype, jnp.integer)
    assert recorded["S"].shape == (16, 5) and poses["alive"].shape == (51, 2)
    _, dumped = jax.eval_shape(partial(trainer.evaluate, dump=True), agent, jax.random.key(1))
    rollout, episodes = dumped["rollout"], 2 * args.eval_episodes  # 50 agent steps per episode
    assert rollout["c"].shape == rollout["cluster"].shape == (50, episodes) and "poses" not in dumped
    assert rollout["z"].shape == (50, episodes, 16) and jnp.issubdtype(rollout["c"].dtype, jnp.integer)


def test_capture_video_frames_carry_their_cluster_and_the_cluster_figure_is_drawn(tmp_path):
    """K = 3 clusters, Glass on from env step 200, evaluations at 0 (Glass off by the schedule: labels from the
    initial prototypes and S) and 400 (Glass on). Every frame's band is in the colour of a cluster in [0, K) (read
    back from the mp4: the colours are far apart, the codec moves them little) and the figure is a PNG. Then
    --evaluate of the step-400 checkpoint with --capture-video --dump-rollouts gives eval.csv's means (arb too), and
    its "glass" record (prototype wins, time per cluster), labels and returns are those of the dumped rollout; the
    gallery and the cluster-time PNGs have the size of 16 prototype rows and of 3 cluster panels."""
    run_dir = tmp_path / "video"
    run_script("tdmpc_glass_jax.py", *TINY_TDMPC2, "--total-steps", "400", "--glass-warmup-steps", "200",
               "--glass-num-clusters", "3", "--capture-video", "--video-height", "48", "--video-width", "64",
               "--arbitration-margin", "5", "--run-dir", str(run_dir))
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == [
        "mppi_step0.mp4", "mppi_step400.mp4", "pi_step0.mp4", "pi_step400.mp4"]
    colors = G.cluster_colors(3) * 255
    for video in (run_dir / "videos").iterdir():
        _, frames = read_video(video)
        assert frames.shape == (51, 48, 64, 3)
        band = frames[:, 2, -4].astype(float)  # a pixel of the band across the top
        distance = np.linalg.norm(band[:, None] - colors[None], axis=-1)  # (frames, K)
        assert distance.min(axis=1).max() < 30, video.name
    for step in (0, 400):
        assert_png(run_dir / "glass" / f"clusters_step{step}.png")
    assert not list((run_dir / "glass").glob("*.tmp"))

    # --evaluate of the step-400 checkpoint with the gallery and the dump: its numbers against the dumped rollout
    out = run_script("tdmpc_glass_jax.py", "--evaluate", str(run_dir), "--capture-video", "--dump-rollouts",
                     "--video-height", "48", "--video-width", "64").stdout
    folder = run_dir / "evaluations"
    record, row = json.loads((folder / "step400.json").read_text()), read_eval(run_dir)[-1]
    assert row["step"] == "400"
    assert list(record["modes"]) == ["pi", "mppi", "arb"]
    for mode in record["modes"]:  # the gallery's program gives the training loop's returns, arb chosen as there
        assert f"{record['modes'][mode]['mean']:.6g}" == row[f"return_{mode}"], mode
    with np.load(folder / "rollouts_step400.npz") as f:
        dump = dict(f)
    with np.load(run_dir / "glass" / "P_S_step400.npz") as f:
        S = f["S"]  # the checkpoint's partition: the evaluation at 400 is of the agent checkpointed at 400
    assert not [name for name in dump if name.endswith(G.GALLERY_FIELDS)]  # the npz keeps its keys
    glass, modes = record["glass"], ("pi", "mppi")
    alive = {mode: dump[f"{mode}_alive"] for mode in modes}  # (2 episodes, 50 steps)
    nearest = np.concatenate([dump[f"{mode}_c"][alive[mode]] for mode in modes])
    assert glass["prototype_wins"] == np.bincount(nearest, minlength=16).tolist()
    assert f"(pi and mppi): {' '.join(map(str, glass['prototype_wins']))}" in out
    assert glass["prototype_cluster"] == S.argmax(axis=1).tolist()
    for mode in modes:
        np.testing.assert_array_equal(dump[f"{mode}_cluster"], S.argmax(axis=1)[dump[f"{mode}_c"]])
        assert glass["running_steps"][mode] == alive[mode].sum(axis=1).tolist()
        fractions = np.array(glass["cluster_time"][mode])
        np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
        for e in range(2):
            labels = dump[f"{mode}_cluster"][e][alive[mode][e]]
            np.testing.assert_allclose(fractions[e], np.bincount(labels, minlength=3) / len(labels))
        np.testing.assert_allclose((dump[f"{mode}_reward"] * alive[mode]).sum(axis=1),
                                   record["modes"][mode]["returns"], rtol=1e-5)
    # 16 prototype rows of 4 frames; 3 cluster panels in one row
    for name, (widths, heights) in [("prototypes", ((700, 800), (2000, 2300))),
                                    ("cluster_time", ((600, 750), (250, 320)))]:
        assert_png(folder / f"{name}_step400.png")
        with Image.open(folder / f"{name}_step400.png") as image:
            (width, height), ((w0, w1), (h0, h1)) = image.size, (widths, heights)
            assert w0 <= width <= w1 and h0 <= height <= h1, (name, image.size)
    assert not list(folder.glob("*.tmp"))


def test_gallery_picks_the_closest_running_frames_of_every_prototype():
    """k = 2 frames per prototype among the running steps only (a finished step never shows, however close), best
    first, ties to the earlier step; a prototype that is nobody's nearest still gets its k."""
    cos = np.zeros((3, 2, 3))  # (steps, episode columns, prototypes)
    cos[:, :, 0] = [[0.9, 0.1], [0.8, 0.99], [0.7, 0.95]]  # the 0.95 is past the end of episode column 1
    cos[:, :, 1] = 0.05  # all tied, never anyone's nearest: the earliest running steps
    cos[:, :, 2] = [[0.2, 0.3], [0.1, 0.4], [0.0, 0.0]]
    alive = np.array([[True, True], [True, True], [True, False]])
    picks = G.gallery_picks(cos, alive, k=2)
    assert picks.shape == (3, 2, 2)
    assert picks.tolist() == [[[1, 1], [0, 0]], [[0, 0], [0, 1]], [[1, 1], [0, 1]]]
    assert G.gallery_picks(cos, alive, k=9).shape == (3, 5, 2)  # at most the 5 running steps


# --- resume ---
def test_resume_is_exact_across_the_glass_schedule(tmp_path):
    """Glass on from env step 200 to 600 (without the stop-gradient, so it shapes the agent and the returns), resumed
    at 400, in the middle of it: the every-k counter, the prototypes and the partition continue as if never stopped,
    and so do the eval returns, the glass/ diagnostics and the graphs written at the evaluation after the resume."""
    flags = [*TINY_TDMPC2, "--glass-warmup-steps", "200", "--glass-off-step", "600", "--glass-every-k-updates", "3",
             "--no-glass-stopgrad-graph"]
    assert_resume_is_exact("tdmpc_glass_jax.py", flags, tmp_path, half=400, full=800)
    scalars = read_tb_scalars(tmp_path / "halves")
    assert scalars["glass/active"] == [(0, 0.0), (400, 1.0), (800, 0.0)]
    assert dict(scalars["losses/glass_loss"])[800] > 0  # the chunk after the resume starts with Glass on
    for name in ["P", "S"]:
        with np.load(tmp_path / "halves" / "glass" / "P_S_step800.npz") as halves, \
                np.load(tmp_path / "whole" / "glass" / "P_S_step800.npz") as whole:
            np.testing.assert_array_equal(halves[name], whole[name])
    with pytest.raises(G.UserError, match="--glass-lambda-se 0.01 differs from the run's 0.005; only --total-steps"):
        G.resume_config(G.Args(resume=str(tmp_path / "halves"), glass_lambda_se=0.01))


def test_resume_refuses_a_tdmpc2_run(tdmpc2_tiny_run, tmp_path):
    with pytest.raises(G.UserError, match="a run of another script, not of tdmpc_glass_jax.py"):
        G.resume_config(G.Args(resume=str(tdmpc2_tiny_run)))
    # Refused for its script alone, even with every field a Glass run has.
    (tmp_path / "checkpoints" / "400").mkdir(parents=True)
    saved = {**dataclasses.asdict(G.Args()), "metadata": {"script": "tdmpc2_jax.py"}}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    with pytest.raises(G.UserError, match="a run of another script, not of tdmpc_glass_jax.py"):
        G.resume_config(G.Args(resume=str(tmp_path)))


# --- seeds as a batch axis ---
def test_seed_batch_on_two_devices(tmp_path):
    """--num-seeds 2 over two devices, Glass on: each seed's folder gets its own graphs, which give the glass/ scalars
    in its own TensorBoard events. (That a variant with its extras off is tdmpc2_jax.py on two devices is
    test_se_ib.py's test_seed_batch_on_two_devices_is_tdmpc2s_and_logs_module_entropy_per_seed, for the copied harness;
    Glass off on one device is test_glass_off_run_is_the_tdmpc2_run.)"""
    flags = [*TINY_TDMPC2, "--num-seeds", "2"]
    on = run_script("tdmpc_glass_jax.py", *flags, "--glass-warmup-steps", "200", "--run-dir", str(tmp_path / "on"),
                    env=TWO_DEVICES).stdout
    assert "2 seeds, 1 per device on 2 devices" in on
    cut_mass = {}
    for seed in (1, 2):
        run_dir = tmp_path / f"on__{seed}"
        assert json.loads((run_dir / "args.json").read_text())["seed"] == seed
        assert sorted(p.name for p in (run_dir / "glass").iterdir()) == ["P_S_step400.npz", "P_S_step800.npz"]
        scalars = read_tb_scalars(run_dir)
        assert dict(scalars["losses/glass_loss"])[800] > 0
        with np.load(run_dir / "glass" / "P_S_step800.npz") as f:
            cut_mass[seed] = float(G.glass_diagnostics(f["S"], f["P"])["cut_mass"])
        assert cut_mass[seed] == pytest.approx(dict(scalars["glass/cut_mass"])[800], rel=1e-5)
    assert cut_mass[1] != cut_mass[2]


@pytest.mark.slow
def test_learns_cartpole_balance(tmp_path):
    run_dir = tmp_path / "run"
    learning_run("tdmpc_glass_jax.py", run_dir, "--glass-warmup-steps", "5000")
    glass = {k: v[-1][1] for k, v in read_tb_scalars(run_dir).items() if k.startswith(("glass/", "losses/glass"))}
    print(f"glass at the end: {glass}")
    assert glass["losses/glass_loss"] > 0 and (run_dir / "glass" / "P_S_step16000.npz").exists()
