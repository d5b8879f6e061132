"""Shared test helpers: run a script as a user would, read its run folder, and a tiny TD-MPC2 run folder reused by
several tests."""

import ast
import contextlib
import csv
import io
import logging
import os
import re
import runpy
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# What the TD-MPC scripts' resolve_args reads from the env: DM Control with action repeat 2 (1000 env steps = 500 agent
# steps, so the resolved discount is 0.99).
DMC_ENV = SimpleNamespace(impl="jax", episode_length=1000, action_dim=4, max_agent_steps=500)

# A CPU process with two devices: how sharding over devices is tested without a GPU.
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

# Tiny TD-MPC2 settings: a few seconds of training on CartpoleBalance on a CPU.
TINY_TDMPC2 = [
    "--env-id", "CartpoleBalance", "--impl", "jax",
    "--model-size", "1", "--enc-dim", "32", "--mlp-dim", "32", "--latent-dim", "16",
    "--num-envs", "4", "--k-update", "2", "--batch-size", "16",
    "--num-samples", "32", "--num-elites", "4", "--num-pi-trajs", "4", "--iterations", "2",
    "--episode-length", "100", "--seed-steps", "200", "--total-steps", "800",
    "--eval-freq", "400", "--eval-episodes", "2", "--buffer-size", "4000",
]

# PPO: one CPU-sized config for every CLI run. Only total steps, evals and seed differ, which the compiled code never
# sees, so the persistent compilation cache serves every run after the first.
PPO_CPU = [
    "--env-id", "CartpoleBalance", "--impl", "jax", "--num-envs", "64", "--batch-size", "32",
    "--num-minibatches", "16", "--unroll-length", "20", "--num-updates-per-batch", "16",
    "--value-hidden-sizes", "64", "64", "64", "--num-eval-envs", "16", "--num-seeds", "2", "--discounting", "0.97",
]
# 2 evaluations and 2 hard resets between them: Brax's rounding gives 2 iterations of 10,240 env steps.
TINY_PPO = [*PPO_CPU, "--total-steps", "20000", "--num-evals", "2", "--num-resets-per-eval", "2",
        "--episode-length", "1000"]

# Learning config on CartpoleBalance: MPPI collection, UTD 2, official seeding (5,000 env steps, then a 5,000-update
# burst). The learning tests run it for 16k env steps (~4 min on 2 cores) with every script, so they compare alike;
# benchmarks/bench_tdmpc2.py runs it on to 30k. At 10k the agent was still unstable on some CPUs (XLA rounds per CPU
# model): seed 3 evaluated MPPI 917 at 8k and 433 at 10k on one AMD EPYC, then 952 to 993 from 14k on.
LEARN_TDMPC2 = [
    "--env-id", "CartpoleBalance", "--impl", "jax", "--model-size", "1", "--enc-dim", "32", "--mlp-dim", "64",
    "--latent-dim", "32", "--num-envs", "4", "--k-update", "8", "--batch-size", "64", "--num-samples", "64",
    "--num-elites", "8", "--num-pi-trajs", "4", "--iterations", "3", "--buffer-size", "20000",
    "--log-freq", "2000", "--eval-episodes", "4",
]


# One persistent compilation cache for the whole suite, in-process tests (set before anything imports jax) and script
# runs alike: a program that several tests build (the repeated runs of one config in the determinism and resume tests,
# the same tiny trainer in several in-process tests) compiles once.
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"tdmpc2_mjx_test_cache_{os.getuid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# In-process runs (below) as the scripts' own processes: on the CPU, and video with the OpenGL backend the scripts pick
# (set before anything imports mujoco, which reads it once).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MUJOCO_GL", "egl")


def script_env() -> dict:
    """The environment the scripts run in: CPU, unbuffered, and the suite's compilation cache."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def run_script(script: str, *args: str, timeout: float = 600, check: bool = True, env: Optional[dict] = None,
               own_process: bool = False) -> subprocess.CompletedProcess:
    """Run `python script args...` from the repo root; on failure show its output. By default in this process: the
    script's `__main__` block with sys.argv set and its output captured, which spares the ~6 s of imports (jax,
    MuJoCo, warp) that a new Python pays. In a new process with `env` added to its environment or with
    `own_process`: for what is set per process (device count), signals, warp's console lines, long runs (timeout)."""
    if env is not None or own_process:
        proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                              env={**script_env(), **(env or {})}, timeout=timeout)
    else:
        proc = run_in_process(script, *args)
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{output}")
    return proc


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """The exit code and output `python script args...` would give, run by runpy in this process. What a script's
    entry point installs process-wide (exception hooks, logging filters) is put back afterwards."""
    path, out, err = str(REPO / script), io.StringIO(), io.StringIO()
    hooks, argv = (sys.excepthook, sys.unraisablehook), sys.argv
    filters = {name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio")}
    code = 0
    try:
        sys.argv = [path, *args]
        with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:  # the scripts (and tyro) exit with a code or with none
                code = 0 if e.code is None else e.code
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, (sys.excepthook, sys.unraisablehook) = argv, hooks
        for name, kept in filters.items():
            logging.getLogger(name).filters[:] = kept
    return subprocess.CompletedProcess([sys.executable, path, *args], code, out.getvalue(), err.getvalue())


def read_eval(run_dir: Path) -> list[dict]:
    with open(run_dir / "eval.csv") as f:
        return list(csv.DictReader(f))


def read_video(path: Path) -> tuple[dict, np.ndarray]:
    """(ffmpeg's metadata, the frames as (T, height, width, 3) uint8) of an mp4. Read with imageio-ffmpeg: mediapy's
    reader fails with the ffmpeg binary that imageio-ffmpeg bundles (no system ffmpeg on these machines)."""
    import imageio_ffmpeg

    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in frames])


def assert_png(path: Path):
    """A whole PNG file: Pillow parses and verifies it."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        image.verify()


def read_tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each scalar as TensorBoard shows them, read straight from the events files' TFRecord framing:
    the files in order (a resumed run adds one; names start with the time), where a SessionLog START event at step s
    (what `purge_step` writes) hides every earlier event at step >= s."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


# --- resume: the same three checks for every training script ---
def assert_resume_is_exact(script: str, flags: list[str], tmp_path: Path, half: int, full: int,
                           own_process: bool = False, halves_run: Optional[Path] = None):
    """A run to `full` env steps and a run to `half` continued with `--resume --total-steps full` write the same
    eval.csv (wall time aside) and the same TensorBoard scalars (speed aside), each step once. `halves_run`: a run of
    `flags` to `half` made already, resumed in a copy."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run = lambda *args: run_script(script, *args, own_process=own_process)
    run(*flags, "--total-steps", str(full), "--run-dir", str(whole))
    if halves_run is None:
        run(*flags, "--total-steps", str(half), "--run-dir", str(halves))
    else:
        shutil.copytree(halves_run, halves)
    out = run("--resume", str(halves), "--total-steps", str(full)).stdout
    assert f"resumed from step {half}\n" in out
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    assert strip(read_eval(halves)) == strip(read_eval(whole))
    scalars = lambda run: {tag: v for tag, v in read_tb_scalars(run).items() if tag != "charts/SPS"}
    assert scalars(halves) == scalars(whole)


def sigterm_after_first_progress_line(script: str, *args: str) -> tuple[int, str]:
    """Run `python script args...`, send SIGTERM once it has printed its first progress line ("step ..."), and wait:
    (exit code, stdout and stderr together)."""
    proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            proc.send_signal(signal.SIGTERM)
            break
    return proc.wait(timeout=600), "".join(lines) + proc.stdout.read()


def sigterm_then_resume(script: str, flags: list[str], run_dir: Path, total: int) -> str:
    """Start a run, SIGTERM it once it has printed a progress line, check that it checkpoints and exits 0 with the
    resume command, then resume it to `total`. Returns the stopped run's output."""
    code, out = sigterm_after_first_progress_line(script, *flags, "--total-steps", str(total), "--run-dir",
                                                  str(run_dir))
    assert code == 0, out[-3000:]
    stopped = re.search(rf"stopped at step (\d+); resume with: python {script} --resume {run_dir}\n", out)
    assert stopped and 0 < int(stopped[1]) < total, out[-3000:]
    assert (run_dir / "checkpoints" / stopped[1]).is_dir()
    run_script(script, "--resume", str(run_dir))
    steps = [int(row["step"]) for row in read_eval(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] >= total
    return out


def damage_newest_checkpoint(run_dir: Path) -> int:
    """Cut every file of the newest checkpoint to a tenth, as a kill during a copy or a full disk would; returns that
    checkpoint's step."""
    step = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    for path in (run_dir / "checkpoints" / str(step)).rglob("*"):
        if path.is_file():
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 10)
    return step


def random_policy_return(env_id: str, episodes: int = 8) -> float:
    """Mean return of uniform random actions, with the TD-MPC scripts' env settings (action repeat 2)."""
    import jax

    import tdmpc2_jax as T

    venv = T.VectorEnv(T.load_env(env_id, "jax"), action_repeat=2)

    @jax.jit
    def random_return(key):
        def step(state, k):
            action = jax.random.uniform(k, (episodes, venv.action_dim), minval=-1, maxval=1)
            state, reward, _ = venv.step(state, action)
            return state, reward

        keys = jax.random.split(key, venv.max_agent_steps + 1)
        _, rewards = jax.lax.scan(step, venv.reset(keys[0], episodes), keys[1:])
        return rewards.sum(0).mean()

    return float(random_return(jax.random.key(0)))


def learning_run(script: str, run_dir: Path, *flags: str):
    """Run `script` with the CartpoleBalance learning config (LEARN_TDMPC2, seed 3) plus `flags` and check that its
    last evaluation (best of pi and MPPI) beats uniform random actions, measured here, by 200."""
    run_script(script, *LEARN_TDMPC2, "--total-steps", "16000", "--eval-freq", "16000", "--seed", "3",
               "--run-dir", str(run_dir), *flags, timeout=1200, own_process=True)
    final = read_eval(run_dir)[-1]
    random = random_policy_return("CartpoleBalance")
    best = max(float(final["return_pi"]), float(final["return_mppi"]))
    print(f"{script}: random {random:.1f}, trained pi {final['return_pi']}, mppi {final['return_mppi']}")
    assert best > random + 200, (best, random)


@pytest.fixture(scope="session")
def tdmpc2_tiny_run(tmp_path_factory) -> Path:
    """Run folder of one tiny `tdmpc2_jax.py` run (args.json, eval.csv, TensorBoard events)."""
    if not (REPO / "tdmpc2_jax.py").exists():
        pytest.skip("tdmpc2_jax.py not present yet")
    run_dir = tmp_path_factory.mktemp("tdmpc2") / "CartpoleBalance__tiny__1"
    run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny", "--run-dir", str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def tdmpc2_two_device_batch(tmp_path_factory) -> tuple[str, Path]:
    """(stdout, base run dir) of one tiny `tdmpc2_jax.py` run of 2 seeds, one per device on two CPU devices: folders
    base__1 and base__2. The tests that use it share an xdist group, so it runs once."""
    base = tmp_path_factory.mktemp("two_devices") / "whole"
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--num-seeds", "2", "--run-dir", str(base), env=TWO_DEVICES)
    return proc.stdout, base


def unused_args_fields(script: str) -> list[str]:
    """Fields of the script's `Args` dataclass never read as `<something>.<field>` or by name outside `Args`."""
    source = (REPO / script).read_text()
    tree = ast.parse(source)
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields = [n.target.id for n in args_class.body if isinstance(n, ast.AnnAssign)]
    lines = source.splitlines()
    rest = "\n".join(lines[: args_class.lineno - 1] + lines[args_class.end_lineno :])
    return [f for f in fields if not re.search(rf"\.{f}\b|[\"']{f}[\"']", rest)]
