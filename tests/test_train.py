"""The fine-tuning loop on the built-in digits: learning, resume, checkpoints, stopping, bad input.

Trajectory parity with the official trainer is proven in test_optim/test_parity; here every run
is a few steps of the demo ViT (16x16 digits), each well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from minivit import train
from minivit.data import eval_transform, get_source
from minivit.models.model import Model
from minivit.train import TrainConfig, TrainingError, finetune, read_training_state


def tiny(workdir, **overrides) -> TrainConfig:
    """The demo recipe shrunk to a few steps (no evaluation until the end)."""
    settings = dict(
        workdir=str(workdir), total_steps=6, warmup_steps=1, batch=32, accum_steps=1,
        eval_every=0, checkpoint_every=0, progress_every=1, num_workers=0,
    )  # fmt: skip
    return TrainConfig.demo(**{**settings, **overrides})


def records(workdir, key: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def stop_at(step: int):
    """A step hook that presses Ctrl-C (raises KeyboardInterrupt) after `step`."""

    def hook(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt

    return hook


def test_a_few_steps_on_digits_lower_the_loss(tmp_path):
    result = finetune(tiny(tmp_path, total_steps=25, warmup_steps=2, base_lr=0.1))
    losses = [r["train_loss"] for r in records(tmp_path, "train_loss")]
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < losses[0] - 0.2  # starts at ln(10) = 2.30 (zero head)
    assert abs(losses[0] - np.log(10)) < 1e-5
    assert result.model_path.is_file() and result.accuracy > 0.2  # chance is 0.1


def test_first_update_uses_learning_rate_zero_and_logs_applied_rates(tmp_path):
    from minivit.optim import learning_rate

    finetune(tiny(tmp_path, warmup_steps=2))
    lrs = [r["lr"] for r in records(tmp_path, "train_loss")]
    assert lrs[0] == 0.0  # optax: update k uses lr_fn(k), k from 0
    assert lrs == [learning_rate(k, 0.1, 6, 2, "cosine") for k in range(6)]


def test_resume_gives_the_same_model_bit_for_bit(tmp_path):
    straight = finetune(tiny(tmp_path / "a", accum_steps=2, total_steps=8, num_workers=2))
    halves = tiny(tmp_path / "b", accum_steps=2, total_steps=8, num_workers=2)
    first = finetune(halves, step_hook=stop_at(4))
    assert first.interrupted and first.step == 4 and first.model_path is None
    meta, _, _ = read_training_state(first.checkpoint_path)
    assert meta["step"] == 4
    second = finetune(dataclasses.replace(halves, resume=True))
    assert second.step == 8
    a, b = npz(straight.model_path), npz(second.model_path)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    _, _, momentum_a = read_training_state(straight.checkpoint_path)
    _, _, momentum_b = read_training_state(second.checkpoint_path)
    for key in momentum_a:
        np.testing.assert_array_equal(momentum_a[key], momentum_b[key], err_msg=key)
    losses = [r["train_loss"] for r in records(tmp_path / "a", "train_loss")]
    assert losses == [r["train_loss"] for r in records(tmp_path / "b", "train_loss")]


def test_checkpoint_survives_a_crash_in_the_middle_of_writing(tmp_path, monkeypatch):
    real_savez = np.savez
    calls = []

    def savez_then_crash(file, **arrays):
        calls.append(1)
        if len(calls) == 1:
            return real_savez(file, **arrays)
        file.write(b"PK\x03\x04 half a zip")  # part of the file, then the machine dies
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(np, "savez", savez_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        finetune(tiny(tmp_path, checkpoint_every=2))
    monkeypatch.undo()
    meta, params, momentum = read_training_state(tmp_path / "checkpoint.npz")
    assert meta["step"] == 2 and params and momentum
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = finetune(tiny(tmp_path, checkpoint_every=2, resume=True))
    assert resumed.step == 6
    assert [r["step"] for r in records(tmp_path, "train_loss")] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    def press_ctrl_c(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal: handled between steps

    before = signal.getsignal(signal.SIGINT)
    result = finetune(tiny(tmp_path), step_hook=press_ctrl_c)
    assert result.interrupted and result.step == 3
    meta, params, _ = read_training_state(result.checkpoint_path)
    assert meta["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert not (tmp_path / "model.npz").exists()


def test_a_workdir_in_use_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"not empty; use --resume .* or a new --workdir"):
        finetune(tiny(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(TrainingError, match="holds no checkpoint.npz"):
        finetune(tiny(tmp_path / "fresh", resume=True))


def test_nan_loss_stops_names_step_and_rate_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = Model.loss_and_grads
    calls = []

    def nan_on_third_step(self, images, labels, train=False, rng=None):
        calls.append(1)
        loss, grads = real(self, images, labels, train=train, rng=rng)
        return (float("nan") if len(calls) == 3 else loss), grads

    monkeypatch.setattr(Model, "loss_and_grads", nan_on_third_step)
    with pytest.raises(TrainingError) as error:
        finetune(tiny(tmp_path, checkpoint_every=2))
    message = str(error.value)
    from minivit.optim import learning_rate

    assert "at step 3" in message and f"learning rate {learning_rate(2, 0.1, 6, 1):.6g}" in message
    assert "kept the last good checkpoint" in message
    assert read_training_state(tmp_path / "checkpoint.npz")[0]["step"] == 2


def test_a_batch_that_does_not_split_names_the_nearest_valid_value(tmp_path):
    with pytest.raises(TrainingError, match=r"--batch 99\b"):
        finetune(tiny(tmp_path, batch=100, accum_steps=3))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any data


def _memory_limited(monkeypatch, largest: int) -> None:
    """Micro-batches above `largest` raise MemoryError; the estimate sees the matching budget."""
    real = Model.loss_and_grads

    def limited(self, images, labels, train=False, rng=None):
        if len(images) > largest:
            raise MemoryError
        return real(self, images, labels, train=train, rng=rng)

    monkeypatch.setattr(Model, "loss_and_grads", limited)
    real_bytes = train._step_bytes

    def budget(model):
        per_example, fixed = real_bytes(model, model.image_size)
        return (fixed + per_example * (largest + 0.5)) / 0.8

    monkeypatch.setattr(train, "_available_bytes", budget)


def test_out_of_memory_names_the_accum_steps_that_fit(tmp_path, monkeypatch):
    _memory_limited(monkeypatch, largest=8)
    with pytest.raises(TrainingError, match=r"out of memory at step 1 .*--accum_steps 4 should"):
        finetune(tiny(tmp_path, accum_steps=1))


def test_auto_accum_steps_picks_the_fewest_that_fit(tmp_path, monkeypatch, capsys):
    _memory_limited(monkeypatch, largest=8)
    result = finetune(tiny(tmp_path, accum_steps="auto"))
    assert result.step == 6
    assert "x 32 per worker x accum 4 = global batch 32" in capsys.readouterr().out


def test_evaluation_counts_every_example_and_the_official_subset(tmp_path):
    result = finetune(tiny(tmp_path))
    from minivit.checkpoint import load

    model = load(result.model_path)
    source = get_source("digits", "test")
    images = np.stack([eval_transform(source.get(i)[0], 16) for i in range(len(source))])
    labels = np.array([source.get(i)[1] for i in range(len(source))])
    hits = model.predict(images).argmax(axis=-1) == labels
    got = train.evaluate(model, source, 16, batch_eval=128, workers=0)
    assert got["examples"] == len(source) == 360 and got["examples_official"] == 256
    assert got["accuracy"] == hits.mean()
    assert got["accuracy_official"] == hits[:256].mean()


def test_model_and_sidecar_describe_the_run(tmp_path):
    result = finetune(tiny(tmp_path))
    sidecar = train.read_sidecar(result.model_path)
    assert sidecar["class_names"] == [str(d) for d in range(10)]
    assert sidecar["image_size"] == 16 and sidecar["step"] == 6
    assert sidecar["accuracy"] == result.accuracy == records(tmp_path, "accuracy")[-1]["accuracy"]
    assert sidecar["config"]["total_steps"] == 6
    assert "Transformer/encoder_norm/scale" in npz(result.model_path)  # official layout


def test_departures_from_the_published_recipe_are_listed():
    published = TrainConfig(dataset="cifar10", image_size=384).resolved()
    assert train.departures(published, pretrained=True) == []
    changed = dataclasses.replace(published, batch=64, base_lr=0.01)
    (line,) = train.departures(changed, pretrained=True)
    assert "batch 64 (published 512)" in line and "base_lr 0.01 (published 0.03)" in line
    assert "total_steps" not in line


def test_fine_tunes_a_checkpoint_in_the_released_layout(tmp_path, golden_tiny):
    source = golden_tiny / "vit_tiny_token" / "model.npz"
    config = TrainConfig(
        pretrained=str(source), dataset="digits", image_size=32, total_steps=4, warmup_steps=1,
        batch=16, accum_steps=2, eval_every=0, progress_every=1, num_workers=0,
        workdir=str(tmp_path),
    )  # fmt: skip
    result = finetune(config)
    first = records(tmp_path, "train_loss")[0]["train_loss"]
    assert abs(first - np.log(10)) < 1e-6  # the head starts at zero, as load_pretrained does
    sidecar = train.read_sidecar(result.model_path)
    assert sidecar["source_checkpoint"] == str(source) and sidecar["image_size"] == 32
    with np.load(source) as before, np.load(result.model_path) as after:
        assert sorted(before.files) == sorted(after.files)
        assert not np.array_equal(before["embedding/kernel"], after["embedding/kernel"])
