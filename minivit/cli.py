"""The `minivit` command: finetune, evaluate, predict, inspect, convert, plot, bench.

`minivit finetune` takes one flag per `TrainConfig` field, named as in the official configs
(`--total_steps`, `--base_lr`, `--accum_steps`, ...); the official `--config.<field>=value` spelling
is accepted too. Without data flags it runs the built-in demo. Errors on bad input are printed as
one sentence (set MINIVIT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import minivit

DEMO_HINT = (
    "minivit finetune            # the built-in demo: a tiny ViT on the digits, minutes on a CPU"
)
EPILOG = f"""examples:
  {DEMO_HINT}
  minivit finetune --model B_16 --dataset cifar10 --pretrained_dir gs://vit_models/imagenet21k
  minivit evaluate --checkpoint runs/cifar10-1/model.npz --dataset cifar10
  minivit predict  --checkpoint runs/cifar10-1/model.npz cat.jpg --top 5
  minivit inspect  ViT-B_16.npz
  minivit plot     runs/cifar10-1
"""


def main(argv: list[str] | None = None) -> int:
    """Run the `minivit` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option, --help included, is bench/step.py's own
        return _run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(_official_spelling(argv))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("minivit: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        if os.environ.get("MINIVIT_DEBUG"):
            raise
        from minivit.distributed import launched_rank  # noqa: PLC0415

        if not getattr(error, "every_rank", False) or launched_rank() == 0:
            print(f"minivit {args.command}: error: {error}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that carry a one-sentence message for the user (no traceback)."""
    from minivit.train import TrainingError  # noqa: PLC0415

    errors: list[type[BaseException]] = [TrainingError, FileNotFoundError, ValueError]
    for module, name in (
        ("minivit.checkpoint", "CheckpointError"),
        ("minivit.distributed", "DistributedError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _official_spelling(argv: list[str]) -> list[str]:
    """`--config.total_steps=100` (the official spelling) -> `--total_steps=100`."""
    return ["--" + a[len("--config.") :] if a.startswith("--config.") else a for a in argv]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minivit",
        description="Fine-tune and run the official ViT, MLP-Mixer and ResNet+ViT checkpoints "
        "with NumPy (CPU) or CuPy (GPU).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"minivit {minivit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_simple(sub)
    return parser


# ---- finetune -----------------------------------------------------------------------------------


def _add_finetune(sub) -> None:
    from minivit.train import DEMO_RECIPE, config_fields  # noqa: PLC0415

    demo = ", ".join(f"{k} {v}" for k, v in DEMO_RECIPE.items())
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint (no arguments: the built-in demo)",
        description="Fine-tune with the official recipe (vit_jax/train.py). Flags carry the "
        "official config names; --config.<name>=value works too. Under mpiexec every process "
        "is a worker and --batch stays the global batch.",
        epilog=f"With no --dataset the built-in demo runs: {demo}; any flag given overrides it.",
    )
    for f, hint in config_fields():
        default = (
            DEMO_RECIPE.get(f.name, f.default) if f.name in ("model", "dataset") else f.default
        )
        shown = "" if default is None else f" (default: {default})"
        options = {"default": argparse.SUPPRESS, "help": f.metadata["help"] + shown}
        if hint is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _parser_for(hint)
            options["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]
                options["help"] += f" (one of: {', '.join(f.metadata['choices'])})"
        p.add_argument(f"--{f.name}", **options)
    p.set_defaults(run=_run_finetune)


def _parser_for(hint) -> type | object:
    """The argparse `type` for a TrainConfig type hint (`int | None` -> int, `int | str` -> ...)."""
    args = [a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
    if set(args) == {int, str}:
        return _int_or_auto
    return args[0]


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def finetune_config(given: dict):
    """The TrainConfig a `minivit finetune` command line asks for (`given`: the flags typed).

    --resume takes the recipe saved in the workdir, with the flags typed on top; without
    --dataset (and without --resume) the demo recipe is the base.
    """
    from minivit.train import CONFIG, TrainConfig, TrainingError  # noqa: PLC0415

    if given.get("resume"):
        if not given.get("workdir"):
            raise TrainingError("--resume needs --workdir, the directory of the run to continue")
        saved_path = Path(given["workdir"]) / CONFIG
        if not saved_path.is_file():
            raise TrainingError(
                f"--resume: {saved_path} does not exist; is {given['workdir']} a minivit run?"
            )
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**{k: v for k, v in saved.items() if k in names}, **given})
    if "dataset" not in given:
        return TrainConfig.demo(**given)
    return TrainConfig(**given)


def _run_finetune(args: argparse.Namespace) -> int:
    from minivit.train import TrainConfig, finetune  # noqa: PLC0415

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    config = finetune_config({k: v for k, v in vars(args).items() if k in names})
    result = finetune(config)
    if not result.main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        where = result.checkpoint_path or "no checkpoint (nothing finished yet)"
        print(
            f"Interrupted after step {result.step}; saved {where}. Continue with: "
            f"minivit finetune --workdir {result.workdir} --resume"
        )
        return 130
    print(
        f"Done: {result.step} steps, test accuracy {result.accuracy:.4f}; model in "
        f"{result.model_path} (sidecar {result.model_path.with_suffix('.json')})"
    )
    print(f"Curves: minivit plot {result.workdir}")
    print(f"Try next: minivit predict --checkpoint {result.model_path} {_example_image(result)}")
    return 0


def _example_image(result) -> str:
    """A test image written next to the model so the `predict` line works as printed."""
    from minivit.data import get_source  # noqa: PLC0415

    config = result.config
    try:
        from PIL import Image  # noqa: PLC0415  (the `images` extra)
    except ImportError:
        return "IMAGE.png"
    source = get_source(config.dataset, config.test_split, config.tfds_data_dir)
    image, label = source.get(0)
    name = source.class_names[label]
    path = result.workdir / f"example_{name}.png"
    picture = Image.fromarray(np.asarray(image))
    picture.resize((max(64, picture.width), max(64, picture.height)), Image.NEAREST).save(path)
    return str(path)


# ---- evaluate / predict -------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="test accuracy of a checkpoint on a data set")
    p.add_argument("--checkpoint", required=True, help="model .npz (minivit or official layout)")
    p.add_argument("--dataset", required=True, help="TFDS name, image folder, .npz or 'digits'")
    p.add_argument("--split", help="split to evaluate (default: the preset test split, or 'test')")
    p.add_argument("--image_size", type=int, help="default: the sidecar's, else the checkpoint's")
    p.add_argument("--batch_eval", type=int, default=512, help="evaluation batch (default: 512)")
    p.add_argument("--tfds_data_dir", help="where prepared TFDS data lives")
    p.add_argument("--devices", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--num_workers", type=int, default=2, help="data loading threads")
    p.set_defaults(run=_run_evaluate)


def load_for_inference(checkpoint: str, image_size: int | None, devices: str | None = None):
    """(model, class names or None, image size) of a checkpoint, its sidecar honoured."""
    from minivit.checkpoint import load  # noqa: PLC0415
    from minivit.classnames import imagenet_names  # noqa: PLC0415
    from minivit.fetch import fetch  # noqa: PLC0415
    from minivit.train import read_sidecar  # noqa: PLC0415

    path = fetch(checkpoint)
    sidecar = read_sidecar(path) or {}
    model = load(path) if image_size is None else load(path, image_size=image_size)
    if devices:
        model.to(devices)
    names = sidecar.get("class_names") or imagenet_names(model.num_classes)
    return model, names, model.image_size


def _run_evaluate(args: argparse.Namespace) -> int:
    from minivit.data import get_source  # noqa: PLC0415
    from minivit.train import DATASET_PRESETS, TrainingError, evaluate  # noqa: PLC0415

    model, _, size = load_for_inference(args.checkpoint, args.image_size, args.devices)
    split = args.split or DATASET_PRESETS.get(args.dataset, {}).get("test_split", "test")
    source = get_source(args.dataset, split, args.tfds_data_dir)
    if source.num_classes != model.num_classes:
        raise TrainingError(
            f"{args.checkpoint} has {model.num_classes} outputs but {args.dataset} [{split}] has "
            f"{source.num_classes} classes; evaluate it on the data set it was fine-tuned on"
        )
    r = evaluate(model, source, size, args.batch_eval, workers=args.num_workers)
    official = (
        f"{r['accuracy_official']:.4f} on the drop-remainder count {r['examples_official']}"
        if r["examples_official"]
        else f"none: fewer examples than --batch_eval {args.batch_eval}"
    )
    print(
        f"{args.dataset} [{split}] at {size}x{size}: accuracy {r['accuracy']:.4f} on all "
        f"{r['examples']} examples (official: {official}), loss {r['test_loss']:.4f}"
    )
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top classes of image files")
    p.add_argument("--checkpoint", required=True, help="model .npz (minivit or official layout)")
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)"
    )
    p.add_argument("--top", type=int, default=5, help="classes to show per image (default: 5)")
    p.add_argument("--image_size", type=int, help="default: the sidecar's, else the checkpoint's")
    p.add_argument("--devices", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(run=_run_predict)


def read_image(path: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey, palette, RGBA and CMYK converted).

    Shapes: -> (H, W, 3) uint8
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415  (the `images` extra)

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image file Pillow can read") from None


def _run_predict(args: argparse.Namespace) -> int:
    from minivit.data import eval_transform  # noqa: PLC0415

    model, names, size = load_for_inference(args.checkpoint, args.image_size, args.devices)
    batch = np.stack([eval_transform(read_image(p), size) for p in args.images])  # (B, S, S, 3)
    logits = model.predict(batch).astype(np.float64)  # (B, classes)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    top = max(1, min(args.top, model.num_classes))
    for path, row in zip(args.images, probs):
        print(path)
        for k in np.argsort(-row, kind="stable")[:top]:
            name = names[k] if names else f"class {k}"
            print(f"  {row[k]:7.2%}  {name} ({k})")
    return 0


# ---- inspect / convert / plot / bench -----------------------------------------------------------


def _add_simple(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint file holds (architecture, shapes)")
    p.add_argument("file", help="a .npz (official or minivit), https:// or gs:// URL")
    p.set_defaults(run=_run_inspect)
    p = sub.add_parser("convert", help="convert between the official and the timm/HF layout")
    p.add_argument("src", help="input file")
    p.add_argument("dst", help="output file")
    p.set_defaults(run=_run_convert)
    p = sub.add_parser("plot", help="loss, learning rate and accuracy curves of a run, as PNG")
    p.add_argument("workdir", help="the --workdir of a finetune run (or its metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: WORKDIR/metrics.png)")
    p.set_defaults(run=_run_plot)
    # Listed for `minivit --help`; `main` hands `minivit bench ...` to bench/step.py unparsed.
    sub.add_parser("bench", help="whole-step benchmark against timm and JAX (bench/step.py)")


def _run_inspect(args: argparse.Namespace) -> int:
    from minivit.checkpoint import inspect  # noqa: PLC0415

    print(inspect(args.file))
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from minivit.checkpoint import convert  # noqa: PLC0415

    convert(args.src, args.dst)
    print(f"wrote {args.dst}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from minivit.plot import plot_metrics  # noqa: PLC0415

    print(f"wrote {plot_metrics(args.workdir, args.out)}")
    return 0


def _run_bench(bench_args: list[str]) -> int:
    """`minivit bench ARGS`: bench/step.py ARGS run by this Python; its exit status."""
    script = Path(minivit.__file__).resolve().parent.parent / "bench" / "step.py"
    if not script.is_file():
        print(
            "minivit bench runs bench/step.py, which ships with the source tree, not the wheel: "
            "from a checkout, `pip install -e .[bench]` then `minivit bench` (or "
            "`python bench/step.py`)",
            file=sys.stderr,
        )
        return 1
    env = {**os.environ, "MINIVIT_BENCH_PROG": "minivit bench"}  # its usage and errors say so
    return subprocess.call([sys.executable, str(script), *bench_args], env=env)


if __name__ == "__main__":
    sys.exit(main())
