"""Fidelity check: one update and one MPPI plan of tdmpc2_jax.py against the official TD-MPC2, to float32 rounding.

    python benchmarks/check_vs_official.py --official-src /tmp/tdmpc2_official_b67b21c [--sizes 1 5]

`--official-src` is a checkout of github.com/nicklashansen/tdmpc2 (the October-2023 release, commit b67b21c); it needs
a CPU torch in the same environment (docs/fidelity.md says how). Nothing of it enters this repository: the script copies
its `tdmpc2/` folder to a temporary folder, patches the copy to run on a CPU (device strings 'cuda' -> 'cpu', Adam
`capturable=False`) and imports it from there.

For each model size the script
1. builds the official agent from the official config.yaml and ours from our Args defaults, compares every shared
   hyperparameter and stops on a mismatch;
2. copies the official initial weights into our parameter trees (Linear weights transposed, LayerNorm, the stacked
   Q ensemble, target Qs, policy) and compares encoder, dynamics, reward, Q, target-Q and policy outputs;
3. runs one update on the same batch (batch 256, horizon 3) and compares every loss, the gradient norm, the Q running
   scale, the clipped gradients, every parameter and target parameter after the step;
4. runs MPPI for one latent twice (first step with exploration noise; then a warm-started eval step) and compares the
   action and the returned mean (from the perturbed start only: at the official init all 512 values tie);
5. repeats 2-4 from a "perturbed" start: zero-initialised output layers, LayerNorm affine parameters and biases
   randomised, target Qs apart from the online Qs, running scale 2.5. At the official init every reward and Q is
   exactly 0, which would leave the head choice, the TD target's Q term, the running scale and MPPI untested.

Random draws differ between the frameworks, so the draws themselves are replaced by the same fixed arrays on both
sides (made with numpy from --draw-seed); no line of either implementation's math is touched:
- policy noise eps (`jax.random.normal` in ours, `torch.randn_like` in the official policy): one array per shape,
  i.e. one for the TD target's actions (H, B, A), one for the policy loss (H+1, B, A), one for the policy rollouts of
  MPPI (num_pi_trajs, A; the same at each of the H steps), one for the value bootstrap of MPPI (num_samples, A);
- the two random Q heads (`jax.random.choice` / `np.random.choice`): one fixed pair, used by every 'min'/'avg' call;
- MPPI sampling noise (`jax.random.normal` / `torch.randn`): one array (H, num_samples - num_pi_trajs, A), the same at
  every iteration (our iterations are one traced `lax.scan` body);
- the final elite pick (`jax.random.categorical` / `np.random.choice(p=score)`): one fixed elite index;
- the exploration noise of the first plan (`jax.random.normal` / `torch.randn`): one array (A,).
Dropout is 0 on both sides: the official ensemble draws its masks inside `torch.vmap(randomness='different')`, which
cannot be aligned with a JAX draw. docs/fidelity.md says what that leaves out and how the 2023 release differs.

Prints one line per comparison (max abs and relative difference, tolerance, ok/FAIL), a summary table, and exits 1 on
any FAIL (2 on bad input).
"""

import argparse
import atexit
import dataclasses
import importlib
import re
import shutil
import sys
import tempfile
import types
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import tdmpc2_jax as T  # noqa: E402

OBS_DIM, ACTION_DIM = 24, 6  # a walker-sized task; single-task, state observations
EPISODE_LENGTH = 500  # agent steps (1000 env steps at action repeat 2): discount 0.99 on both sides
HEAD_PAIR = {2: (1, 0), 5: (4, 1)}  # the fixed 'two random Q heads' per ensemble size (order matters for nothing)
ELITE_INDEX = 3  # the fixed final elite pick


# ---------------------------------------------------------------------------------------------------------------------
# Adapter: every access to tdmpc2_jax.py is in this section
# ---------------------------------------------------------------------------------------------------------------------
def our_args(size: int) -> T.Args:
    """Our defaults at one model size, resolved for a task like the check's (dropout 0, see the docstring)."""
    task = types.SimpleNamespace(impl="jax", episode_length=2 * EPISODE_LENGTH, action_dim=ACTION_DIM,
                                 max_agent_steps=EPISODE_LENGTH)
    return T.resolve_args(T.Args(model_size=size, dropout=0.0), task)


def our_defaults() -> T.Args:
    return T.Args()


def our_model(args: T.Args):
    return T.WorldModel(args, OBS_DIM, ACTION_DIM)


def our_optimizers(args: T.Args, wm_params):
    return T.make_optimizers(args, wm_params)


def our_agent(wm_params, target_qs, pi_params, scale: float, wm_tx, pi_tx) -> T.AgentState:
    return T.AgentState(wm_params=wm_params, target_qs=target_qs, pi_params=pi_params,
                        wm_opt_state=wm_tx.init(wm_params), pi_opt_state=pi_tx.init(pi_params),
                        scale=jnp.asarray(scale, jnp.float32))


def our_update(model, wm_tx, pi_tx):
    """Jitted (agent, batch, key) -> (new agent, info dict). Traced at its first call: make that under FixedDraws."""
    return jax.jit(partial(T.update, model, wm_tx, pi_tx))


def our_plan(model, eval_mode: bool):
    """Jitted (agent, z, prev_mean, is_first, key) -> (action, mean)."""
    return jax.jit(partial(T.plan, model, eval_mode=eval_mode))


def our_outputs(model, agent, obs, action, key) -> dict:
    wm = agent.wm_params
    z = model.encode(wm, obs)
    mu, pi, log_pi = model.pi(agent.pi_params, z, key)
    return {"encoder": z, "dynamics": model.next(wm, z, action), "reward logits": model.reward(wm, z, action),
            "Q logits (all heads)": model.q_logits(wm["qs"], z, action),
            "target Q logits (all heads)": model.q_logits(agent.target_qs, z, action),
            "policy mean action": mu, "policy action": pi, "policy log-prob": log_pi}


# ---------------------------------------------------------------------------------------------------------------------
# The official code: a patched temporary copy
# ---------------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    pass


CPU_PATCHES = [  # (pattern, replacement): the only changes made to the official copy
    (r"'cuda(:0)?'", "'cpu'"),
    (r"capturable=True", "capturable=False"),
]


def load_official(src: Path):
    """Import the official agent from a patched copy of `src/tdmpc2`; returns (tdmpc2 module, common package, yaml)."""
    package = src / "tdmpc2"
    if not (package / "tdmpc2.py").is_file() or not (package / "common").is_dir():
        raise UserError(f"{src} is not a checkout of nicklashansen/tdmpc2 (no tdmpc2/tdmpc2.py)")
    try:
        import torch
    except ImportError:
        raise UserError("torch is not installed (see docs/fidelity.md: pip install torch, CPU build)") from None
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*combine_state_for_ensemble", category=FutureWarning)
    copy = Path(tempfile.mkdtemp(prefix="tdmpc2_official_"))
    shutil.copytree(package / "common", copy / "common")
    shutil.copy(package / "tdmpc2.py", copy / "tdmpc2.py")
    for path in [copy / "tdmpc2.py", *(copy / "common").glob("*.py")]:
        text = path.read_text()
        for pattern, replacement in CPU_PATCHES:
            text = re.sub(pattern, replacement, text)
        path.write_text(text)
    for name in [n for n in sys.modules if n == "tdmpc2" or n == "common" or n.startswith("common.")]:
        del sys.modules[name]  # a second --official-src in one process
    sys.path.insert(0, str(copy))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    try:
        module = importlib.import_module("tdmpc2")
    except ImportError as e:
        raise UserError(f"the official code at {src} needs a package that is not installed: {e}") from None
    finally:
        sys.path.remove(str(copy))
    import yaml

    config = yaml.safe_load((package / "config.yaml").read_text())
    config = {k: number(v) for k, v in config.items()}  # YAML 1.1 reads 3e-4 as a string; omegaconf reads a float
    return types.SimpleNamespace(module=module, common=sys.modules["common"], math=sys.modules["common.math"],
                                 config=config, torch=torch)


def number(value):
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def official_cfg(official, size: int, dropout: float = 0.0):
    """The official config.yaml with what its parser derives for a single-task state-based run of one model size."""
    cfg = dict(official.config)
    cfg.update(official.common.MODEL_SIZE[size])
    cfg.update(model_size=size, dropout=dropout, multitask=False, task_dim=0, tasks=["check"], compile=False,
               obs_shape={"state": (OBS_DIM,)}, action_dim=ACTION_DIM, episode_length=EPISODE_LENGTH,
               bin_size=(cfg["vmax"] - cfg["vmin"]) / (cfg["num_bins"] - 1))
    return types.SimpleNamespace(**cfg)


def official_agent(official, cfg, state: dict, scale: float):
    """A fresh official agent (fresh Adam states) holding the model state `state` and the running scale `scale`."""
    agent = official.module.TDMPC2(cfg)
    agent.model.load_state_dict(state)
    agent.scale._value.fill_(scale)
    return agent


SHARED_HYPERPARAMETERS = ["enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "simnorm_dim", "num_bins",
                          "vmin", "vmax", "lr", "enc_lr_scale", "grad_clip_norm", "batch_size", "horizon", "rho",
                          "tau", "consistency_coef", "reward_coef", "value_coef", "entropy_coef", "log_std_min",
                          "log_std_max", "num_samples", "num_elites", "num_pi_trajs", "iterations", "min_std",
                          "max_std", "temperature"]


def compare_hyperparameters(args, defaults, cfg, official_yaml: dict, agent) -> list[str]:
    """Print ours vs official for every shared hyperparameter; returns the mismatches."""
    rows = [(name, getattr(args, name), getattr(cfg, name)) for name in SHARED_HYPERPARAMETERS]
    rows.append(("discount (episode of 500 agent steps)", args.discount, agent.discount))
    rows.append(("dropout (default; set to 0 on both sides)", defaults.dropout, official_yaml["dropout"]))
    print("  hyperparameter                              ours        official")
    bad = []
    for name, ours, theirs in rows:
        same = np.isclose(float(ours), float(theirs), rtol=1e-12, atol=0)
        print(f"  {name:42s}  {ours!s:10s}  {theirs!s:10s}{'' if same else '  MISMATCH'}")
        if not same:
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------------------------------
# Parameter trees: official state dict -> our flax trees
# ---------------------------------------------------------------------------------------------------------------------
def flax_mlp(named: dict, stacked: bool = False) -> dict:
    """torch `nn.Sequential` of NormedLinear/Linear ('i.weight', 'i.bias', 'i.ln.weight', 'i.ln.bias') -> flax MLP
    params ('Dense_i': kernel, bias; 'LayerNorm_i': scale, bias). Linear weights are (out, in) in torch."""
    tree: dict = {}
    for name, value in named.items():
        index, *rest = name.split(".")
        value = np.asarray(value, np.float32)
        if rest == ["weight"]:
            tree.setdefault(f"Dense_{index}", {})["kernel"] = np.swapaxes(value, -1, -2)
        elif rest == ["bias"]:
            tree.setdefault(f"Dense_{index}", {})["bias"] = value
        elif rest == ["ln", "weight"]:
            tree.setdefault(f"LayerNorm_{index}", {})["scale"] = value
        elif rest == ["ln", "bias"]:
            tree.setdefault(f"LayerNorm_{index}", {})["bias"] = value
        else:
            raise ValueError(f"unexpected official parameter {name}")
    return tree


def sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.detach().cpu().numpy() for k, v in state.items() if k.startswith(prefix)}


def ensemble_names(model, prefix: str) -> dict:
    """The ensemble's ParameterList ('params.0', ...) under the names of one member's module."""
    member = [n for n, _ in model._Qs.modules().named_parameters()]
    return {f"{prefix}params.{i}": name for i, name in enumerate(member)}


def our_trees(model, tensors: dict) -> dict:
    """`tensors`: name -> tensor in official naming (a state dict, or grads). Returns our wm, target Q and pi trees."""
    def ensemble(prefix):
        names = ensemble_names(model, prefix)
        return flax_mlp({names[k]: v.detach().cpu().numpy() for k, v in tensors.items() if k in names})

    return {
        "wm": {"encoder": flax_mlp(sub(tensors, "_encoder.state.")), "dynamics": flax_mlp(sub(tensors, "_dynamics.")),
               "reward": flax_mlp(sub(tensors, "_reward.")), "qs": ensemble("_Qs.")},
        "target_qs": ensemble("_target_Qs."),
        "pi": flax_mlp(sub(tensors, "_pi.")),
    }


def same_structure(ours, theirs, what: str):
    s1, s2 = jax.tree.structure(ours), jax.tree.structure(theirs)
    shapes1, shapes2 = [np.shape(x) for x in jax.tree.leaves(ours)], [np.shape(x) for x in jax.tree.leaves(theirs)]
    if s1 != s2 or shapes1 != shapes2:
        raise AssertionError(f"{what}: our tree {s1} {shapes1} does not match the copied official one {s2} {shapes2}")


# ---------------------------------------------------------------------------------------------------------------------
# Fixed draws on both sides
# ---------------------------------------------------------------------------------------------------------------------
class FixedDraws:
    """The arrays that replace every random draw: normal draws by shape, one head pair, one elite index."""

    def __init__(self, seed: int, head_pair, elite_index: int):
        self.rng = np.random.default_rng(seed)
        self.normals: dict = {}
        self.head_pair, self.elite_index = np.array(head_pair), elite_index
        self.used: set = set()

    def normal(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if shape not in self.normals:
            self.normals[shape] = self.rng.standard_normal(shape).astype(np.float32)
        self.used.add(shape)
        return self.normals[shape]

    @contextmanager
    def ours(self):
        """Replace jax.random.normal/choice/categorical while our functions are traced."""
        saved = jax.random.normal, jax.random.choice, jax.random.categorical
        jax.random.normal = lambda key, shape=(), dtype=jnp.float32: jnp.asarray(self.normal(shape), dtype)
        jax.random.choice = lambda key, a, shape=(), replace=True, p=None, axis=0: jnp.asarray(self.head_pair)
        jax.random.categorical = lambda key, logits, axis=-1, shape=None: jnp.asarray(self.elite_index)
        try:
            yield
        finally:
            jax.random.normal, jax.random.choice, jax.random.categorical = saved

    @contextmanager
    def official(self, torch):
        """Replace torch.randn/randn_like and np.random.choice while the official code runs."""
        saved = torch.randn, torch.randn_like, np.random.choice

        def randn(*shape, device=None, **_):
            shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            return torch.from_numpy(self.normal(shape).copy())

        def choice(a, size=None, replace=True, p=None):
            return self.elite_index if p is not None else self.head_pair.copy()

        torch.randn, torch.randn_like, np.random.choice = randn, lambda x: randn(tuple(x.shape)), choice
        try:
            yield
        finally:
            torch.randn, torch.randn_like, np.random.choice = saved


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    size: int
    start: str
    name: str
    max_abs: float
    rel: float
    tol: float
    ok: bool
    note: str = ""
    allowance_used: float = 0.0  # parameter steps: the worst element's |diff| / its allowance
    normwise: float = 0.0  # parameter steps: beyond-rounding |diff| norm / official step norm


# Tolerances (docs/fidelity.md justifies each). Forward values, losses and gradients: max |ours - official| as a
# fraction of the official tensor's largest magnitude.
TOL_FORWARD = 2e-5  # one forward pass: float32 rounding (~6e-8 per op) grows to ~1e-6 through a few 512-wide layers
TOL_LOSS = 2e-5  # losses and the running scale: batch means of forward values
TOL_PI_LOSS = 2e-4  # the policy loss reads the just-updated Q heads, whose first Adam step amplifies rounding (below)
TOL_GRAD = 1e-4  # gradients and their norm: backward passes add a second chain of rounded sums
TOL_PLAN = 1e-4  # MPPI action and mean: score-weighted means of the same elites
# Parameter steps. Adam's first step of an element is -lr * g / (|g| + eps); a gradient error d moves it by up to
# lr * eps * d / (|g| + eps)^2, which is large where |g| is near eps. Element-wise allowance: that with
# d = TOL_GRAD * max|g|, plus STEP_ROUNDING * lr and two float32 ulps of the parameter (the sum p + step is rounded).
# Elements whose gradient is rounding noise get a loose allowance, so the whole step is also compared normwise.
STEP_ROUNDING = 1e-4
TOL_STEP_NORM = 1e-2
ULP = 2.0**-23


class Checker:
    def __init__(self):
        self.results: list[Result] = []
        self.size, self.start = 0, ""

    def add(self, name, max_abs, rel, tol, ok, note="", **extra):
        r = Result(self.size, self.start, name, float(max_abs), float(rel), tol, bool(ok), note, **extra)
        self.results.append(r)
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.start:9s} {r.name:44s} max abs {r.max_abs:9.2e}  rel {r.rel:9.2e}"
              f"  tol {r.tol:7.1e}{'  ' + r.note if r.note else ''}", flush=True)

    def close(self, name, ours, theirs, tol):
        """Max |ours - official| within tol * max |official| (leaf by leaf for trees; the worst leaf is reported)."""
        worst = (0.0, 0.0, "")
        ok = True
        paths_ours = jax.tree_util.tree_leaves_with_path(ours)
        for (path, a), b in zip(paths_ours, jax.tree.leaves(theirs), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape:
                raise AssertionError(f"{name}: shapes {a.shape} vs {b.shape}")
            diff = np.max(np.abs(a - b), initial=0.0)
            rel = diff / max(np.max(np.abs(b), initial=0.0), 1e-30)
            ok &= bool(diff <= tol * max(np.max(np.abs(b), initial=0.0), 1e-6))
            if rel >= worst[1]:
                worst = (diff, rel, keystr(path))
        note = f"worst {worst[2]}" if len(paths_ours) > 1 else ""
        self.add(name, worst[0], worst[1], tol, ok, note)

    def steps(self, name, new_ours, new_theirs, old, allowance, lr: float):
        """Parameter changes of one step, in units of `lr`: element-wise within `allowance` (a tree like the params),
        and normwise within TOL_STEP_NORM of the official step's norm (beyond the allowance's rounding part)."""
        worst_el, worst_ratio, worst_norm, ok, worst_path = 0.0, 0.0, 0.0, True, ""
        leaves = jax.tree_util.tree_leaves_with_path(new_ours)
        for (path, a), b, p, allow in zip(leaves, jax.tree.leaves(new_theirs), jax.tree.leaves(old),
                                          jax.tree.leaves(allowance), strict=True):
            p = np.asarray(p, np.float64)
            diff = np.abs((np.asarray(a, np.float64) - p) - (np.asarray(b, np.float64) - p))
            ratio = np.max(diff / allow, initial=0.0)
            rounding = 2 * ULP * np.linalg.norm(np.maximum(np.abs(p), np.abs(np.asarray(b, np.float64))))
            norm = max(np.linalg.norm(diff) - rounding, 0.0) / max(np.linalg.norm(np.asarray(b, np.float64) - p),
                                                                   1e-30)
            ok &= bool(ratio <= 1) & bool(norm <= TOL_STEP_NORM)
            if max(ratio, norm / TOL_STEP_NORM) >= max(worst_ratio, worst_norm / TOL_STEP_NORM):
                worst_el, worst_ratio, worst_norm, worst_path = diff.max(initial=0.0), ratio, norm, keystr(path)
        self.add(name, worst_el, worst_el / lr, TOL_STEP_NORM, ok,
                 f"{worst_ratio:.2f} of the element allowance; normwise {worst_norm:.1e}; worst {worst_path}",
                 allowance_used=worst_ratio, normwise=worst_norm)


def keystr(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def adam_allowance(grads, params, lr: float, eps: float):
    """Element-wise allowance for one Adam step from zero moments (see the tolerances above)."""
    def one(g, p):
        g, p = np.abs(np.asarray(g, np.float64)), np.abs(np.asarray(p, np.float64))
        d = TOL_GRAD * max(g.max(initial=0.0), 1e-30)
        return lr * eps * d / (g + eps) ** 2 + STEP_ROUNDING * lr + 2 * ULP * p

    return jax.tree.map(one, grads, params)


def adam_first_moment(opt_state):
    """Adam's first moment after one step from zero is (1 - b1) * clipped gradient; multi_transform's masked parts are
    merged back into one tree."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree.map(lambda *xs: next(x for x in xs if not masked(x)), *[s.mu for s in states], is_leaf=masked)


# ---------------------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------------------
def perturb(official, agent, seed: int) -> tuple[dict, float]:
    """A state where every reward and Q is non-zero, the ensemble members differ from their targets and scale != 1."""
    torch = official.torch
    gen = torch.Generator().manual_seed(seed)
    randn = lambda t, std: std * torch.randn(t.shape, generator=gen)
    state = {k: v.clone() for k, v in agent.model.state_dict().items()}
    q_names = ensemble_names(agent.model, "")
    for key, value in state.items():
        if key.startswith("_target_Qs."):
            continue
        name = q_names.get(key.removeprefix("_Qs."), key)
        if name.endswith("ln.weight"):
            value.add_(randn(value, 0.1))
        elif name.endswith("bias"):
            value.add_(randn(value, 0.1))
        if not value.any():  # the zero-initialised output layers of reward and Q
            value.add_(randn(value, 0.05))
    for key in [k for k in state if k.startswith("_target_Qs.")]:
        state[key] = state[key.replace("_target_Qs.", "_Qs.")] + randn(state[key], 0.01)
    return state, 2.5


def make_batch(rng: np.random.Generator, cfg):
    H, B = cfg.horizon, cfg.batch_size
    obs = rng.standard_normal((H + 1, B, OBS_DIM)).astype(np.float32)
    action = rng.uniform(-1, 1, (H, B, ACTION_DIM)).astype(np.float32)
    reward = (3 * rng.standard_normal((H, B))).astype(np.float32)
    return obs, action, reward


def check_size(check: Checker, official, size: int, draw_seed: int, starts=("init", "perturbed"),
               parts=("outputs", "update", "plan")) -> None:
    """All comparisons at one model size (`starts` and `parts` select a subset, for the tests)."""
    torch = official.torch
    cfg = official_cfg(official, size)
    torch.manual_seed(draw_seed)
    init_agent = official.module.TDMPC2(cfg)
    args = our_args(size)
    check.size = size
    count = lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"\nmodel size {size}: {count(init_agent.model):,} trained official parameters, "
          f"{count(init_agent.model._Qs):,} of them in the Q ensemble", flush=True)
    bad = compare_hyperparameters(args, our_defaults(), cfg, official.config, init_agent)
    if bad:
        raise UserError(f"model size {size}: hyperparameters differ: {', '.join(bad)}")
    model = our_model(args)
    wm_tx, pi_tx = our_optimizers(args, our_trees(init_agent.model, init_agent.model.state_dict())["wm"])
    run = types.SimpleNamespace(
        official=official, cfg=cfg, model=model, wm_tx=wm_tx, pi_tx=pi_tx,
        batch=make_batch(np.random.default_rng(draw_seed), cfg),
        draws=FixedDraws(draw_seed, HEAD_PAIR[cfg.num_q], ELITE_INDEX),
        update=our_update(model, wm_tx, pi_tx), plans=[our_plan(model, False), our_plan(model, True)],
    )
    for start in starts:
        check.start = start
        if start == "init":
            state, scale = {k: v.clone() for k, v in init_agent.model.state_dict().items()}, 1.0
        else:
            state, scale = perturb(official, init_agent, draw_seed + 1)
        trees = our_trees(init_agent.model, state)
        agent = our_agent(trees["wm"], trees["target_qs"], trees["pi"], scale, wm_tx, pi_tx)
        wm_shapes, pi_shapes = jax.eval_shape(model.init, jax.random.key(0))
        same_structure(wm_shapes, agent.wm_params, "world-model params")
        same_structure(pi_shapes, agent.pi_params, "policy params")
        if "outputs" in parts:
            check_outputs(check, run, state, scale, agent)
        if "update" in parts:
            check_update(check, run, state, scale, agent)
        if "plan" in parts and start == "init":
            print("  --   init      plan: not compared: every reward and Q is 0, so all 512 values tie and the elites "
                  "are whichever the sort puts first", flush=True)
        elif "plan" in parts:
            check_plan(check, run, state, scale, agent)


def check_outputs(check, run, state, scale, agent):
    torch, obs, action = run.official.torch, run.batch[0][0], run.batch[1][0]
    off = official_agent(run.official, run.cfg, state, scale)
    with run.draws.ours():
        ours = our_outputs(run.model, agent, obs, action, jax.random.key(0))
    with torch.no_grad(), run.draws.official(torch):
        m = off.model
        z, a = m.encode(torch.from_numpy(obs), None), torch.from_numpy(action)
        mu, pi, log_pi, _ = m.pi(z, None)
        za = torch.cat([z, a], -1)
        theirs = {"encoder": z, "dynamics": m.next(z, a, None), "reward logits": m.reward(z, a, None),
                  "Q logits (all heads)": m._Qs(za), "target Q logits (all heads)": m._target_Qs(za),
                  "policy mean action": mu, "policy action": pi, "policy log-prob": log_pi[..., 0]}
    for name in ours:
        check.close(f"output: {name}", ours[name], theirs[name].numpy(), TOL_FORWARD)


def check_update(check, run, state, scale, agent):
    torch, cfg = run.official.torch, run.cfg
    obs, action, reward = run.batch
    off = official_agent(run.official, cfg, state, scale)
    buffer = types.SimpleNamespace(sample=lambda: (torch.from_numpy(obs), torch.from_numpy(action),
                                                   torch.from_numpy(reward[..., None]), None))
    with run.draws.official(torch):
        info_off = off.update(buffer)
    batch = (jnp.asarray(obs), jnp.asarray(action), jnp.asarray(reward), jnp.zeros(reward.shape))
    with run.draws.ours():
        new, info = jax.device_get(run.update(agent, batch, jax.random.key(0)))
    for name in ["consistency_loss", "reward_loss", "value_loss", "total_loss"]:
        check.close(f"update: {name}", info[name], info_off[name], TOL_LOSS)
    check.close("gradient norm (world model, before clipping)", info["grad_norm"], info_off["grad_norm"], TOL_GRAD)
    check.close("update: pi_loss", info["pi_loss"], info_off["pi_loss"], TOL_PI_LOSS)
    check.close("update: Q running scale", new.scale, off.scale._value.numpy()[0], TOL_LOSS)

    # The official clipped gradients stay in .grad after the step; ours are Adam's first moment / (1 - beta1).
    params = dict(off.model.named_parameters())
    grads_off = our_trees(off.model, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                      for n, p in params.items()})
    grads = {"wm": adam_first_moment(new.wm_opt_state), "pi": adam_first_moment(new.pi_opt_state)}
    grads = jax.tree.map(lambda m: m / (1 - 0.9), grads)
    parts = ["encoder", "dynamics", "reward", "qs"]
    for part in parts:
        check.close(f"gradient (clipped): {part}", grads["wm"][part], grads_off["wm"][part], TOL_GRAD)
    check.close("gradient (clipped): policy", grads["pi"], grads_off["pi"], TOL_GRAD)

    before, after = our_trees(off.model, state), our_trees(off.model, off.model.state_dict())
    groups = dict(zip(parts, off.optim.param_groups, strict=False))  # encoder, dynamics, reward, Qs (task embedding)
    for part in parts:
        lr, eps = groups[part]["lr"], groups[part]["eps"]
        allow = adam_allowance(grads_off["wm"][part], before["wm"][part], lr, eps)
        check.steps(f"parameter step: {part}", new.wm_params[part], after["wm"][part], before["wm"][part], allow, lr)
    lr, eps = off.pi_optim.param_groups[0]["lr"], off.pi_optim.param_groups[0]["eps"]
    allow = adam_allowance(grads_off["pi"], before["pi"], lr, eps)
    check.steps("parameter step: policy", new.pi_params, after["pi"], before["pi"], allow, lr)
    # Polyak: target <- target + tau * (online_new - target); allowance tau * the online step's, plus rounding.
    q_allow = adam_allowance(grads_off["wm"]["qs"], before["wm"]["qs"], groups["qs"]["lr"], groups["qs"]["eps"])
    target_allow = jax.tree.map(lambda q, t: cfg.tau * q + 2 * ULP * np.abs(t), q_allow, before["target_qs"])
    check.steps("parameter step: target Qs", new.target_qs, after["target_qs"], before["target_qs"], target_allow,
                groups["qs"]["lr"])


def check_plan(check, run, state, scale, agent):
    torch, cfg = run.official.torch, run.cfg
    obs = run.batch[0][0, :1]
    off = official_agent(run.official, cfg, state, scale)
    with torch.no_grad():
        z_off = off.model.encode(torch.from_numpy(obs), None)
    z = run.model.encode(agent.wm_params, jnp.asarray(obs))[0]
    prev_mean = jnp.zeros((cfg.horizon, ACTION_DIM))
    for step, (t0, eval_mode) in enumerate([(True, False), (False, True)], 1):
        with torch.no_grad(), run.draws.official(torch):
            action_off = off.plan(z_off, t0=t0, eval_mode=eval_mode).numpy()
        with run.draws.ours():
            action, prev_mean = run.plans[eval_mode](agent, z, prev_mean, jnp.asarray(t0), jax.random.key(step))
        label = "first, exploring" if t0 else "warm-started, eval"
        check.close(f"plan {step} ({label}): action", action, action_off, TOL_PLAN)
        check.close(f"plan {step} ({label}): mean", prev_mean, off._prev_mean.numpy(), TOL_PLAN)


def release_behaviours(official, size: int, draw_seed: int) -> None:
    """Measure the two behaviours of the 2023 release that differ from the paper and the current official code."""
    torch = official.torch
    print(f"\n2023-release behaviours (model size {size}, perturbed start; measured, not part of PASS/FAIL):")
    cfg = official_cfg(official, size, dropout=official.config["dropout"])
    torch.manual_seed(draw_seed)
    state, scale = perturb(official, official.module.TDMPC2(cfg), draw_seed + 1)
    obs, action, reward = make_batch(np.random.default_rng(draw_seed), cfg)
    draws = FixedDraws(draw_seed, HEAD_PAIR[cfg.num_q], ELITE_INDEX)
    agent = official_agent(official, cfg, state, scale)
    agent.model.eval()
    with torch.no_grad(), draws.official(torch):
        next_z = agent.model.encode(torch.from_numpy(obs[1:]), None)
        targets = [agent._td_target(next_z, torch.from_numpy(reward[..., None]), None) for _ in range(2)]
        z = next_z[0, :cfg.num_samples]
        actions = torch.from_numpy(np.clip(draws.normal((cfg.horizon, len(z), ACTION_DIM)), -1, 1))
        values = [agent._estimate_value(z, actions, None) for _ in range(2)]
        agent.model.track_q_grad(False)  # as in the policy update
        pi_qs = [agent.model.Q(next_z, agent.model.pi(next_z, None)[1], None, return_type="avg") for _ in range(2)]
        agent.model.track_q_grad(True)
    control = official_agent(official, official_cfg(official, size), state, scale)
    control.model.eval()
    with torch.no_grad(), draws.official(torch):
        control_targets = [control._td_target(next_z, torch.from_numpy(reward[..., None]), None) for _ in range(2)]
    ensemble_training = agent.model._Qs.modules().training
    print(f"  dropout {cfg.dropout}, model.eval() called; the ensemble's vmapped module still has training="
          f"{ensemble_training}")
    for what, pair in [("TD target", targets), ("MPPI value estimate", values),
                       ("policy-loss Q, after track_q_grad(False)", pi_qs)]:
        print(f"  {what}: two calls with the same inputs and draws differ by up to "
              f"{(pair[0] - pair[1]).abs().max().item():.3g} (|value| up to {pair[0].abs().max().item():.3g})")
    control_diff = (control_targets[0] - control_targets[1]).abs().max().item()
    print(f"  control, dropout 0: the two TD targets differ by {control_diff:.3g}")

    cfg = official_cfg(official, size)
    buffer = types.SimpleNamespace(sample=lambda: (torch.from_numpy(obs), torch.from_numpy(action),
                                                   torch.from_numpy(reward[..., None]), None))
    norms = {}
    for clear in (False, True):
        agent = official_agent(official, cfg, state, scale)
        with draws.official(torch):
            first = agent.update(buffer)
            stale = sum(p.grad.pow(2).sum().item() for p in agent.model._pi.parameters()) ** 0.5
            if clear:
                agent.model._pi.zero_grad(set_to_none=True)
            norms[clear] = (first["grad_norm"], agent.update(buffer)["grad_norm"])
    print(f"  world-model grad norm, dropout 0: first update {norms[False][0]:.6g}; second update "
          f"{norms[False][1]:.6g} as released, {norms[True][1]:.6g} with the policy grads cleared first (the previous "
          f"policy gradient, norm {stale:.6g}, is counted and clipped with the world model's: "
          f"sqrt({norms[True][1]:.6g}^2 + {stale:.6g}^2) = {np.hypot(norms[True][1], stale):.6g})")
    args = our_args(size)
    model = our_model(args)
    trees = our_trees(agent.model, state)
    wm_tx, pi_tx = our_optimizers(args, trees["wm"])
    ours = our_agent(trees["wm"], trees["target_qs"], trees["pi"], scale, wm_tx, pi_tx)
    batch = (jnp.asarray(obs), jnp.asarray(action), jnp.asarray(reward), jnp.zeros(reward.shape))
    update = our_update(model, wm_tx, pi_tx)
    with draws.ours():
        ours, info1 = update(ours, batch, jax.random.key(0))
        _, info2 = update(ours, batch, jax.random.key(1))
    print(f"  ours: first update {float(info1['grad_norm']):.6g}, second update {float(info2['grad_norm']):.6g}")


def summary(results: list[Result]) -> str:
    """Largest differences per kind of comparison and model size (over both starts), as a Markdown table."""
    starts = lambda *prefixes: lambda name: name.startswith(prefixes) and name != "update: pi_loss"
    kinds = [("forward outputs", starts("output:"), "rel", TOL_FORWARD),
             ("losses and running scale", starts("update:"), "rel", TOL_LOSS),
             ("policy loss", lambda name: name == "update: pi_loss", "rel", TOL_PI_LOSS),
             ("gradients (clipped) and the gradient norm", starts("gradient"), "rel", TOL_GRAD),
             ("parameter steps: max abs diff / lr", starts("parameter step"), "rel", "per element, below"),
             ("parameter steps: worst element / its allowance", starts("parameter step"), "allowance_used", 1),
             ("parameter steps: normwise", starts("parameter step"), "normwise", TOL_STEP_NORM),
             ("MPPI action and mean", starts("plan"), "rel", TOL_PLAN)]
    sizes = sorted({r.size for r in results})
    lines = ["| comparison (max over both starts) | " + " | ".join(f"size {s}" for s in sizes) + " | tolerance |",
             "|---|" + "---|" * len(sizes) + "---|"]
    for label, selects, field, tol in kinds:
        rows = [r for r in results if selects(r.name)]
        if not rows:
            continue
        cells = []
        for size in sizes:
            mine = [r for r in rows if r.size == size]
            worst = max((getattr(r, field) for r in mine), default=None)
            fail = "" if all(r.ok for r in mine) else " (FAIL)"
            cells.append("-" if worst is None else f"{worst:.1e}{fail}" if field != "allowance_used" else
                         f"{worst:.2f}{fail}")
        tol = f"{tol:.0e}" if isinstance(tol, float) else str(tol)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {tol} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", type=Path, required=True, help="checkout of nicklashansen/tdmpc2")
    parser.add_argument("--commit-label", default="b67b21c", help="what the checkout is, for the printout")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5], choices=[1, 5, 19, 48, 317])
    parser.add_argument("--draw-seed", type=int, default=0, help="seed of the fixed draws, batch and perturbation")
    parser.add_argument("--no-behaviours", dest="behaviours", action="store_false",
                        help="skip measuring the two 2023-release behaviours (docs/fidelity.md)")
    cli = parser.parse_args(argv)
    try:
        official = load_official(cli.official_src)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"official TD-MPC2 {cli.commit_label} from {cli.official_src} (torch {official.torch.__version__}, "
          f"2 threads) vs {T.__name__}.py (jax {jax.__version__}); float32 on CPU; "
          f"obs {OBS_DIM}, action {ACTION_DIM}, dropout 0 on both sides")
    check = Checker()
    try:
        for size in cli.sizes:
            check_size(check, official, size, cli.draw_seed)
        if cli.behaviours:
            release_behaviours(official, cli.sizes[0], cli.draw_seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in check.results if not r.ok]
    print("\n" + summary(check.results))
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(check.results) - len(failed)}/{len(check.results)} comparisons "
          f"within tolerance at model sizes {', '.join(map(str, cli.sizes))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
