"""BLAS threads during :func:`~optim_core.fit`: a limit scoped to the call, restored after it.

A training step on NumPy arrays alternates the model's matrix products (NumPy's BLAS,
OpenBLAS in NumPy's wheels, with a pool of one thread per core) with the optimizer's
fused kernels (numba, a pool of its own, threaded for tensors of 2**20 elements or
more). BLAS workers keep spinning for a while after each product, so the two pools
fight for the cores, and beside other busy processes a multi-threaded product of a
mini-batch waits for time slices at every barrier: on 2 cores shared with other jobs,
100 steps of an MLP 784-256-10 (batch 128) took 1031 ms with 2 BLAS threads against
240 ms with one (load average 2.2, medians of 7 interleaved rounds).

:func:`limited_blas` caps the BLAS libraries that threadpoolctl finds loaded in the
process for the duration of a ``with`` block and puts back what they had when the
outermost block ends, also when it raises. Concurrent and nested blocks (fits in
several Python threads) share one scope: the first saves the libraries' settings, each
one lowers the cap to its own limit if that is lower, and the last one to leave
restores the saved settings, so no interleaving of calls leaves a limit behind. A
library loaded inside the block (the first import of numba loads SciPy's BLAS, which
NumPy does not use) keeps the count it starts with.
numba's pool is left alone: with BLAS on the calling thread only, the threaded kernels
have the cores to themselves, and which loop they run is chosen by measurement
(:class:`optim_core.backends._numba._ThreadChoice`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["limited_blas", "blas_threads"]

_LOCK = threading.Lock()
_depth = 0
# The BLAS libraries the outermost block found and their thread counts before it.
_saved: list[tuple[Any, int]] = []
_cap: int | None = None  # the lowest limit of the blocks now open


def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def limited_blas(threads: int | None) -> Iterator[None]:
    """At most ``threads`` BLAS threads inside the block (None: no limit, nothing done).

    Parameters
    ----------
    threads : int or None
        The cap, at least 1.
    """
    global _depth, _saved, _cap
    if threads is None:
        yield
        return
    with _LOCK:
        if _depth == 0:
            # Found once per outermost block (a scan of the loaded libraries, ~5 ms).
            _saved = [(library, library.num_threads)
                      for library in _controller().lib_controllers]
            _cap = None
        if _cap is None or threads < _cap:
            for library, _ in _saved:
                library.set_num_threads(threads)
            _cap = threads
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                for library, count in _saved:
                    library.set_num_threads(count)
                _saved, _cap = [], None


def blas_threads() -> dict[str, int]:
    """The thread count of every BLAS library loaded now, by file (for tests and reports)."""
    return {info["filepath"]: info["num_threads"] for info in _controller().info()}
