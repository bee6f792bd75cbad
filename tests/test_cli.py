"""The `minivit` command line: help and version, flags from TrainConfig, predict, evaluate, plot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minivit
from minivit import cli, train
from minivit.data import eval_transform, get_source

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--total_steps", "12", "--warmup_steps", "2", "--batch", "32", "--num_workers", "0"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "minivit.cli", *args], capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A demo run of a few dozen steps (about a second): workdir with model.npz and metrics."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    flags = ["--total_steps", "40", "--warmup_steps", "4", "--batch", "64", "--eval_every", "20"]
    assert cli.main(["finetune", *flags, "--workdir", str(workdir), "--num_workers", "0"]) == 0
    return workdir


def test_help_explains_every_finetune_flag_and_version_prints():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("finetune", "evaluate", "predict", "inspect", "convert", "plot", "bench"):
        assert command in top.stdout
    version = run_cli("--version")
    assert version.stdout.strip() == f"minivit {minivit.__version__}"
    flags = run_cli("finetune", "--help").stdout
    for name, _ in train.TrainConfig().items():
        assert f"--{name}" in flags, name
    assert "(default: 512)" in flags and "'auto'" in flags


def test_flags_come_from_trainconfig_in_either_spelling():
    args = cli.build_parser().parse_args(
        cli._official_spelling(["finetune", "--dataset", "cifar10", "--config.total_steps=100",
                                "--accum_steps", "auto", "--no-augment"])
    )  # fmt: skip
    given = {k: v for k, v in vars(args).items() if k in dict(train.TrainConfig().items())}
    config = cli.finetune_config(given)
    assert (config.dataset, config.total_steps, config.accum_steps) == ("cifar10", 100, "auto")
    assert config.augment is False and config.batch == 512  # official default kept
    demo = cli.finetune_config({"total_steps": 7})
    assert demo.dataset == "digits" and demo.model == "demo" and demo.total_steps == 7
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--accum_steps", "many"])


def test_finetune_prints_the_predict_line_that_works(trained, capsys):
    sidecar = json.loads((trained / "model.json").read_text())
    assert sidecar["image_size"] == 16 and len(sidecar["class_names"]) == 10
    examples = list(trained.glob("example_*.png"))
    assert len(examples) == 1
    assert cli.main(["predict", "--checkpoint", str(trained / "model.npz"), str(examples[0])]) == 0
    assert str(examples[0]) in capsys.readouterr().out


def test_predict_ranks_classes_of_an_image_file(trained, tmp_path, capsys):
    from PIL import Image

    from minivit.checkpoint import load

    source = get_source("digits", "test")
    image, _ = source.get(5)
    path = tmp_path / "digit.png"
    Image.fromarray(image).save(path)  # 8x8 (grey or RGB): predict converts and resizes
    logits = load(trained / "model.npz").predict(eval_transform(image, 16)[None])[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert cli.main(["predict", "--checkpoint", str(trained / "model.npz"), str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(path) and len(lines) == 6  # path + top 5
    best = int(np.argmax(probs))
    assert lines[1].split() == [f"{probs[best]:.2%}", str(best), f"({best})"]


def test_evaluate_reports_the_accuracy_the_run_recorded(trained, capsys):
    args = ["evaluate", "--checkpoint", str(trained / "model.npz"), "--dataset", "digits"]
    assert cli.main([*args, "--num_workers", "0"]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((trained / "model.json").read_text())["accuracy"]
    assert f"accuracy {recorded:.4f} on all 360 examples" in out


def test_inspect_describes_the_fine_tuned_model(trained):
    result = run_cli("inspect", str(trained / "model.npz"))
    assert result.returncode == 0, result.stderr
    with np.load(trained / "model.npz") as params:
        count = sum(params[k].size for k in params.files)
    assert f"{count:,}" in result.stdout and "16x16" in result.stdout


def test_plot_writes_a_png(trained):
    result = run_cli("plot", str(trained))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(trained / "metrics.png") as picture:
        assert picture.format == "PNG" and picture.width > 300
        pixels = np.asarray(picture.convert("L"))
    assert (pixels < 128).mean() > 0.005  # axes, labels and curves were drawn


def test_plot_of_a_missing_run_is_one_sentence(tmp_path):
    result = run_cli("plot", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "metrics.jsonl does not exist" in result.stderr


def test_a_workdir_in_use_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = run_cli("finetune", *QUICK, "--workdir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("use --resume to continue that run or a new --workdir")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_ctrl_c_prints_one_line_and_resume_finishes(tmp_path, monkeypatch, capsys):
    real = train._Run._after_step

    def press_ctrl_c(self, step):
        real(self, step)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train._Run, "_after_step", press_ctrl_c)
    workdir = str(tmp_path / "run")
    assert cli.main(["finetune", *QUICK, "--workdir", workdir]) == 130
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"Interrupted after step 5; saved {workdir}/checkpoint.npz. "
        f"Continue with: minivit finetune --workdir {workdir} --resume"
    )
    monkeypatch.undo()
    assert cli.main(["finetune", "--workdir", workdir, "--resume"]) == 0  # flags from config.json
    assert "Done: 12 steps" in capsys.readouterr().out


def test_bench_hands_every_option_to_bench_step():
    """`minivit bench --help` is bench/step.py's help, and its options reach it unparsed."""
    shown = run_cli("bench", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: minivit bench ")
    for option in ("--models", "--frameworks", "--quick", "--json", "--device"):
        assert option in shown.stdout, option
    refused = run_cli("bench", "--frameworks", "caffe")
    assert refused.returncode == 2
    assert "minivit bench: error: argument --frameworks: invalid choice: 'caffe'" in refused.stderr
