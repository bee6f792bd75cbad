"""The fine-tuning loop of `vit_jax/train.py`, on minivit's models, data, optimiser and workers.

One step is the official update: the global batch is split over the workers, each worker splits
its shard into `accum_steps` contiguous micro-batches and averages their gradients (the official
`accumulate_gradient`), the workers average their gradients (`pmean`), the global gradient is
clipped to `grad_norm_clip` and SGD with momentum 0.9 applies learning rate `lr_fn(k)` for the
k-th update (optax counts from 0, so with warmup the first update has learning rate 0).

Around it: a header with the whole recipe, a progress bar, evaluation over every test example,
`metrics.jsonl`, atomic checkpoints with everything needed to resume bit for bit, Ctrl-C that
saves, and one-sentence errors (`TrainingError`) for a workdir in use, a batch that does not split,
a NaN loss or running out of memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import minivit
from minivit import backend
from minivit.models.config import ViTConfig

CHECKPOINT = "checkpoint.npz"  # training state inside the workdir
MODEL = "model.npz"  # the fine-tuned model, official layout
METRICS = "metrics.jsonl"
CONFIG = "config.json"
STATE_FORMAT = "minivit-train-state/1"
SIDECAR_FORMAT = "minivit-model/1"
MOMENTUM = 0.9  # hard-coded in the official train.py

# `vit_jax/configs/common.py`: DATASET_PRESETS (total_steps and splits per data set).
DATASET_PRESETS = {
    "cifar10": {"total_steps": 10_000, "train_split": "train[:98%]", "test_split": "test"},
    "cifar100": {"total_steps": 10_000, "train_split": "train[:98%]", "test_split": "test"},
    "imagenet2012": {
        "total_steps": 20_000,
        "train_split": "train[:99%]",
        "test_split": "validation",
    },
}
# The published fine-tuning recipe (`get_config()` of vit_jax/configs/common.py, crop 384).
PUBLISHED = {
    "warmup_steps": 500,
    "base_lr": 0.03,
    "decay_type": "cosine",
    "batch": 512,
    "grad_norm_clip": 1.0,
    "optim_dtype": "bfloat16",
    "image_size": 384,
}

# The built-in demo: a 2-block ViT trained from scratch on the 8x8 scikit-learn digits, upsampled.
DEMO_MODEL = ViTConfig(
    name="ViT-demo", patches=(4, 4), hidden_size=64, mlp_dim=128, num_heads=4, num_layers=2
)
DEMO_RECIPE = {
    "model": "demo",
    "dataset": "digits",
    "image_size": 16,
    "augment": False,  # crops of 5% of an 8x8 digit and mirrored digits do not help
    "total_steps": 600,
    "warmup_steps": 50,
    "base_lr": 0.1,
    "batch": 128,
    "accum_steps": 1,
    "batch_eval": 120,
    "eval_every": 100,
    "progress_every": 10,
    "checkpoint_every": 200,
    # 64-wide matrices gain nothing from a second BLAS thread, and spinning BLAS threads slow
    # every step by up to 10x when the cores are shared (measured: 26 s vs 333 s on a busy box)
    "blas_threads": 1,
}


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message is one sentence that says what to do.

    `every_rank` marks errors that every worker of a data-parallel run raises identically (a
    batch that does not split); only rank 0 prints those.
    """

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def _flag(default, help: str, **metadata):
    """A TrainConfig field with its `--help` text (the CLI builds one flag per field)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Fine-tuning settings, named and defaulted as in `vit_jax/configs/common.py`.

    Fields left at None are filled by `resolved()`: from the data set preset (total_steps,
    splits), from the checkpoint's sidecar (image_size), or by the demo.
    """

    model: str | None = _flag(
        None,
        "official model name (B_16, ViT-B_16, R50+ViT-B_16, Mixer-B_16, ...); 'demo': tiny ViT",
    )
    pretrained: str | None = _flag(
        None, "checkpoint to start from: a .npz file, https:// or gs:// URL (official layout)"
    )
    pretrained_dir: str | None = _flag(
        None,
        "directory or gs:// prefix holding <model>.npz, as the official --config.pretrained_dir",
    )
    dataset: str | None = _flag(
        None, "TFDS name (cifar10, imagenet2012, ...), image folder, .npz file, or 'digits'"
    )
    train_split: str | None = _flag(None, "training split, TFDS syntax (default: the preset)")
    test_split: str | None = _flag(None, "evaluation split (default: the preset, else 'test')")
    tfds_data_dir: str | None = _flag(None, "where prepared TFDS data lives (else $TFDS_DATA_DIR)")
    tfds_manual_dir: str | None = _flag(None, "where manually downloaded TFDS archives live")
    image_size: int | None = _flag(
        None, "input resolution (default 384; a minivit-fine-tuned checkpoint's own size)"
    )
    total_steps: int | None = _flag(None, "optimiser steps (default: the data set preset)")
    warmup_steps: int = _flag(500, "linear warmup steps of the learning rate")
    base_lr: float = _flag(0.03, "peak learning rate of SGD with momentum 0.9")
    decay_type: str = _flag(
        "cosine", "learning-rate decay after warmup", choices=("cosine", "linear")
    )
    batch: int = _flag(512, "global batch size, summed over all workers")
    batch_eval: int = _flag(512, "evaluation batch size (global)")
    accum_steps: int | str = _flag(
        8, "micro-batches per step (gradient accumulation), or 'auto' for the fewest that fit"
    )
    grad_norm_clip: float = _flag(1.0, "clip the global gradient norm to this value")
    optim_dtype: str = _flag("bfloat16", "momentum buffer dtype", choices=("bfloat16", "float32"))
    shuffle_buffer: int = _flag(
        50_000, "accepted for compatibility; minivit shuffles the whole split every epoch"
    )
    augment: bool = _flag(
        True, "official training augmentation (random crop, flip); --no-augment: resize only"
    )
    seed: int = _flag(0, "seed of data order, augmentation, dropout and fresh initialisation")
    workdir: str | None = _flag(None, "output directory (default: a new runs/<dataset>-<n>)")
    eval_every: int = _flag(100, "evaluate every so many steps (0: only at the end)")
    progress_every: int = _flag(10, "write a train record to metrics.jsonl every so many steps")
    checkpoint_every: int = _flag(
        1000, "save a checkpoint every so many steps (0: only at the end)"
    )
    resume: bool = _flag(False, "continue the run in --workdir from its last checkpoint")
    devices: str | None = _flag(
        None, "cpu, cuda (one GPU per mpiexec process) or cuda:N (default: cpu)"
    )
    num_workers: int = _flag(2, "data loading threads per process")
    blas_threads: int | None = _flag(
        None, "threads of NumPy's BLAS (default: the library's own choice)"
    )
    prefetch: int = _flag(2, "batches prepared ahead of the model")

    @classmethod
    def demo(cls, **overrides) -> TrainConfig:
        """The built-in demo recipe (tiny ViT on the digits), with `overrides` on top."""
        return cls(**{**DEMO_RECIPE, **overrides})

    def resolved(self) -> TrainConfig:
        """A copy with every None default filled in; raises TrainingError for what cannot be."""
        if self.dataset is None:
            raise TrainingError(
                "no --dataset given; use TrainConfig.demo() (or `minivit finetune` without "
                "data flags) for the built-in demo"
            )
        preset = DATASET_PRESETS.get(self.dataset, {})
        fill = {
            "train_split": preset.get("train_split", "train"),
            "test_split": preset.get("test_split", "test"),
            "total_steps": preset.get("total_steps"),
        }
        values = {k: v if v is not None or k not in fill else fill[k] for k, v in self.items()}
        if values["total_steps"] is None:
            raise TrainingError(
                f"--total_steps is needed for dataset {self.dataset!r}: the official presets "
                f"only cover {', '.join(DATASET_PRESETS)}"
            )
        resolved = TrainConfig(**values)
        _validate(resolved)
        return resolved

    def items(self) -> list[tuple[str, object]]:
        """(field name, value) pairs in declaration order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


def _validate(config: TrainConfig) -> None:
    """Raise TrainingError for settings the schedule or the batch arithmetic cannot use."""
    for name in ("total_steps", "batch", "batch_eval", "image_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name} must be a positive integer, got {value}")
    accum = config.accum_steps
    if accum != "auto" and (not isinstance(accum, int) or accum < 1):
        raise TrainingError(f"--accum_steps must be a positive integer or 'auto', got {accum!r}")
    if not 0 <= config.warmup_steps < config.total_steps:
        raise TrainingError(
            f"--warmup_steps {config.warmup_steps} must be at least 0 and below --total_steps "
            f"{config.total_steps}; lower it (the published ratio is 1/20 of the steps)"
        )


def config_fields() -> list[tuple[dataclasses.Field, type]]:
    """The TrainConfig fields with their resolved type hints (for the CLI)."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


@dataclass
class TrainResult:
    """What `finetune` did."""

    workdir: Path
    step: int  # optimiser steps completed
    accuracy: float | None  # last evaluation, every test example
    model_path: Path | None  # the final model.npz (None when stopped early)
    config: TrainConfig  # as run (defaults filled in)
    interrupted: bool = False  # stopped by Ctrl-C, with a checkpoint saved
    checkpoint_path: Path | None = None
    last_eval: dict = field(default_factory=dict)
    main: bool = True  # this process is rank 0 (the one that prints)


# ---- the run ------------------------------------------------------------------------------------


def finetune(config: TrainConfig, step_hook: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune (or, for the demo, train) a model with the official recipe.

    Shapes: the global batch `config.batch` is split as workers x per-worker x micro-batches.

    `step_hook(step)` runs after every completed step (tests use it to simulate Ctrl-C).
    """
    from minivit.distributed import get_communicator  # noqa: PLC0415  (heavy, optional MPI)

    comm = get_communicator("auto", devices=config.devices)
    run = _Run(config.resolved(), comm)
    return run.train(step_hook)


def _check_batch(batch: int, world: int, accum) -> None:
    """Raise TrainingError, naming the nearest valid --batch, when the batch does not split."""
    from minivit.distributed import split_batch  # noqa: PLC0415

    try:
        split_batch(batch, world, 1 if accum == "auto" else accum)
    except ValueError as error:
        raise TrainingError(str(error), every_rank=True) from None


def _check_workdir(path: Path, resume: bool) -> None:
    """Refuse to overwrite a workdir in use, or to resume one that holds no checkpoint."""
    busy = path.is_dir() and any(path.iterdir())
    if busy and not resume:
        raise TrainingError(
            f"workdir {path} is not empty; use --resume to continue that run or a new --workdir"
        )
    if resume and not (path / CHECKPOINT).is_file():
        raise TrainingError(
            f"--resume: {path} holds no {CHECKPOINT}; start without --resume or pick the "
            "workdir of an earlier run"
        )


def _new_workdir(config: TrainConfig, comm) -> Path:
    """runs/<dataset>-<n>: the first name not taken yet on rank 0, told to every rank."""
    stem = Path(str(config.dataset)).name or "run"
    n = 1
    while comm.is_main and Path("runs", f"{stem}-{n}").exists():
        n += 1
    n = int(comm.allreduce_sum(np.array([float(n if comm.is_main else 0)]))[0])
    return Path("runs", f"{stem}-{n}")


class _Run:
    """One fine-tuning run: model, data, optimiser, communicator and the files in the workdir."""

    def __init__(self, config: TrainConfig, comm):
        self.config, self.comm = config, comm
        self.main = comm.is_main
        workdir = Path(config.workdir) if config.workdir else _new_workdir(config, comm)
        self.config = dataclasses.replace(config, workdir=str(workdir))
        self.workdir = workdir
        _check_batch(config.batch, comm.size, config.accum_steps)
        if len(comm.devices) > 1:
            raise TrainingError(
                f"--devices {config.devices}: one process driving several GPUs is not wired into "
                "the trainer; launch one process per GPU: mpiexec -n N minivit finetune "
                "--devices cuda ..."
            )
        if self._any_rank_fails(lambda: _check_workdir(workdir, config.resume)):
            _check_workdir(workdir, config.resume)
            raise TrainingError(f"workdir {workdir} is in use on rank 0; pick a new --workdir")
        self.step = 0
        self.sigint = self.stop_requested = self.updating = False
        self.last_eval: dict = {}

    def _any_rank_fails(self, check: Callable[[], None]) -> bool:
        """Run `check` on rank 0 and tell every rank whether it raised TrainingError."""
        failed = 0.0
        if self.main:
            try:
                check()
            except TrainingError:
                failed = 1.0
        return float(self.comm.allreduce_sum(np.array([failed]))[0]) > 0

    def train(self, step_hook) -> TrainResult:
        """Set up, then run steps until total_steps, Ctrl-C, or a TrainingError."""
        self._setup()
        previous = _install_sigint(self)
        try:
            with _blas_limit(self.config.blas_threads):
                return self._loop(step_hook)
        except KeyboardInterrupt:
            return self._interrupted()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._progress.close()
            self._writer.close()

    # ---- setup --------------------------------------------------------------------------------

    def _setup(self) -> None:
        from minivit.data import get_source  # noqa: PLC0415
        from minivit.optim import SGDMomentum  # noqa: PLC0415

        c = self.config
        self.train_source = get_source(c.dataset, c.train_split, c.tfds_data_dir, c.tfds_manual_dir)
        self.test_source = get_source(c.dataset, c.test_split, c.tfds_data_dir, c.tfds_manual_dir)
        self.model, self.source_checkpoint = _build_model(c, self.train_source.num_classes)
        if self.comm.devices != ["cpu"]:
            self.model.to(self.comm.devices[0])  # the GPU the communicator gave this process
        self.image_size = self.model.image_size
        self.config = c = dataclasses.replace(c, image_size=self.image_size)
        self.comm.broadcast(self.model.params, root=0)
        self.optimizer = SGDMomentum(
            self.model.params, momentum=MOMENTUM, accumulator_dtype=c.optim_dtype
        )
        if c.resume:
            self._restore()
        self.accum_steps = self._pick_accum_steps()
        if self.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._writer = _MetricsWriter(self.workdir / METRICS, enabled=self.main)
        self._print_header()
        self._progress = _Progress(c.total_steps, self.step, enabled=self.main)

    def _pick_accum_steps(self) -> int:
        """accum_steps as configured, or for 'auto' the fewest micro-batches that fit in memory."""
        per_worker = self.config.batch // self.comm.size
        if self.config.accum_steps != "auto":
            return int(self.config.accum_steps)
        accum = _fitting_accum_steps(self.model, per_worker, self.image_size)
        # every worker must use the same value: take the largest any of them needs
        counts = np.zeros(self.comm.size)
        counts[self.comm.rank] = accum
        return int(self.comm.allreduce_sum(counts).max())

    # ---- the loop -----------------------------------------------------------------------------

    def _loop(self, step_hook) -> TrainResult:
        from minivit.data import Loader  # noqa: PLC0415

        c = self.config
        kind = Loader if c.augment else _resize_only_loader()
        loader = kind(
            self.train_source, c.batch, self.image_size, train=True, seed=c.seed,
            rank=self.comm.rank, world=self.comm.size, start_step=self.step,
            workers=c.num_workers, prefetch=c.prefetch,
        )  # fmt: skip
        batches = iter(loader)
        while self.step < c.total_steps:
            images, labels = next(batches)
            self._train_step(self.step + 1, images, labels)
            self._after_step(self.step)
            if step_hook is not None:
                step_hook(self.step)
            if self.stop_requested or (self.sigint and self.comm.size == 1):
                raise KeyboardInterrupt
        return self._finish()

    def _train_step(self, step: int, images: np.ndarray, labels: np.ndarray) -> None:
        """One official update; sets self.step = step when the parameters have been updated."""
        from minivit.optim import clip_by_global_norm, learning_rate  # noqa: PLC0415

        c = self.config
        t0 = time.perf_counter()
        try:
            loss, grads = self._accumulate(step, images, labels)
        except MemoryError as error:
            raise self._out_of_memory(step) from error
        self.comm.allreduce_mean(grads)
        loss, stop = self.comm.allreduce_sum(np.array([loss, float(self.sigint)]))
        loss /= self.comm.size
        self.stop_requested = bool(stop > 0)  # every worker stops after the same step
        lr = learning_rate(step - 1, c.base_lr, c.total_steps, c.warmup_steps, c.decay_type)
        grad_norm = clip_by_global_norm(grads, c.grad_norm_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._not_finite(step, lr, loss)
        self.updating = True  # a Ctrl-C from here to the next line leaves the params half-updated
        self.optimizer.update(self.model.params, grads, lr)
        self.step, self.updating = step, False
        seconds = time.perf_counter() - t0
        self._progress.update(step, loss=loss, lr=lr, images_per_s=c.batch / seconds)
        if c.progress_every and step % c.progress_every == 0:
            record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm}
            self._writer.write({**record, "img_sec": c.batch / seconds})

    def _accumulate(self, step: int, images: np.ndarray, labels: np.ndarray):
        """Mean loss and gradients over `accum_steps` contiguous micro-batches (official order).

        Shapes: images (b, S, S, 3), labels (b,) with b = batch / workers -> grads like params
        """
        accum = self.accum_steps
        micro = len(images) // accum
        total_loss, total = 0.0, None
        for i in range(accum):
            part = slice(i * micro, (i + 1) * micro)
            rng = np.random.default_rng([self.config.seed, step, self.comm.rank, i])  # dropout
            loss, grads = self.model.loss_and_grads(images[part], labels[part], train=True, rng=rng)
            total_loss += loss
            if total is None:
                total = grads if accum == 1 else {k: g.copy() for k, g in grads.items()}
            else:
                for k, g in grads.items():
                    total[k] += g
        if accum > 1:
            for g in total.values():
                g /= accum
        return total_loss / accum, total

    def _after_step(self, step: int) -> None:
        """Evaluate and checkpoint when due."""
        c = self.config
        if step == c.total_steps:
            return  # _finish evaluates and saves
        if c.eval_every and step % c.eval_every == 0:
            self._evaluate()
        if c.checkpoint_every and step % c.checkpoint_every == 0:
            self._save_checkpoint()

    def _evaluate(self) -> dict:
        from minivit.optim import learning_rate  # noqa: PLC0415

        c = self.config
        t0 = time.perf_counter()
        result = evaluate(
            self.model, self.test_source, self.image_size, c.batch_eval, self.comm, c.num_workers
        )
        lr = learning_rate(self.step, c.base_lr, c.total_steps, c.warmup_steps, c.decay_type)
        result.update(step=self.step, lr=lr, seconds=round(time.perf_counter() - t0, 3))
        self.last_eval = result
        self._writer.write(result)
        official = (
            f"{result['accuracy_official']:.4f} on the official drop-remainder count "
            f"{result['examples_official']}"
            if result["examples_official"]
            else f"none in the official count: fewer than --batch_eval {c.batch_eval}"
        )
        self._progress.write(
            f"step {self.step}: test accuracy {result['accuracy']:.4f} on all "
            f"{result['examples']} examples ({official}), test loss {result['test_loss']:.4f}"
        )
        return result

    def _finish(self) -> TrainResult:
        """Final evaluation, checkpoint, model.npz and its sidecar."""
        if self.last_eval.get("step") != self.step:
            self._evaluate()
        self._save_checkpoint()
        model_path = self.workdir / MODEL
        if self.main:
            self.model.save(model_path)
            write_sidecar(model_path, self._sidecar())
        self.comm.barrier()
        return TrainResult(
            self.workdir, self.step, self.last_eval.get("accuracy"), model_path, self.config,
            checkpoint_path=self.workdir / CHECKPOINT, last_eval=self.last_eval, main=self.main,
        )  # fmt: skip

    def _sidecar(self) -> dict:
        return {
            "format": SIDECAR_FORMAT,
            "class_names": list(self.train_source.class_names),
            "image_size": self.image_size,
            "preprocessing": {
                "resize": "bilinear, whole image (tf.image.resize, no antialiasing)",
                "normalize": "(x - 127.5) / 127.5",
            },
            "source_checkpoint": self.source_checkpoint,
            "model": _model_name(self.model),
            "accuracy": self.last_eval.get("accuracy"),
            "accuracy_official": self.last_eval.get("accuracy_official"),
            "step": self.step,
            "config": dict(self.config.items()),
            "minivit": minivit.__version__,
        }

    # ---- stopping -----------------------------------------------------------------------------

    def _interrupted(self) -> TrainResult:
        """Ctrl-C: save the state after the last completed step and report where it is."""
        path = self.workdir / CHECKPOINT
        if self.step > 0 and not self.updating:
            self._save_checkpoint()
        return TrainResult(
            self.workdir, self.step, self.last_eval.get("accuracy"), None, self.config,
            interrupted=True, checkpoint_path=path if path.is_file() else None,
            last_eval=self.last_eval, main=self.main,
        )  # fmt: skip

    def _not_finite(self, step: int, lr: float, loss: float) -> TrainingError:
        kept = self.workdir / CHECKPOINT
        where = (
            f"kept the last good checkpoint {kept}" if kept.is_file() else "no checkpoint was saved"
        )
        return TrainingError(
            f"the loss is {loss} at step {step} (learning rate {lr:.6g}); stopped and {where}; "
            "lower --base_lr or raise --warmup_steps"
        )

    def _out_of_memory(self, step: int) -> TrainingError:
        per_worker = self.config.batch // self.comm.size
        fits = _fitting_accum_steps(self.model, per_worker, self.image_size)
        return TrainingError(
            f"out of memory at step {step} with accum_steps {self.accum_steps} (micro-batch "
            f"{per_worker // self.accum_steps} per worker); --accum_steps {fits} should fit "
            f"(micro-batch {per_worker // fits}), or use --accum_steps auto"
        )

    # ---- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """Write params, optimiser state, step, RNG and data position atomically (rank 0)."""
        if self.main:
            meta = {
                "format": STATE_FORMAT,
                "step": self.step,
                "data_position": self.step * self.config.batch,  # examples consumed (global)
                "rng": f"numpy default_rng([seed={self.config.seed}, step, rank, micro-batch])",
                "config": dict(self.config.items()),
                "last_eval": self.last_eval,
            }
            arrays = {f"params/{k}": backend.to_host(v) for k, v in self.model.params.items()}
            arrays.update({f"optim/{k}": v for k, v in self.optimizer.state_dict().items()})
            arrays["meta"] = np.array(json.dumps(meta))
            write_npz_atomic(self.workdir / CHECKPOINT, arrays)
            _write_json_atomic(self.workdir / CONFIG, dict(self.config.items()))
        self.comm.barrier()

    def _restore(self) -> None:
        """Load the checkpoint on rank 0 and broadcast it (params, optimiser state, step)."""
        state = {"step": np.zeros(1)}
        if self.main:
            meta, params, optim = read_training_state(self.workdir / CHECKPOINT)
            _check_same_recipe(self.config, meta["config"], self.workdir)
            self.model.load_params(params)
            self.optimizer.load_state_dict(optim)
            state["step"][0] = meta["step"]
            self.last_eval = meta.get("last_eval", {})
            _drop_records_after(self.workdir / METRICS, meta["step"])
        self.comm.broadcast(self.model.params, root=0)
        optim_state = self.optimizer.state_dict()  # float32 on the host
        self.comm.broadcast(optim_state, root=0)
        self.optimizer.load_state_dict(optim_state)
        self.comm.broadcast(state, root=0)
        self.step = int(state["step"][0])

    # ---- output -------------------------------------------------------------------------------

    def _print_header(self) -> None:
        if not self.main:
            return
        for line in header_lines(self):
            print(line, flush=True)


# Fields that must match between a checkpoint and the run that resumes it.
RECIPE_FIELDS = (
    "model", "dataset", "train_split", "image_size", "total_steps", "warmup_steps", "base_lr",
    "decay_type", "batch", "grad_norm_clip", "optim_dtype", "seed",
)  # fmt: skip


def _check_same_recipe(config: TrainConfig, saved: dict, workdir: Path) -> None:
    for name in RECIPE_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise TrainingError(
                f"--resume: --{name} {getattr(config, name)} differs from the run in {workdir} "
                f"({name} {saved[name]}); drop the flag to continue that run or use a new --workdir"
            )


def header_lines(run: _Run) -> list[str]:
    """The recipe, the worker layout, and warnings where the run departs from the published one."""
    c, comm = run.config, run.comm
    per_worker = c.batch // comm.size
    n_params = sum(int(np.prod(v.shape)) for v in run.model.params.values())
    start = run.source_checkpoint or "fresh initialisation (no --pretrained)"
    lines = [
        f"minivit {minivit.__version__} fine-tuning, workdir {run.workdir}",
        f"  model       {_model_name(run.model)}, {n_params:,} parameters, from {start}",
        f"  data        {c.dataset}: {c.train_split} {len(run.train_source):,} images, "
        f"{c.test_split} {len(run.test_source):,} images, {run.train_source.num_classes} classes, "
        f"{run.image_size}x{run.image_size}",
        f"  batch       {comm.size} worker{'s' if comm.size > 1 else ''} x {per_worker} per worker "
        f"x accum {run.accum_steps} = global batch {c.batch} (micro-batch "
        f"{per_worker // run.accum_steps})",
        f"  compute     {_compute(comm, c.blas_threads)}",
        f"  schedule    {c.total_steps:,} steps, warmup {c.warmup_steps}, {c.decay_type} decay "
        f"from base_lr {c.base_lr}, grad_norm_clip {c.grad_norm_clip}, SGD momentum {MOMENTUM} "
        f"({c.optim_dtype} buffer)",
        f"  evaluation  {_every(c.eval_every, c.total_steps)} on all "
        f"{len(run.test_source):,} test examples (official drop-remainder count "
        f"{len(run.test_source) // c.batch_eval * c.batch_eval:,})",
        f"  checkpoints {_every(c.checkpoint_every, c.total_steps)} to "
        f"{run.workdir / CHECKPOINT}; recipe in {run.workdir / CONFIG}",
    ]
    if c.resume:
        lines.append(f"  resuming    at step {run.step} of {c.total_steps}")
    lines += departures(c, pretrained=run.source_checkpoint is not None)
    if not minivit.BLAS_THREADS_SLEEP and _products_on_numpy_threads():
        lines.append(
            "note: NumPy was imported before minivit, so OpenBLAS threads spin between calls and "
            "steps run ~10% slower; import minivit first or set "
            f"OPENBLAS_THREAD_TIMEOUT={minivit.BLAS_THREAD_TIMEOUT}"
        )
    lines.append(
        "note: the first step includes compiling minivit's kernels (numba), so it is slower "
        "than the rest"
    )
    return lines


def _products_on_numpy_threads() -> bool:
    from minivit.kernels import _blas  # noqa: PLC0415  (loads Numba: only once training starts)

    return _blas.products_on_numpy_threads()


def _compute(comm, blas_threads: int | None) -> str:
    """Where the steps run: the device, and on the CPU the threads and the BLAS of the GEMMs."""
    if comm.devices != ["cpu"]:
        return f"{comm.devices[0]} (CuPy)"
    from minivit.kernels import _blas  # noqa: PLC0415  (loads Numba: only once training starts)

    blas = f"{blas_threads} BLAS thread{'s' if blas_threads != 1 else ''}" if blas_threads else ""
    threads = f"{backend.num_threads()} kernel threads" + (f", {blas}" if blas else "")
    return f"cpu, {threads}, matrix products: {_blas.products_description()}"


def _every(period: int, total: int) -> str:
    return f"every {period} steps and at the end" if 0 < period < total else "at the end"


def departures(config: TrainConfig, pretrained: bool) -> list[str]:
    """One warning line listing where `config` differs from the published recipe."""
    published = dict(PUBLISHED)
    preset = DATASET_PRESETS.get(config.dataset or "")
    if preset:
        published["total_steps"] = preset["total_steps"]
    diffs = [
        f"{k} {getattr(config, k)} (published {v})"
        for k, v in published.items()
        if getattr(config, k) != v
    ]
    if not config.augment:
        diffs.append("no augmentation (--no-augment)")
    if not pretrained:
        diffs.append("no pre-trained checkpoint (the published recipe fine-tunes one)")
    if config.shuffle_buffer != 50_000:
        diffs.append("shuffle_buffer has no effect (minivit shuffles the whole split)")
    if not diffs:
        return []
    who = "the demo" if config.model == "demo" else "this run"
    return [f"warning: {who} departs from the published recipe: " + "; ".join(diffs)]


# ---- model --------------------------------------------------------------------------------------


def _pretrained_path(config: TrainConfig) -> str | None:
    """--pretrained, else <pretrained_dir>/<official name>.npz, else None (fresh model)."""
    if config.pretrained:
        return config.pretrained
    if not config.pretrained_dir:
        return None
    if not config.model or config.model == "demo":
        raise TrainingError("--pretrained_dir needs --model to name the file <model>.npz")
    from minivit.models.registry import resolve  # noqa: PLC0415

    model_config, _ = resolve(config.model)
    return f"{config.pretrained_dir.rstrip('/')}/{model_config.name}.npz"


def _build_model(config: TrainConfig, num_classes: int):
    """The model to train and the checkpoint it starts from (None for a fresh initialisation)."""
    from minivit.checkpoint import load  # noqa: PLC0415
    from minivit.models import build_model, create_model  # noqa: PLC0415

    path = _pretrained_path(config)
    named = config.model not in (None, "demo")
    if path is not None:
        from minivit.fetch import fetch  # noqa: PLC0415

        local = fetch(path)
        size = config.image_size or (read_sidecar(local) or {}).get("image_size") or 384
        model = load(local, num_classes, size, model=config.model if named else None)
    elif named:
        model = create_model(config.model, num_classes, config.image_size or 384, seed=config.seed)
    elif config.model is None:
        raise TrainingError(
            "no model to fine-tune: give --pretrained FILE, or --model NAME with --pretrained_dir "
            "(e.g. --model B_16 --pretrained_dir gs://vit_models/imagenet21k), or --model demo"
        )
    else:
        model = build_model(DEMO_MODEL, num_classes, config.image_size or 16)
        model.initialize(config.seed)
    return model, path


def _model_name(model) -> str:
    return getattr(model.config, "name", type(model).__name__)


# ---- memory -------------------------------------------------------------------------------------


def _fitting_accum_steps(model, per_worker: int, image_size: int) -> int:
    """The fewest micro-batches per step whose activations fit in the memory available now.

    Measures the bytes one training micro-batch of 1 and of 2 examples allocates (the difference
    is the cost per example), then picks the smallest divisor of `per_worker` that leaves 20% free.
    """
    per_example, fixed = _step_bytes(model, image_size)
    budget = 0.8 * _available_bytes(model)
    for accum in range(1, per_worker + 1):
        if per_worker % accum == 0 and fixed + per_example * (per_worker // accum) <= budget:
            return accum
    return per_worker


def _step_bytes(model, image_size: int) -> tuple[float, float]:
    """(bytes per example, fixed bytes) of one forward/backward, from two small trial runs."""
    peaks = []
    for micro in (1, 2):
        images = np.zeros((micro, image_size, image_size, 3), np.float32)
        labels = np.zeros(micro, np.int32)
        with _peak_bytes(model) as peak:
            model.loss_and_grads(images, labels, train=True, rng=np.random.default_rng(0))
        peaks.append(peak())
    per_example = max(peaks[1] - peaks[0], 1.0)
    return per_example, max(peaks[0] - per_example, 0.0)


class _peak_bytes:  # noqa: N801  (used as a context manager, reads like a function)
    """Peak bytes allocated inside the block: tracemalloc on the CPU, the CuPy pool on a GPU."""

    def __init__(self, model):
        self.gpu = str(getattr(model, "device", "cpu")) != "cpu"
        self.value = 0.0

    def __enter__(self):
        if self.gpu:
            pool = backend.Device.parse("cuda").xp.get_default_memory_pool()
            pool.free_all_blocks()
            self.start = pool.total_bytes()
        else:
            import tracemalloc  # noqa: PLC0415

            tracemalloc.start()
        return lambda: self.value

    def __exit__(self, *exc):
        if self.gpu:
            pool = backend.Device.parse("cuda").xp.get_default_memory_pool()
            self.value = float(pool.total_bytes() - self.start)
        else:
            import tracemalloc  # noqa: PLC0415

            self.value = float(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        return False


def _available_bytes(model) -> float:
    """Free memory where the model lives: GPU free + pool free, else MemAvailable of the host."""
    if str(getattr(model, "device", "cpu")) != "cpu":
        cp = backend.Device.parse("cuda").xp
        return float(cp.cuda.runtime.memGetInfo()[0] + cp.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ---- evaluation ---------------------------------------------------------------------------------


def evaluate(model, source, image_size: int, batch_eval: int = 512, comm=None, workers: int = 2):
    """Top-1 accuracy over every example of `source`, and over the official drop-remainder subset.

    Shapes: batches (b, S, S, 3) -> logits (b, classes); the counts are summed over workers.

    The official evaluation drops the last partial batch of `batch_eval` (the first
    `len // batch_eval` global batches count); `accuracy_official` reproduces that number.
    """
    from minivit.data import Loader  # noqa: PLC0415

    rank, world = (comm.rank, comm.size) if comm is not None else (0, 1)
    loader = Loader(
        source, batch_eval, image_size, train=False, rank=rank, world=world, workers=workers
    )
    full_batches = len(source) // batch_eval
    sums = np.zeros(5)  # correct, count, correct in full batches, count in full batches, loss sum
    for index, (images, labels) in enumerate(loader):
        if len(labels) == 0:
            continue  # this worker's slice of the last, short batch is empty
        logits = backend.to_host(model.predict(images)).astype(np.float64)  # (b, classes)
        hits = logits.argmax(axis=-1) == labels
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        losses = log_norm - shifted[np.arange(len(labels)), labels]  # (b,)
        full = index < full_batches
        sums += [hits.sum(), len(hits), hits.sum() * full, len(hits) * full, losses.sum()]
    if comm is not None:
        sums = comm.allreduce_sum(sums)
    correct, count, correct_full, count_full, loss_sum = sums
    return {
        "accuracy": correct / max(count, 1),
        "accuracy_official": correct_full / count_full if count_full else float("nan"),
        "examples": int(count),
        "examples_official": int(count_full),
        "test_loss": loss_sum / max(count, 1),
    }


# ---- files --------------------------------------------------------------------------------------


def write_npz_atomic(path: Path, arrays: dict) -> None:
    """Write `arrays` to `path` so that a crash leaves the old file intact: temp file + replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_records_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint being resumed: those steps run again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_training_state(path: Path) -> tuple[dict, dict, dict]:
    """(meta, params, optimiser state) of a checkpoint written by the trainer."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta", '""')) or "{}")
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a minivit training checkpoint ({STATE_FORMAT})")
    parts: dict[str, dict] = {"params": {}, "optim": {}}
    for key, value in arrays.items():
        group, name = key.split("/", 1)
        parts[group][name] = value
    return meta, parts["params"], parts["optim"]


def sidecar_path(model_path: str | Path) -> Path:
    """model.npz -> model.json: the small file that says how a fine-tuned model was made."""
    return Path(model_path).with_suffix(".json")


def read_sidecar(model_path: str | Path) -> dict | None:
    """The sidecar of a minivit-written model, or None for a released checkpoint."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if data.get("format") == SIDECAR_FORMAT else None


def write_sidecar(model_path: str | Path, sidecar: dict) -> None:
    _write_json_atomic(sidecar_path(model_path), sidecar)


class _MetricsWriter:
    """Append records to metrics.jsonl (and TensorBoard events when tensorboardX is installed)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.board = path, enabled, None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional)
            except ImportError:
                return
            self.board = SummaryWriter(str(path.parent))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class _Progress:
    """A progress bar on stderr with loss, learning rate, images/s and ETA (tqdm if installed)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.start, self.first = time.perf_counter(), initial
        if not enabled:
            return
        try:
            from tqdm import tqdm  # noqa: PLC0415  (optional)
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, leave=True)

    def update(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        stats = f"loss {loss:.4f} lr {lr:.4g} {images_per_s:,.0f} img/s"
        if self.bar is not None:
            self.bar.set_postfix_str(stats, refresh=False)
            self.bar.update(1)
            return
        done = step - self.first
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        sys.stderr.write(f"\rstep {step}/{self.total} {stats} ETA {eta:,.0f}s ")
        sys.stderr.flush()

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            sys.stderr.write("\r")
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _resize_only_loader():
    """A training Loader whose examples are only resized (same order, shards and resume)."""
    from minivit.data import Loader, eval_transform  # noqa: PLC0415

    class ResizeOnlyLoader(Loader):
        def make_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
            """Shapes: -> images (b, S, S, 3) float32, labels (b,) int32"""
            indices, _ = self.indices(step)
            examples = [self.source.get(int(i)) for i in indices]
            images = [eval_transform(image, self.image_size) for image, _ in examples]
            labels = np.array([label for _, label in examples], np.int32)
            return np.stack(images), labels  # (b, S, S, 3), (b,)

    return ResizeOnlyLoader


def _blas_limit(threads: int | None):
    """Limit NumPy's BLAS to `threads` inside the block (None: change nothing). The kernels' own
    single-threaded copy of OpenBLAS, where there is one, keeps its one thread."""
    import contextlib  # noqa: PLC0415

    if threads is None:
        return contextlib.nullcontext()
    from minivit.kernels import _blas  # noqa: PLC0415

    return _blas.limit_numpy_blas(threads) or contextlib.nullcontext()


def _install_sigint(run: _Run):
    """First Ctrl-C: finish the current step, save, stop. Second: stop at once."""
    import threading  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if run.sigint:
            raise KeyboardInterrupt
        run.sigint = True

    return signal.signal(signal.SIGINT, handler)
