"""The training loss of the official code: mean softmax cross-entropy.

`vit_jax/train.py`: `-mean(sum(log_softmax(logits) * labels, axis=-1))` with one-hot labels; here
labels may also be integer class indices (the same loss) or soft rows.
"""

from __future__ import annotations

import numpy as np

from minivit import kernels
from minivit.autograd import Function, Tensor


class SoftmaxCrossEntropy(Function):
    """Mean over the batch of -sum(labels * log_softmax(logits)).

    Shapes: logits (B, C), labels (B,) integer classes or (B, C) rows -> loss ()
    """

    def _check(self, xp, logits, labels):
        if logits.ndim != 2 or labels.shape not in ((logits.shape[0],), logits.shape):
            raise self.shape_error(
                f"logits {logits.shape} and labels {labels.shape} must be (B, C) and (B,) or (B, C)"
            )
        if labels.ndim == 1:
            if not np.issubdtype(labels.dtype, np.integer):
                raise self.shape_error(
                    f"labels of shape {labels.shape} must hold integer class indices, "
                    f"got dtype {labels.dtype}"
                )
            if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
                raise self.shape_error(
                    f"labels must lie in [0, {logits.shape[1]}) for logits {logits.shape}"
                )

    def forward(self, xp, logits, labels):
        labels = xp.asarray(labels)
        self._check(xp, logits, labels)
        self.fused = kernels.fusable(logits) and not self.needs_grad[1]
        if self.fused:
            return self._fused_forward(xp, logits, labels)
        z = logits - logits.max(axis=1, keepdims=True)  # (B, C)
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))  # (B, C)
        if labels.ndim == 1:
            rows = -logp[xp.arange(labels.shape[0]), labels]  # (B,)
        else:
            labels = labels.astype(logp.dtype, copy=False)
            rows = -(logp * labels).sum(axis=1)  # (B,)
        self.save(logp, labels)
        return xp.asarray(rows.mean(), dtype=logp.dtype)

    def _fused_forward(self, xp, logits, labels):
        """The fused kernel on one-hot rows; keeps the log-sum-exp for backward."""
        if labels.ndim == 1:
            onehot = xp.zeros(logits.shape, logits.dtype)  # (B, C)
            onehot[xp.arange(labels.shape[0]), labels] = 1.0
        else:
            onehot = labels.astype(logits.dtype, copy=False)
        rows, lse = kernels.softmax_xent_forward(logits, onehot)  # (B,), (B,)
        self.save(logits, onehot, lse)
        return xp.asarray(rows.mean(), dtype=logits.dtype)

    def backward(self, xp, gy):
        if self.fused:
            logits, onehot, lse = self.saved
            g_rows = xp.full(logits.shape[0], gy / logits.shape[0], logits.dtype)  # (B,)
            return kernels.softmax_xent_backward(g_rows, logits, onehot, lse), None
        logp, labels = self.saved
        b = logp.shape[0]
        scale = gy / b  # () in the logits' dtype
        glogits = glabels = None
        if self.needs_grad[0]:
            if labels.ndim == 1:
                glogits = xp.exp(logp)
                glogits[xp.arange(b), labels] -= 1.0
            else:
                glogits = xp.exp(logp) * labels.sum(axis=1, keepdims=True) - labels
            glogits *= scale
        if labels.ndim == 2 and self.needs_grad[1]:
            glabels = -logp * scale
        return glogits, glabels


def softmax_cross_entropy(logits, labels) -> Tensor:
    """Mean softmax cross-entropy; labels are class indices (B,) or one-hot / soft rows (B, C).

    Shapes: logits (B, C), labels (B,) or (B, C) -> ()
    """
    if isinstance(labels, list | tuple):
        labels = np.asarray(labels)
    return SoftmaxCrossEntropy()(logits, labels)
