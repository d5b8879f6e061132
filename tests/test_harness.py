"""The run harness the four training scripts share: --help, a full disk under the run folder, --track."""

import ast
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import REPO, TINY_PPO, TINY_TDMPC2, read_eval, run_script

SCRIPTS = ["tdmpc2_jax.py", "tdmpc_glass_jax.py", "se_ib_tdmpc2.py", "ppo_playground.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_help_is_one_line(script):
    """tyro keeps a field docstring's line breaks, so a docstring over two lines breaks mid-sentence in --help."""
    tree = ast.parse((REPO / script).read_text())
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    body = args_class.body
    fields = [(node.target.id, doc.value.value) for node, doc in zip(body, body[1:], strict=False)
              if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)]
    assert len(fields) == sum(isinstance(node, ast.AnnAssign) for node in body)  # every field has its docstring
    assert [name for name, doc in fields if "\n" in doc] == []
    run_flags = [node.target.id for node in body if isinstance(node, ast.AnnAssign)]
    assert run_flags[-3:] == ["track", "wandb_project_name", "wandb_entity"]  # the run flags close Args


def test_help_lists_the_run_flags_last():
    out = run_script("tdmpc2_jax.py", "--help", env={"COLUMNS": "120"}).stdout
    assert out.index("--total-steps") < out.index("--temperature") < out.index("--exp-name") < out.index("--track")


@pytest.fixture
def small_disk(tmp_path):
    """A 700 kB tmpfs: the tiny run's first checkpoint (about 0.4 MB on disk) fits, the second does not."""
    mount = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_stops_in_one_line_and_loses_nothing(small_disk, tdmpc2_tiny_run, tmp_path):
    """The second checkpoint does not fit: the run stops with one line naming the folder, the step, the space and the
    newest intact checkpoint (exit 2, no traceback); resumed from a copy elsewhere it writes what the run that had
    room wrote."""
    run_dir = small_disk / tdmpc2_tiny_run.name
    proc = run_script("tdmpc2_jax.py", *TINY_TDMPC2, "--seed", "1", "--exp-name", "tiny", "--run-dir", str(run_dir),
                      check=False, own_process=True)  # orbax's failing background writes stay in that process
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(  # the cause is the first line of whichever write failed first (a file or tensorstore's)
        rf"error: checkpoint step 800 could not be written to {re.escape(str(run_dir / 'checkpoints'))} \(.+\): it "
        r"needs about 0\.5 MB, that disk has 0\.\d MB free; newest intact checkpoint: step 400; stopping \(free space, "
        rf"then --resume {re.escape(str(run_dir))}\)", error), error
    moved = tmp_path / "moved" / run_dir.name
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    out = run_script("tdmpc2_jax.py", "--resume", str(moved)).stdout
    assert "resumed from step 400\n" in out
    strip = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
    assert strip(read_eval(moved)) == strip(read_eval(tdmpc2_tiny_run))


def test_ppo_full_disk_stops_in_one_line(small_disk):
    """PPO writes its checkpoints synchronously: the failed write stops the run at once, in the same one line."""
    run_dir = small_disk / "ppo"
    proc = run_script("ppo_playground.py", *TINY_PPO, "--num-seeds", "1", "--checkpoint-every", "10240",
                      "--run-dir", str(run_dir), check=False, own_process=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(
        rf"error: checkpoint step 20480 could not be written to {re.escape(str(run_dir / 'checkpoints'))} \(.+\): "
        r"it needs about 0\.\d MB, that disk has 0\.\d MB free; newest intact checkpoint: step 10240; stopping "
        rf"\(free space, then --resume {re.escape(str(run_dir))}\)", error), error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["10240"]


def test_track_logs_each_seed_to_wandb_offline(tmp_path):
    """--track: one Weights & Biases run per seed folder (offline here), holding the eval and loss scalars."""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "tracked"
    tiny = [*TINY_TDMPC2, "--total-steps", "400"]
    run_script("tdmpc2_jax.py", *tiny, "--num-seeds", "2", "--run-dir", str(run_dir), "--track",
               env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    for seed in (1, 2):
        (records,) = Path(f"{run_dir}__{seed}").glob("wandb/offline-run-*/run-*.wandb")
        data = records.read_bytes()
        assert b"eval/return_pi" in data and b"eval/return_mppi" in data and b"losses/consistency_loss" in data
