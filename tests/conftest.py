"""Shared fixtures: one ``xp`` fixture over every array library present."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _blas_on_one_thread():
    """BLAS on one thread for the whole run. fit's default (``blas_threads="auto"``) then has
    no second count to choose, so runs the tests compare bit for bit are a pure function
    of their seed, as for any fixed count; tests/test_fit_threads.py sets other counts
    itself to test the choice. (On CI's 2 cores the suite's own threads share them too.)
    Without threadpoolctl (bench/gpu_check.sh's bare import path) nothing is limited."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _gpu_present() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device: all mean "no GPU"
        return False


def _namespaces():
    yield pytest.param("numpy", id="numpy")
    yield pytest.param("array_api_strict", id="array_api_strict",
                       marks=pytest.mark.skipif(
                           importlib.util.find_spec("array_api_strict") is None,
                           reason="array_api_strict not installed"))
    yield pytest.param("torch", id="torch",
                       marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                reason="torch not installed"))
    yield pytest.param("cupy", id="cupy",
                       marks=pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU"))


class Namespace:
    """An array library under test: its array API namespace plus host conversions."""

    def __init__(self, name: str) -> None:
        import array_api_compat

        self.name = name
        if name == "numpy":
            import numpy

            self.module = numpy
        elif name == "array_api_strict":
            import array_api_strict

            self.module = array_api_strict
        elif name == "torch":
            import torch

            self.module = torch
        elif name == "cupy":
            import cupy

            self.module = cupy
        self.xp = array_api_compat.array_namespace(self.module.asarray([1.0]))

    def asarray(self, values, dtype: str = "float64"):
        """A new array of this library from host values."""
        return self.xp.asarray(np.asarray(values, dtype=dtype).copy(),
                               dtype=getattr(self.xp, dtype))

    def to_numpy(self, x) -> np.ndarray:
        from optim_core._namespace import to_numpy

        return to_numpy(x)

    def __repr__(self) -> str:
        return f"Namespace({self.name})"


@pytest.fixture(params=list(_namespaces()))
def xp(request) -> Namespace:
    """Each array library present: numpy, array_api_strict, torch CPU, cupy on a GPU."""
    return Namespace(request.param)


@pytest.fixture
def gpu() -> None:
    if not _gpu_present():
        pytest.skip("no CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def outside_the_source_tree(tmp_path_factory):
    """Run every test from an empty folder.

    A ``python -c`` started in the repository root would import the source folder
    optim_core/ (whose backends/ sits beside it and is mapped in by
    ``optim_core/_source_tree.py``) instead of the installed package, which is what
    the tests check.
    """
    import os

    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
