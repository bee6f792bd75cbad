"""bench/step.py's timing plan and its account of where the wall time goes, on a fake clock."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import step  # noqa: E402


class FakeClock:
    """time.perf_counter for the bench: moves only when a fake step (or setup) advances it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(step.time, "perf_counter", fake)
    return fake


def stepping(clock, seconds: list[float]):
    """A step whose n-th call takes seconds[n] on the fake clock (the last value repeats)."""
    calls = []

    def run():
        clock.now += seconds[min(len(calls), len(seconds) - 1)]
        calls.append(clock.now)

    return run, calls


def test_short_steps_fill_the_budget_and_phases_add_up(clock):
    phases = step.Phases()
    clock.now += 0.7  # model and data
    run, calls = stepping(clock, [0.5, 0.6, 0.3, 0.2, 0.8, 0.2])
    seconds, iters = step.time_steps(run, 1, 2.0, 2, 10, phases)
    assert iters == 5  # 0.6 + 0.3 + 0.2 + 0.8 = 1.9, + 0.2: the fifth run reaches the budget
    assert len(calls) == 6
    assert seconds == pytest.approx(0.3)  # median of 0.6, 0.3, 0.2, 0.8, 0.2
    assert phases.seconds == pytest.approx({"setup": 0.7, "warm-up": 0.5, "timed": 2.1})


def test_a_slow_first_step_does_not_cut_the_count(clock):
    """The cold first step (page faults, first allocations) is warm-up, not the yardstick."""
    run, calls = stepping(clock, [2.5, 0.9, 0.8, 0.8])
    seconds, iters = step.time_steps(run, 1, 2.0, 2, 10)
    assert (seconds, iters, len(calls)) == (pytest.approx(0.8), 3, 4)


def test_min_and_max_runs_bound_the_count(clock):
    run, _ = stepping(clock, [0.1, 1.5])
    assert step.time_steps(run, 1, 2.0, 5, 30) == (pytest.approx(1.5), 5)  # past the budget
    run, _ = stepping(clock, [0.01])
    assert step.time_steps(run, 3, 2.0, 5, 30) == (pytest.approx(0.01), 30)  # 0.3 s of runs


def test_a_first_timed_step_longer_than_the_budget_is_the_only_one(clock):
    run, calls = stepping(clock, [3.0, 2.4, 1.0])
    seconds, iters = step.time_steps(run, 1, 2.0, 2, 10)
    assert (seconds, iters, len(calls)) == (pytest.approx(2.4), 1, 2)


def test_time_lines_sum_the_children_phases():
    details = {
        "minivit": [
            {"child_s": 10.0, "phases": {"setup": 1.0, "warm-up": 3.0, "timed": 4.0}},
            {"child_s": 5.0, "phases": {"setup": 0.5, "warm-up": 1.0, "timed": 2.0}},
        ],
        "torch": [{"error": "boom", "child_s": 2.0}],
    }
    (line,) = step.time_lines(details, 20.0)
    assert line == (
        "wall time 20 s: 17 s in configurations (setup 2 s, warm-up 4 s, timed 6 s; 6 s to start,"
        " touch pages and exit), 3 s in this process and zygotes"
    )


class FakeRunner:
    """Runner stand-in: hands out the next img/s of each framework and records every call."""

    def __init__(self, img_s: dict[str, list], budget: float = 2.0):
        self.frameworks, self.img_s, self.calls = list(img_s), img_s, []
        self.budget = budget

    def run(self, framework, spec, mode, batch, rounds=1, probe=True):
        self.calls.append((framework, self.budget / rounds, probe))
        value = self.img_s[framework][sum(c[0] == framework for c in self.calls) - 1]
        if value is None:
            return {"error": "child died"}
        rate = 200.0 if probe else None
        cpu = dict(user_s=1.0, sys_s=0.25)
        return dict(img_s=value, rss_mb=100.0 + value, iters=5, gemm_gflops=rate, **cpu)


def test_batch_one_rows_take_turns_and_report_the_median_process():
    runner = FakeRunner({"minivit": [30.0, 48.0, 47.0], "torch": [35.0, 45.0, None]})
    spec = step.SPECS[0]
    rounds = step.rounds_for("inference", 1, 3)
    row = step.measure_row(spec, "inference", 1, runner, {}, rounds)
    assert [c[0] for c in runner.calls] == ["minivit", "torch"] * 3  # interleaved in time
    assert all(budget == pytest.approx(2.0 / 3) for _, budget, _ in runner.calls)
    assert [probe for *_, probe in runner.calls] == [True, True] + [False] * 4  # first round only
    assert row["minivit_img_s"] == 47.0  # the middle of 30, 47, 48
    assert row["torch_img_s"] == 45.0  # of the two that ran, the higher middle
    assert row["minivit_rss_mb"] == 148.0  # the peak of all rounds
    assert row["vs_torch"] == pytest.approx(47.0 / 45.0)
    assert row["gemm_fraction"] > 0  # the median round has no probe: the first round's rate
    assert step.rounds_for("train", 32, 3) == step.rounds_for("inference", 32, 3) == 1


def test_the_log_line_sums_wall_and_cpu_seconds_over_the_rounds(monkeypatch):
    lines = []
    monkeypatch.setattr(step, "log", lines.append)
    runner = FakeRunner({"minivit": [20.0, 21.0]})
    step.measure_row(step.SPECS[0], "inference", 1, runner, {}, 2)
    (line,) = lines
    assert "CPU 2 s user 0.5 s sys" in line and "rounds [20.0, 21.0]" in line


def test_a_framework_whose_every_round_failed_leaves_its_cell_empty():
    runner = FakeRunner({"minivit": [20.0, 21.0], "torch": [None, None]})
    row = step.measure_row(step.SPECS[0], "inference", 1, runner, {}, 2)
    assert row["minivit_img_s"] == 21.0 and "torch_img_s" not in row and row["vs_torch"] is None


def test_the_gemm_probe_moves_to_the_next_round_when_the_first_one_failed():
    runner = FakeRunner({"minivit": [None, 40.0], "torch": [30.0, 31.0]})
    row = step.measure_row(step.SPECS[0], "inference", 1, runner, {}, 2)
    assert [(c[0], c[2]) for c in runner.calls] == [
        ("minivit", True),
        ("torch", True),
        ("minivit", True),  # its first round left no rate
        ("torch", False),
    ]
    assert row["minivit_img_s"] == 40.0 and row["gemm_fraction"] > 0


def test_the_log_line_shows_the_childs_cpu_seconds():
    assert step._cpu_times({"user_s": 12.4, "sys_s": 3.26}) == ", CPU 12 s user 3.3 s sys"
    assert step._cpu_times({"img_s": 1.0}) == ""  # a result from before the field


def test_no_usable_framework_stops_with_one_sentence(monkeypatch, capsys):
    monkeypatch.setattr(step, "header", lambda args: [])  # no 2048^3 probe in a unit test
    monkeypatch.setattr(step._common, "setup_threads", lambda threads: None)  # NumPy is loaded
    monkeypatch.setattr(step.Runner, "_start", lambda self, name: "No module named 'numba'")
    with pytest.raises(SystemExit) as stop:
        step.main(["--frameworks", "minivit", "torch"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "minivit: not usable, column left empty (): No module named 'numba'" in err
    assert "none of minivit, torch can run in" in err and "pip install -e '.[bench]'" in err


# ---- --device cuda: the plumbing, checked without a GPU ------------------------------------------
def test_device_cuda_runs_every_configuration_in_a_fresh_interpreter():
    assert not step.parse_args([]).fresh and step.parse_args([]).device == "cpu"
    args = step.parse_args(["--device", "cuda"])
    assert args.fresh and args.device == "cuda"


def test_the_device_reaches_the_child(monkeypatch):
    args = step.parse_args(["--device", "cuda"])
    assert step._request("ViT-Ti/16", "train", 32, args, 2.0, True)["device"] == "cuda"
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        raise step.subprocess.TimeoutExpired(command, 1)

    monkeypatch.setattr(step.subprocess, "run", fake_run)
    result = step.fresh_child("minivit", step.SPECS[0], "train", 32, args, 2.0, True)
    assert "error" in result
    at = seen["command"].index("--device")
    assert seen["command"][at + 1] == "cuda"
    child = step.parse_args(seen["command"][2:])  # what the child parses
    assert (child.child, child.device, child.batch) == ("minivit", "cuda", 32)


def test_run_config_hands_the_device_to_the_framework(monkeypatch):
    seen = []

    def fake_minivit(spec, mode, batch, budget, phases, device):
        seen.append(device)
        return dict(step_s=0.5, iters=2, rss_mb=1.0, gemm_probe=lambda: 100.0)

    monkeypatch.setattr(step, "run_minivit", fake_minivit)
    request = dict(model="ViT-Ti/16", mode="train", batch=32, budget=1.0, threads=2)
    result = step.run_config("minivit", {**request, "device": "cuda"})
    assert seen == ["cuda"] and result["img_s"] == 64 and result["gemm_gflops"] == 100.0
    assert result["user_s"] > 0 and result["sys_s"] >= 0  # this process's own CPU seconds
    step.run_config("minivit", request)  # an older request without the key: the CPU
    assert seen == ["cuda", "cpu"]


def test_jax_stays_on_the_cpu_for_the_cpu_table(monkeypatch):
    for name in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    step.pin_jax_platform("cuda")
    assert "JAX_PLATFORMS" not in step.os.environ
    assert step.os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    step.pin_jax_platform("cpu")
    assert step.os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    step.pin_jax_platform("cpu")  # a user's own choice is kept
    assert step.os.environ["JAX_PLATFORMS"] == "cuda"


def test_minivit_on_cuda_without_cupy_fails_in_one_sentence():
    if step.importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    with pytest.raises(RuntimeError, match="needs CuPy; install it with"):
        step.run_minivit(step.SPECS[0], "inference", 1, 0.01, step.Phases(), device="cuda")


def test_gpu_name_without_nvidia_smi(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(step.subprocess, "run", missing)
    assert step.gpu_name() == "no nvidia-smi"


def test_a_framework_that_sees_no_gpu_is_dropped_before_any_row():
    if step.importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    runner = step.Runner(["minivit"], step.parse_args(["--device", "cuda"]))
    assert runner.frameworks == []  # one check in a fresh process, not a failure per row


def _probes(*rates):
    """A GEMM probe that reads `rates` in turn, and the list of the probes taken."""
    taken = []

    def probe():
        taken.append(rates[len(taken)])
        return taken[-1]

    return probe, taken


def test_anchor_rate_probes_once_when_the_step_is_well_below_it():
    probe, taken = _probes(190.0, 300.0)
    assert step.anchor_rate(probe, 150.0) == (190.0, [190.0])
    assert taken == [190.0]


def test_anchor_rate_probes_again_when_the_step_matches_the_probe():
    """run 12's ViT-Ti/16 child: steps at 140 GFLOP/s, a first probe at 107."""
    probe, taken = _probes(107.0, 201.0, 300.0)
    assert step.anchor_rate(probe, 140.0) == (201.0, [107.0, 201.0])  # 140 < 0.95 x 201: done
    probe, taken = _probes(100.0, 120.0, 110.0, 300.0)
    assert step.anchor_rate(probe, 140.0) == (120.0, [100.0, 120.0, 110.0])
    assert len(taken) == 1 + step.RECHECKS  # never more than RECHECKS again
    probe, taken = _probes(213.0, 410.0, 300.0)  # run 17's R26+S/32 training child, in a dip
    assert step.anchor_rate(probe, 198.6) == (410.0, [213.0, 410.0])


def test_step_gflop_is_the_configs_flops_times_the_batch():
    from minivit.models.registry import resolve

    spec = next(s for s in step.SPECS if s.label == "ViT-S/16")
    config = resolve(spec.name)[0]
    assert step.step_gflop(spec, "train", 32) == pytest.approx(
        3 * 32 * step.forward_flops(config) / 1e9
    )
    args = step.parse_args(["--child", "minivit", "--model", "ViT-S/16", "--step-gflop", "2.5"])
    assert args.step_gflop == 2.5
    request = step._request("ViT-S/16", "train", 32, args, 2.0, True, 2.5)
    assert request["step_gflop"] == 2.5


def compiling(counter: list, compiles: list[int]):
    """A `compiled` callback and a step hook: the n-th step compiles compiles[n] functions."""
    steps = []

    def hook():
        counter[0] += compiles[len(steps)] if len(steps) < len(compiles) else 0
        steps.append(1)

    return (lambda: counter[0]), hook


def test_a_warm_up_step_that_compiled_is_followed_by_another(clock):
    """The step after one that compiled is slow too, so it is not the one timed."""
    counter = [0]
    compiled, hook = compiling(counter, [12, 0])
    run, calls = stepping(clock, [35.0, 2.55, 2.3])
    timed = lambda: (hook(), run())  # noqa: E731
    seconds, iters = step.time_steps(timed, 1, 2.0, 2, 10, compiled=compiled)
    assert (seconds, iters, len(calls)) == (pytest.approx(2.3), 1, 3)  # 2 warm-up, 1 timed


def test_settling_stops_after_settle_steps_and_without_compiles(clock):
    counter = [0]
    compiled, hook = compiling(counter, [3, 2, 1, 1])  # every warm-up step compiles
    run, calls = stepping(clock, [0.5])
    step.time_steps(lambda: (hook(), run()), 1, 2.0, 2, 10, compiled=compiled)
    assert len(calls) == 1 + step.SETTLE_STEPS + 4  # 4 timed runs of 0.5 s fill the budget
    counter = [0]
    compiled, hook = compiling(counter, [0])  # a warm cache: no extra step
    run, calls = stepping(clock, [0.5])
    step.time_steps(lambda: (hook(), run()), 1, 2.0, 2, 10, compiled=compiled)
    assert len(calls) == 1 + 4


def test_compile_watch_counts_numba_compiles_once_each():
    import numba  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    @numba.njit(cache=False)
    def inner(x):
        return x * 2.0

    @numba.njit(cache=False)
    def outer(x):
        return inner(x).sum()

    watch = step.CompileWatch()
    try:
        assert outer(np.ones(3)) == 6.0
        assert watch.count == 1 and watch.seconds > 0  # inner compiled inside outer: one
        outer(np.ones(4))
        assert watch.count == 1  # the same types: no compile
        outer(np.ones(3, np.float32))
        assert watch.count == 2  # new types: one more
    finally:
        watch.close()
    outer(np.ones(2, np.int64))
    assert watch.count == 2  # closed: no longer listening


def test_warm_plan_runs_each_mode_at_batch_one_and_four_per_model():
    args = step.parse_args([])
    plans = {spec.label: steps for spec, steps in step.warm_plan(step.plan(args))}
    assert list(plans) == [s.label for s in step.SPECS]
    for steps in plans.values():  # ViT-B/16's batch-8 training row adds nothing
        assert steps == [["inference", 1], ["inference", 4], ["train", 4]]
    quick = step.warm_plan(step.plan(step.parse_args(["--quick"])))
    assert [(s.label, steps) for s, steps in quick] == [
        ("ViT-Ti/16", [["inference", 1], ["inference", 4], ["train", 4]]),
        ("ViT-S/16", [["inference", 4], ["train", 4]]),
    ]


class WarmRunner:
    def __init__(self, results, frameworks=("minivit", "torch"), device="cpu"):
        self.results, self.frameworks, self.calls = list(results), list(frameworks), []
        self.args = step.parse_args(["--device", device])

    def warm(self, spec, steps):
        self.calls.append(spec.label)
        return self.results.pop(0)


def test_warm_kernels_sums_the_compile_pass_and_names_a_failed_model():
    specs = step.SPECS
    runner = WarmRunner(
        [
            dict(numba_compiled=20, numba_compile_s=18.4, warm_s=25.0),
            {"error": "child died"},
            dict(numba_compiled=11, numba_compile_s=12.3, warm_s=14.0),
        ]
    )
    configs = [(specs[0], "inference", 1), (specs[4], "train", 32), (specs[1], "train", 32)]
    lines, took = step.warm_kernels(runner, configs)
    assert runner.calls == ["ViT-Ti/16", "R26+S/32", "ViT-S/16"] and took >= 0
    assert lines[0].startswith("minivit kernels compiled before the table: 31 functions in 31 s")
    assert lines[1:] == ["minivit compile pass FAILED for R26+S/32: child died"]


def test_warm_kernels_says_cached_only_when_every_child_ran():
    configs = [(step.SPECS[0], "inference", 1), (step.SPECS[1], "inference", 1)]
    nothing = dict(numba_compiled=0, numba_compile_s=0.0, warm_s=4.0)
    (line,), _ = step.warm_kernels(WarmRunner([nothing, dict(nothing)]), configs)
    assert line.startswith("minivit kernels: all in Numba's cache already")
    lines, _ = step.warm_kernels(WarmRunner([nothing, {"error": "child died"}]), configs)
    assert lines[0].startswith("minivit compile pass: the models whose child ran compiled nothing")
    assert lines[1] == "minivit compile pass FAILED for ViT-S/16: child died"


def test_warm_kernels_is_skipped_without_minivit_or_on_the_gpu():
    configs = [(step.SPECS[0], "inference", 1)]
    assert step.warm_kernels(WarmRunner([], frameworks=["torch"]), configs) == ([], 0.0)
    assert step.warm_kernels(WarmRunner([], device="cuda"), configs) == ([], 0.0)


def test_time_lines_name_the_compile_pass():
    details = {"minivit": [{"child_s": 10.0, "phases": {"setup": 1.0, "timed": 8.0}}]}
    (line,) = step.time_lines(details, 40.0, 25.0)
    assert line.endswith("25 s in minivit's compile pass, 5 s in this process and zygotes")
