"""Single-precision GEMM callable from Numba code, on strided row-major blocks.

Numba's `np.dot` takes only contiguous 2-D arrays (it copies anything else), allocates its
result, and cannot accumulate or scale. The attention bodies need all three on heads that are
strided views of the flax (B, N, NH, K) layout, so they call BLAS `sgemm` themselves, through
the C entry point SciPy exports for Cython (`scipy.linalg.cython_blas`, the library Numba's own
`np.dot` uses). The call is emitted by name (`minivit_sgemm`) and the name is bound to SciPy's
address when this module loads, so the functions that use it stay in Numba's on-disk cache.
"""

from __future__ import annotations

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

_SYMBOL = "minivit_sgemm"
binding.add_symbol(_SYMBOL, get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
N, T = ord("N"), ord("T")


@intrinsic
def _sgemm(typingctx, trans_a, trans_b, m, n, k, alpha, a, b, beta, c, lda, ldb, ldc):
    """Fortran sgemm (column-major): c <- alpha op(a) op(b) + beta c, every argument by address."""
    sig = types.void(
        trans_a, trans_b, m, n, k, types.float32, a, b, types.float32, c, lda, ldb, ldc
    )

    def codegen(context, builder, signature, args):
        ta, tb, m_, n_, k_, alpha_, a_, b_, beta_, c_, lda_, ldb_, ldc_ = args
        i8, i32 = ir.IntType(8), ir.IntType(32)

        def scalar(value, ty):  # a stack slot holding value, as the pointer sgemm reads
            return cgutils.alloca_once_value(
                builder,
                value
                if value.type == ty
                else (builder.trunc(value, ty) if isinstance(ty, ir.IntType) else value),
            )

        def data(array, array_type):
            return context.make_array(array_type)(context, builder, array).data

        sig_args = signature.args
        pointers = [
            scalar(ta, i8), scalar(tb, i8), scalar(m_, i32), scalar(n_, i32), scalar(k_, i32),
            scalar(alpha_, ir.FloatType()), data(a_, sig_args[6]), scalar(lda_, i32),
            data(b_, sig_args[7]), scalar(ldb_, i32), scalar(beta_, ir.FloatType()),
            data(c_, sig_args[9]), scalar(ldc_, i32),
        ]  # fmt: skip
        pointers = [builder.bitcast(p, i8.as_pointer()) for p in pointers]
        fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer()] * 13)
        fn = cgutils.get_or_insert_function(builder.module, fnty, _SYMBOL)
        builder.call(fn, pointers)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", cache=True)
def rows(a) -> int:
    """The leading dimension (row stride in elements) of a row-major float32 block."""
    return a.strides[0] // 4


@numba.njit(inline="always", cache=True)
def gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c):
    """c <- alpha op(a) op(b) + beta c on row-major blocks (unit stride within a row).

    op(x) is x for `N` and x.T for `T`; op(a) is (m, k), op(b) is (k, n), c is (m, n). Row-major
    c = op(a) op(b) is column-major c.T = op(b).T op(a).T, so sgemm gets b before a.
    """
    _sgemm(trans_b, trans_a, n, m, k, alpha, b, a, beta, c, rows(b), rows(a), rows(c))
