"""Micro-benchmark of minivit's fused kernels against their NumPy references and PyTorch's ops.

Shapes of ViT-B/16 at batch 8 and ViT-S/16 at batch 32 (224 px: 197 tokens). For each of LayerNorm,
GELU (tanh form, the official one, fused with the Dense bias), the MLP's first Dense with its bias
(the product with the bias added inside it; backward: both gradient products and the bias
gradient, a column sum), attention and softmax cross-entropy it times minivit's CPU body,
the `*_ref` NumPy spec (float64 statistics) and torch's op (`layer_norm`, `gelu`, `linear`,
`scaled_dot_product_attention`, `cross_entropy`), forward and
forward+backward, all with the same thread count; torch's ops in a child process of their own (each
framework brings its own OpenMP runtime, and two spinning pools would share the cores). It then
measures the peak extra memory of attention forward+backward at 577 tokens (ViT-B/16 at 384 px),
batch 32, for the fused body and for the plain tokens-squared version, each in a fresh process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/kernels.py [--json] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _common  # noqa: E402  (next to this file)

MODELS = {  # name: (batch, tokens, width, heads)
    "ViT-B/16 b8": (8, 197, 768, 12),
    "ViT-S/16 b32": (32, 197, 384, 6),
}
MEMORY_SHAPE = (32, 12, 577, 64)  # ViT-B/16 at 384 px, batch 32: (B, NH, N, K)
CLASSES = 1000
# Rows that are matrix products, outside the 2x-over-NumPy goal: NumPy's `@` calls the same BLAS.
PRODUCTS = {"dense+bias"}
JSON_KEYS = ("kernel", "shape", "pass", "minivit_ms", "numpy_ms", "torch_ms")


def _cases(np, batch, tokens, width, heads):
    """Per kernel: shape label, inputs, and forward / forward+backward closures per library."""
    from minivit import kernels  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    rows, head = batch * tokens, width // heads
    x, scale, bias = normal(rows, width), 1 + 0.1 * normal(width), normal(width)
    h, hb = normal(rows, 4 * width), normal(4 * width)
    q, k, v = (normal(batch, heads, tokens, head) for _ in range(3))
    logits = normal(batch, CLASSES)
    onehot = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, batch)]
    g_rows = np.full(batch, 1.0 / batch, np.float32)

    def ln(fwd, bwd):
        return lambda: fwd(x, scale, bias), lambda: bwd(x, x, *fwd(x, scale, bias)[1:], scale)

    def gelu(fwd, bwd):
        return lambda: fwd(h, hb), lambda: (fwd(h, hb), bwd(h, h, hb))

    w = normal(width, 4 * width)  # the MLP's first kernel, flax layout (in, out)

    def dense(mm, grad):  # h: the output's gradient
        return lambda: mm(x, w, bias=hb), lambda: (
            mm(x, w, bias=hb),
            mm(h, w.T),
            mm(x.T, h),
            grad(h),
        )

    def attn(fwd, bwd):
        return lambda: fwd(q, k, v), lambda: bwd(q, q, k, v, *fwd(q, k, v))

    def xent(fwd, bwd):
        return lambda: fwd(logits, onehot), lambda: bwd(
            g_rows, logits, onehot, fwd(logits, onehot)[1]
        )

    return {
        "layernorm": (
            f"({rows}, {width})",
            ln(kernels.layernorm_forward, kernels.layernorm_backward),
            ln(kernels.layernorm_forward_ref, kernels.layernorm_backward_ref),
            dict(x=x, scale=scale, bias=bias),
        ),
        "gelu_tanh+bias": (
            f"({rows}, {4 * width})",
            gelu(kernels.gelu_forward, kernels.gelu_backward),
            gelu(kernels.gelu_forward_ref, kernels.gelu_backward_ref),
            dict(h=h + hb),
        ),
        "dense+bias": (
            f"({rows}, {width}) x ({width}, {4 * width})",
            dense(kernels.matmul, kernels.bias_grad),
            dense(kernels.matmul_ref, kernels.bias_grad_ref),
            dict(x=x, w=np.ascontiguousarray(w.T), b=hb),  # torch's layout: (out, in)
        ),
        "attention": (
            str((batch, heads, tokens, head)),
            attn(kernels.attention_forward, kernels.attention_backward),
            attn(kernels.attention_forward_ref, kernels.attention_backward_ref),
            dict(q=q, k=k, v=v),
        ),
        "softmax_xent": (
            f"({batch}, {CLASSES})",
            xent(kernels.softmax_xent_forward, kernels.softmax_xent_backward),
            xent(kernels.softmax_xent_forward_ref, kernels.softmax_xent_backward_ref),
            dict(logits=logits, labels=onehot.argmax(-1)),
        ),
    }


def _torch_pair(torch, kernel, arrays):
    """(forward, forward+backward) closures of torch's own op on the same data."""
    functional = torch.nn.functional
    t = {name: torch.from_numpy(a) for name, a in arrays.items()}
    grad_in = {name: a.clone().requires_grad_(a.is_floating_point()) for name, a in t.items()}
    ops = {
        "layernorm": lambda a: functional.layer_norm(
            a["x"], a["x"].shape[-1:], a["scale"], a["bias"], 1e-6
        ),
        "gelu_tanh+bias": lambda a: functional.gelu(
            a["h"], approximate="tanh"
        ),  # bias is free in addmm
        "dense+bias": lambda a: functional.linear(a["x"], a["w"], a["b"]),
        "attention": lambda a: functional.scaled_dot_product_attention(a["q"], a["k"], a["v"]),
        "softmax_xent": lambda a: functional.cross_entropy(a["logits"], a["labels"]),
    }
    op = ops[kernel]
    leaves = [a for a in grad_in.values() if a.requires_grad]

    def forward():
        with torch.no_grad():
            return op(t)

    def forward_backward():
        out = op(grad_in)
        return torch.autograd.grad(out, leaves, torch.ones_like(out) if out.ndim else None)

    return forward, forward_backward


def torch_timings(np, torch, min_runs: int) -> dict:
    """Run in a fresh process: ms of torch's op per "model/kernel/pass", on the same data."""
    times = {}
    for model, dims in MODELS.items():
        for kernel, (_, _, _, arrays) in _cases(np, *dims).items():
            for name, timed in zip(
                ("forward", "forward+backward"), _torch_pair(torch, kernel, arrays)
            ):
                times[f"{model}/{kernel}/{name}"] = _common.time_ms(timed, min_runs)
    return times


def run_timings(np, torch_ms: dict | None, min_runs: int) -> list[dict]:
    """Time every kernel, shape and pass in this process; torch's times (`torch_ms`, from
    `torch_timings` in a child, None without torch) join them. Each framework runs in its own
    process because each brings its own OpenMP runtime: with both pools spinning after their
    regions on the same cores, minivit's LayerNorm forward at (1576, 768) read 1.12-1.23x of
    torch's time against 0.68x before Numba's threads stopped sleeping at once."""
    rows = []
    for model, dims in MODELS.items():
        for kernel, (shape, fused, ref, _) in _cases(np, *dims).items():
            for index, name in enumerate(("forward", "forward+backward")):
                row = {"kernel": kernel, "model": model, "shape": shape, "pass": name}
                row["minivit_ms"] = _common.time_ms(fused[index], min_runs)
                row["numpy_ms"] = _common.time_ms(ref[index], min_runs)
                row["torch_ms"] = (torch_ms or {}).get(f"{model}/{kernel}/{name}")
                row["speedup_vs_numpy"] = _common.ratio(row["numpy_ms"], row["minivit_ms"])
                row["vs_torch"] = _common.ratio(row["minivit_ms"], row["torch_ms"])
                rows.append(row)
                print(f"  {model} {kernel} {name}: done", file=sys.stderr, flush=True)
    return rows


def plain_attention(np, q, k, v, go):
    """Forward+backward of attention holding the (B, NH, N, N) weights, float32 NumPy."""
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    s = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, NH, N, N)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s, out=s)
    p /= p.sum(-1, keepdims=True)
    o = p @ v  # (B, NH, N, K)
    gv = p.transpose(0, 1, 3, 2) @ go  # (B, NH, N, K)
    gp = go @ v.transpose(0, 1, 3, 2)  # (B, NH, N, N)
    gs = p * (gp - (go * o).sum(-1, keepdims=True))  # (B, NH, N, N)
    return o, gs @ k * scale, gs.transpose(0, 1, 3, 2) @ q * scale, gv


def _fused_attention(np, q, k, v, go):
    """Forward+backward through minivit's CPU body."""
    from minivit import kernels  # noqa: PLC0415

    return kernels.attention_backward(go, q, k, v, *kernels.attention_forward(q, k, v, body="cpu"))


def memory_probe(which: str) -> dict:
    """Run in a fresh process: peak extra MiB of one attention forward+backward."""
    import numpy as np  # noqa: PLC0415

    step = _fused_attention if which == "fused" else plain_attention
    rng = np.random.default_rng(0)
    q, k, v, go = (rng.standard_normal(MEMORY_SHAPE, dtype=np.float32) for _ in range(4))
    step(np, *(a[:1, :1, :9] for a in (q, k, v, go)))  # load compiled code before measuring
    return {"which": which, "peak_extra_mib": _common.peak_extra_mib(lambda: step(np, q, k, v, go))}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--threads", type=int, default=_common.default_threads())
    parser.add_argument("--min-runs", type=int, default=3, help="timed runs per cell at least")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory probe")
    parser.add_argument("--memory-probe", choices=("fused", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--torch-timings", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.setup_threads(args.threads)
    import json  # noqa: PLC0415

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    import numpy as np  # noqa: PLC0415

    if args.torch_timings:
        torch = _common.load_torch(args.threads)
        print(json.dumps({"version": torch.__version__, **torch_timings(np, torch, args.min_runs)}))
        return
    torch_ms = _torch_child(args) if importlib.util.find_spec("torch") else None
    torch_version = torch_ms.pop("version") if torch_ms else None
    rows = run_timings(np, torch_ms, args.min_runs)
    memory = None if args.skip_memory else _memory_rows()
    report = sys.stderr if args.json else sys.stdout
    _print_header(report, args.threads, torch_version)
    if args.json:
        _common.emit_json(rows, JSON_KEYS)
        if memory:
            _common.emit_json([memory], tuple(memory))
    else:
        print(_table(rows))
        if memory:
            print(_memory_line(memory))
    print(_goals(rows, memory), file=report)


def _torch_child(args) -> dict:
    """torch's times from a child process (`--torch-timings`), with its version."""
    script = str(Path(__file__).resolve())
    flags = ["--torch-timings", "--threads", str(args.threads), "--min-runs", str(args.min_runs)]
    return _common.run_probe(script, flags)


def _memory_rows() -> dict:
    script = str(Path(__file__).resolve())
    fused = _common.run_probe(script, ["--memory-probe", "fused"])["peak_extra_mib"]
    plain = _common.run_probe(script, ["--memory-probe", "plain"])["peak_extra_mib"]
    return {
        "kernel": "attention",
        "shape": str(MEMORY_SHAPE),
        "pass": "forward+backward peak extra memory",
        "minivit_mib": round(fused, 1),
        "plain_n2_mib": round(plain, 1),
        "ratio": round(fused / plain, 3),
    }


def _print_header(out, threads, torch_version: str | None) -> None:
    import numba  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    versions = f"numpy {np.__version__}, numba {numba.__version__} ({numba.threading_layer()})"
    versions += f", torch {torch_version}" if torch_version else ", torch not installed"
    print(f"threads: {threads} for minivit (Numba), NumPy (BLAS) and torch; {versions}", file=out)
    print(
        f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        file=out,
    )
    for line in _common.blas_report():
        print(f"  {line}", file=out)
    print("times: ms, best of 3 to 50 runs (about 0.6 s per cell); float32 in and out", file=out)


def _table(rows) -> str:
    columns = [
        ("model", "model"),
        ("kernel", "kernel"),
        ("shape", "shape"),
        ("pass", "pass"),
        ("minivit_ms", "minivit ms"),
        ("numpy_ms", "NumPy ref ms"),
        ("torch_ms", "torch ms"),
        ("speedup_vs_numpy", "NumPy / minivit"),
        ("vs_torch", "minivit / torch"),
    ]
    return _common.format_table(rows, columns)


def _memory_line(memory) -> str:
    return (
        f"attention fwd+bwd {memory['shape']} peak extra memory: fused {memory['minivit_mib']} MiB,"
        f" plain N^2 {memory['plain_n2_mib']} MiB, ratio {memory['ratio']} (goal < 0.25)"
    )


def _goals(rows, memory) -> str:
    """Which goals this run met, in words."""
    goal_rows = [r for r in rows if r["kernel"] != "softmax_xent"]
    fused = [r for r in rows if r["kernel"] not in PRODUCTS]
    slow = [r for r in fused if r["speedup_vs_numpy"] < 2.0]
    behind = [r for r in goal_rows if r["vs_torch"] is not None and r["vs_torch"] > 1.0]
    verdict = "met" if not behind else "NOT met"
    torch_goal = f"{verdict} ({len(goal_rows) - len(behind)}/{len(goal_rows)} cells)"
    if goal_rows[0]["vs_torch"] is None:
        torch_goal = "not measured (torch missing)"
    lines = [
        f"goal >= 2x vs NumPy ref (fused kernels): {'met' if not slow else 'NOT met'} "
        f"({len(fused) - len(slow)}/{len(fused)} cells)",
        f"goal minivit/torch <= 1.0 (LayerNorm, GELU, Dense+bias, attention): {torch_goal}",
    ]
    lines += [
        f"  behind torch: {r['model']} {r['kernel']} {r['pass']} {r['vs_torch']:.2f}x"
        for r in behind
    ]
    lines += [f"  under 2x vs NumPy: {r['model']} {r['kernel']} {r['pass']}" for r in slow]
    if memory:
        met = "met" if memory["ratio"] < 0.25 else "NOT met"
        lines.append(f"goal attention peak memory < 1/4 of plain N^2: {met} ({memory['ratio']})")
    return "\n".join(lines)


if __name__ == "__main__":
    _main()
