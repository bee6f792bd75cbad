"""The query, key and value projections: three `ops.dense` calls against one packed
`ops.heads_projections`, forward and forward+backward, in this process.

The packed op copies the three (D, NH, K) kernels side by side on every call (O(D^2)) and runs
one product three times as wide; its backward is one input-gradient product with a 3x longer
inner axis (no sum of three) and one kernel-gradient product 3x wider. This measures where that
pays: widths of ViT-Ti/S/B (192, 384, 768) at batch 1, 8 and 32 of 197 tokens. The model packs
only when gradients are taken over at least `minivit.models.vit.PACK_ROWS` rows.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/qkv.py [--json] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _common  # noqa: E402  (next to this file)

WIDTHS = {192: 3, 384: 6, 768: 12}  # D: heads (ViT-Ti, ViT-S, ViT-B)
BATCHES = (1, 8, 32)
TOKENS = 197
JSON_KEYS = ("width", "rows", "pass", "three_ms", "packed_ms", "speedup")


def _closures(np, width: int, heads: int, rows: int) -> dict:
    """Per pass, the (three products, packed) closures over the same float32 data.

    Each runs the ops' own forward and backward (`Function.backward`, as the autograd sweep
    calls it); the three products' input gradients are summed as the sweep sums them.
    """
    from minivit import Tensor  # noqa: PLC0415
    from minivit.autograd import no_grad  # noqa: PLC0415
    from minivit.ops.linalg import Dense, HeadsProjections  # noqa: PLC0415

    rng = np.random.default_rng(0)
    head = width // heads

    def leaf(*shape):
        return Tensor(rng.standard_normal(shape, dtype=np.float32), requires_grad=True)

    x = leaf(rows, width)
    kernels, biases = (
        [leaf(width, heads, head) for _ in range(3)],
        [leaf(heads, head) for _ in range(3)],
    )
    flat = [Tensor(w.data.reshape(width, -1), requires_grad=True) for w in kernels]  # (D, NH K)
    flat_bias = [Tensor(b.data.reshape(-1), requires_grad=True) for b in biases]
    gy = rng.standard_normal((rows, 3, heads * head), dtype=np.float32)  # (R, 3, NH K)
    gys = [np.ascontiguousarray(gy[:, i]) for i in range(3)]  # as attention hands them back

    def three():
        return [Dense()(x, w, b) for w, b in zip(flat, flat_bias)]

    def packed():
        return HeadsProjections()(x, *kernels, *biases)

    def three_both():
        grads = [y.creator.backward(np, g) for y, g in zip(three(), gys)]
        return grads[0][0] + grads[1][0] + grads[2][0], grads

    def packed_both():
        y = packed()
        return y.creator.backward(np, gy.reshape(y.shape))

    def without_grad(fn):
        def run():
            with no_grad():
                return fn()

        return run

    return {
        "forward": (without_grad(three), without_grad(packed)),
        "forward+backward": (three_both, packed_both),
    }


def run(np, min_runs: int) -> list[dict]:
    """Best-of times of both ways for every width, batch and pass."""
    rows = []
    for width, heads in WIDTHS.items():
        for batch in BATCHES:
            n = batch * TOKENS
            for name, (three, packed) in _closures(np, width, heads, n).items():
                a = _common.time_ms(three, min_runs=min_runs, budget_s=0.5)
                b = _common.time_ms(packed, min_runs=min_runs, budget_s=0.5)
                rows.append(dict(width=width, rows=n, **{"pass": name}, three_ms=a, packed_ms=b))
                rows[-1]["speedup"] = _common.ratio(a, b)
                print(
                    f"  D {width} rows {n} {name}: three {a:.3f} ms, packed {b:.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--threads", type=int, default=_common.default_threads())
    parser.add_argument("--min-runs", type=int, default=5, help="timed runs per cell at least")
    args = parser.parse_args()
    _common.setup_threads(args.threads)
    importlib.import_module("minivit")  # before NumPy loads its BLAS: minivit sets it up
    import numpy as np  # noqa: PLC0415

    rows = run(np, args.min_runs)
    report = sys.stderr if args.json else sys.stdout
    print(f"{args.threads} threads; " + "; ".join(_common.blas_report()), file=report)
    if args.json:
        _common.emit_json(rows, JSON_KEYS)
        return
    columns = [("width", "D"), ("rows", "rows"), ("pass", "pass"), ("three_ms", "three ms")]
    columns += [("packed_ms", "packed ms"), ("speedup", "three / packed")]
    print(_common.format_table(rows, columns))


if __name__ == "__main__":
    _main()
