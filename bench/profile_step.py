"""Where a minivit training or inference step spends its time, per op kind.

Every `Function` subclass's `forward` and `backward` is wrapped with a timer (exclusive time:
a Function called inside another is charged to itself only), a training step (forward, softmax
cross-entropy, backward, SGD-momentum update) or an inference step (the forward under
`no_grad`, as `bench/step.py` times it) is run, and the time is summed per op kind: GEMM
(Dense / MatMul), conv (the patch embedding and ResNet convs), attention, norms, GELU,
softmax / cross-entropy, elementwise, reductions, copies / reshape / transpose, the optimizer,
and the rest of the step (autograd bookkeeping, gradient sums, module calls: "Python overhead").
It also replays the step's matrix products alone through `kernels.matmul` (same shapes and
transposes) to give the time BLAS needs for them, the floor the step can approach.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/profile_step.py \
        [--configs ViT-S/16:32 ViT-B/16:8 ViT-Ti/16:1:inference] [--steps 2] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common  # noqa: E402  (next to this file)

GEMM, CONV, OTHER_STEP = (
    "GEMM (Dense, MatMul, DenseGelu, HeadsProjections)",
    "conv (patch embedding, ResNet)",
    "Python overhead",
)
OPTIMIZER = "optimizer (SGDMomentum.update)"
ATTENTION = "attention"
# Op class name -> kind, checked in order by substring so fused ops land with their main cost.
KINDS = (
    ("Attention", ATTENTION),
    ("HeadsProjections", GEMM),
    ("Dense", GEMM),
    ("MatMul", GEMM),
    ("Conv", CONV),
    ("Norm", "norm (LayerNorm, GroupNorm, StdConv)"),
    ("Standardize", "norm (LayerNorm, GroupNorm, StdConv)"),
    ("Gelu", "GELU"),
    ("Softmax", "softmax / cross-entropy"),
    ("Entropy", "softmax / cross-entropy"),
    ("Pool", "pooling"),
    ("Reshape", "copies / reshape / transpose"),
    ("Transpose", "copies / reshape / transpose"),
    ("Concat", "copies / reshape / transpose"),
    ("Index", "copies / reshape / transpose"),
    ("Pad", "copies / reshape / transpose"),
    ("Broadcast", "copies / reshape / transpose"),
    ("Sum", "reductions"),
    ("Mean", "reductions"),
    ("Max", "reductions"),
)
ELEMENTWISE = {  # AddRelu: the ResNet unit's residual add and ReLU, one op
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Exp",
    "Log",
    "Tanh",
    "Relu",
    "Sqrt",
    "Dropout",
    "AddRelu",
}


PRODUCT_OPS = ("Dense", "DenseGelu", "MatMul", "HeadsProjections")


def gemm_shapes(op, arrays) -> tuple[tuple, tuple]:
    """The operand shapes of a product op's forward GEMM as the op runs it: (R, I) by (I, O) for
    the Dense family (DenseGeneral kernels flattened; the three projection kernels side by side),
    the operands' own shapes for MatMul."""
    x, kernel = arrays[0], arrays[1]
    name = type(op).__name__
    if name == "HeadsProjections":  # kernels (D, NH, K) x 3 -> one (D, 3 NH K)
        return (x.size // x.shape[-1], x.shape[-1]), (kernel.shape[0], 3 * kernel[0].size)
    if name in ("Dense", "DenseGelu"):
        inner = int(math.prod(kernel.shape[: op.in_axes]))
        return (x.size // inner, inner), (inner, kernel.size // inner)
    return x.shape, kernel.shape


def kind_of(name: str) -> str:
    """The op kind of a Function class name (`other (Name)` when no rule matches)."""
    if name in ELEMENTWISE:
        return "elementwise (residual adds, ReLU, ...)"
    return next((kind for key, kind in KINDS if key in name), f"other ({name})")


class OpTimer:
    """Exclusive wall time per (Function class, pass), the shapes of every matrix product, and
    the time and FLOPs of the `kernels.matmul` calls the product ops make (their sgemm calls,
    without the bias, GELU and gradient-sum work around them)."""

    def __init__(self):
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.products: Counter = Counter()  # (op, a shape, b shape, needs_grad) -> calls
        self.sgemm_s, self.sgemm_flops = 0.0, 0
        self._inner: list[float] = []
        self._ops: list[str] = []  # the Function classes whose passes are running, innermost last

    def wrap_matmul(self, matmul: Callable) -> Callable:
        """`kernels.matmul`, timed when a product op calls it."""

        def timed(a, b, *args, **kwargs):
            if not self._ops or self._ops[-1] not in PRODUCT_OPS:
                return matmul(a, b, *args, **kwargs)
            start = time.perf_counter()
            try:
                return matmul(a, b, *args, **kwargs)
            finally:
                self.sgemm_s += time.perf_counter() - start
                self.sgemm_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]

        return timed

    def wrap(self, method: Callable, which: str) -> Callable:
        def timed(op, xp, *arrays):
            if which == "forward" and type(op).__name__ in PRODUCT_OPS:
                recording = op.needs_grad and op._recording  # False under no_grad
                three = type(op).__name__ == "HeadsProjections"  # three kernels, three biases
                weights = op.needs_grad[1:4] if three else op.needs_grad[1:2]
                needs = (op.needs_grad[0], any(weights)) if recording else (False, False)
                a_shape, b_shape = gemm_shapes(op, arrays)
                self.products[(type(op).__name__, a_shape, b_shape, needs)] += 1
            self._inner.append(0.0)
            self._ops.append(type(op).__name__)
            start = time.perf_counter()
            try:
                return method(op, xp, *arrays)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._inner.pop()
                self._ops.pop()
                self.seconds[(type(op).__name__, which)] += elapsed - inner
                self.calls[(type(op).__name__, which)] += 1
                if self._inner:
                    self._inner[-1] += elapsed

        return timed


def _function_classes() -> list[type]:
    from minivit.autograd import Function  # noqa: PLC0415

    found, todo = [], [Function]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


@contextmanager
def timed_functions(timer: OpTimer) -> Iterator[None]:
    """Every Function subclass's own forward/backward, and `kernels.matmul` (which the ops look
    up on the module at each call), wrapped by `timer`, restored on exit."""
    import minivit.ops  # noqa: F401, PLC0415  (registers every Function subclass)
    from minivit import kernels  # noqa: PLC0415

    originals = [(kernels, "matmul", kernels.matmul)]
    kernels.matmul = timer.wrap_matmul(kernels.matmul)
    for cls in _function_classes():
        for which in ("forward", "backward"):
            if which in cls.__dict__:
                originals.append((cls, which, cls.__dict__[which]))
                setattr(cls, which, timer.wrap(cls.__dict__[which], which))
    try:
        yield
    finally:
        for cls, which, method in originals:
            setattr(cls, which, method)


def _product_calls(np, kernels, a_shape: tuple, b_shape: tuple, needs: tuple) -> list[tuple]:
    """(closure, FLOPs) of a recorded product's forward and backward GEMMs, as the ops run them.

    Shapes: a (..., M, K) with b (K, N) as one (R, K) @ (K, N) GEMM; else batched a @ b.
    """
    rng = np.random.default_rng(0)
    if len(b_shape) == 2:
        a_shape = (int(np.prod(a_shape[:-1])), a_shape[-1])  # (R, K)
    out = (*np.broadcast_shapes(a_shape[:-2], b_shape[:-2]), a_shape[-2], b_shape[-1])
    a, b, gy = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape, out))
    flops = 2 * int(np.prod(out)) * a_shape[-1]
    mm = kernels.matmul if len(b_shape) == 2 else np.matmul  # the call the ops make
    calls = [(lambda: mm(a, b), flops)]
    if needs[0]:
        calls.append((lambda: mm(gy, np.swapaxes(b, -1, -2)), flops))  # (..., M, K)
    if needs[1]:
        calls.append((lambda: mm(np.swapaxes(a, -1, -2), gy), flops))  # (..., K, N), summed later
    return calls


def replay_products(products: Counter) -> tuple[float, float]:
    """Seconds and FLOPs of one step's recorded matrix products run alone through the BLAS the
    ops call (`kernels.matmul`; NumPy's for batched products)."""
    import numpy as np  # noqa: PLC0415

    from minivit import kernels  # noqa: PLC0415

    seconds = flops = 0.0
    for (_, a_shape, b_shape, needs), count in products.items():
        for call, f in _product_calls(np, kernels, a_shape, b_shape, needs):
            call()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                call()
                runs.append(time.perf_counter() - start)
            seconds += statistics.median(runs) * count
            flops += f * count
    return seconds, flops


def _step(label: str, batch: int, mode: str):
    """A closure running one `mode` step of `label` at `batch`, split into its two phases: the
    forward (and backward) ops, then the optimizer update (none for inference)."""
    import numpy as np  # noqa: PLC0415
    import step  # noqa: PLC0415  (bench/step.py: specs and data)

    from minivit.autograd import no_grad  # noqa: PLC0415
    from minivit.models import create_model  # noqa: PLC0415
    from minivit.optim import SGDMomentum  # noqa: PLC0415

    spec = next(s for s in step.SPECS if s.label == label)
    model = create_model(spec.name, num_classes=step.CLASSES, image_size=step.IMAGE_SIZE)
    params, rng = model.params, np.random.default_rng(0)
    images, labels = step.batch_data(batch)
    if mode == "inference":

        def infer() -> tuple[float, float]:
            start = time.perf_counter()
            with no_grad():
                model.forward(images)
            return time.perf_counter() - start, 0.0

        return infer, model.config
    optimizer = SGDMomentum(params)

    def train() -> tuple[float, float]:
        start = time.perf_counter()
        _, grads = model.loss_and_grads(images, labels, train=True, rng=rng)
        middle = time.perf_counter()
        optimizer.update(params, grads, step.LR)
        return middle - start, time.perf_counter() - middle

    return train, model.config


def profile_config(label: str, batch: int, steps: int, mode: str = "train") -> dict:
    """Per-kind milliseconds of a `mode` step (mean of `steps` timed steps after a warm-up)."""
    import step  # noqa: PLC0415

    run, config = _step(label, batch, mode)
    run()  # warm-up: kernel compilation, first allocations
    plain = statistics.median(sum(run()) for _ in range(steps))
    timer, grads_s, update_s = OpTimer(), 0.0, 0.0
    with timed_functions(timer):
        for _ in range(steps):
            g, u = run()
            grads_s, update_s = grads_s + g, update_s + u
    ms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (name, which), seconds in timer.seconds.items():
        ms[kind_of(name)][which == "backward"] += 1e3 * seconds / steps
    ops_ms = sum(f + b for f, b in ms.values())
    ms[OTHER_STEP] = [1e3 * grads_s / steps - ops_ms, 0.0]
    if mode == "train":
        ms[OPTIMIZER] = [1e3 * update_s / steps, 0.0]
    products = Counter({k: v // steps for k, v in timer.products.items()})
    blas_s, gemm_flops = replay_products(products)
    return dict(
        model=label,
        batch=batch,
        mode=mode,
        kinds={k: v for k, v in sorted(ms.items(), key=lambda kv: -sum(kv[1]))},
        step_ms=1e3 * plain,
        profiled_ms=1e3 * (grads_s + update_s) / steps,
        gemm_flops=gemm_flops,
        gemm_ms=sum(ms[GEMM]),
        sgemm_ms=1e3 * timer.sgemm_s / steps,
        sgemm_flops=timer.sgemm_flops / steps,
        attention_ms=sum(ms.get(ATTENTION, (0.0, 0.0))),
        conv_ms=sum(ms.get(CONV, (0.0, 0.0))),
        blas_ms=1e3 * blas_s,
        model_flops=step.step_flops(config, mode) * batch,
    )


def bounds(result: dict, gemm_rate: float) -> dict:
    """Fractions of the GEMM rate the profiled step reaches, and would reach with every product
    at its replayed rate (the rest as profiled), or made of nothing but the replayed products
    and the attention and convolutions as profiled: how far removing overhead alone could take
    the step."""
    gflop = result["model_flops"] / 1e9
    replayed_ms = result["profiled_ms"] - result["gemm_ms"] + result["blas_ms"]
    bare_ms = result["blas_ms"] + result["attention_ms"] + result["conv_ms"]
    return {
        "of_gemm": gflop / result["profiled_ms"] * 1e3 / gemm_rate,
        "of_gemm_products_replayed": gflop / replayed_ms * 1e3 / gemm_rate,
        "of_gemm_products_attention_conv": gflop / bare_ms * 1e3 / gemm_rate,
    }


def report(result: dict, gemm_rate: float) -> list[str]:
    """The per-kind table of one configuration and the GEMM / whole-step rates under it."""
    total = result["profiled_ms"]
    rows = [
        {"kind": kind, "fwd": f, "bwd": b, "total": f + b, "share": f"{(f + b) / total:.1%}"}
        for kind, (f, b) in result["kinds"].items()
    ]
    rows.append({"kind": "whole step (profiled)", "total": total, "share": "100%"})
    columns = (
        ("kind", "op kind"),
        ("fwd", "forward ms"),
        ("bwd", "backward ms"),
        ("total", "total ms"),
        ("share", "% of step"),
    )
    gemm_in_ops = result["gemm_flops"] / result["gemm_ms"] / 1e6
    gemm_alone = result["gemm_flops"] / result["blas_ms"] / 1e6
    step_rate = result["model_flops"] / result["step_ms"] / 1e6
    img_s = 1e3 * result["batch"] / result["step_ms"]
    bound = bounds(result, gemm_rate)
    return [
        f"## {result['model']} {result['mode']} step, batch {result['batch']}",
        "",
        _common.format_table(rows, columns),
        "",
        f"unprofiled step {result['step_ms']:.0f} ms ({img_s:.2f} img/s, {step_rate:.0f} GFLOP/s"
        f" = {step_rate / gemm_rate:.0%} of the {gemm_rate:.0f} GFLOP/s GEMM rate);"
        f" profiled {total:.0f} ms",
        f"GEMM ops: {result['gemm_flops'] / 1e9:.0f} GFLOP in {result['gemm_ms']:.0f} ms "
        f"({gemm_in_ops:.0f} GFLOP/s), of which their sgemm calls {result['sgemm_ms']:.0f} ms "
        f"({result['sgemm_flops'] / result['sgemm_ms'] / 1e6:.0f} GFLOP/s) and the bias, GELU "
        f"and gradient-sum work around them {result['gemm_ms'] - result['sgemm_ms']:.0f} ms; "
        "the same products alone through kernels.matmul: "
        f"{result['blas_ms']:.0f} ms ({gemm_alone:.0f} GFLOP/s)",
        f"of the GEMM rate: profiled {bound['of_gemm']:.0%}; every product at its replayed rate "
        f"{bound['of_gemm_products_replayed']:.0%}; nothing but the replayed products, attention "
        f"and convs {bound['of_gemm_products_attention_conv']:.0%}",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["ViT-S/16:32", "ViT-B/16:8"],
        help="MODEL:BATCH[:MODE] with MODEL as in bench/step.py (ViT-S/16, R26+S/32) and MODE"
        " train (the default) or inference",
    )
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per configuration")
    parser.add_argument("--threads", type=int, default=_common.default_threads())
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per op kind, then one with the step's bounds (kind 'bounds')",
    )
    args = parser.parse_args(argv)
    _common.setup_threads(args.threads)
    importlib.import_module("minivit")  # before NumPy loads OpenBLAS: minivit/__init__.py
    import step  # noqa: PLC0415  (after the thread setup: it imports numpy lazily)

    from minivit import kernels  # noqa: PLC0415
    from minivit.kernels import _blas  # noqa: PLC0415

    gemm = step.square_gemm_rate(kernels.matmul)
    blas = "; ".join(_common.blas_report())
    print(f"{args.threads} threads; minivit GEMMs on {_blas.LIBRARY}; {blas}", file=sys.stderr)
    for pair in args.configs:
        label, _, rest = pair.partition(":")
        batch, _, mode = rest.partition(":")
        mode = mode or "train"
        if (
            label not in {s.label for s in step.SPECS}
            or not batch.isdigit()
            or mode not in ("train", "inference")
        ):
            parser.error(
                f"--configs {pair!r} must be MODEL:BATCH[:MODE] with MODEL one of "
                f"{', '.join(s.label for s in step.SPECS)} and MODE train or inference"
            )
        result = profile_config(label, int(batch), args.steps, mode)
        if not args.json:
            print("\n".join(report(result, gemm)), flush=True)
            continue
        where = {"model": label, "batch": int(batch), "mode": mode}
        for kind, (f, b) in result["kinds"].items():
            share = (f + b) / result["profiled_ms"]
            print(
                json.dumps(
                    {
                        **where,
                        "kind": kind,
                        "forward_ms": round(f, 2),
                        "backward_ms": round(b, 2),
                        "percent": round(100 * share, 1),
                    }
                ),
                flush=True,
            )
        fractions = {k: round(v, 3) for k, v in bounds(result, gemm).items()}
        names = ("step_ms", "profiled_ms", "gemm_ms", "sgemm_ms", "blas_ms")
        totals = {k: round(result[k], 1) for k in names}
        line = {**where, "kind": "bounds", "gemm_gflops": round(gemm, 1), **totals, **fractions}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
