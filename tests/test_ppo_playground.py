"""Tests of ppo_playground.py: the math against independent numbers, the resolved config, the CLI, learning.

The CLI runs share one set of shapes, so the suite's persistent compilation cache compiles their programs once.
"""

import ast
import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    PPO_CPU,
    REPO,
    TINY_PPO,
    TWO_DEVICES,
    read_eval,
    read_tb_scalars,
    read_video,
    run_script,
    sigterm_after_first_progress_line,
)
from scipy import stats

import ppo_playground as P


def run_ppo(*args: str, check: bool = True, own_process: bool = False):
    return run_script("ppo_playground.py", *args, check=check, own_process=own_process)


# ---------------------------------------------------------------------------------------------------------------
# Math against independent numbers
# ---------------------------------------------------------------------------------------------------------------
def gae_python(truncation, termination, rewards, values, bootstrap, lam, gamma):
    """docs/ppo.md "GAE", written as a plain loop over time for each env, in float64."""
    T, B = rewards.shape
    vs, adv = np.zeros((T, B)), np.zeros((T, B))
    for b in range(B):
        acc = 0.0
        v_next = np.append(values[1:, b], bootstrap[b])
        for t in reversed(range(T)):
            not_trunc = 1 - truncation[t, b]
            delta = (rewards[t, b] + gamma * (1 - termination[t, b]) * v_next[t] - values[t, b]) * not_trunc
            acc = delta + gamma * (1 - termination[t, b]) * (1 - truncation[t, b]) * lam * acc
            vs[t, b] = acc + values[t, b]
        vs_next = np.append(vs[1:, b], bootstrap[b])
        for t in range(T):
            adv[t, b] = (rewards[t, b] + gamma * (1 - termination[t, b]) * vs_next[t] - values[t, b]) * (
                1 - truncation[t, b])
    return vs, adv


def random_gae_inputs(seed, T=9, B=4):
    rng = np.random.default_rng(seed)
    done = rng.random((T, B)) < 0.25
    truncation = (done & (rng.random((T, B)) < 0.5)).astype(np.float32)
    termination = (done & (truncation == 0)).astype(np.float32)
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    values = rng.normal(size=(T, B)).astype(np.float32)
    bootstrap = rng.normal(size=B).astype(np.float32)
    assert termination.sum() > 0 and truncation.sum() > 0
    return truncation, termination, rewards, values, bootstrap


@pytest.mark.parametrize("lam,gamma", [(0.95, 0.995), (1.0, 0.9), (0.0, 0.99)])
def test_compute_gae_matches_python_loop(lam, gamma):
    inputs = random_gae_inputs(0)
    vs, adv = P.compute_gae(*map(jnp.asarray, inputs), lam, gamma)
    vs_ref, adv_ref = gae_python(*[x.astype(np.float64) for x in inputs], lam, gamma)
    np.testing.assert_allclose(vs, vs_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)


def test_compute_gae_no_bootstrap_across_truncation():
    # A truncated last step contributes nothing; a terminated one keeps its reward but drops the bootstrap.
    values, bootstrap, rewards = jnp.array([[1.0]]), jnp.array([100.0]), jnp.array([[2.0]])
    vs, adv = P.compute_gae(jnp.array([[1.0]]), jnp.array([[0.0]]), rewards, values, bootstrap, 0.95, 0.9)
    assert float(adv[0, 0]) == 0.0 and float(vs[0, 0]) == 1.0
    vs, adv = P.compute_gae(jnp.array([[0.0]]), jnp.array([[1.0]]), rewards, values, bootstrap, 0.95, 0.9)
    assert float(adv[0, 0]) == pytest.approx(1.0) and float(vs[0, 0]) == pytest.approx(2.0)


def test_compute_gae_matches_brax():
    from brax.training.agents.ppo.losses import compute_gae as brax_gae

    for seed in range(3):
        inputs = [jnp.asarray(x) for x in random_gae_inputs(seed, T=30, B=16)]
        ours = P.compute_gae(*inputs, 0.95, 0.995)
        theirs = brax_gae(*inputs, lambda_=0.95, discount=0.995)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tanh_normal_log_prob_change_of_variables():
    rng = np.random.default_rng(1)
    loc, scale = rng.normal(size=(50, 3)), rng.uniform(0.1, 2.0, size=(50, 3))
    raw = loc + scale * rng.normal(size=(50, 3))
    # density of y = tanh(x): p_X(x) / |dy/dx| with dy/dx = 1 - tanh(x)^2, in float64
    expected = np.sum(stats.norm.logpdf(raw, loc, scale) - np.log(1.0 - np.tanh(raw) ** 2), axis=-1)
    got = P.tanh_normal_log_prob(*(jnp.asarray(x, jnp.float32) for x in (raw, loc, scale)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_tanh_normal_entropy_estimate_mean_matches_monte_carlo():
    loc, scale = np.array([0.3, -1.0]), np.array([0.5, 1.2])
    n = 200_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    estimates = jax.vmap(lambda k: P.tanh_normal_entropy(k, jnp.asarray(loc, jnp.float32),
                                                         jnp.asarray(scale, jnp.float32)))(keys)
    # Independent Monte Carlo of -E[log p_Y(Y)], Y = tanh(X), X ~ N(loc, scale), with numpy's own samples.
    x = loc + scale * np.random.default_rng(2).normal(size=(n, 2))
    log_p_y = stats.norm.logpdf(x, loc, scale) - np.log(1.0 - np.tanh(x) ** 2)
    mc = -log_p_y.sum(-1)
    se = math.sqrt(np.var(mc) / n + float(np.var(estimates)) / n)
    assert abs(float(np.mean(estimates)) - mc.mean()) < 4 * se


def test_normalizer_matches_numpy_over_a_stream():
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, size=(n, 4)) * np.array([1, 10, 0.1, 1]) for n in (5, 17, 64, 1)]
    batches.append(rng.normal(-1.0, 0.5, size=(6, 7, 4)))  # [sequences, T, D] as in training
    state = P.init_normalizer(4)
    for b in batches:
        state = P.update_normalizer(state, jnp.asarray(b, jnp.float32))
    everything = np.concatenate([b.reshape(-1, 4) for b in batches])
    assert int(state.count) == len(everything)
    np.testing.assert_allclose(state.mean, everything.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.std, everything.std(0), rtol=1e-4)
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(P.normalize(state, jnp.asarray(x, jnp.float32)),
                               (x - everything.mean(0)) / everything.std(0), rtol=1e-3, atol=1e-4)
    # constant features: std clipped at 1e-6, not zero
    const = P.update_normalizer(P.init_normalizer(2), jnp.ones((10, 2)))
    np.testing.assert_allclose(const.std, 1e-6)


def test_ppo_loss_and_gradients_match_brax():
    """Our loss on one minibatch equals brax's compute_ppo_loss with the same weights, data and key."""
    from brax.training import types
    from brax.training.acme import running_statistics
    from brax.training.agents.ppo import losses as brax_losses
    from brax.training.agents.ppo import networks as brax_networks

    D, A, B, T = 5, 2, 6, 7
    args = P.resolve_args(P.Args(env_id="CartpoleBalance", policy_hidden_sizes=(8, 8), value_hidden_sizes=(16, 16)))
    args = dataclasses.replace(args, observation_size=D, action_size=A)
    rng = np.random.default_rng(4)  # numpy data: no eager JAX ops to compile one by one
    dummy = jnp.zeros((1, D))
    params = {"policy": jax.jit(P.policy_net(args).init)(jax.random.PRNGKey(0), dummy),
              "value": jax.jit(P.value_net(args).init)(jax.random.PRNGKey(1), dummy)}
    mean, std = rng.normal(size=D), rng.uniform(0.5, 3.0, size=D)
    norm = P.Normalizer(jnp.asarray(50), *(jnp.asarray(x, jnp.float32) for x in (mean, np.zeros(D), std)))
    done = (rng.random((B, T)) < 0.2).astype(np.float32)
    batch = dict(obs=rng.normal(size=(B, T, D)), raw_action=rng.normal(size=(B, T, A)),
                 log_prob=rng.normal(size=(B, T)) - 2, reward=rng.random((B, T)), done=done,
                 truncation=done * (rng.random((B, T)) < 0.5), bootstrap_obs=rng.normal(size=(B, D)))
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
    assert float(batch["truncation"].sum()) > 0 and float((batch["done"] - batch["truncation"]).sum()) > 0

    net = brax_networks.make_ppo_networks(D, A, preprocess_observations_fn=running_statistics.normalize,
                                          policy_hidden_layer_sizes=(8, 8), value_hidden_layer_sizes=(16, 16))
    rename = lambda p: {"params": {f"hidden_{i}": v for i, v in enumerate(p["params"].values())}}
    brax_params = brax_losses.PPONetworkParams(policy=rename(params["policy"]), value=rename(params["value"]))
    brax_norm = running_statistics.init_state(jnp.zeros(D)).replace(mean=norm.mean, std=norm.std)
    next_obs = jnp.asarray(np.concatenate([batch["obs"][:, 1:], batch["bootstrap_obs"][:, None]], 1))
    data = types.Transition(
        observation=batch["obs"], action=batch["raw_action"], reward=batch["reward"], discount=jnp.asarray(1 - done),
        next_observation=next_obs,
        extras={"state_extras": {"truncation": batch["truncation"]},
                "policy_extras": {"raw_action": batch["raw_action"], "log_prob": batch["log_prob"],
                                  "distribution_params": jnp.zeros((B, T, 2 * A))}})
    key = jax.random.PRNGKey(5)

    def brax_loss(p):
        return brax_losses.compute_ppo_loss(
            p, brax_norm, data, key, net, entropy_cost=args.entropy_cost, discounting=args.discounting,
            reward_scaling=args.reward_scaling, gae_lambda=args.gae_lambda, clipping_epsilon=args.clipping_epsilon)

    ours_fn = jax.jit(jax.value_and_grad(lambda p: P.ppo_loss(p, norm, batch, key, args), has_aux=True))
    (ours, metrics), grads = ours_fn(params)
    (theirs, brax_metrics), brax_grads = jax.jit(jax.value_and_grad(brax_loss, has_aux=True))(brax_params)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for name in ("policy_loss", "v_loss", "entropy_loss"):
        np.testing.assert_allclose(metrics[name], brax_metrics[name], rtol=1e-5, atol=1e-6)
    brax_grads = {"policy": brax_grads.policy, "value": brax_grads.value}
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(brax_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Resolved configuration and input checks (in-process, no env loaded)
# ---------------------------------------------------------------------------------------------------------------
def test_resolved_config_fixes_pendulum_and_keeps_finger_spin_discount():
    pendulum = P.resolve_args(P.Args(env_id="PendulumSwingup"))
    assert pendulum.action_repeat == 4 and pendulum.num_updates_per_batch == 4
    assert P.resolve_args(P.Args(env_id="FingerSpin")).discounting == 0.95
    cartpole = P.resolve_args(P.Args(env_id="CartpoleBalance"))
    assert (cartpole.action_repeat, cartpole.num_updates_per_batch, cartpole.discounting) == (1, 16, 0.995)
    assert (cartpole.num_envs, cartpole.batch_size, cartpole.num_minibatches, cartpole.unroll_length) == (
        2048, 1024, 32, 30)
    assert cartpole.num_eval_envs == 128 and cartpole.clipping_epsilon == 0.3 and cartpole.max_grad_norm is None


def test_iterations_and_evaluations_match_brax_at_playground_defaults():
    """Brax's ppo.train at Playground's config: (num_evals - 1) x num_resets_per_eval x ceil(T / (that x S))
    iterations of S = 1024 x 32 x 30 = 983,040 env steps, evaluated before training and after every 10 epochs."""
    cartpole = P.resolve_args(P.Args(env_id="CartpoleBalance"))  # 60M: ceil(60M / (9 x 10 x S)) = 1
    assert cartpole.steps_per_iteration == 983_040
    assert (cartpole.num_iterations, cartpole.total_steps_resolved, cartpole.iterations_per_epoch) == (
        90, 88_473_600, 1)
    assert cartpole.eval_steps == tuple(k * 10 * 983_040 for k in range(10))
    acrobot = P.resolve_args(P.Args(env_id="AcrobotSwingup"))  # 100M: ceil(100M / (9 x 10 x S)) = 2
    assert acrobot.total_steps == 100_000_000
    assert (acrobot.num_iterations, acrobot.total_steps_resolved, acrobot.iterations_per_epoch) == (
        180, 176_947_200, 2)
    assert acrobot.eval_steps == tuple(k * 20 * 983_040 for k in range(10))


# S = 4 x 2 x 5 = 40 env steps per iteration in every case below.
SMALL = dict(num_envs=4, batch_size=4, num_minibatches=2, unroll_length=5, action_repeat=1)


@pytest.mark.parametrize("num_evals,resets,total,iterations,eval_iterations", [
    (4, 2, 700, 18, (0, 6, 12, 18)),  # 3 blocks x 2 epochs x ceil(700 / (6 x 40)) = 3 iterations
    (3, 0, 500, 14, (0, 7, 14)),  # no resets: 2 blocks of one epoch x ceil(500 / (2 x 40)) = 7 iterations
    (1, 0, 300, 8, (8,)),  # num_evals 1: one block, no evaluation before training
])
def test_brax_rounding_by_hand(num_evals, resets, total, iterations, eval_iterations):
    args = P.resolve_args(P.Args(num_evals=num_evals, num_resets_per_eval=resets, total_steps=total, **SMALL))
    assert args.num_iterations == iterations and args.total_steps_resolved == 40 * iterations
    assert args.eval_steps == tuple(40 * i for i in eval_iterations)


@pytest.mark.slow
def test_eval_steps_equal_those_of_brax_ppo_train(monkeypatch):
    """Brax's own ppo.train (tiny networks, ~45 s on 2 cores) reports its evaluations at our eval_steps."""
    # brax 0.14.2 calls jax.device_put_replicated, which JAX 0.10 removed; one CPU device here
    replicate = lambda x, devices: jax.tree.map(lambda a: jnp.asarray(a)[None], x)
    monkeypatch.setattr(jax, "device_put_replicated", replicate, raising=False)
    import functools

    from brax.training.agents.ppo import networks as brax_networks
    from brax.training.agents.ppo import train as brax_ppo
    from mujoco_playground import wrapper

    args = P.resolve_args(P.Args(num_evals=4, num_resets_per_eval=2, total_steps=700, episode_length=20,
                                 num_eval_envs=2, num_updates_per_batch=1, **SMALL))
    steps = []
    brax_ppo.train(P.make_env(args), num_timesteps=700, num_evals=4, num_resets_per_eval=2, episode_length=20,
                   num_eval_envs=2, num_updates_per_batch=1, **SMALL, wrap_env_fn=wrapper.wrap_for_brax_training,
                   network_factory=functools.partial(brax_networks.make_ppo_networks, policy_hidden_layer_sizes=(4,),
                                                     value_hidden_layer_sizes=(4,)),
                   progress_fn=lambda step, metrics: steps.append(step))
    assert tuple(steps) == args.eval_steps == (0, 240, 480, 720)


def test_iteration_rounding_is_the_plain_ceil_budget(capsys):
    cartpole = P.resolve_args(P.Args(env_id="CartpoleBalance", step_rounding="iteration"))
    assert cartpole.num_iterations == 62 and cartpole.total_steps_resolved == 62 * 983_040  # 60M <= it < 60M + S
    assert cartpole.eval_steps == tuple(983_040 * math.ceil(k * 62 / 9) for k in range(10))
    assert capsys.readouterr().err == ""
    # 3 iterations cannot hold 9 evaluations after step 0: every iteration gets one, and one line says why.
    short = P.resolve_args(P.Args(step_rounding="iteration", total_steps=120, num_evals=10, **SMALL))
    assert short.eval_steps == (0, 40, 80, 120)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "room for 3 of the 9 evaluations" in err


def test_unknown_playground_keys_are_named_in_one_warning(monkeypatch, capsys):
    from mujoco_playground.config import dm_control_suite_params

    real = dm_control_suite_params.brax_ppo_config("CartpoleBalance").to_dict()
    fake = lambda env_id: types.SimpleNamespace(to_dict=lambda: real | dict(network_factory={}, clip_eps=0.2))
    monkeypatch.setattr(dm_control_suite_params, "brax_ppo_config", fake)
    args = P.resolve_args(P.Args())
    assert args.num_envs == 2048
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "clip_eps, network_factory" in err


def test_flags_override_playground_values():
    args = P.resolve_args(P.Args(env_id="FingerSpin", discounting=0.9, num_envs=16, batch_size=8, num_minibatches=4))
    assert args.discounting == 0.9 and args.num_envs == 16


@pytest.mark.parametrize("overrides,needle", [
    (dict(env_id="CartPoleBalance"), "CartpoleBalance"),
    (dict(num_envs=3000), "divisible by num_envs = 3000"),
    (dict(batch_size=0), "--batch-size must be positive"),
    (dict(unroll_length=-1), "--unroll-length must be positive"),
])
def test_bad_input_is_refused_in_one_line(overrides, needle):
    with pytest.raises(P.UserError) as exc:
        P.resolve_args(P.Args(**overrides))
    assert "\n" not in str(exc.value) and needle in str(exc.value)


def test_every_args_field_is_used():
    source = (REPO / "ppo_playground.py").read_text()
    tree = ast.parse(source)
    (args_class,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    fields = [n.target.id for n in args_class.body if isinstance(n, ast.AnnAssign)]
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    unused = [f for f in fields if f not in used and f not in P.BRAX_DEFAULTS]
    assert not unused, f"Args fields never read: {unused}"
    assert all(f in used for f in P.BRAX_DEFAULTS)


def test_args_come_in_order_with_one_line_help():
    """env_id and seed first, the run flags in one closing block; each field's help is one physical line (tyro keeps
    line breaks) of at most 120 characters."""
    source = (REPO / "ppo_playground.py").read_text()
    (args_class,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    body = args_class.body[1:]
    fields = [n.target.id for n in body if isinstance(n, ast.AnnAssign)]
    assert fields[:2] == ["env_id", "seed"]
    run = fields[fields.index("exp_name"):]
    assert {"num_seeds", "distributed", "run_dir", "resume", "dry_run", "capture_video", "track"} <= set(run)
    assert not {"total_steps", "learning_rate", "step_rounding", "impl"} & set(run)
    lines = source.splitlines()
    for field, doc in zip(body[::2], body[1::2], strict=True):
        assert isinstance(doc, ast.Expr) and doc.lineno == doc.end_lineno, field.target.id
        assert len(lines[doc.lineno - 1]) <= 120, field.target.id
    banner = ("# Run: folder, logs, checkpoints and resume, seeds, videos, tracking (none of these change the training "
              "math)")
    assert lines[body[2 * fields.index("exp_name")].lineno - 2].strip() == banner


def test_import_has_no_side_effects():
    assert not hasattr(P, "args") and not hasattr(P, "env") and not hasattr(P, "writers")


def test_import_does_not_load_playground_or_tensorboard():
    check = "import ppo_playground, sys; assert not {'mujoco_playground', 'tensorboardX'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a real run would create runs/ here
    assert P.train(P.Args(env_id="AcrobotSwingup", num_seeds=2, dry_run=True)) == []
    config = json.loads(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []
    assert (config["num_iterations"], config["total_steps_resolved"]) == (180, 176_947_200)
    assert config["eval_steps"][:2] == [0, 19_660_800] and len(config["eval_steps"]) == 10
    assert (config["observation_size"], config["action_size"]) == (6, 1)  # from the loaded env
    assert config["discounting"] == 0.995 and config["clipping_epsilon"] == 0.3 and config["impl"] == "jax"
    assert config["seed"] == 1 and config["seed_index"] == 0 and "dry_run" not in config


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def test_cli_help():
    out = run_script("ppo_playground.py", "--help").stdout
    for flag in ("--env-id", "--num-seeds", "--total-steps", "--unroll-length", "--num-updates-per-batch",
                 "--normalize-observations", "--num-eval-envs", "--save-model", "--impl"):
        assert flag in out


def test_cli_bad_input_one_line_error():
    """As a user sees it: exit code, no traceback, one line (the other refusals are checked in-process above)."""
    flags, needle = ["--env-id", "Nope"], "valid DM Control ids"
    proc = run_script("ppo_playground.py", *flags, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("ppo") / "tiny"
    run_ppo(*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--run-dir", str(base), "--save-model")
    return [Path(f"{base}__3"), Path(f"{base}__4")]


same_worker = pytest.mark.xdist_group("ppo_tiny_runs")  # under pytest-xdist: one worker runs (and compiles) tiny_runs


@same_worker
def test_cli_smoke_writes_run_folder(tiny_runs):
    for seed, run_dir in zip((3, 4), tiny_runs, strict=True):
        record = json.loads((run_dir / "args.json").read_text())
        assert record["env_id"] == "CartpoleBalance" and record["exp_name"] == "tiny" and record["seed"] == seed
        assert record["num_envs"] == 64 and record["entropy_cost"] == 0.01  # a flag and a Playground value
        assert record["total_steps_resolved"] == 2 * record["steps_per_iteration"] == 20480
        assert record["metadata"]["versions"]["jax"] == jax.__version__
        assert "git_commit" in record["metadata"] and "--run-dir" in record["metadata"]["command"]
        assert (run_dir / "eval.csv").read_text().splitlines()[0] == "step,wall_time,return,return_deterministic"
        rows = read_eval(run_dir)
        assert [int(r["step"]) for r in rows] == record["eval_steps"] == [0, 20480]
        scalars = read_tb_scalars(run_dir)
        for tag in ("charts/SPS", "eval/return", "eval/return_deterministic", "losses/policy_loss",
                    "losses/v_loss", "losses/entropy_loss"):
            assert tag in scalars, tag
        assert [s for s, _ in scalars["eval/return"]] == record["eval_steps"]
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["20480"]  # the end is an eval point


@same_worker
def test_dry_run_prints_what_args_json_holds(tiny_runs, tmp_path):
    """Same flags as the tiny run but another --run-dir: the printed object is its first args.json but for that
    and the metadata."""
    flags = [*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--save-model", "--run-dir", str(tmp_path / "dry")]
    printed = json.loads(run_script("ppo_playground.py", *flags, "--dry-run").stdout)
    assert list(tmp_path.iterdir()) == []
    written = json.loads((tiny_runs[0] / "args.json").read_text())
    del written["metadata"], written["batch_run_dirs"]
    assert printed.pop("run_dir") == str(tmp_path / "dry") and written.pop("run_dir") != str(tmp_path / "dry")
    assert printed == written


@same_worker
def test_num_seeds_gives_separate_folders_with_different_curves(tiny_runs):
    a, b = (read_eval(d) for d in tiny_runs)
    assert [r["return"] for r in a] != [r["return"] for r in b]


@same_worker
def test_equal_seeds_give_identical_returns(tiny_runs, tmp_path, monkeypatch):
    """The tiny batch again, with --track (W&B offline): the same numbers, and one W&B run per seed folder that
    holds the logged scalars."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_ppo(*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--run-dir", str(tmp_path / "again"), "--track",
            own_process=True)  # W&B's service and threads stay out of the test process
    for original, again in zip(tiny_runs, (Path(f"{tmp_path}/again__3"), Path(f"{tmp_path}/again__4")), strict=True):
        columns = [(r["return"], r["return_deterministic"]) for r in read_eval(original)]
        assert columns == [(r["return"], r["return_deterministic"]) for r in read_eval(again)]
        (wandb_file,) = (again / "wandb").glob("offline-run-*/run-*.wandb")
        assert b"eval/return" in wandb_file.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, resume and preemption
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every,save_model,due", [
    (None, False, [40, 80, 120, 160]),  # eval points (every 2nd iteration of 20 env steps) and the end
    (50, False, [60, 100, 160]),  # first iteration at or past 50, 100, 150 (the end)
    (0, False, []),
    (0, True, [160]),
])
def test_checkpoint_schedule(every, save_model, due):
    args = P.resolve_args(P.Args(num_evals=5, num_resets_per_eval=0, total_steps=160, checkpoint_every=every,
                                 save_model=save_model, num_envs=2, batch_size=2, num_minibatches=2, unroll_length=5,
                                 action_repeat=1))
    assert args.steps_per_iteration == 20 and args.eval_steps == (0, 40, 80, 120, 160)
    assert [s for s in range(20, 161, 20) if P.checkpoint_due(args, s)] == due


def resume_ppo(run_dir: Path, *args: str, check: bool = True):
    return run_ppo("--resume", str(run_dir), *args, check=check)


def eval_returns(run_dir: Path) -> list[tuple[str, str, str]]:
    """eval.csv without the wall_time column."""
    return [(r["step"], r["return"], r["return_deterministic"]) for r in read_eval(run_dir)]


@pytest.fixture(scope="module")
def extended_runs(tiny_runs, tmp_path_factory) -> tuple[list[Path], subprocess.CompletedProcess]:
    """A copy of the tiny runs (2 iterations, ended with a checkpoint) resumed from the second seed's folder with
    --total-steps doubled: (the two folders, the resume's output)."""
    base = tmp_path_factory.mktemp("extended")
    copies = [Path(shutil.copytree(d, base / d.name)) for d in tiny_runs]
    return copies, resume_ppo(copies[1], "--total-steps", "40960")


@same_worker
def test_resume_extends_exactly_like_a_longer_run(extended_runs, tmp_path):
    """T then --resume --total-steps 2T equals 2T from scratch: every seed of the batch, every eval.csv value but
    wall_time, and the resolved config. Extending adds evaluation blocks of the same length, so the 2T run is the
    one with --num-evals 3 (evaluations at 0, T, 2T) and the same hard-reset period (every iteration)."""
    resumed, proc = extended_runs
    assert "resumed from step 20480" in proc.stdout and "--num-evals 2 -> 3" in proc.stdout
    run_ppo(*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--total-steps", "40960", "--num-evals", "3",
            "--save-model", "--run-dir", str(tmp_path / "long"))
    for seed, run_dir in zip((3, 4), resumed, strict=True):
        long = tmp_path / f"long__{seed}"
        assert [r[0] for r in eval_returns(run_dir)] == ["0", "20480", "40960"]
        assert eval_returns(run_dir) == eval_returns(long)
        configs = [json.loads((d / "args.json").read_text()) for d in (run_dir, long)]
        for config in configs:
            del config["metadata"], config["run_dir"], config["batch_run_dirs"]
        assert configs[0] == configs[1]
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["20480", "40960"]
        shown, shown_long = read_tb_scalars(run_dir), read_tb_scalars(long)
        assert [s for s, _ in shown["eval/return"]] == [0, 20480, 40960]
        for tag in ("eval/return", "losses/v_loss", "losses/policy_loss"):
            assert shown[tag] == shown_long[tag], tag


@same_worker
def test_damaged_newest_checkpoint_falls_back_to_the_previous(extended_runs, tmp_path):
    copies = [Path(shutil.copytree(d, tmp_path / d.name)) for d in extended_runs[0]]
    (largest, *_) = sorted((f for f in (copies[0] / "checkpoints" / "40960").rglob("*") if f.is_file()),
                           key=lambda f: -f.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)
    proc = resume_ppo(copies[0])
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step 40960 is damaged" in warnings[0]
    assert "resumed from step 20480" in proc.stdout
    for copy, original in zip(copies, extended_runs[0], strict=True):
        assert (copy / "checkpoints_damaged" / "40960").is_dir()  # moved aside in every seed's folder, not deleted
        assert eval_returns(copy) == eval_returns(original)


@same_worker
def test_sigterm_stops_with_a_checkpoint_and_resume_finishes(tmp_path):
    """6 iterations; SIGTERM after the first progress line: the current iteration ends, a checkpoint is written,
    exit 0. The resume runs the rest, and the run ends as an uninterrupted one would (evaluations at 0 and the
    end; each seed's folder holds its checkpoints)."""
    run_dir = tmp_path / "term"
    flags = [*PPO_CPU, "--total-steps", "61440", "--num-evals", "2", "--num-resets-per-eval", "2",
             "--episode-length", "1000", "--seed", "3", "--run-dir", str(run_dir)]
    code, out = sigterm_after_first_progress_line("ppo_playground.py", *flags)
    lines = out.splitlines(keepends=True)
    assert code == 0, out
    assert ("SIGTERM received: finishing the current iteration, then checkpointing (send it again to exit at "
            "once)\n") in lines
    (stopped,) = [line for line in lines if line.startswith("stopped at step ")]
    step = int(stopped.split()[3].rstrip(";"))
    assert 0 < step < 61440 and stopped.strip().endswith(f"--resume {run_dir}__3")
    for seed in (3, 4):
        assert (Path(f"{run_dir}__{seed}") / "checkpoints" / str(step)).is_dir()

    done = resume_ppo(Path(f"{run_dir}__3"))
    assert f"resumed from step {step}" in done.stdout
    for seed in (3, 4):
        assert [r[0] for r in eval_returns(Path(f"{run_dir}__{seed}"))] == ["0", "61440"]
        assert (Path(f"{run_dir}__{seed}") / "checkpoints" / "61440").is_dir()


@same_worker
def test_resume_refusals_are_one_line_and_write_nothing(tiny_runs, tmp_path):
    run_dir, _ = (Path(shutil.copytree(d, tmp_path / d.name)) for d in tiny_runs)
    mismatched = {}  # the batch again, with a value network the checkpoints do not fit
    for name, sizes in [("shape", [64, 64, 32]), ("layers", [64, 64])]:
        copies = [Path(shutil.copytree(d, tmp_path / name / d.name)) for d in tiny_runs]
        config = json.loads((copies[0] / "args.json").read_text())
        (copies[0] / "args.json").write_text(json.dumps(config | dict(value_hidden_sizes=sizes)))
        mismatched[name] = copies[0]
    bare = tmp_path / "bare" / run_dir.name  # a run folder without checkpoints (--checkpoint-every 0)
    bare.mkdir(parents=True)
    shutil.copy(run_dir / "args.json", bare)
    other = tmp_path / "other"  # another script's run folder
    other.mkdir()
    (other / "args.json").write_text(json.dumps({"buffer_size": 10, "metadata": {"script": "tdmpc2_jax.py"}}))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    cases = [
        (dict(resume=str(run_dir), learning_rate=0.01), "--learning-rate 0.01 differs from the run's 0.001"),
        (dict(resume=str(run_dir), value_hidden_sizes=(8,)), "--value-hidden-sizes 8 differs from the run's 64 64 64"),
        (dict(resume=str(tmp_path / "nope")), "no folder"),
        (dict(resume=str(tmp_path)), "no args.json"),
        (dict(resume=str(other)), "a run folder of tdmpc2_jax.py, not of ppo_playground.py"),
        (dict(resume=str(bare)), "has no checkpoints"),
        (dict(resume=str(mismatched["shape"])), "['Dense_2']['bias'] has shape (64,), the config gives (32,)"),
        (dict(resume=str(mismatched["layers"])), "no checkpoint in"),  # orbax: another structure; nothing moved
        # a new run into the folders of one with checkpoints
        (dict(run_dir=str(tmp_path / "tiny"), seed=3, num_seeds=2, impl="jax"), "already holds a run's checkpoints"),
    ]
    for overrides, needle in cases:
        with pytest.raises(P.UserError) as exc:
            P.train(P.Args(**overrides))
        assert "\n" not in str(exc.value) and needle in str(exc.value), str(exc.value)
    # As a user sees it: exit code 2, one line, no traceback.
    proc = run_script("ppo_playground.py", "--resume", str(run_dir), "--num-envs", "32", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --resume: --num-envs 32 differs from the run's 64; only "
                                                "--total-steps, --checkpoint-every, --keep-checkpoints may change "
                                                "when resuming"]
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}



# ---------------------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------------------
def test_evaluation_records_the_first_episode_of_each_mode_to_its_final_state_only_when_asked():
    """Without `record` the evaluation's outputs are the two modes' per-episode returns alone (the program is the one
    before videos). With it, also the poses of envs 0 and num_eval_envs (the first stochastic and the first
    deterministic episode): the reset state and one per agent step, the last one where the episode ended rather than
    the reset state every finished env returns to otherwise. With `dump`, each step's observation, action, reward and
    running mask, whose masked rewards add up to the returns."""
    args, env = P.setup(P.Args(env_id="CartpoleBalance", impl="jax", num_envs=4, batch_size=4, num_minibatches=2,
                               num_eval_envs=3, episode_length=40, action_repeat=2, total_steps=1000))
    ts = P.init_ppo_state(args, jax.random.PRNGKey(0), env_state=None)  # the evaluation builds its own envs
    key = jax.random.PRNGKey(1)
    plain = jax.eval_shape(functools.partial(P.evaluate, env, args), ts.params, ts.normalizer, key)
    assert [(x.shape, x.dtype) for x in plain] == [((3,), jnp.float32), ((3,), jnp.float32)]  # num_eval_envs
    _, extras = jax.jit(functools.partial(P.evaluate, env, args, record=True))(ts.params, ts.normalizer, key)
    poses = extras["poses"]  # 40 env steps / repeat 2 = 20 agent steps; one column per mode; cartpole's 2 joints
    assert set(poses) == {*P.RENDER_FIELDS, "alive"} and poses["qpos"].shape == (21, 2, 2)
    assert poses["alive"].all()  # CartpoleBalance never terminates: the episode ends by truncation at the last step
    # The evaluation resets 2 x 3 envs with the first half of its key; env 3 is the first deterministic one.
    reset_qpos = jax.jit(lambda k: jax.vmap(env.reset)(jax.random.split(k, 6)).data.qpos)(jax.random.split(key)[0])
    np.testing.assert_array_equal(poses["qpos"][0], reset_qpos[np.array([0, 3])])
    assert not np.allclose(poses["qpos"][-1], poses["qpos"][0])
    returns, extras = jax.jit(functools.partial(P.evaluate, env, args, dump=True))(ts.params, ts.normalizer, key)
    rollout = extras["rollout"]
    assert {k: v.shape for k, v in rollout.items()} == {"obs": (20, 6, 5), "action": (20, 6, 1), "reward": (20, 6),
                                                         "alive": (20, 6)}
    reset_obs = jax.jit(lambda k: jax.vmap(env.reset)(jax.random.split(k, 6)).obs)(jax.random.split(key)[0])
    np.testing.assert_allclose(rollout["obs"][0], reset_obs, atol=1e-6)  # XLA fuses the two programs differently
    np.testing.assert_allclose((rollout["reward"] * rollout["alive"]).sum(0), np.concatenate(returns), rtol=1e-5)


@same_worker
def test_capture_video_writes_decodable_mp4s_per_seed_and_changes_no_number(tiny_runs, tmp_path):
    """The tiny batch with --capture-video --video-every 2: every seed's folder holds the video of evaluation 0 only
    (step 0; evaluation 1, the final one, is not a multiple of 2), 1001 frames (the reset state and 1000 agent steps)
    at CartpoleBalance's control rate, and eval.csv is that of the same run without video."""
    base = tmp_path / "video"
    run_ppo(*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--save-model", "--run-dir", str(base),
            "--capture-video", "--video-every", "2", "--video-height", "48", "--video-width", "64")
    for seed, without_video in zip((3, 4), tiny_runs, strict=True):
        run_dir = Path(f"{base}__{seed}")
        assert [p.name for p in (run_dir / "videos").iterdir()] == ["deterministic_step0.mp4"]
        assert eval_returns(run_dir) == eval_returns(without_video)  # recording changes no number
    meta, frames = read_video(Path(f"{base}__4") / "videos" / "deterministic_step0.mp4")
    assert meta["fps"] == 100  # CartpoleBalance: 0.01 s control step, action repeat 1
    assert frames.shape == (1001, 48, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# Seeds over devices
# ---------------------------------------------------------------------------------------------------------------
@same_worker
def test_two_devices_reproduce_the_one_device_batch_up_to_rounding(tiny_runs, tmp_path):
    """The tiny batch with one seed per device (two CPU devices) against the same batch vmapped on one device. XLA
    compiles the two programs differently (a seed alone on its device runs the unbatched program), so they agree to
    float32 rounding, not bit for bit: the step-0 evaluation of the same initial networks (deterministic column
    equal, sampled one within 1e-4; measured 8e-5) and the first iteration's losses (within 1e-3; measured 7e-5).
    Later evaluations are not compared: PPO's rollouts amplify the rounding (measured 1% apart after 2 iterations;
    docs/ppo.md, "Seeds over devices and hosts"). A --resume of the sharded batch continues both seeds exactly as
    the uninterrupted sharded batch, and a seed count that the devices do not divide is refused in one line."""
    base = tmp_path / "two"
    flags = [*TINY_PPO, "--seed", "3", "--exp-name", "tiny", "--save-model"]
    out = run_script("ppo_playground.py", *flags, "--run-dir", str(base), env=TWO_DEVICES).stdout
    assert "2 seeds, 1 per device on 2 devices" in out
    two = [Path(f"{base}__{seed}") for seed in (3, 4)]
    for one_dir, two_dir in zip(tiny_runs, two, strict=True):
        one_rows, two_rows = read_eval(one_dir), read_eval(two_dir)
        assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == ["0", "20480"]
        assert two_rows[0]["return_deterministic"] == one_rows[0]["return_deterministic"]
        np.testing.assert_allclose(float(two_rows[0]["return"]), float(one_rows[0]["return"]), rtol=1e-4)
        one_tb, two_tb = read_tb_scalars(one_dir), read_tb_scalars(two_dir)
        for name in P.LOSS_NAMES:
            (step, x), (two_step, y) = one_tb[f"losses/{name}"][0], two_tb[f"losses/{name}"][0]
            assert step == two_step == 10240
            np.testing.assert_allclose(y, x, rtol=1e-3, err_msg=name)

    resumed = run_script("ppo_playground.py", "--resume", str(two[1]), "--total-steps", "40960",
                         env=TWO_DEVICES).stdout
    assert "resumed from step 20480" in resumed and "2 seeds, 1 per device on 2 devices" in resumed
    run_script("ppo_playground.py", *flags, "--total-steps", "40960", "--num-evals", "3", "--run-dir",
               str(tmp_path / "long"), env=TWO_DEVICES)
    for seed, run_dir in zip((3, 4), two, strict=True):
        assert [r[0] for r in eval_returns(run_dir)] == ["0", "20480", "40960"]
        assert eval_returns(run_dir) == eval_returns(tmp_path / f"long__{seed}")

    proc = run_script("ppo_playground.py", *TINY_PPO, "--num-seeds", "3", check=False, env=TWO_DEVICES)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --num-seeds 3 is not a multiple of the 2 devices; the nearest that is: 4")


def test_distributed_without_a_coordinator_is_one_line():
    proc = run_script("ppo_playground.py", "--distributed", "--impl", "jax", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --distributed: could not reach a coordinator") and "JAX_COORDINATOR_ADDRESS" in line


@pytest.mark.slow
def test_learns_cartpole_balance(tmp_path):
    """CPU-sized PPO on CartpoleBalance for 204,800 env steps (Playground's settings with smaller batches and a
    shorter discount horizon, 0.97: at 0.995 a CPU budget this small learns on some seeds only). Four evaluation
    blocks of 5 epochs of one iteration: 20 iterations of 10,240 env steps, hard resets after each.

    The baseline is measured in the same run: the step-0 evaluation of the randomly initialised stochastic policy
    (random actions, about 250 here; a balanced pole scores about 1000). The mean final return over the two vmapped
    seeds must clearly beat it (measured: 254 -> 408 on a 2-core AMD EPYC; docs/ppo.md, "Learning")."""
    run_ppo(*PPO_CPU, "--total-steps", "204800", "--num-evals", "5", "--num-resets-per-eval", "5",
            "--seed", "1", "--run-dir", str(tmp_path / "learn"))
    rows = [read_eval(tmp_path / f"learn__{seed}") for seed in (1, 2)]
    random_return = np.mean([float(r[0]["return"]) for r in rows])
    final = np.mean([float(r[-1]["return"]) for r in rows])
    assert final > random_return + 100, (random_return, final, rows)
