"""Whole-step benchmark: minivit against timm (PyTorch) and JAX/Flax on the same CPU threads.

For ViT-Ti/16, ViT-S/16, ViT-B/16, Mixer-B/16 and R26+S/32 at 224 px it measures inference
images/s at batch 1 and 32 and training-step images/s at batch 32 (and 8 for ViT-B/16): forward,
softmax cross-entropy, backward and an SGD-momentum update. Every (framework, model, mode, batch)
runs alone in a process of its own, forked from a zygote that has imported its framework once
(`_zygote.py`; `--fresh`: a fresh interpreter each), so its peak resident memory (VmHWM, read
when the timed steps end) is its own. Warm-up steps are not timed (JAX's compile time is
reported apart); the figure is the median of the timed steps. Before the table, one minivit
child per model runs untimed steps (`warm_minivit`: inference at batch 1 where the table has
such a row, each mode at batch 4), so that Numba compiles minivit's kernels into its on-disk
cache there (30-40 s on a fresh checkout, about 9 s when the cache is warm) and no measured
child carries the compiler in its time or its peak memory. Batch-1 inference rows run `--rounds`
processes per framework (default 2), the frameworks taking turns, and report the process of
median img/s (of two: the faster): this guest slows whole processes at a time, not single steps.
`--device cuda` runs the same table on the first GPU: minivit on CuPy, timm on torch CUDA, JAX on
its GPU backend, fp32 without TF32, each step waited for, the MB columns the GPU memory each
framework's allocator held, the GEMM probes 8192^3 products on the GPU.
The header gives the thread settings, the BLAS kernel NumPy uses and the fp32 GEMM rate of a large
NumPy sgemm; each minivit child measures the rate of the GEMM minivit's ops call (`kernels.matmul`:
MKL where it is bound, else OpenBLAS in one block per Numba thread), and `% GEMM` is the model's
arithmetic rate (matmul and conv FLOPs counted from the config, training = 3x forward) over it.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/step.py [--json] [--quick]
        [--models ViT-S/16 Mixer-B/16] [--frameworks minivit torch jax] [--threads N] [--fresh]
        [--rounds 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import _common  # noqa: E402  (next to this file)
import _zygote  # noqa: E402


@dataclass(frozen=True)
class Spec:
    """One benchmarked network: its table label, minivit registry name and timm name."""

    label: str
    name: str
    timm: str


SPECS = (
    Spec("ViT-Ti/16", "ViT-Ti_16", "vit_tiny_patch16_224"),
    Spec("ViT-S/16", "ViT-S_16", "vit_small_patch16_224"),
    Spec("ViT-B/16", "ViT-B_16", "vit_base_patch16_224"),
    Spec("Mixer-B/16", "Mixer-B_16", "mixer_b16_224"),
    Spec("R26+S/32", "R26+ViT-S_32", "vit_small_r26_s32_224"),
)
CONFIGS = (("inference", 1), ("inference", 32), ("train", 32))
EXTRA_CONFIGS = {"ViT-B/16": (("train", 8),)}
QUICK = {"ViT-Ti/16": CONFIGS, "ViT-S/16": (("inference", 32), ("train", 32))}
FRAMEWORKS = ("minivit", "torch", "jax")
IMAGE_SIZE, CLASSES, LR = 224, 1000, 1e-3
GEMM_SIZE = 2048
GPU_GEMM_SIZE = 8192  # the GPU probe: 1.1 TFLOP a product, milliseconds on a data-centre GPU
DEVICES = ("cpu", "cuda")
CHILD_TIMEOUT_S = 420
PROG_ENV = "MINIVIT_BENCH_PROG"  # set by `minivit bench`: the program name its messages use
RECHECK_ABOVE, RECHECKS = 0.85, 2  # `anchor_rate`: when to probe the GEMM rate again, how often
LONG_STEP = 1.0  # a first timed step longer than the budget is the only one (`time_steps`)
SETTLE_STEPS = 2  # `time_steps`: extra warm-up steps, at most, while the last one compiled code
WARM_BATCH = 4  # the batch of the kernel-compiling pass (`warm_plan`) for rows of a larger one
JSON_KEYS = (
    "model",
    "mode",
    "batch",
    "minivit_img_s",
    "torch_img_s",
    "jax_img_s",
    "minivit_rss_mb",
    "torch_rss_mb",
    "gflops_per_s",
)


# ---- arithmetic per image, from the config ------------------------------------------------------
def _conv(side: int, size: int, cin: int, cout: int) -> int:
    """FLOPs (2 per multiply-add) of a conv with a side x side output."""
    return 2 * side * side * size * size * cin * cout


def resnet_flops(resnet, side: int) -> tuple[int, int, int]:
    """Forward FLOPs of a BiT ResNetV2 body (root + stages), and the side and channels it outputs.

    Shapes: (S, S, 3) image -> (side, side, channels) map; TF 'SAME' strides round up.
    """
    width = int(64 * resnet.width_factor)
    side = math.ceil(side / 2)
    flops = _conv(side, 7, 3, width)  # conv_root, stride 2
    side, cin = math.ceil(side / 2), width  # max pool, stride 2
    for i, units in enumerate(resnet.num_layers):
        features = width * 2**i
        for j in range(units):
            out = math.ceil(side / 2) if i > 0 and j == 0 else side
            flops += _conv(side, 1, cin, features) + _conv(out, 3, features, features)
            flops += _conv(out, 1, features, 4 * features)
            if cin != 4 * features or out != side:
                flops += _conv(out, 1, cin, 4 * features)  # conv_proj
            side, cin = out, 4 * features
    return flops, side, cin


def forward_flops(config, image_size: int = IMAGE_SIZE, classes: int = CLASSES) -> int:
    """Matmul and conv FLOPs of one image's forward pass (elementwise work not counted).

    Shapes: one (S, S, 3) image -> logits (classes,)
    """
    side, cin, flops = image_size, 3, 0
    if getattr(config, "resnet", None) is not None:
        flops, side, cin = resnet_flops(config.resnet, image_size)
    patch = config.patches[0]
    grid = side // patch
    if config.family == "mixer":
        s, c = grid * grid, config.hidden_dim
        flops += _conv(grid, patch, cin, c)
        per_block = 4 * c * s * config.tokens_mlp_dim + 4 * s * c * config.channels_mlp_dim
        return flops + config.num_blocks * per_block + 2 * c * classes
    n, d = grid * grid + (config.classifier == "token"), config.hidden_size
    flops += _conv(grid, patch, cin, d)
    per_block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * config.mlp_dim  # qkv+out, qk+av, mlp
    head_in = config.representation_size or d
    pre_logits = 2 * d * head_in if config.representation_size else 0
    return flops + config.num_layers * per_block + pre_logits + 2 * head_in * classes


def step_flops(config, mode: str) -> int:
    """FLOPs per image of one step: forward, or forward + backward (3x forward) for training."""
    return forward_flops(config) * (3 if mode == "train" else 1)


# ---- timing inside a child ----------------------------------------------------------------------
class Phases:
    """Wall seconds of a child's phases: `mark(name)` charges the time since the previous mark
    (or since it was made) to `name`. The table's footer sums them over children."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def time_steps(
    step: Callable[[], object],
    warmup: int,
    budget_s: float,
    min_iters: int,
    max_iters: int,
    phases: Phases | None = None,
    compiled: Callable[[], int] | None = None,
) -> tuple[float, int]:
    """Median seconds of `step()` over as many runs as fit `budget_s`, after `warmup` runs.

    Returns (median seconds, number of timed runs): timed runs go on until they add up to the
    budget and number at least `min_iters`, at most `max_iters`; a first timed run longer than
    `LONG_STEP` budgets is the only one (a ViT-B/16 or Mixer-B/16 training step at batch 32 in
    timm or JAX runs 20-35 s on 2 cores, so its single run already averages over seconds; a
    second one would add about 3 minutes to the table). The count goes by the timed runs, not
    the warm-up: a process's first step pays its page faults and first allocations (a ViT-Ti/16
    training step at batch 32: 2.0 s, then 0.9-1.0 s), which would otherwise cut the count.

    `compiled`: how many functions the process has compiled so far (`CompileWatch.count`).
    While the last warm-up step compiled any, up to `SETTLE_STEPS` more run untimed: the step
    after one that compiled is slow too (R26+S/32 training at batch 32, compiling in-process:
    35 s, then 2.55 s with 0.22 s in the kernel, then 2.30-2.33 s; from a warm cache 2.35 s
    from the second step on), and a step that long is timed once.
    """
    phases = phases or Phases()
    phases.mark("setup")  # model, data, compile: everything before the first step
    before = compiled() if compiled else 0  # the count before the latest warm-up step
    for n in range(warmup + (SETTLE_STEPS if compiled else 0)):
        if n >= warmup and compiled() == before:
            break  # the latest warm-up step compiled nothing
        before = compiled() if compiled else 0
        step()
    phases.mark("warm-up")
    times: list[float] = []
    while len(times) < max_iters:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if times[0] > LONG_STEP * budget_s or (len(times) >= min_iters and sum(times) >= budget_s):
            break
    phases.mark("timed")
    return statistics.median(times), len(times)


class CompileWatch:
    """The compiles Numba starts in this process from now on (cache misses: a function its
    on-disk cache holds loads without compiling; a compile that fails counts too), and their
    wall seconds (not the writing of the cache file, which follows); a function compiled while
    another compiles counts once, inside the outer one. A context manager: listening stops on
    leaving it."""

    def __init__(self):
        from numba.core import event  # noqa: PLC0415  (the minivit child's, not the parent's)

        watch = self

        class Listener(event.Listener):
            def on_start(self, ev):
                if watch._depth == 0:
                    watch._started = time.perf_counter()
                watch._depth += 1

            def on_end(self, ev):
                watch._depth -= 1
                if watch._depth == 0:
                    watch.count += 1
                    watch.seconds += time.perf_counter() - watch._started

        self.count, self.seconds, self._depth, self._started = 0, 0.0, 0, 0.0
        self._listener, self._event = Listener(), event
        event.register("numba:compile", self._listener)

    def close(self) -> None:
        self._event.unregister("numba:compile", self._listener)

    def __enter__(self) -> CompileWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gemm_rate(matmul: Callable[[], object], n: int = GEMM_SIZE, repeats: int = 7) -> float:
    """GFLOP/s of the fastest of `repeats` n x n x n fp32 products (`matmul()` runs one,
    synchronised). The fastest, not the median: this is the anchor the steps are measured
    against, and on this guest the median of 5 read 221-365 GFLOP/s in children a minute apart
    (a burst of another tenant's load lowers a probe of a quarter second, never raises it)."""
    matmul()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def square_gemm_rate(matmul: Callable | None = None, n: int = GEMM_SIZE) -> float:
    """fp32 rate of an n x n x n product in this process, GFLOP/s: `matmul(a, b)`, by default
    NumPy's."""
    import numpy as np  # noqa: PLC0415  (after the thread setup)

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    product = np.matmul if matmul is None else matmul
    return gemm_rate(lambda: product(a, b), n)


def device_gemm_rate(xp, matmul: Callable, sync: Callable[[], object]) -> float:
    """fp32 rate of a GPU_GEMM_SIZE^3 product of `xp` (CuPy) arrays through `matmul`, each run
    waited for with `sync()`, GFLOP/s."""
    n = GPU_GEMM_SIZE
    a, b = (xp.random.standard_normal((n, n), dtype=xp.float32) for _ in range(2))
    return gemm_rate(lambda: (matmul(a, b), sync()), n)


def ensure_gpu(framework: str) -> None:
    """Raise a one-sentence RuntimeError unless `framework` sees a GPU (importing it to ask)."""
    if framework == "minivit":
        from minivit import backend  # noqa: PLC0415

        backend.Device.parse("cuda").xp.cuda.runtime.getDeviceCount()  # names what is missing
    elif framework == "torch":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU; install a CUDA build of torch")
    else:
        import jax  # noqa: PLC0415

        if jax.default_backend() != "gpu":
            raise RuntimeError(
                f"JAX runs on {jax.default_backend()}, not a GPU; install jax[cuda13] (or cuda12)"
            )


def batch_data(batch: int):
    """Fixed random NHWC images in [-1, 1] and integer labels. Shapes: (B, S, S, 3), (B,)."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return images, rng.integers(0, CLASSES, batch).astype(np.int32)


def _timing_plan(mode: str, batch: int, budget_s: float) -> dict:
    """Warm-up and timed-run counts: more runs for the cheap batch-1 inference."""
    if mode == "inference" and batch == 1:
        return dict(warmup=3, budget_s=budget_s, min_iters=5, max_iters=30)
    return dict(warmup=1, budget_s=budget_s, min_iters=2, max_iters=10)


# ---- the three frameworks (each runs in its own child process) -----------------------------------
def _minivit_step(model, mode: str, images, labels, sync: Callable[[], object]):
    """One minivit step as a function: Model.forward under no_grad, or loss_and_grads and an
    SGDMomentum update (the optimizer made here, once)."""
    import numpy as np  # noqa: PLC0415

    from minivit.autograd import no_grad  # noqa: PLC0415
    from minivit.optim import SGDMomentum  # noqa: PLC0415

    if mode == "inference":

        def step():
            with no_grad():
                out = model.forward(images).data
            sync()
            return out

        return step
    params, rng = model.params, np.random.default_rng(0)
    optimizer = SGDMomentum(params)

    def step():
        _, grads = model.loss_and_grads(images, labels, train=True, rng=rng)
        optimizer.update(params, grads, LR)
        sync()

    return step


def run_minivit(
    spec: Spec, mode: str, batch: int, budget_s: float, phases: Phases, device: str = "cpu"
) -> dict:
    """minivit: Model.forward under no_grad, or loss_and_grads + SGDMomentum.update; on
    `device` "cuda" the model, images and labels on the first GPU (CuPy), each step waited for.
    The result counts the CPU functions Numba compiled in this process (none where
    `warm_minivit` filled the cache first); Numba's CUDA kernels compile in every process's
    first step, a warm-up step, and are not counted (they do not report to `numba.core.event`)."""
    importlib.import_module("minivit")  # before NumPy loads OpenBLAS: minivit/__init__.py
    import numba  # noqa: PLC0415

    from minivit import kernels  # noqa: PLC0415
    from minivit.kernels import _blas  # noqa: PLC0415
    from minivit.models import create_model  # noqa: PLC0415

    with CompileWatch() as watch:
        model = create_model(spec.name, num_classes=CLASSES, image_size=IMAGE_SIZE)
        images, labels = batch_data(batch)
        sync: Callable[[], object] = lambda: None  # noqa: E731
        if device == "cuda":
            model.to("cuda:0")  # a one-sentence error where CuPy or the GPU is missing
            cp = model.device.xp
            images, labels = model.device.put(images), model.device.put(labels)
            sync = cp.cuda.Device().synchronize
        step = _minivit_step(model, mode, images, labels, sync)
        plan = _timing_plan(mode, batch, budget_s)
        seconds, iters = time_steps(step, **plan, phases=phases, compiled=lambda: watch.count)
    if device == "cuda":  # the bytes CuPy's pool holds: it keeps what it once allocated
        rss_mb = cp.get_default_memory_pool().total_bytes() / 2**20
        probe = lambda: device_gemm_rate(cp, kernels.matmul, sync)  # noqa: E731
    else:
        rss_mb = _common.peak_rss_mb()  # before the GEMM probe's three 2048^2 arrays
        probe = lambda: square_gemm_rate(kernels.matmul)  # noqa: E731  (the GEMM ops call)
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel ran yet
        layer = "not started"
    return dict(
        step_s=seconds,
        iters=iters,
        rss_mb=rss_mb,
        gemm_probe=probe,
        blas_library=_blas.LIBRARY,
        products=_blas.products_description(),
        numba_layer=layer,
        numba_threads=numba.get_num_threads(),
        blas=_common.blas_report(),
        numba_compiled=watch.count,
        numba_compile_s=watch.seconds,
    )


def warm_minivit(spec: Spec, steps: list[list]) -> dict:
    """One untimed step of `spec` for each (mode, batch) of `steps`, on the CPU: the pass that
    fills Numba's on-disk cache (next to minivit's sources) before any measured child, so none
    of them carries the compiler in its time or its peak memory. The functions it compiled and
    the seconds they took (0 and 0.0 where the cache was already warm)."""
    importlib.import_module("minivit")  # before NumPy loads OpenBLAS, as in `run_minivit`
    from minivit.models import create_model  # noqa: PLC0415

    started = time.perf_counter()
    with CompileWatch() as watch:
        model = create_model(spec.name, num_classes=CLASSES, image_size=IMAGE_SIZE)
        for mode, batch in steps:  # [mode, batch] pairs (`warm_plan`)
            images, labels = batch_data(batch)
            _minivit_step(model, mode, images, labels, lambda: None)()
    return dict(
        numba_compiled=watch.count,
        numba_compile_s=watch.seconds,
        warm_s=time.perf_counter() - started,
    )


def run_torch(
    spec: Spec,
    mode: str,
    batch: int,
    budget_s: float,
    threads: int,
    phases: Phases,
    device: str = "cpu",
) -> dict:
    """timm model in eager PyTorch fp32: inference_mode forward, or CE + backward + SGD step;
    on `device` "cuda" on the first GPU with TF32 off (fp32 products and convolutions), each
    step waited for."""
    torch = _common.load_torch(threads)
    import timm  # noqa: PLC0415

    model = timm.create_model(spec.timm, pretrained=False, num_classes=CLASSES)
    images, labels = batch_data(batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
    y = torch.from_numpy(labels).long()
    sync: Callable[[], object] = lambda: None  # noqa: E731
    if device == "cuda":
        ensure_gpu("torch")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model, x, y, sync = model.cuda(), x.cuda(), y.cuda(), torch.cuda.synchronize
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode():
                out = model(x)
            sync()
            return out

    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sync()

    seconds, iters = time_steps(step, **_timing_plan(mode, batch, budget_s), phases=phases)
    if device == "cuda":  # what the caching allocator held at most, as CuPy's pool above
        rss_mb = torch.cuda.max_memory_reserved() / 2**20
        a, b = (torch.randn(GPU_GEMM_SIZE, GPU_GEMM_SIZE, device="cuda") for _ in range(2))
        probe = lambda: gemm_rate(lambda: (a @ b, sync()), GPU_GEMM_SIZE)  # noqa: E731
    else:
        rss_mb = _common.peak_rss_mb()  # before the GEMM probe's three 2048^2 arrays
        a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
        probe = lambda: gemm_rate(lambda: a @ b)  # noqa: E731
    return dict(
        step_s=seconds,
        iters=iters,
        rss_mb=rss_mb,
        gemm_probe=probe,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        timm_version=timm.__version__,
    )


def flax_model(config):
    """The Flax network of `config` (bench/flax_models.py)."""
    import flax_models  # noqa: PLC0415  (needs flax)

    if config.family == "mixer":
        return flax_models.Mixer(
            config.patches[0],
            config.hidden_dim,
            config.num_blocks,
            config.tokens_mlp_dim,
            config.channels_mlp_dim,
            CLASSES,
        )
    resnet = tuple(config.resnet.num_layers) if config.resnet is not None else None
    return flax_models.ViT(
        config.patches[0],
        config.hidden_size,
        config.num_layers,
        config.num_heads,
        config.mlp_dim,
        CLASSES,
        resnet,
    )


def timing_params(jax, model, x):
    """Flax parameters for timing: the shapes `model.init` would give (traced, not run), filled
    from a fixed NumPy generator: scales one, biases zero, other arrays normal with variance
    1 / fan-in. Compiling and running `model.init` took 7.5 s for ViT-B/16 and 15 s for
    R26+S/32 on 2 cores, in each of the 16 JAX children; this takes under a second."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jax.numpy.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jax.numpy.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        values = rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in)
        return jax.numpy.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _jax_step(jax, model, mode: str, params, x, y):
    """A compiled step and its argument tuple; the step returns what must be waited on."""
    import optax  # noqa: PLC0415

    if mode == "inference":
        fn = jax.jit(lambda p, xb: model.apply({"params": p}, xb))
        args = (params, x)
    else:
        tx = optax.sgd(LR, momentum=0.9, accumulator_dtype="bfloat16")

        def loss_fn(p, xb, yb):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def train(p, state, xb, yb):
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        fn = jax.jit(train, donate_argnums=(0, 1))
        args = (params, tx.init(params), x, y)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, args, time.perf_counter() - start


def run_jax(
    spec: Spec, mode: str, batch: int, budget_s: float, phases: Phases, device: str = "cpu"
) -> dict:
    """JAX/Flax: the same step under jax.jit; ahead-of-time compile timed apart. On `device`
    "cuda" JAX's default device must be a GPU; fp32 products at full precision (no TF32)."""
    import jax  # noqa: PLC0415

    from minivit.models.registry import resolve  # noqa: PLC0415

    if device == "cuda":
        ensure_gpu("jax")
        jax.config.update("jax_default_matmul_precision", "highest")

    model = flax_model(resolve(spec.name)[0])
    images, labels = batch_data(batch)
    x, y = jax.numpy.asarray(images), jax.numpy.asarray(labels)
    params = timing_params(jax, model, x[:1])
    compiled, args, compile_s = _jax_step(jax, model, mode, params, x, y)
    state = {"args": args}

    def step():
        out = compiled(*state["args"])
        if mode == "train":
            state["args"] = (out[0], out[1], x, y)
        jax.block_until_ready(out)

    seconds, iters = time_steps(step, **_timing_plan(mode, batch, budget_s), phases=phases)
    size = GEMM_SIZE
    if device == "cuda":  # XLA's own peak (the child runs with preallocation off)
        rss_mb = jax.local_devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
        size = GPU_GEMM_SIZE
    else:
        rss_mb = _common.peak_rss_mb()  # before the GEMM probe's three 2048^2 arrays
    a = jax.numpy.ones((size, size), jax.numpy.float32)
    matmul = jax.jit(lambda u: u @ u)
    return dict(
        step_s=seconds,
        iters=iters,
        rss_mb=rss_mb,
        compile_s=compile_s,
        jax_version=jax.__version__,
        gemm_probe=lambda: gemm_rate(lambda: matmul(a).block_until_ready(), size),
    )


def preload(framework: str, threads: int) -> None:
    """The imports of `framework`'s child, in its order: what a zygote does once before forking."""
    if framework == "minivit":
        names = ("minivit", "numba", "numpy", "minivit.kernels", "minivit.models", "minivit.optim")
        for name in names:
            importlib.import_module(name)  # minivit first: it sets the thread pools up
    elif framework == "torch":
        if _common.load_torch(threads) is None:
            raise ImportError("No module named 'torch'")
        importlib.import_module("timm")
    else:
        for name in ("jax", "optax", "flax_models", "minivit.models.registry"):
            importlib.import_module(name)


def run_config(framework: str, request: dict) -> dict:
    """One configuration (`request`: model, mode, batch, budget, threads, `probe`: False to skip
    the GEMM probe, default True, and `device`, default "cpu"): img/s, peak memory (resident, or
    on "cuda" the GPU memory the framework's allocator held), the framework's GEMM rate or
    None. A request with `warm` (a list of [mode, batch]) runs `warm_minivit` instead."""
    spec = next(s for s in SPECS if s.label == request["model"])
    if "warm" in request:
        return warm_minivit(spec, request["warm"])
    mode, batch, budget = request["mode"], request["batch"], request["budget"]
    device, phases = request.get("device", "cpu"), Phases()
    if framework == "minivit":
        result = run_minivit(spec, mode, batch, budget, phases, device)
    elif framework == "torch":
        result = run_torch(spec, mode, batch, budget, request["threads"], phases, device)
    else:
        result = run_jax(spec, mode, batch, budget, phases, device)
    probe = result.pop("gemm_probe")  # after the timed steps and the RSS reading
    result["gemm_gflops"] = None
    if request.get("probe", True):
        step_gflops = request.get("step_gflop", 0.0) / result["step_s"]
        result["gemm_gflops"], result["gemm_probes"] = anchor_rate(probe, step_gflops)
    phases.mark("GEMM probe")
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process's own, from its fork or start
    result.update(
        img_s=batch / result["step_s"],
        phases=phases.seconds,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,  # kernel time: page faults mostly
    )
    return result


def anchor_rate(probe: Callable[[], float], step_gflops: float) -> tuple[float, list[float]]:
    """The process's GEMM rate, the anchor of its `of GEMM` cell, and every probe taken: one
    probe, and up to `RECHECKS` more while the step itself ran at `RECHECK_ABOVE` of the fastest
    probe or more. A whole step does not outrun the products it is made of, so a probe it
    matches most likely ran in one of this guest's dips (run 12: a ViT-Ti/16 child whose steps
    read 140 GFLOP/s probed 107, '131% of GEMM', with every other child at 183-207; run 17: an
    R26+S/32 training child at 199 probed 213, '93%', where that step reads 52-69% against
    probes of 378-414). Probing again can only raise the anchor, never flatter the step."""
    rates = [probe()]
    while len(rates) <= RECHECKS and step_gflops >= RECHECK_ABOVE * max(rates):
        rates.append(probe())
    return max(rates), [round(r, 1) for r in rates]


def pin_jax_platform(device: str) -> None:
    """Before JAX loads: the CPU table keeps JAX on the CPU even where a GPU plugin is installed
    (it would take the GPU by default), and the GPU table stops XLA from taking 75% of the GPU's
    memory up front, so its peak is what the step used."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def child_main(args: argparse.Namespace) -> None:
    """Run one configuration in this fresh process and print its JSON object (`--fresh`)."""
    pin_jax_platform(args.device)
    request = _request(
        args.model, args.mode, args.batch, args, args.budget, not args.no_probe, args.step_gflop
    )
    if args.warm is not None:
        request["warm"] = json.loads(args.warm)
    print(json.dumps(run_config(args.child, request)))


def zygote_main(args: argparse.Namespace) -> None:
    """Import `args.zygote`'s modules once, then fork one child per configuration asked for."""
    framework = args.zygote
    pin_jax_platform("cpu")  # zygotes serve the CPU table only (`--device cuda` runs fresh)
    _zygote.serve(
        lambda: preload(framework, args.threads),
        lambda request: run_config(framework, request),
        CHILD_TIMEOUT_S,
    )


# ---- the parent: probes, table, goals ------------------------------------------------------------
def _request(
    model: str,
    mode: str,
    batch: int,
    args: argparse.Namespace,
    budget: float,
    probe: bool,
    step_gflop: float = 0.0,
) -> dict:
    """A child's configuration; `step_gflop`: the GFLOP of one step (for `anchor_rate`)."""
    return dict(
        model=model,
        mode=mode,
        batch=batch,
        budget=budget,
        threads=args.threads,
        probe=probe,
        device=args.device,
        step_gflop=step_gflop,
    )


def step_gflop(spec: Spec, mode: str, batch: int) -> float:
    """GFLOP of one step of `spec` at `batch`, counted from its config (in the parent: the
    children of torch and JAX do not import minivit)."""
    from minivit.models.registry import resolve  # noqa: PLC0415

    return step_flops(resolve(spec.name)[0], mode) * batch / 1e9


class Runner:
    """Runs configurations: each in a fork of its framework's zygote (default), or with
    `--fresh` in a fresh interpreter (the check on the fork's memory column, and the slow way)."""

    NEEDS = {"minivit": (), "torch": ("torch", "timm"), "jax": ("jax", "flax", "optax")}

    def __init__(self, wanted: list[str], args: argparse.Namespace):
        self.args, self.zygotes, self.frameworks = args, {}, []
        for name in wanted:
            error = self._start(name)
            if error is None:
                self.frameworks.append(name)
            else:
                needs = ", ".join(self.NEEDS[name])
                log(f"{name}: not usable, column left empty ({needs}): {error}")

    def _start(self, name: str) -> str | None:
        """Start `name`'s zygote (or, with --fresh, check that it imports, and with --device
        cuda that it sees the GPU, so a missing GPU stack costs one check, not every row); an
        error or None."""
        if self.args.fresh:
            probe = "import " + ", ".join(self.NEEDS[name]) if self.NEEDS[name] else "pass"
            failure = "does not import"
            if self.args.device == "cuda":  # the children's own check, as they set up JAX
                setup = f"import sys; sys.path.insert(0, {str(HERE)!r}); import step"
                probe = (
                    f"{setup}; step.pin_jax_platform('cuda'); {probe}; step.ensure_gpu({name!r})"
                )
                failure = "does not import or see the GPU"
            done = subprocess.run(
                [sys.executable, "-c", probe], capture_output=True, text=True, check=False
            )
            if done.returncode == 0:
                return None
            last = done.stderr.strip().splitlines()[-1:] or ["?"]
            return f"{failure}: {last[0]}"
        command = [sys.executable, str(Path(__file__).resolve()), "--zygote", name]
        zygote = _zygote.Zygote([*command, "--threads", str(self.args.threads)])
        if zygote.error is None:
            self.zygotes[name] = zygote
        return zygote.error

    def run(
        self, framework: str, spec: Spec, mode: str, batch: int, rounds: int = 1, probe=True
    ) -> dict:
        """One process of a configuration, with 1/rounds of the budget (and the GEMM probe
        unless `probe` is False): its JSON result, or {"error": ...} when it failed or timed
        out."""
        budget, gflop = self.args.budget / rounds, step_gflop(spec, mode, batch)
        if not self.args.fresh:
            request = _request(spec.label, mode, batch, self.args, budget, probe, gflop)
            return self.zygotes[framework].run(request)
        return fresh_child(framework, spec, mode, batch, self.args, budget, probe, gflop)

    def warm(self, spec: Spec, steps: list[list]) -> dict:
        """`warm_minivit` of `spec` over `steps` in a minivit child: its result or {"error"}."""
        if not self.args.fresh:
            request = _request(spec.label, "warm", 0, self.args, 0.0, False)
            return self.zygotes["minivit"].run({**request, "warm": steps})
        return fresh_child("minivit", spec, "warm", 0, self.args, 0.0, False, warm=steps)

    def close(self) -> None:
        for zygote in self.zygotes.values():
            zygote.close()


def fresh_child(
    framework: str,
    spec: Spec,
    mode: str,
    batch: int,
    args,
    budget: float,
    probe: bool,
    gflop: float = 0.0,
    warm: list[list] | None = None,
) -> dict:
    """One configuration (or with `warm`, the kernel-compiling pass) in a fresh interpreter;
    its JSON result, or {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", framework]
    command += ["--model", spec.label, "--mode", mode, "--batch", str(batch)]
    command += ["--budget", str(budget), "--threads", str(args.threads)]
    command += ["--device", args.device, "--step-gflop", str(gflop)]
    command += [] if probe else ["--no-probe"]
    command += ["--warm", json.dumps(warm)] if warm is not None else []
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rounds_for(mode: str, batch: int, rounds: int) -> int:
    """Processes per framework for one configuration: `rounds` for batch-1 inference (a few
    seconds each), one for the rest (whose steps already average over seconds)."""
    return rounds if (mode, batch) == ("inference", 1) else 1


def median_result(results: list[dict]) -> dict:
    """The process of median images/s among one framework's rounds (the higher middle of an
    even count), with the peak RSS of all of them and their img/s listed; errors only when every
    round failed."""
    ok = sorted((r for r in results if "error" not in r), key=lambda r: r["img_s"])
    if not ok:
        return results[0]
    chosen = dict(ok[len(ok) // 2])
    rates = [r["gemm_gflops"] for r in ok if r.get("gemm_gflops") is not None]
    chosen.update(
        gemm_gflops=chosen.get("gemm_gflops") or (rates[0] if rates else None),
        rss_mb=max(r["rss_mb"] for r in ok),
        iters=sum(r["iters"] for r in ok),
        rounds=[round(r["img_s"], 3) for r in ok],
    )
    return chosen


def _cpu_times(cpu: dict) -> str:
    """A child's CPU seconds (over its threads) in its own code and in the kernel, `user_s` and
    `sys_s`, for its log line: page faults and first touches of memory show as sys, cores the
    guest did not get as CPU time short of threads x wall time."""
    if not cpu.get("user_s"):  # results from before the field
        return ""
    return f", CPU {cpu['user_s']:.0f} s user {cpu['sys_s']:.1f} s sys"


def measure_row(
    spec: Spec, mode: str, batch: int, runner: Runner, details: dict, rounds: int = 1
) -> dict:
    """All frameworks on one configuration; the table row. With `rounds` > 1 the frameworks
    take turns, one process each per round (this guest slows whole processes at a time: a
    ViT-Ti/16 batch-1 process ran all its steps at 21 ms or all at 35 ms), each round with
    1/rounds of the budget, and each cell is the process of median img/s (`median_result`)."""
    row = {"model": spec.label, "mode": mode, "batch": batch}
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for framework in runner.frameworks:
            done = runs.setdefault(framework, [])
            probe = not any(r.get("gemm_gflops") for r in done)  # until one round has a rate
            start = time.perf_counter()
            result = runner.run(framework, spec, mode, batch, rounds, probe=probe)
            details.setdefault(framework, []).append(result)
            result["child_s"] = time.perf_counter() - start
            done.append(result)
    for framework in runner.frameworks:
        result = median_result(runs[framework])
        if "error" in result:
            log(f"  {spec.label} {mode} b{batch} {framework}: FAILED ({result['error']})")
            continue
        took = sum(r["child_s"] for r in runs[framework])
        cpu = {k: sum(r.get(k, 0.0) for r in runs[framework]) for k in ("user_s", "sys_s")}
        per_round = f", rounds {result['rounds']}" if rounds > 1 else ""
        if len(result.get("gemm_probes", [])) > 1:  # `anchor_rate` probed again
            per_round += f", GEMM probes {result['gemm_probes']}"
        if result.get("numba_compiled"):  # compiled in this child (the pass missed them or
            # did not run: on cuda), its warm-up steps going on until one compiled nothing
            per_round += (
                f", compiled {result['numba_compiled']} functions "
                f"({result['numba_compile_s']:.0f} s)"
            )
        log(
            f"  {spec.label} {mode} b{batch} {framework}: {result['img_s']:.2f} img/s, "
            f"{result['rss_mb']:.0f} MB, {result['iters']} timed runs, GEMM "
            f"{result['gemm_gflops']:.0f} GFLOP/s ({took:.0f} s{_cpu_times(cpu)}, "
            f"load {os.getloadavg()[0]:.1f}){per_round}"
        )
        row[f"{framework}_img_s"] = result["img_s"]
        row[f"{framework}_rss_mb"] = result["rss_mb"]
        if framework == "minivit":
            gflops = step_gflop(spec, mode, 1) * result["img_s"]  # GFLOP per image x img/s
            fraction = gflops / result["gemm_gflops"]
            row.update(gflops_per_s=gflops, gemm_fraction=fraction, of_gemm=f"{fraction:.0%}")
        if framework == "jax":
            row["jax_compile_s"] = result["compile_s"]
    row["vs_torch"] = _common.ratio(row.get("minivit_img_s"), row.get("torch_img_s"))
    row["vs_jax"] = _common.ratio(row.get("minivit_img_s"), row.get("jax_img_s"))
    return row


COLUMNS = (
    ("model", "model"),
    ("mode", "mode"),
    ("batch", "batch"),
    ("minivit_img_s", "minivit img/s"),
    ("torch_img_s", "timm img/s"),
    ("jax_img_s", "JAX img/s"),
    ("vs_torch", "minivit/timm"),
    ("vs_jax", "minivit/JAX"),
    ("gflops_per_s", "minivit GFLOP/s"),
    ("of_gemm", "of GEMM"),
    ("minivit_rss_mb", "minivit MB"),
    ("torch_rss_mb", "timm MB"),
    ("jax_rss_mb", "JAX MB"),
    ("jax_compile_s", "JAX compile s"),
)


def goal_lines(rows: list[dict]) -> list[str]:
    """The issue's goals, each with the measured figure and met / NOT met."""

    def verdict(ok: bool | None) -> str:
        return "n/a (missing column)" if ok is None else ("met" if ok else "NOT met")

    lines = []
    ratios = [(r["vs_torch"], r) for r in rows if r.get("vs_torch") is not None]
    worst = min(ratios, key=lambda p: p[0], default=(None, None))
    if worst[1] is not None:
        where = f"{worst[1]['model']} {worst[1]['mode']} b{worst[1]['batch']}"
        lines.append(
            f"no row below 1.0x timm: lowest {worst[0]:.2f}x ({where}): {verdict(worst[0] >= 1.0)}"
        )
    for label in ("ViT-S/16", "Mixer-B/16", "R26+S/32"):
        mine = [r for r, row in ratios if row["model"] == label]
        if mine:
            lines.append(
                f"{label} at least 1.25x timm: lowest {min(mine):.2f}x: "
                f"{verdict(min(mine) >= 1.25)}"
            )
    train = [r for r in rows if r["mode"] == "train" and r.get("gemm_fraction") is not None]
    if train:
        low = min(train, key=lambda r: r["gemm_fraction"])
        lines.append(
            f"training steps at >= 80% of the GEMM rate: lowest {low['gemm_fraction']:.0%} "
            f"({low['model']} b{low['batch']}): {verdict(low['gemm_fraction'] >= 0.8)}"
        )
    big = [r for r in rows if (r["model"], r["mode"], r["batch"]) == ("ViT-B/16", "train", 32)]
    if big and big[0].get("minivit_rss_mb") and big[0].get("torch_rss_mb"):
        mine, theirs = big[0]["minivit_rss_mb"], big[0]["torch_rss_mb"]
        lines.append(
            f"ViT-B/16 training b32 peak RSS <= timm: {mine:.0f} MB vs {theirs:.0f} MB: "
            f"{verdict(mine <= theirs)}"
        )
    return lines


def header(args: argparse.Namespace) -> list[str]:
    """Threads, BLAS kernel, fp32 GEMM rate and load of this machine, measured in this process."""
    import numpy as np  # noqa: PLC0415  (after setup_threads)

    rate = square_gemm_rate()
    env = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in _common._THREAD_VARS)
    lines = [
        f"python {sys.version.split()[0]}, numpy {np.__version__}, {args.threads} threads: {env}; "
        f"torch.set_num_threads({args.threads})",
        *("BLAS " + line for line in _common.blas_report()),
        f"fp32 GEMM rate (NumPy, {GEMM_SIZE}^3, fastest of 7): {rate:.1f} GFLOP/s",
        f"load average at start: {os.getloadavg()[0]:.2f} (1 min)",
    ]
    if args.device == "cuda":
        lines.append(
            f"device: cuda, {gpu_name()}; MB columns: GPU memory held (CuPy's pool, "
            "torch's reserved peak, XLA's peak in use); fp32 products without TF32"
        )
    if "OPENBLAS_CORETYPE" in os.environ:
        forced = os.environ["OPENBLAS_CORETYPE"]
        lines.append(
            f"warning: OPENBLAS_CORETYPE={forced} forces that BLAS kernel; run under "
            "`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`"
        )
    return lines


def gpu_name() -> str:
    """The first GPU as nvidia-smi names it, read without starting CUDA in this process (the
    children start their own contexts)."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else "no GPU that nvidia-smi lists"


def detail_lines(details: dict) -> list[str]:
    """Versions, thread pools seen inside the children, and their own GEMM rates."""
    lines = []
    for framework, results in details.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            continue
        rates = statistics.median(r["gemm_gflops"] for r in ok if r.get("gemm_gflops"))
        keys = ("version", "threads", "layer", "library", "products")
        extra = {k: v for k, v in ok[0].items() if k.endswith(keys)}
        lines.append(f"{framework} children: median in-process GEMM {rates:.1f} GFLOP/s; {extra}")
    return lines


def time_lines(details: dict, wall_s: float, warm_s: float = 0.0) -> list[str]:
    """Where the run's wall time went: each phase of the children summed over configurations,
    the children's start, page touching and exit, the kernel-compiling pass (`warm_s`), and the
    rest (this process and the zygotes)."""
    phases, children = Counter(), 0.0
    for results in details.values():
        for result in results:
            children += result.get("child_s", 0.0)
            phases.update(result.get("phases", {}))
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    outside = children - sum(phases.values())
    warm = f"{warm_s:.0f} s in minivit's compile pass, " if warm_s else ""
    return [
        f"wall time {wall_s:.0f} s: {children:.0f} s in configurations ({parts}; {outside:.0f} s "
        f"to start, touch pages and exit), {warm}{wall_s - children - warm_s:.0f} s in this "
        "process and zygotes"
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    prog = os.environ.get(PROG_ENV)  # `minivit bench` names itself in usage and errors
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout, text on stderr")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset (Ti/16, S/16)")
    parser.add_argument("--models", nargs="+", choices=[s.label for s in SPECS])
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--threads", type=int, default=_common.default_threads())
    parser.add_argument("--budget", type=float, help="seconds of timed runs per configuration")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="processes per framework for each batch-1 inference row, taking turns; the cell is "
        "the median one, of two the faster (default 2; 1: one process each, as the other rows)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="run each configuration in a fresh interpreter instead of a fork of an interpreter "
        "that has imported its framework (slower by the imports: ~6 s per timm configuration)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cuda: every framework on the first GPU (minivit on CuPy, timm on torch CUDA, JAX "
        "on its GPU backend), fp32 without TF32, each step waited for; the MB columns are then "
        "the GPU memory each framework's allocator held, and each configuration runs in a fresh "
        "interpreter (a CUDA context does not survive a fork)",
    )
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--zygote", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-gflop", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)  # JSON [[mode, batch], ...]
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 1.5 if args.quick else 2.0
    if args.device == "cuda":
        args.fresh = True
    return args


def plan(args: argparse.Namespace) -> list[tuple[Spec, str, int]]:
    """The (model, mode, batch) configurations to run, in table order."""
    chosen = [s for s in SPECS if args.models is None or s.label in args.models]
    if args.quick:
        return [(s, m, b) for s in chosen if s.label in QUICK for m, b in QUICK[s.label]]
    return [(s, m, b) for s in chosen for m, b in CONFIGS + EXTRA_CONFIGS.get(s.label, ())]


def warm_plan(configs: list[tuple[Spec, str, int]]) -> list[tuple[Spec, list]]:
    """The kernel-compiling pass for `configs`: per model, in table order, one step of each
    mode at batch 1 where a row runs batch 1 (some views are contiguous only there, and Numba
    compiles a function once per array layout) and at `WARM_BATCH` for the larger batches."""
    plans: dict[str, tuple[Spec, list]] = {}
    for spec, mode, batch in configs:
        steps = plans.setdefault(spec.label, (spec, []))[1]
        wanted = [mode, min(batch, WARM_BATCH)]
        if wanted not in steps:
            steps.append(wanted)
    return list(plans.values())


def warm_kernels(runner: Runner, configs: list[tuple[Spec, str, int]]) -> tuple[list[str], float]:
    """Compile minivit's kernels into Numba's cache before the table (CPU only: CUDA kernels are
    compiled in every process, in its first step, a warm-up step), one child per model, each
    logged as it ends; the footer lines (the sum, and any model whose child failed) and the
    pass's wall seconds."""
    if "minivit" not in runner.frameworks or runner.args.device != "cpu":
        return [], 0.0
    log("compiling minivit's kernels into Numba's cache first: one untimed child per model")
    started, compiled, seconds, failed = time.perf_counter(), 0, 0.0, []
    for spec, steps in warm_plan(configs):
        begun = time.perf_counter()
        result = runner.warm(spec, steps)
        if "error" in result:  # its rows will fail (or compile) on their own and say so
            failed.append(f"minivit compile pass FAILED for {spec.label}: {result['error']}")
            log(f"  {failed[-1]}")
            continue
        compiled += result["numba_compiled"]
        seconds += result["numba_compile_s"]
        log(
            f"  {spec.label} compile pass: {result['numba_compiled']} functions compiled in "
            f"{result['numba_compile_s']:.0f} s ({time.perf_counter() - begun:.0f} s)"
        )
    took = time.perf_counter() - started
    if compiled:
        line = (
            f"minivit kernels compiled before the table: {compiled} functions in {seconds:.0f} s "
            f"({took:.0f} s with the untimed steps that called them); the measured children "
            "load them from Numba's cache"
        )
    elif failed:
        line = f"minivit compile pass: the models whose child ran compiled nothing ({took:.0f} s)"
    else:
        line = f"minivit kernels: all in Numba's cache already (the compile pass took {took:.0f} s)"
    return [line, *failed], took


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _common.setup_threads(args.threads)
    if args.child:
        child_main(args)
        return
    if args.zygote:
        zygote_main(args)
        return
    started = time.perf_counter()
    text = print if not args.json else log
    for line in header(args):
        text(line)
    runner = Runner(args.frameworks, args)
    if not runner.frameworks:
        runner.close()
        log(
            f"{os.environ.get(PROG_ENV, 'bench/step.py')}: none of {', '.join(args.frameworks)} "
            f"can run in {sys.executable} (why is above); install them into that Python "
            "(`pip install -e '.[bench]'` from the checkout) or run this with the Python that "
            "has them"
        )
        sys.exit(2)
    rows, details, configs = [], {}, plan(args)
    warmed, warm_s = [], 0.0
    try:
        warmed, warm_s = warm_kernels(runner, configs)
        for spec, mode, batch in configs:
            turns = rounds_for(mode, batch, args.rounds)
            rows.append(measure_row(spec, mode, batch, runner, details, turns))
    except KeyboardInterrupt:
        log(f"interrupted after {len(rows)} of {len(configs)} rows; no table printed")
        sys.exit(130)
    finally:
        runner.close()
    text("")
    text(_common.format_table(rows, COLUMNS))
    text("")
    goals = (
        goal_lines(rows)
        if args.device == "cpu"
        else ["the issue's goals are for the CPU table; this GPU table is reported as measured"]
    )
    for line in detail_lines(details) + warmed + goals:
        text(line)
    text(f"load average at end: {os.getloadavg()[0]:.2f}")
    for line in time_lines(details, time.perf_counter() - started, warm_s):
        text(line)
    if args.json:
        _common.emit_json(rows, JSON_KEYS)


if __name__ == "__main__":
    main()
