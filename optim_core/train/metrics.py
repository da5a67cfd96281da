r"""The two metrics of the bundled models, from sums that chunks and batches can share.

* accuracy: correct labels over samples;
* :math:`R^2 = 1 - \mathrm{RSS} / \mathrm{TSS}`, the residual sum of squares over the
  targets' sum of squared deviations from their (per-output) mean, over all outputs
  together for a multi-output regression.
"""

from __future__ import annotations

from typing import Any

__all__ = ["r2", "outputs_per_sample"]


def r2(residual: float, total: float) -> float:
    """:math:`R^2` from the residual and total sums of squares.

    Constant targets (``total == 0``) give, as scikit-learn does, 1 when predicted
    exactly and 0 otherwise.
    """
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return 1.0 - residual / total


def outputs_per_sample(y: Any) -> int:
    """How many targets each sample has: 1 for a vector, ``k`` for shape ``(n, k)``."""
    return 1 if y.ndim == 1 else int(y.shape[1])
