"""benchmarks/gpu_session.py: the prepared GPU session must run (its --smoke run on a CPU, at tiny sizes), report
every part as measured or skipped with a reason, and derive its ratios and estimates by the formulas it states."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.py"
spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def run(*args: str, timeout: float = 900, cache: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if not cache:  # without the suite's shared compilation cache (tests/conftest.py sets it)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def positive_numbers(row: dict) -> list:
    """The row's numbers that are not positive (bools and absent statistics, None, are not numbers here)."""
    return [(k, v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (v > 0 and math.isfinite(v))]


@pytest.mark.slow  # ~2-3 min on an idle 2-core CPU with a cold compilation cache (every program compiles once)
def test_smoke_session_measures_or_explains_every_part(tmp_path):
    out = tmp_path / "session"
    proc = run("--smoke", "--out", str(out), "--deadline-s", "900")  # no part skipped for the machine's load
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    session = json.loads((out / "gpu_session.json").read_text())
    parts = session["parts"]
    assert list(parts) == S.PARTS
    for name, part in parts.items():
        assert part["status"] in {"measured", "partial", "skipped"}, name
        if part["status"] != "measured":
            assert part.get("reason"), f"{name} is {part['status']} without a reason"
        for skipped in part.get("skipped", []):
            assert skipped["what"] and skipped["why"], name
    # On a CPU without torch only these two may be skipped; everything else must have run.
    assert {n for n, p in parts.items() if p["status"] != "measured"} <= {"official", "tdmpc2_size1"}
    assert "torch" in parts["official"]["reason"] or "official source" in parts["official"]["reason"]
    for name in ["tdmpc2", "seeds", "glass", "ppo"]:
        rows = parts[name]["rows"]
        assert rows and not parts[name]["skipped"], name
        for row in rows:
            assert not positive_numbers(row), (name, row["name"], positive_numbers(row))
            if row["kind"] == "rate":  # env steps/s from the envs, seeds and action repeat per vector step
                per_vector_step = row["num_envs"] * row["action_repeat"] * row["num_seeds"]
                assert row["env_steps_per_s"] == pytest.approx(1e3 * per_vector_step / row["ms_per_vector_step"])
    names = [r["name"] for r in parts["tdmpc2"]["rows"]]
    assert names[0].startswith("env stepping") and "one update" in names
    assert sum(n.startswith("MPPI plan") for n in names) == 2
    assert sum(n.startswith("training chunk") for n in names) == 2
    assert len(parts["glass"]["rows"]) == 3 and len(parts["ppo"]["rows"]) == 2
    derived = session["derived"]
    assert len(derived["estimates"]) == 4 and all(e["hours"] > 0 for e in derived["estimates"])
    assert len(derived["ratios"]) >= 2 and all(r["ratio"] > 0 for r in derived["ratios"])

    md = (out / "gpu_session.md").read_text()
    assert "| part | measurement | ms per call / vector step | env steps/s | compile s | memory |" in md
    assert "- device: cpu" in md and "jax " in md and session["meta"]["date"] in md
    assert sum(line.startswith(("| tdmpc2 |", "| seeds |", "| glass |", "| ppo |")) for line in md.splitlines()) == 12
    assert "Not measured:" in md and "- official:" in md
    for name in ["tdmpc2", "seeds", "glass", "ppo"]:
        assert (out / "parts" / f"{name}.log").is_file()


def synthetic_chunk(name: str, env_steps_per_s: float, num_seeds: int = 1, k_update: int = 256, **extra) -> dict:
    row = S.rate_row(name, [512 * 2 * num_seeds / env_steps_per_s], 2, 256, 2, num_seeds)
    return {**row, "k_update": k_update, "compile_s": 60.0, "seed_steps": 5120, **extra}


def test_rates_ratios_and_estimates_follow_their_formulas():
    one = synthetic_chunk("training chunk, --k-update 256", 700.0, peak_bytes=3e9)
    recipe = synthetic_chunk("training chunk, --k-update 128", 1200.0, k_update=128)
    five = synthetic_chunk("training chunk, --k-update 256 --num-seeds 5", 1750.0, num_seeds=5, peak_bytes=12e9)
    assert one["ms_per_vector_step"] == pytest.approx(512 / 700 * 1e3)
    assert five["ms_per_vector_step"] == pytest.approx(5 * 512 / 1750 * 1e3)  # summed over seeds
    phases = ["before the warm-up (gate closed)", "on (between warm-up and off step)", "after the off step"]
    glass = [synthetic_chunk(f"Glass chunk, {p}", rate, k_update=128, phase=p, glass_warmup_steps=100_000,
                             glass_off_step=1_000_000) for p, rate in zip(phases, [1150.0, 900.0, 1100.0], strict=True)]
    parts = {"tdmpc2": {"rows": [one, recipe]}, "seeds": {"rows": [five]}, "glass": {"rows": glass}}
    d = S.derived(parts)
    ratios = {r["what"].split(",")[0]: r["ratio"] for r in d["ratios"]}
    assert ratios["5 seeds in one program / 1 seed"] == pytest.approx(2.5)
    assert ratios["GPU memory peak"] == pytest.approx(4.0)
    assert ratios["Glass on / TD-MPC2 at --k-update 128"] == pytest.approx(1200 / 900)
    hours = {e["what"]: e["hours"] for e in d["estimates"]}
    burst = 10 * 256 * (512 / 700) / 256  # 10 seed vector steps x 256 updates, at the chunk's cost per update
    assert hours["TD-MPC2, defaults, 1 seed"] == pytest.approx((60 + burst + (4e6 - 5120) / 700) / 3600)
    burst5 = 10 * (5 * 512 / 1750)
    assert hours["TD-MPC2, defaults, 5 seeds in one program"] == pytest.approx(
        (60 + burst5 + (4e6 - 5120) / 350) / 3600)  # 1,750 env steps/s in all is 350 per seed
    glass_s = 60 + 10 * (512 / 1150) + (100_000 - 5120) / 1150 + 900_000 / 900 + 3_000_000 / 1100
    assert hours["Glass at the recipe, 1 seed"] == pytest.approx(glass_s / 3600)
    scaled = [h for what, h in hours.items() if what.startswith("Glass at the recipe, 5 seeds")]
    assert scaled == [pytest.approx(glass_s / 3600 * hours["TD-MPC2, defaults, 5 seeds in one program"]
                                    / hours["TD-MPC2, defaults, 1 seed"])]
    assert S.derived({})["not_derived"] and not S.derived({})["estimates"]


def test_glass_phases_lie_inside_their_windows():
    phases = S.glass_phases(S.FULL, per_vector_step=512, seed_vector_steps=10)
    assert list(phases.values()) == [11, 196, 1954]
    windows = [(5120, 100_000), (100_000, 1_000_000), (1_000_000, math.inf)]
    for (lo, hi), v in zip(windows, phases.values(), strict=True):
        first, last = (v + 1) * 512, (v + S.FULL.vector_steps) * 512  # env steps its updates see
        assert lo <= first and last < hi
    assert len(S.glass_phases(S.SMOKE, per_vector_step=4, seed_vector_steps=4)) == 3


def test_markdown_shows_the_official_comparison_and_what_was_skipped():
    versus = dict(name="update, size 5, official main (compile=true)", kind="versus", size=5, official="main",
                  compile=True, ours_ms=4.0, official_ms=10.0, official_over_ours=2.5)
    session = {"meta": {"smoke": False, "host_cpus": 16, "impl": "jax",
                        "versions": {"python": "3.12.3", "jax": "0.11.2"},
                        "date": "2027-01-01 00:00 UTC", "commit": "abc1234", "wall_s": 500.0, "deadline_s": 540,
                        "command": "python benchmarks/gpu_session.py", "sizes": {"env_id": "HopperHop"}},
               "parts": {"tdmpc2": {"status": "measured", "device": "NVIDIA H200", "platform": "gpu",
                                    "rows": [synthetic_chunk("training chunk, --k-update 256", 700.0, peak_bytes=3e9)]},
                         "official": {"status": "partial", "reason": "over its budget of 90 s", "torch": "2.11.0",
                                      "torch_device": "NVIDIA H200", "rows": [versus],
                                      "skipped": [{"what": "official b67b21c", "why": "not a checkout"}]}},
               "derived": {"ratios": [], "estimates": [{"what": "TD-MPC2, defaults, 1 seed", "hours": 1.5}],
                           "not_derived": []}}
    md = S.markdown(session)
    assert "- device: NVIDIA H200 (gpu), 16 CPU cores" in md and "torch 2.11.0 on NVIDIA H200" in md
    assert "| main compile=true | update | 5 | 4.00 | 10.00 | 2.50 |" in md
    assert "| tdmpc2 | training chunk, --k-update 256 (256 envs) | 731.4 | 700 | 60.0 | 3.00 GB peak |" in md
    assert "| TD-MPC2, defaults, 1 seed | 1.50 |" in md
    assert "- official: over its budget of 90 s" in md and "- official: official b67b21c: not a checkout" in md


@pytest.mark.parametrize("args, message", [
    (["--parts", "tdmpc3"], "error: unknown part 'tdmpc3'; the parts are tdmpc2, official"),
    (["--official-2023", "/nonexistent"], "error: --official-2023 /nonexistent is not a checkout"),
    (["--deadline-s", "0"], "error: --deadline-s must be positive"),
    (["--out", "{tmp}/a_file/session"], "error: --out {tmp}/a_file/session: cannot create"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "a_file").write_text("")
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    proc = run("--out", str(tmp_path), *args, timeout=60, cache=False)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "gpu_session.json").exists()


class FakeTensor(np.ndarray):
    def to(self, device):
        return self


class FakeAgent:
    """What the session calls of an official TDMPC2: update(buffer) and act(obs, t0, eval_mode)."""

    samples, plans = [], []

    def __init__(self, cfg):
        self.cfg = cfg

    def update(self, buffer):
        FakeAgent.samples.append(buffer.sample())

    def act(self, obs, t0=False, eval_mode=False):
        FakeAgent.plans.append((obs.shape, t0))


class FakeMain(FakeAgent):
    def _td_target(self, next_z, reward, terminated, task):
        pass


class Fake2023(FakeAgent):
    def _td_target(self, next_z, reward, task):
        pass


@pytest.mark.parametrize("agent, sample_len", [(FakeMain, 5), (Fake2023, 4)])
def test_official_calls_feed_each_release_its_own_batch(agent, sample_len):
    """The glue around the official agent (torch itself is not installed here): the config it gets, the batch it
    samples (main's has `terminated`), one first plan with t0, and the interleaved timing."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import check_vs_official as C

    torch = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False), manual_seed=lambda seed: None,
                            from_numpy=lambda x: x.view(FakeTensor), zeros_like=np.zeros_like)
    loaded = SimpleNamespace(torch=torch, module=SimpleNamespace(TDMPC2=agent), common=SimpleNamespace(
        MODEL_SIZE={1: {"mlp_dim": 384}}), config={"dropout": 0.01, "vmin": -10, "vmax": 10, "num_bins": 101,
                                                  "batch_size": 8, "horizon": 3})
    batch = C.make_batch(np.random.default_rng(0), C.official_cfg(loaded, 1))
    FakeAgent.samples, FakeAgent.plans = [], []
    update, plan = S.official_calls(C, loaded, 1, batch, compile_=True)
    result = S.interleaved({"update": update, "plan": plan}, rounds=2)
    assert [len(s) for s in FakeAgent.samples] == [sample_len] * 5  # 3 warm-up calls, 2 rounds
    obs, action, reward = FakeAgent.samples[0][:3]
    assert obs.shape == (4, 8, C.OBS_DIM) and action.shape == (3, 8, C.ACTION_DIM) and reward.shape == (3, 8, 1)
    assert FakeAgent.plans == [((C.OBS_DIM,), True)] + [((C.OBS_DIM,), False)] * 4
    assert all(len(r) == 3 and r[0] >= 0 and r[2] <= r[1] for r in result.values())
