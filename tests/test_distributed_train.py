"""Data-parallel fine-tuning end to end: `mpiexec -n 2 minivit finetune` against one process.

The built-in demo (a 2-block ViT on the digits) runs a few steps with the same global batch and
seed, once in one process and once as 2 MPI workers; the final parameters must agree to
summation-order noise. Two workers sum each gradient in a different order (two half-batch means,
then their mean, instead of one mean over the batch), so bit equality is not expected.

Norm: all parameters flattened into one float64 vector p; `relative` is
||p_2 - p_1|| / ||p_1|| (L2), `update_relative` is ||p_2 - p_1|| / ||p_1 - p_0|| with p_0 the
fresh initialisation (what the 8 steps changed), and `max_abs` the largest element difference.

Measured on the development box (8 steps, batch 16):
    momentum   accum  max_abs   relative  update_relative
    float32    1      6.0e-08   8.3e-09   6.5e-07
    float32    2      6.0e-08   8.2e-09   6.5e-07
    bfloat16   1      8.2e-07   3.7e-08   2.9e-06
    bfloat16   2      6.9e-07   3.6e-08   2.8e-06
The float32 bounds are the issue's 1e-5 with a margin of 15x or more over what was measured.
The bfloat16 momentum buffer rounds to 8 significant bits: where the float32 momentum of one
element lies within summation noise of a bfloat16 rounding midpoint, the two runs round it to
neighbouring values, one bfloat16 step apart (2^-9 at the largest |momentum|, 0.30 after 8
steps), and the parameter moves by lr x that step, up to 0.1 x 2^-9 = 2e-4, in one update. The
bounds below allow five such worst-case flips: 1e-3 absolute, 1e-3 / ||p_1|| = 3e-5 relative
(||p_1|| = 35) and 1e-3 / ||p_1 - p_0|| = 2.2e-3 of the update (||p_1 - p_0|| = 0.45).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_support import LAUNCH_LIMIT_S, MPIEXEC, needs_mpi

from minivit import distributed
from minivit.checkpoint import read_npz
from minivit.models import build_model
from minivit.train import DEMO_MODEL, DEMO_RECIPE, read_training_state

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
REPO = SCRIPTS.parent.parent
NUM_CLASSES = 10  # the digits
# A few demo steps; progress_every 1 logs every step, so a second writer would show.
RECIPE = {
    "total_steps": 8,
    "warmup_steps": 1,
    "batch": 16,
    "eval_every": 0,
    "progress_every": 1,
    "num_workers": 1,
}
BOUNDS = {  # momentum dtype -> (max_abs, relative, update_relative); see the module docstring
    "float32": (1e-6, 1e-5, 1e-5),
    "bfloat16": (1e-3, 3e-5, 2.5e-3),
}
MIN_MOVEMENT = 1e-3  # ||p_1 - p_0|| / ||p_1|| measured 0.0127: the bounds are far below it
STEPS = RECIPE["total_steps"]
FILES = {"checkpoint.npz", "config.json", "metrics.jsonl", "model.npz", "model.json"}


pytestmark = [needs_mpi, pytest.mark.mpi]


def _hydra() -> bool:
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    return "HYDRA" in version.stdout


def _env(timeout: str | None = None) -> dict[str, str]:
    """The children's environment: minivit importable, one BLAS/Numba thread per rank."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OPENBLAS_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    for name in (distributed.TIMEOUT_ENV, "MINIVIT_DEBUG", *distributed.LAUNCHER_SIZE_VARS):
        env.pop(name, None)
    if timeout is not None:
        env[distributed.TIMEOUT_ENV] = timeout
    return env


def _launch(program: list[str], cwd: Path, ranks: int, extra=(), dist_timeout=None):
    """Run `python PROGRAM` in one process (ranks=1) or under mpiexec; never hangs.

    `dist_timeout` sets MINIVIT_DIST_TIMEOUT, the seconds a collective waits for a rank.
    """
    command = [sys.executable, *program]
    if ranks > 1:
        command = [MPIEXEC, *extra, "-n", str(ranks), *command]
    return subprocess.run(
        command,
        env=_env(dist_timeout),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=LAUNCH_LIMIT_S,
    )


def _flags(settings: dict) -> list[str]:
    return [f"--{key}={value}" for key, value in settings.items()]


def _finetune(workdir: Path, settings: dict, ranks: int, extra=()):
    """`minivit finetune` (the demo plus `settings`) writing to `workdir`; must succeed."""
    program = ["-m", "minivit.cli", "finetune", f"--workdir={workdir}", *_flags(settings)]
    run = _launch(program, workdir.parent, ranks, extra)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process runs of RECIPE, made once per momentum dtype and accum_steps."""
    made: dict[tuple[str, int], tuple[Path, str]] = {}

    def run(optim_dtype: str, accum: int) -> tuple[Path, str]:
        if (optim_dtype, accum) not in made:
            workdir = tmp_path_factory.mktemp("one") / "run"
            settings = {**RECIPE, "optim_dtype": optim_dtype, "accum_steps": accum}
            made[optim_dtype, accum] = workdir, _finetune(workdir, settings, ranks=1).stdout
        return made[optim_dtype, accum]

    return run


def _flat(params: dict) -> np.ndarray:
    """Shapes: {key: array} -> (P,) float64 in sorted key order."""
    return np.concatenate([np.asarray(params[k], np.float64).reshape(-1) for k in sorted(params)])


def _differences(one: Path, two: Path) -> dict[str, float]:
    """max_abs, relative, update_relative and movement of two model.npz files (docstring norm)."""
    start = build_model(DEMO_MODEL, NUM_CLASSES, DEMO_RECIPE["image_size"]).initialize(0).params
    p0, p1, p2 = _flat(start), _flat(read_npz(one)), _flat(read_npz(two))
    gap = np.linalg.norm(p2 - p1)
    return {
        "max_abs": float(np.abs(p2 - p1).max()),
        "relative": float(gap / np.linalg.norm(p1)),
        "update_relative": float(gap / np.linalg.norm(p1 - p0)),
        "movement": float(np.linalg.norm(p1 - p0) / np.linalg.norm(p1)),
    }


def _records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _check_rank_0_alone_wrote(one: Path, two: Path) -> None:
    """Same files, and each metrics record once: a second writer would append its own copy."""
    assert {p.name for p in two.iterdir()} - {"example_1.png"} == FILES
    assert not (two.parent / "runs").exists()
    steps_one = [(r["step"], "train_loss" in r) for r in _records(one)]
    steps_two = [(r["step"], "train_loss" in r) for r in _records(two)]
    assert steps_two == steps_one == [(s, True) for s in range(1, STEPS + 1)] + [(STEPS, False)]
    for a, b in zip(_records(one), _records(two)):
        for key in ("train_loss", "grad_norm", "lr", "accuracy"):
            if key in a:  # grad_norm: the global gradient, averaged over workers before clipping
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']}")


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("optim_dtype", ["float32", "bfloat16"])
def test_two_workers_match_one_process(tmp_path, one_process, optim_dtype, accum):
    one, one_stdout = one_process(optim_dtype, accum)
    settings = {**RECIPE, "optim_dtype": optim_dtype, "accum_steps": accum}
    tags = ["-prepend-rank"] if _hydra() else []  # Hydra tags every output line with its rank
    run = _finetune(tmp_path / "run", settings, ranks=2, extra=tags)
    micro = 16 // 2 // accum
    assert one_stdout.count(f"1 worker x 16 per worker x accum {accum} = global batch 16") == 1
    startup = f"2 workers x 8 per worker x accum {accum} = global batch 16 (micro-batch {micro})"
    assert run.stdout.count(startup) == 1, run.stdout
    assert run.stdout.count(f"Done: {STEPS} steps") == 1
    if tags:
        assert "[0]" in run.stderr and "[1]" not in run.stdout + run.stderr
    _check_rank_0_alone_wrote(one, tmp_path / "run")
    diff = _differences(one / "model.npz", tmp_path / "run" / "model.npz")
    print(f"{optim_dtype} accum {accum}: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    max_abs, relative, update_relative = BOUNDS[optim_dtype]
    assert diff["movement"] > MIN_MOVEMENT
    assert diff["max_abs"] <= max_abs
    assert diff["relative"] <= relative
    assert diff["update_relative"] <= update_relative


def test_batch_that_does_not_split_names_the_nearest_one_before_reading_data(tmp_path):
    # The data set does not exist: had the trainer opened it first, that would be the error.
    settings = {
        "dataset": str(tmp_path / "missing.npz"),
        "model": "demo",
        **RECIPE,
        "batch": 15,
        "accum_steps": 2,
    }
    program = ["-m", "minivit.cli", "finetune", f"--workdir={tmp_path / 'run'}", *_flags(settings)]
    run = _launch(program, tmp_path, ranks=2)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and run.stdout == ""
    sentence = (
        "minivit finetune: error: --batch 15 cannot be split over 2 workers x accum 2 "
        "(it must be a multiple of 4); use --batch 16"
    )
    assert run.stderr.splitlines() == [sentence], run.stderr  # printed by rank 0 only
    assert not (tmp_path / "run").exists()


def test_dead_worker_stops_the_job_and_leaves_a_valid_checkpoint(tmp_path, one_process):
    if not _hydra():
        pytest.skip("killing a rank is tested with MPICH's mpiexec (Hydra)")
    one, _ = one_process("float32", 1)
    workdir = tmp_path / "run"
    settings = {**RECIPE, "optim_dtype": "float32", "checkpoint_every": 1, "workdir": str(workdir)}
    # Without -disable-auto-cleanup Hydra itself would kill rank 0 when rank 1 dies; minivit's
    # own watchdog (which also covers hangs) is what must stop the job and name the rank.
    program = [str(SCRIPTS / "train_kill.py"), "3", json.dumps(settings)]
    run = _launch(program, tmp_path, 2, extra=["-disable-auto-cleanup"], dist_timeout="3")
    assert run.returncode != 0
    # The sentence may follow the progress bar on the same line (the bar ends without a newline).
    lines = re.findall(r"minivit\.distributed: .*", run.stderr)
    assert len(lines) == 1 and lines[0].endswith("; stopping all 2 ranks."), run.stderr
    assert re.search(r"\brank 1 did not reach collective #\d+ \(all-reduce\) within 3 s", lines[0])
    assert "Traceback" not in run.stderr
    assert not (workdir / "model.npz").exists()

    meta, params, momentum = read_training_state(workdir / "checkpoint.npz")
    assert meta["step"] == 3 and meta["data_position"] == 3 * 16
    assert set(params) == set(read_npz(one / "model.npz")) == set(momentum)
    assert all(np.isfinite(v).all() for v in (*params.values(), *momentum.values()))

    resumed = _launch(
        ["-m", "minivit.cli", "finetune", f"--workdir={workdir}", "--resume"], tmp_path, ranks=1
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming    at step 3 of {STEPS}" in resumed.stdout
    diff = _differences(one / "model.npz", workdir / "model.npz")
    print(
        "killed at 3, resumed in one process: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
    )
    max_abs, relative, update_relative = BOUNDS["float32"]
    assert diff["max_abs"] <= max_abs
    assert diff["relative"] <= relative
    assert diff["update_relative"] <= update_relative
