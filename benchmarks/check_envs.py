"""What the official TD-MPC2 curves can be compared with: Playground's DM Control ports, under both MJX backends,
measured against the original dm_control suite.

    python benchmarks/check_envs.py --backends jax warp dm_control --dm-control-python /tmp/dmc_venv/bin/python \
        --out results/envs

For each task of data/official_tdmpc2/ (Playground names; QuadrupedWalk has no Playground port and gets a row that
says so) and each backend (Playground `jax`, Playground `warp`, `dm_control`) it measures
1. the episode length in env steps, the control timestep and the physics settings behind it (simulator timestep,
   substeps, integrator, solver and line-search iterations, friction cone, eulerdamp, Playground's contact caps);
2. the observation and reward functions on identical states: states visited by Playground (jax) are copied into each
   backend (qpos, qvel, the action as ctrl, Reacher's target), each backend's own functions are evaluated there, and
   the observations are matched entry by entry up to a reordering; entries without a partner are named. Playground's
   step is evaluated with its integration replaced by one forward pass, so its own reward and observation code runs;
3. divergence: from the same states (Playground jax resets) under the same uniform-random actions, the first env step
   at which qpos differs by more than 1e-3 and 1e-1 from dm_control (and, for warp, from jax); the median over the
   episodes, "never" when it stays within the threshold over the whole horizon;
4. fixed-policy returns over full episodes from each env's own reset: zero actions and uniform-random actions.
And from the resets: whether the first observation after a reset equals the observation of the reset state itself,
which joints' reset ranges differ from dm_control's, and the fraction of resets in contact (dm_control's Finger
redraws any reset in contact).

dm_control 1.0.50 does not run with this project's mujoco 4.0.0, so it runs in its own virtual environment
(`--dm-control-python`, docs/envs.md gives the two commands) as `python check_envs.py dmc-worker REQUEST RESPONSE`:
this same file, importing only numpy and dm_control there; the two sides exchange arrays through .npz files.

Writes DIR/envs.csv (one row per task and backend) and DIR/envs.md (the table), and prints the table. Exit code 0, or
2 on bad input (`error: ...`).
"""

import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Playground id -> (official CSV stem, dm_control domain, dm_control task). Playground's own ids for its DM Control
# ports; QuadrupedWalk is the official curve without a port.
TASKS = {
    "AcrobotSwingup": ("acrobot-swingup", "acrobot", "swingup"),
    "CartpoleBalance": ("cartpole-balance", "cartpole", "balance"),
    "CartpoleSwingup": ("cartpole-swingup", "cartpole", "swingup"),
    "CheetahRun": ("cheetah-run", "cheetah", "run"),
    "FingerSpin": ("finger-spin", "finger", "spin"),
    "HopperHop": ("hopper-hop", "hopper", "hop"),
    "PendulumSwingup": ("pendulum-swingup", "pendulum", "swingup"),
    "QuadrupedWalk": ("quadruped-walk", "quadruped", "walk"),
    "ReacherEasy": ("reacher-easy", "reacher", "easy"),
    "WalkerRun": ("walker-run", "walker", "run"),
    "WalkerWalk": ("walker-walk", "walker", "walk"),
}
NO_PORT = {"QuadrupedWalk"}
# Reacher's target is part of the state: a mocap body in Playground, a geom moved in the model in dm_control.
TARGET = {"ReacherEasy": "target"}
BACKENDS = ("jax", "warp", "dm_control")
THRESHOLDS = {"1e-3": 1e-3, "1e-1": 1e-1}  # column suffix: qpos threshold
# The steps of the random episodes whose states are the probe states of part 2 (0 = the reset state).
PROBE_STEPS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 999)

COLUMNS = [
    "task", "official_csv", "backend", "note",
    "episode_env_steps", "control_dt", "sim_dt", "n_substeps", "integrator", "solver_iterations", "ls_iterations",
    "cone", "eulerdamp", "contact_caps",
    "episodes", "episode_steps", "zero_return_mean", "zero_return_std", "random_return_mean", "random_return_std",
    "reference", "probe_states", "obs_dim", "obs_order", "obs_entries_differ", "obs_max_abs_diff",
    "reward_max_abs_diff", "reset_obs_max_abs_diff", "reset_ranges_differ", "reset_contact_frac",
    "diverge_horizon", "diverge_1e-3", "diverge_1e-1", "diverge_jax_1e-3", "diverge_jax_1e-1",
]


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# Shared by both sides (numpy only).


def save_npz(path: Path, arrays: dict):
    """Write an .npz atomically: a temp file in the same folder, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def mean_std(x) -> tuple:
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std())


def physics_facts(model, mujoco) -> dict:
    """The simulator settings of a MuJoCo model, by name (the enum values differ between mujoco releases)."""
    opt = model.opt
    bits = mujoco.mjtDisableBit.__members__.items()
    disabled = {name for name, bit in bits if name != "mjNDISABLE" and opt.disableflags & int(bit)}
    caps = {}
    for i in range(model.nnumeric):
        name = model.numeric(i).name
        if name in ("max_contact_points", "max_geom_pairs"):
            caps[name] = int(model.numeric_data[model.numeric_adr[i]])
    return {
        "sim_dt": float(opt.timestep),
        "integrator": mujoco.mjtIntegrator(opt.integrator).name.removeprefix("mjINT_"),
        "solver_iterations": int(opt.iterations),
        "ls_iterations": int(opt.ls_iterations),
        "cone": mujoco.mjtCone(opt.cone).name.removeprefix("mjCONE_"),
        "eulerdamp": "off" if "mjDSBL_EULERDAMP" in disabled else "on",
        "contact_caps": " ".join(f"{k}={v}" for k, v in caps.items()) or "none",
        "qpos_names": qpos_names(model),
    }


def qpos_names(model) -> list:
    names = [""] * model.nq
    for j in range(model.njnt):
        width = {0: 7, 1: 4}.get(int(model.jnt_type[j]), 1)  # free, ball, slide/hinge
        for k in range(width):
            names[model.jnt_qposadr[j] + k] = model.joint(j).name + (f"[{k}]" if width > 1 else "")
    return names


# ---------------------------------------------------------------------------------------------------------------
# The dm_control side: run by the dm_control interpreter as `check_envs.py dmc-worker REQUEST RESPONSE`.


def dmc_worker(request_path: str, response_path: str):
    req = np.load(request_path)
    meta = json.loads(str(req["meta"]))
    arrays, info = {}, {}
    for task in meta["tasks"]:
        prefix = f"{task}/"
        given = {k[len(prefix):]: req[k] for k in req.files if k.startswith(prefix)}
        info[task], out = dmc_task(task, given, meta)
        arrays.update({prefix + k: v for k, v in out.items()})
    arrays["info"] = np.asarray(json.dumps(info))
    save_npz(Path(response_path), arrays)


def dmc_task(task: str, given: dict, meta: dict) -> tuple:
    """(facts, arrays) of one task on dm_control, replaying the states and actions `given` by the Playground side."""
    import mujoco
    from dm_control import suite

    _, domain, name = TASKS[task]
    env = suite.load(domain, name, task_kwargs={"random": meta["seed"]})
    physics = env.physics
    spec = env.action_spec()
    facts = physics_facts(physics.model.ptr, mujoco)
    facts.update(control_dt=float(env.control_timestep()), n_substeps=int(env._n_sub_steps),
                 episode_env_steps=int(round(env._step_limit)))
    out = {}

    def set_state(qpos, qvel, ctrl=None, target=None):
        env.reset()  # a fresh episode (step counter, task state), then the given state
        with physics.reset_context():  # on exit: mj_forward, as after dm_control's own resets
            physics.data.qpos[:] = qpos
            physics.data.qvel[:] = qvel
            if ctrl is not None:
                physics.data.ctrl[:] = ctrl
            if target is not None:
                physics.named.model.geom_pos[TARGET[task], ["x", "y"]] = target

    # Part 2: observation and reward at the given states; the observation flattened with a name per entry.
    if "probe_qpos" in given:
        obs, rewards, targets = [], [], given.get("probe_target")
        for i in range(len(given["probe_qpos"])):
            set_state(given["probe_qpos"][i], given["probe_qvel"][i], given["probe_ctrl"][i],
                      None if targets is None else targets[i])
            names, values = [], []
            for key, value in env.task.get_observation(physics).items():
                value = np.asarray(value, np.float64)
                names += [key] if value.ndim == 0 else [f"{key}[{j}]" for j in range(value.size)]
                values.append(value.ravel())
            obs.append(np.concatenate(values))
            rewards.append(env.task.get_reward(physics))
        out["probe_obs"], out["probe_reward"] = np.stack(obs), np.asarray(rewards, np.float64)
        facts["obs_names"] = names
    # Part 3: qpos after each step from the given starts under the given actions.
    if "start_qpos" in given:
        trajs, targets = [], given.get("start_target")
        for i, actions in enumerate(given["start_actions"]):
            set_state(given["start_qpos"][i], given["start_qvel"][i], None, None if targets is None else targets[i])
            traj = []
            for action in actions:
                env.step(action)
                traj.append(physics.data.qpos.copy())
            trajs.append(traj)
        out["start_qpos_traj"] = np.asarray(trajs)
    # Part 4: returns from dm_control's own resets.
    rng = np.random.default_rng(meta["seed"])
    for policy in ("zero", "random"):
        returns = []
        for _ in range(meta["episodes"]):
            env.reset()
            total = 0.0
            for _ in range(meta["episode_steps"]):
                action = rng.uniform(spec.minimum, spec.maximum) if policy == "random" else np.zeros(spec.shape)
                total += env.step(action).reward
            returns.append(total)
        out[f"{policy}_returns"] = np.asarray(returns)
    # Resets: dm_control's own, and which of Playground's resets dm_control finds in contact.
    resets, contacts = [], []
    for _ in range(meta["resets"]):
        env.reset()
        resets.append(physics.data.qpos.copy())
        contacts.append(physics.data.ncon > 0)
    out["reset_qpos"] = np.asarray(resets)
    facts["reset_contact_frac"] = float(np.mean(contacts))
    if "pg_reset_qpos" in given:
        in_contact = []
        for qpos, qvel in zip(given["pg_reset_qpos"], given["pg_reset_qvel"], strict=True):
            set_state(qpos, qvel)
            in_contact.append(physics.data.ncon > 0)
        facts["pg_reset_contact_frac"] = float(np.mean(in_contact))
    return facts, out


def run_dmc(python: str, request: dict, meta: dict) -> tuple:
    """Send the request to the dm_control interpreter; (info per task, arrays)."""
    with tempfile.TemporaryDirectory(prefix="check_envs_") as tmp:
        req, resp = Path(tmp) / "request.npz", Path(tmp) / "response.npz"
        save_npz(req, {**request, "meta": np.asarray(json.dumps(meta))})
        proc = subprocess.run([python, str(Path(__file__).resolve()), "dmc-worker", str(req), str(resp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
            raise InputError(f"the dm_control interpreter {python} failed: {lines[-1]}")
        with np.load(resp) as data:
            arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("info"))), arrays


# ---------------------------------------------------------------------------------------------------------------
# The Playground side.


@contextlib.contextmanager
def step_is_forward():
    """Playground's envs step through `mjx_env.step`; replaced by one forward pass with ctrl = action, the env's own
    step code computes its reward and observation at the state it is given."""
    from mujoco import mjx
    from mujoco_playground._src import mjx_env

    original = mjx_env.step
    mjx_env.step = lambda model, data, action, n_substeps=1: mjx.forward(model, data.replace(ctrl=action))
    try:
        yield
    finally:
        mjx_env.step = original


class Playground:
    """One Playground env on one backend, batched over episodes with vmap (as the training scripts do)."""

    def __init__(self, task: str, impl: str):
        import jax
        from mujoco import mjx
        from mujoco_playground import registry

        self.jax, self.impl = jax, impl
        with contextlib.redirect_stdout(io.StringIO()):  # warp announces itself on stdout
            self.env = registry.load(task, config_overrides={"impl": impl})
        self.mj_model = self.env.mj_model
        # Jitted once per env: a new vmap wrapper per call would be traced and compiled again.
        self._reset = jax.jit(jax.vmap(self.env.reset))
        self._forward = jax.jit(jax.vmap(lambda d: mjx.forward(self.env.mjx_model, d)))
        self._evaluate = jax.jit(jax.vmap(self.env.step))  # only ever called inside step_is_forward()
        self._rollout = jax.jit(self._run)
        self.target_mocap = (self.mj_model.body(TARGET[task]).mocapid[0] if task in TARGET else None)

    def facts(self) -> dict:
        import mujoco

        facts = physics_facts(self.mj_model, mujoco)
        facts.update(control_dt=float(self.env.dt), n_substeps=int(self.env.n_substeps),
                     episode_env_steps=int(self.env._config.episode_length))
        return facts

    def reset(self, keys):
        return self._reset(keys)

    def with_states(self, states, qpos, qvel, mocap_pos):
        """The env states `states` moved to the given qpos / qvel / mocap positions (one per env), then a forward pass.
        Only per-env fields are replaced: warp's contact buffers have no env axis."""
        data = states.data.replace(qpos=qpos, qvel=qvel, mocap_pos=mocap_pos)
        return states.replace(data=self._forward(data))

    def evaluate(self, states, ctrl):
        """Reward and observation of the env's own step at the given states, without integrating."""
        with step_is_forward():
            out = self._evaluate(states, ctrl)
        return np.asarray(out.obs, np.float64), np.asarray(out.reward, np.float64)

    def rollout(self, states, actions):
        """Step each env of `states` through its actions (envs, steps, action dim): rewards (envs, steps), and qpos,
        qvel after each step (envs, steps, n)."""
        return [np.asarray(x, np.float64) for x in self._rollout(states, actions)]

    def _run(self, states, actions):
        jax = self.jax

        def body(s, a):
            s = jax.vmap(self.env.step)(s, a)
            return s, (s.reward, s.data.qpos, s.data.qvel)

        _, out = jax.lax.scan(body, states, jax.numpy.swapaxes(actions, 0, 1))
        return [jax.numpy.swapaxes(x, 0, 1) for x in out]


def first_divergence(a: np.ndarray, b: np.ndarray, threshold: float):
    """Median over episodes of the first step (1-based) at which max |qpos_a - qpos_b| > threshold; "never" when the
    median episode stays within it over the horizon. a, b: (episodes, steps, nq)."""
    over = np.abs(a - b).max(axis=-1) > threshold
    first = np.where(over.any(axis=1), over.argmax(axis=1) + 1.0, np.inf)
    median = np.percentile(first, 50, method="lower")
    return "never" if np.isinf(median) else int(median)


def match_obs(ours: np.ndarray, ref: np.ndarray, ref_names: list) -> dict:
    """Match each reference observation entry with an entry of ours that has the same value at every probe state
    (tolerance 1e-3 relative to the entry's scale; one partner each, the same index preferred)."""
    scale = np.maximum(1.0, np.abs(ref).max(axis=0))
    close = np.abs(ours[:, :, None] - ref[:, None, :]).max(axis=0) <= 1e-3 * scale  # (ours, ref)
    partner, used = {}, set()
    for j in range(ref.shape[1]):
        candidates = [i for i in np.flatnonzero(close[:, j]) if i not in used]
        if candidates:
            i = j if j in candidates else candidates[0]
            partner[j] = i
            used.add(i)
    unmatched = [ref_names[j] for j in range(ref.shape[1]) if j not in partner]
    extra = [f"ours[{i}]" for i in range(ours.shape[1]) if i not in used]
    if not unmatched and not extra:
        order = "same" if all(partner[j] == j for j in partner) else "reordered: " + " ".join(
            f"{ref_names[j]}->{partner[j]}" for j in partner if partner[j] != j)
    else:
        order = "partial" if partner else "none"
    diffs = [float(np.abs(ours[:, partner[j]] - ref[:, j]).max()) for j in partner]
    diffs += [float(np.abs(ours[:, j] - ref[:, j]).max()) for j in range(min(ours.shape[1], ref.shape[1]))
              if j not in partner]
    return {"obs_order": order, "obs_entries_differ": " ".join(unmatched + extra) or "none",
            "obs_max_abs_diff": max(diffs) if diffs else ""}


def ranges_differ(ours: np.ndarray, ref: np.ndarray, names: list) -> str:
    """Joints whose reset distribution differs from the reference's: two-sample Kolmogorov-Smirnov distance above its
    0.1% critical value (1.95 sqrt((n + m) / (n m))), each named with both 1%..99% ranges."""
    n, m = len(ours), len(ref)
    critical = 1.95 * np.sqrt((n + m) / (n * m))
    out = []
    for k, name in enumerate(names):
        a, b = np.sort(ours[:, k]), np.sort(ref[:, k])
        grid = np.concatenate([a, b])
        distance = np.abs(np.searchsorted(a, grid, "right") / n - np.searchsorted(b, grid, "right") / m).max()
        if distance > critical:
            (lo_a, hi_a), (lo_b, hi_b) = np.percentile(a, [1, 99]), np.percentile(b, [1, 99])
            out.append(f"{name} [{lo_a:.2f},{hi_a:.2f}] vs [{lo_b:.2f},{hi_b:.2f}]")
    return "; ".join(out) or "none"


FACT_KEYS = ("episode_env_steps", "control_dt", "sim_dt", "n_substeps", "integrator", "solver_iterations",
             "ls_iterations", "cone", "eulerdamp", "contact_caps")


def measure_playground(task: str, backends: list, args) -> dict:
    """Parts 1-4 on each Playground backend (jax always: its resets and episodes give the shared states).

    One batch per backend: E zero-action and E random-action episodes from the env's own resets (keys shared by all
    backends), and E copies of jax's random-episode starts under the same actions (the divergence runs; for jax they
    are its random episodes again). Cheetah's reset settles for 200 steps, so its warp resets differ from jax's.
    """
    import jax

    E, T = args.episodes, args.episode_steps
    keys = jax.random.split(jax.random.PRNGKey(args.seed), 2 * E)
    keys = jax.numpy.concatenate([keys, keys[E:]])
    reset_keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), args.resets)
    results, starts = {}, None
    for backend in ["jax"] + [b for b in backends if b != "jax"]:
        t0 = time.time()
        env = Playground(task, backend)
        mj = env.mj_model
        if starts is None:  # the actions and the jax starts that every backend shares
            rng = np.random.default_rng(args.seed)
            random = rng.uniform(mj.actuator_ctrlrange[:, 0], mj.actuator_ctrlrange[:, 1], (E, T, mj.nu))
            actions = np.concatenate([np.zeros((E, T, mj.nu)), random, random]).astype(np.float32)
        states = env.reset(keys)
        own = [np.asarray(x) for x in (states.data.qpos, states.data.qvel, states.data.mocap_pos)]
        if starts is None:
            starts = [x[E:2 * E] for x in own]
        states = env.with_states(states, *[np.concatenate([x[:2 * E], s]) for x, s in zip(own, starts, strict=True)])
        rewards, qpos, qvel = env.rollout(states, actions)
        resets = env.reset(reset_keys)
        reset_obs, _ = env.evaluate(resets, np.zeros((args.resets, mj.nu), np.float32))
        results[backend] = {
            "env": env, "facts": env.facts(), "rewards": rewards[:2 * E], "qpos": qpos[E:2 * E],
            "qvel": qvel[E:2 * E], "copy_qpos": qpos[2 * E:, :args.horizon],
            "reset_qpos": np.asarray(resets.data.qpos), "reset_qvel": np.asarray(resets.data.qvel),
            "reset_obs_diff": float(np.abs(reset_obs - np.asarray(resets.obs, np.float64)).max()),
        }
        print(f"  {task} {backend}: episodes in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    # Probe states: jax's random episodes at PROBE_STEPS, with the action that led there as ctrl (none at a reset).
    ref, nu = results["jax"], results["jax"]["env"].mj_model.nu
    probe = {"qpos": [], "qvel": [], "ctrl": [], "mocap": []}
    for e in range(E):
        for t in (t for t in PROBE_STEPS if t < T):
            probe["qpos"].append(starts[0][e] if t == 0 else ref["qpos"][e, t - 1])
            probe["qvel"].append(starts[1][e] if t == 0 else ref["qvel"][e, t - 1])
            probe["ctrl"].append(np.zeros(nu) if t == 0 else actions[E + e, t - 1])
            probe["mocap"].append(starts[2][e])
    probe = {k: np.asarray(v, np.float32) for k, v in probe.items()}
    n = len(probe["qpos"])
    for res in results.values():
        env = res["env"]
        states = env.with_states(env.reset(jax.random.split(jax.random.PRNGKey(args.seed + 2), n)),
                                 probe["qpos"], probe["qvel"], probe["mocap"])
        res["probe_obs"], res["probe_reward"] = env.evaluate(states, probe["ctrl"])
    return {"results": results, "probe": probe, "starts": starts, "actions": actions[E:2 * E, :args.horizon]}


def dmc_request(task: str, pg: dict) -> dict:
    """The states and actions the dm_control side replays, from the Playground (jax) measurement."""
    if pg is None:
        return {}
    ref = pg["results"]["jax"]
    out = {"probe_qpos": pg["probe"]["qpos"], "probe_qvel": pg["probe"]["qvel"], "probe_ctrl": pg["probe"]["ctrl"],
           "start_qpos": pg["starts"][0], "start_qvel": pg["starts"][1], "start_actions": pg["actions"],
           "pg_reset_qpos": ref["reset_qpos"], "pg_reset_qvel": ref["reset_qvel"]}
    if task in TARGET:
        mocap = ref["env"].target_mocap
        out["probe_target"] = pg["probe"]["mocap"][:, mocap, :2]
        out["start_target"] = pg["starts"][2][:, mocap, :2]
    return {f"{task}/{k}": np.asarray(v, np.float64) for k, v in out.items()}


def task_rows(task: str, args) -> list:
    E, T, H = args.episodes, args.episode_steps, args.horizon
    base = {"task": task, "official_csv": TASKS[task][0], "episodes": E, "episode_steps": T}
    playground = [b for b in args.backends if b != "dm_control"]
    pg = None if task in NO_PORT else measure_playground(task, playground, args)
    dmc = None
    if "dm_control" in args.backends:
        t0 = time.time()
        meta = {"tasks": [task], "seed": args.seed, "episodes": E, "episode_steps": T, "resets": args.resets}
        dmc = run_dmc(args.dm_control_python, dmc_request(task, pg), meta)
        print(f"  {task} dm_control: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    rows = []
    if task in NO_PORT:
        rows += [{"task": task, "official_csv": TASKS[task][0], "backend": b, "note": "no Playground port"}
                 for b in playground]
    if dmc is not None:
        info, arrays = dmc
        facts = info[task]
        row = {**base, "backend": "dm_control", **{k: facts[k] for k in FACT_KEYS},
               "reset_contact_frac": facts["reset_contact_frac"],
               "note": "no Playground port" if task in NO_PORT else "reference"}
        if f"{task}/probe_obs" in arrays:
            row["obs_dim"] = arrays[f"{task}/probe_obs"].shape[1]
        row["zero_return_mean"], row["zero_return_std"] = mean_std(arrays[f"{task}/zero_returns"])
        row["random_return_mean"], row["random_return_std"] = mean_std(arrays[f"{task}/random_returns"])
        rows.append(row)
    if pg is None:
        return rows

    results = pg["results"]
    for backend in playground:
        res = results[backend]
        row = {**base, "backend": backend, **{k: res["facts"][k] for k in FACT_KEYS}, "note": "",
               "probe_states": len(pg["probe"]["qpos"]), "obs_dim": res["probe_obs"].shape[1],
               "reset_obs_max_abs_diff": res["reset_obs_diff"], "diverge_horizon": min(H, T)}
        row["zero_return_mean"], row["zero_return_std"] = mean_std(res["rewards"][:E].sum(axis=1))
        row["random_return_mean"], row["random_return_std"] = mean_std(res["rewards"][E:].sum(axis=1))
        if backend != "jax":
            for name, thr in THRESHOLDS.items():
                row[f"diverge_jax_{name}"] = first_divergence(res["copy_qpos"], results["jax"]["copy_qpos"], thr)
        if dmc is not None and info[task]["qpos_names"] != res["facts"]["qpos_names"]:
            row["note"] = "qpos layout differs from dm_control: states not compared"
        elif dmc is not None:
            ref = info[task]
            row["reference"] = "dm_control"
            row.update(match_obs(res["probe_obs"], arrays[f"{task}/probe_obs"], ref["obs_names"]))
            row["reward_max_abs_diff"] = float(np.abs(res["probe_reward"] - arrays[f"{task}/probe_reward"]).max())
            for name, thr in THRESHOLDS.items():
                row[f"diverge_{name}"] = first_divergence(res["copy_qpos"], arrays[f"{task}/start_qpos_traj"], thr)
            row["reset_ranges_differ"] = ranges_differ(res["reset_qpos"], arrays[f"{task}/reset_qpos"],
                                                       res["facts"]["qpos_names"])
            row["reset_contact_frac"] = ref.get("pg_reset_contact_frac", "")
        elif backend != "jax":  # no dm_control: warp's functions against jax's
            jax_res = results["jax"]
            row["reference"] = "jax"
            names = [f"jax[{i}]" for i in range(jax_res["probe_obs"].shape[1])]
            row.update(match_obs(res["probe_obs"], jax_res["probe_obs"], names))
            row["reward_max_abs_diff"] = float(np.abs(res["probe_reward"] - jax_res["probe_reward"]).max())
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output.


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.1f}" if abs(value) >= 100 \
            else f"{value:.3g}"
    return str(value)


def markdown(rows: list) -> str:
    """The summary table: one line per task and backend; envs.csv holds every column."""
    head = ["task", "backend", "steps", "control dt", "sim dt × substeps", "integrator", "iterations / ls", "eulerdamp",
            "zero-action return", "random-action return", "obs vs reference", "max reward diff",
            "diverges (1e-3 / 1e-1)", "warp vs jax (1e-3 / 1e-1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        get = lambda k: fmt(r.get(k, "")) if r.get(k, "") != "" else ""  # noqa: B023
        if r.get("note") == "no Playground port" and r["backend"] != "dm_control":
            lines.append(f"| {r['task']} | {r['backend']} | no Playground port |" + " |" * (len(head) - 3))
            continue
        ret = lambda p: f"{get(p + '_mean')} ± {get(p + '_std')}" if get(p + "_mean") else ""  # noqa: B023
        obs = get("obs_order")
        if r.get("obs_entries_differ", "none") not in ("none", ""):
            obs += f"; differ: {r['obs_entries_differ']}"
        pair = lambda a, b: f"{get(a)} / {get(b)}" if get(a) else ""  # noqa: B023
        cells = [r["task"], r["backend"], get("episode_env_steps"), get("control_dt"),
                 f"{get('sim_dt')} × {get('n_substeps')}", get("integrator"),
                 f"{get('solver_iterations')} / {get('ls_iterations')}", get("eulerdamp"), ret("zero_return"),
                 ret("random_return"), obs, get("reward_max_abs_diff"), pair("diverge_1e-3", "diverge_1e-1"),
                 pair("diverge_jax_1e-3", "diverge_jax_1e-1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, rows: list):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: fmt(v) if isinstance(v, float) and k.endswith("_diff") else v for k, v in row.items()
                         if k in COLUMNS})
    write_atomic(path, buf.getvalue())


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise InputError(message)


def parse(argv) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                        help="Playground ids (default: the 11 tasks of data/official_tdmpc2/)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), metavar="BACKEND",
                        help="any of jax, warp, dm_control (default: all three)")
    parser.add_argument("--dm-control-python", help="python of a virtual environment with dm-control (docs/envs.md)")
    parser.add_argument("--out", required=True, type=Path, help="folder for envs.csv and envs.md")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per fixed policy (and divergence starts)")
    parser.add_argument("--episode-steps", type=int, default=1000, help="env steps per episode (full episode: 1000)")
    parser.add_argument("--horizon", type=int, default=1000, help="env steps of the divergence runs")
    parser.add_argument("--resets", type=int, default=200, help="resets drawn for the reset checks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task {unknown[0]!r}; the official curves' tasks are {', '.join(TASKS)}")
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        raise InputError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
    if min(args.episodes, args.episode_steps, args.horizon, args.resets) < 1:
        raise InputError("--episodes, --episode-steps, --horizon and --resets must be at least 1")
    args.horizon = min(args.horizon, args.episode_steps)
    if "dm_control" in args.backends:
        if not args.dm_control_python:
            raise InputError("the dm_control backend needs --dm-control-python (docs/envs.md makes that venv)")
        if not (os.path.isfile(args.dm_control_python) and os.access(args.dm_control_python, os.X_OK)):
            raise InputError(f"--dm-control-python {args.dm_control_python} is not an executable file")
        probe = subprocess.run([args.dm_control_python, "-c", "import dm_control.suite"], capture_output=True,
                               text=True)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise InputError(f"{args.dm_control_python} cannot import dm_control.suite: {last}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dmc-worker"]:
        dmc_worker(*argv[1:3])
        return 0
    try:
        args = parse(argv)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for task in args.tasks:
            rows += task_rows(task, args)
            write_csv(args.out / "envs.csv", rows)  # after every task: a long run keeps what it measured
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    command = "python benchmarks/check_envs.py " + " ".join(argv)
    write_atomic(args.out / "envs.md", f"`{command}`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
