"""The founding article's linear-regression example, trained with every optimizer.

The article (section 4) fits ``y = X theta`` on four samples with no intercept,
learning rate 0.01 and 1000 full-batch iterations.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..optim import algorithms as optimizers

#: The article's data, section 4.2.
ARTICLE_X = np.array([[1, 2], [2, 3], [3, 4], [4, 5]], dtype=np.float64)
ARTICLE_Y = np.array([2, 3, 4, 5], dtype=np.float64)
ARTICLE_LR = 0.01
ARTICLE_ITERATIONS = 1000
#: Iterations of the untimed-in-"time" warm-up run of each optimizer: enough for every
#: kernel specialization (first step, later steps, RAdam's rectified form from step 6).
WARMUP_ITERATIONS = 8

#: (name, optimizer class, keyword arguments) trained by the demo.
DEMO_OPTIMIZERS: tuple[tuple[str, Any, dict[str, Any]], ...] = (
    ("GD", optimizers.GD, {"lr": ARTICLE_LR}),
    ("SGD+momentum", optimizers.SGD, {"lr": ARTICLE_LR, "momentum": 0.9}),
    ("SGD+nesterov", optimizers.SGD, {"lr": ARTICLE_LR, "momentum": 0.9, "nesterov": True}),
    ("DGD", optimizers.DGD, {"lr": ARTICLE_LR, "decay": 0.9}),
    ("Adagrad", optimizers.Adagrad, {"lr": 0.1}),
    ("RMSprop", optimizers.RMSprop, {"lr": ARTICLE_LR}),
    ("Adadelta", optimizers.Adadelta, {"lr": 1.0}),
    ("Adam", optimizers.Adam, {"lr": ARTICLE_LR}),
    ("AdamW", optimizers.AdamW, {"lr": ARTICLE_LR, "weight_decay": 0.0}),
    ("Adamax", optimizers.Adamax, {"lr": ARTICLE_LR}),
    ("NAdam", optimizers.NAdam, {"lr": ARTICLE_LR}),
    ("RAdam", optimizers.RAdam, {"lr": ARTICLE_LR}),
    ("Lion", optimizers.Lion, {"lr": 1e-3}),
)


def mse_gradient(X: Any, y: Any, theta: Any) -> Any:
    """The article's gradient of the mean squared error, ``X^T (X theta - y) / m``."""
    return X.T @ (X @ theta - y) / X.shape[0]


def train(optimizer_class: Any, iterations: int = ARTICLE_ITERATIONS,
          **kwargs: Any) -> np.ndarray:
    """Full-batch training on the article's data from ``theta = 0``; returns theta."""
    theta = np.zeros(ARTICLE_X.shape[1])
    opt = optimizer_class([theta], **kwargs)
    for _ in range(iterations):
        opt.step([mse_gradient(ARTICLE_X, ARTICLE_Y, theta)])
    return theta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optim_core", description=__doc__)
    parser.add_argument("--iterations", type=int, default=ARTICLE_ITERATIONS)
    args = parser.parse_args(argv)
    print(f"Article example: X {ARTICLE_X.shape}, {args.iterations} full-batch iterations\n")
    print(f"{'optimizer':<14} {'theta':>24} {'MSE':>12} {'time ms':>9} {'warm-up ms':>11}")
    for name, cls, kwargs in DEMO_OPTIMIZERS:
        # One-time work (compiling this optimizer's kernels, or loading them from the
        # disk cache) is done and timed apart, so "time" is the training alone.
        start = time.perf_counter()
        train(cls, WARMUP_ITERATIONS, **kwargs)
        warm_up = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        theta = train(cls, args.iterations, **kwargs)
        elapsed = (time.perf_counter() - start) * 1e3
        mse = float(np.mean((ARTICLE_X @ theta - ARTICLE_Y) ** 2))
        print(f"{name:<14} {np.array2string(theta, precision=5):>24} {mse:12.3e} "
              f"{elapsed:9.1f} {warm_up:11.1f}")
    return 0
