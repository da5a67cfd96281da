"""The fused NumPy path runs small tensors on the calling thread and large ones on all, same
numbers, and leaves numba's thread count alone."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import optim_core

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba not installed")


def test_small_and_large_tensors_match_the_generic_path_and_threads_are_restored():
    import numba
    from optim_core.backends import _numba

    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    sizes = (1000, _numba._PARALLEL_MIN_SIZE)  # the serial kernel, then the parallel one
    runs = {}
    for impl in ("fused", "generic"):
        params = [np.ones(n, dtype=np.float32) for n in sizes]
        opt = optim_core.Adam(params, lr=0.01, impl=impl)
        # One implementation object serves every optimizer: count this run's launches.
        launches_before = getattr(opt.implementation, "launches", 0)
        for step in range(3):
            opt.step([np.asarray(rng.standard_normal(n), dtype=np.float32) + step
                      for n in sizes])
        runs[impl] = opt
        launches = getattr(opt.implementation, "launches", 0) - launches_before
        rng = np.random.default_rng(0)
        if impl == "fused":
            launches_fused = launches
    assert runs["fused"].implementation.name == "fused-numba"
    # The first step one call per tensor; then the step plan's one call for both.
    assert launches_fused == len(sizes) + 2
    for got, want in zip(runs["fused"].params, runs["generic"].params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert numba.get_num_threads() == threads


def test_large_tensors_take_the_loop_that_is_faster_now_and_retry_the_other_rarely(
        monkeypatch):
    """A threaded loop that is slow (busy cores) is left for the serial one after one
    try each, and tried again at doubling intervals; when it turns fast it is taken back."""
    from types import SimpleNamespace

    from optim_core.backends import _numba

    clock = [0.0]
    cost = {"parallel": 100.0, "serial": 1.0}
    calls = []

    def loop(kind):
        def run(*args):
            calls.append(kind)
            clock[0] += cost[kind]
        return run

    monkeypatch.setattr(_numba.time, "perf_counter", lambda: clock[0])
    kernels = SimpleNamespace(parallel=loop("parallel"), serial=loop("serial"))
    choice = _numba._ThreadChoice()
    arrays = (np.zeros(1),)
    for _ in range(200):
        choice.run(kernels, arrays, [])
    assert calls[:2] == ["parallel", "serial"]
    probes = [i for i, kind in enumerate(calls) if kind == "parallel"]
    assert len(probes) <= 8 and calls.count("serial") >= 190
    cost["parallel"] = 0.1  # the cores are free again
    calls.clear()
    for _ in range(400):
        choice.run(kernels, arrays, [])
    assert calls[-50:] == ["parallel"] * 50


def test_each_kernel_times_its_own_loops(monkeypatch):
    # A float32 pass where the threaded loop wins and a quantized pass, five times as
    # long an element, where the serial loop wins, stepped in turn: one choice for both
    # would time one kernel's loop against the other's.
    from types import SimpleNamespace

    from optim_core.backends import _numba

    clock = [0.0]
    calls = []

    def loop(name, kind, cost):
        def run(*args):
            calls.append((name, kind))
            clock[0] += cost
        return run

    monkeypatch.setattr(_numba.time, "perf_counter", lambda: clock[0])
    fast = SimpleNamespace(parallel=loop("fast", "parallel", 1.0),
                           serial=loop("fast", "serial", 2.0))
    slow = SimpleNamespace(parallel=loop("slow", "parallel", 20.0),
                           serial=loop("slow", "serial", 10.0))
    implementation = _numba.NumbaImplementation()
    arrays = (np.zeros(1),)
    for _ in range(300):
        for kernels in (fast, slow):
            implementation.thread_choice(kernels).run(kernels, arrays, [])
    assert implementation.thread_choice(fast) is implementation.thread_choice(fast)
    assert implementation.thread_choice(fast) is not implementation.thread_choice(slow)
    late = calls[-200:]
    assert late.count(("fast", "parallel")) >= 95 and late.count(("slow", "serial")) >= 95
