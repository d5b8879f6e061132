"""The fidelity check (benchmarks/check_vs_official.py) must fail on bugs: four planted in copies of our update, each
failing exactly the comparisons it should. Needs torch and the official TD-MPC2 source (commit b67b21c) at
$TDMPC2_OFFICIAL_SRC; skipped otherwise (as in CI)."""

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import tdmpc2_jax as T

pytest.importorskip("torch")
OFFICIAL_SRC = os.environ.get("TDMPC2_OFFICIAL_SRC")
if not OFFICIAL_SRC or not (Path(OFFICIAL_SRC) / "tdmpc2" / "tdmpc2.py").is_file():
    pytest.skip("TDMPC2_OFFICIAL_SRC does not point at a checkout of the official TD-MPC2", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,  # five runs of the check: ~30 s on a quiet 2-core machine, ~100 s on a busy one
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),  # torch on the 2023 code
]

spec = importlib.util.spec_from_file_location("check_vs_official",
                                              Path(__file__).resolve().parents[1] / "benchmarks/check_vs_official.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.fixture(scope="module")
def official():
    return check.load_official(Path(OFFICIAL_SRC))


def failures(official, parts=("update",)) -> set:
    """(start, comparison) of every FAIL of the check at model size 1."""
    checker = check.Checker()
    check.check_size(checker, official, 1, draw_seed=0, parts=parts)
    return {(r.start, r.name) for r in checker.results if not r.ok}


BOTH = ("init", "perturbed")


def test_unmodified_update_passes(official):
    assert failures(official, parts=("outputs", "update")) == set()


def test_wrong_polyak_tau_fails_the_target_step(official, monkeypatch):
    our_update = check.our_update

    def update_with_tau_doubled(model, wm_tx, pi_tx):
        update = our_update(model, wm_tx, pi_tx)

        def planted(agent, batch, key):
            new, info = update(agent, batch, key)
            targets = optax.incremental_update(new.wm_params["qs"], agent.target_qs, 2 * model.args.tau)
            return new.replace(target_qs=targets), info

        return planted

    monkeypatch.setattr(check, "our_update", update_with_tau_doubled)
    assert failures(official) == {(start, "parameter step: target Qs") for start in BOTH}


def test_missing_encoder_lr_scale_fails_the_encoder_step(official, monkeypatch):
    optimizers = check.our_optimizers
    monkeypatch.setattr(check, "our_optimizers",
                        lambda args, wm: optimizers(dataclasses.replace(args, enc_lr_scale=1.0), wm))
    assert failures(official) == {(start, "parameter step: encoder") for start in BOTH}


def test_log_prob_without_action_dim_factor_fails_the_policy(official, monkeypatch):
    def log_prob_without_factor(eps, log_std, action):
        gaussian = jnp.sum(-0.5 * eps**2 - log_std, axis=-1) - 0.5 * jnp.log(2 * jnp.pi)
        return gaussian - jnp.sum(jnp.log(jax.nn.relu(1 - action**2) + 1e-6), axis=-1)

    monkeypatch.setattr(T, "squashed_gaussian_log_prob", log_prob_without_factor)
    failed = failures(official, parts=("outputs", "update"))
    must = {(start, name) for start in BOTH for name in
            ["output: policy log-prob", "update: pi_loss", "gradient (clipped): policy"]}
    assert must <= failed <= must | {(start, "parameter step: policy") for start in BOTH}


def test_dividing_by_the_scale_before_its_update_fails_at_the_perturbed_start(official, monkeypatch):
    def policy_loss_old_scale(model, pi_params, wm_params, zs, scale, key):
        """T.policy_loss with Q divided by the running scale before the scale's update."""
        args = model.args
        k_pi, k_heads, k_dropout = jax.random.split(key, 3)
        _, action, log_prob = model.pi(pi_params, zs, k_pi)
        q1, q2 = model.q_two_random(wm_params["qs"], zs, action, k_heads, k_dropout)
        q = 0.5 * (q1 + q2)
        scaled_q = q / scale
        scale = T.running_scale_update(scale, jax.lax.stop_gradient(q[0]), args.tau)
        rho = args.rho ** jnp.arange(zs.shape[0])
        loss = jnp.mean(rho * jnp.mean(args.entropy_coef * log_prob - scaled_q, axis=1))
        return loss, (scale, {"pi_loss": loss, "pi_log_prob": log_prob.mean(), "pi_scale": scale})

    monkeypatch.setattr(T, "policy_loss", policy_loss_old_scale)
    failed = failures(official)
    # At the official init every Q is 0 and the scale stays 1: the bug shows only from the perturbed start.
    must = {("perturbed", "update: pi_loss"), ("perturbed", "gradient (clipped): policy")}
    assert must <= failed <= must | {("perturbed", "parameter step: policy")}
