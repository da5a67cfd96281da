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


def _fake_loops(monkeypatch, cost):
    """Loops that only advance a fake clock by ``cost[kind]`` a call, and the calls made."""
    from types import SimpleNamespace

    from optim_core.backends import _numba

    clock = [0.0]
    calls = []

    def loop(kind):
        def run(*args):
            calls.append(kind)
            clock[0] += cost[kind]
        return run

    # (By its dotted name: tests/test_notebooks.py's clock check reads any ``x.time`` as
    # a measured time.)
    monkeypatch.setattr(f"{_numba.__name__}.time.perf_counter", lambda: clock[0])
    return SimpleNamespace(parallel=loop("parallel"), serial=loop("serial")), calls


def test_large_tensors_take_the_loop_that_is_faster_now_and_retry_the_other_rarely(
        monkeypatch):
    """A threaded loop that is slow (busy cores) is left for the serial one after one
    try each, and tried again rarely; when it turns fast it is taken back at its next
    try, at most MAX_INTERVAL calls later."""
    from optim_core.backends import _numba

    cost = {"parallel": 100.0, "serial": 1.0}
    kernels, calls = _fake_loops(monkeypatch, cost)
    choice = _numba._ThreadChoice()
    arrays = (np.zeros(1),)
    for _ in range(200):
        choice.run(kernels, arrays, [])
    assert calls[:2] == ["parallel", "serial"]
    assert calls.count("parallel") <= 2 and calls.count("serial") >= 198
    cost["parallel"] = 0.1  # the cores are free again
    calls.clear()
    for _ in range(_numba._ThreadChoice.MAX_INTERVAL + 50):
        choice.run(kernels, arrays, [])
    assert calls[-50:] == ["parallel"] * 50


@pytest.mark.parametrize("slowdown", [1.5, 4.0, 15.0, 100.0])
def test_trying_the_slower_loop_again_costs_about_the_budget(monkeypatch, slowdown):
    """Beside busy processes the threaded loop can be many times slower than the serial
    one; its tries then add about BUDGET (2%) to the time of the serial calls, never the
    quarter that trying at doubling intervals cost over the first few hundred calls."""
    from optim_core.backends import _numba

    cost = {"parallel": slowdown, "serial": 1.0}
    kernels, calls = _fake_loops(monkeypatch, cost)
    choice = _numba._ThreadChoice()
    arrays = (np.zeros(1),)
    for n_calls in (300, 3000, 30000):
        calls.clear()
        for _ in range(n_calls):
            choice.run(kernels, arrays, [])
        extra = calls.count("parallel") * (slowdown - 1.0)
        assert extra <= 0.03 * n_calls + 2 * (slowdown - 1.0), (n_calls, calls.count("parallel"))
    # And it is still tried: at least once every MAX_INTERVAL calls.
    assert calls.count("parallel") >= 30000 // _numba._ThreadChoice.MAX_INTERVAL


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


#: Large (threaded) factored shapes: many matrices (a 16th of them per chunk, a count
#: 16 does not divide), one matrix of a row count 16 does not divide (16 parts), a few
#: matrices in 4 parts each, a few of 4 rows split row by row, 3x3 and 1x1 matrices as
#: a convolution's.
ADAFACTOR_SHAPES = [(3, 7, 1000, 50), (1037, 1013), (5, 211, 1000), (3, 4, 90001),
                    (1200, 100, 3, 3), (1100, 1000, 1, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factored_loops_give_the_same_bits_on_the_parallel_and_the_serial_variant(
        monkeypatch, dtype):
    """Adafactor's reduction passes add float64 partials of a fixed number of chunks, in
    chunk order, on either variant: the thread choice changes the speed, never a bit."""
    from optim_core.backends import _numba

    calls = []

    def run(parallel: bool) -> tuple:
        def call(self, threaded, serial, arguments, size, serial_arguments=None):
            calls.append(parallel)
            if parallel:
                threaded(*arguments)
            else:
                serial(*(arguments if serial_arguments is None else serial_arguments))

        monkeypatch.setattr(_numba._ThreadChoice, "call", call)
        rng = np.random.default_rng(7)
        params = [rng.standard_normal(shape).astype(dtype) for shape in ADAFACTOR_SHAPES]
        opt = optim_core.Adafactor(params, lr=0.05, weight_decay=0.1, impl="fused")
        for _ in range(2):
            opt.step([(rng.standard_normal(p.shape) * (1 + np.abs(p))).astype(dtype)
                      for p in opt.params])
        assert opt.implementation.name == "fused-numba"
        return [np.array(p) for p in opt.params], [
            {name: np.array(value) for name, value in state.items()}
            for state in opt.state[0]]

    (params_p, states_p), (params_s, states_s) = run(True), run(False)
    # Every tensor, every step, on the variant asked for.
    assert calls == [True] * 12 + [False] * 12
    for shape, got, want, state_p, state_s in zip(ADAFACTOR_SHAPES, params_p, params_s,
                                                  states_p, states_s, strict=True):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), shape
        assert set(state_p) == {"row_var", "col_var"}, shape
        for name in state_p:
            assert np.array_equal(state_p[name].view(np.uint8),
                                  state_s[name].view(np.uint8)), (shape, name)


#: Sizes around the per-tensor reduction passes' chunking (16 chunks of blocks of 256
#: lanes): fewer elements than chunks, a block and one more, sizes neither divides, one
#: above the parallel threshold.
REDUCTION_SIZES = [1, 15, 257, 16 * 256 + 15, 70001, (1 << 20) + 7]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_per_tensor_reductions_give_the_same_bits_on_any_thread_count_and_serially(
        monkeypatch, name, dtype):
    """The elementwise rules' norm passes (LAMB's and LARS's trust ratios, a 1-D
    Adafactor's RMS) add float64 partials of fixed chunks and lanes in a fixed order: the
    multi-threaded pass on 2 threads, on 1, and the serial one give the same bits."""
    import numba
    from optim_core.backends import _numba

    def run(parallel: bool, threads: int) -> list[np.ndarray]:
        threshold = 0 if parallel else 1 << 62
        monkeypatch.setattr(_numba, "_PARALLEL_MIN_SIZE", threshold)
        monkeypatch.setattr(_numba.NumbaImplementation, "large_size", threshold)
        rng = np.random.default_rng(3)
        params = [rng.standard_normal(n).astype(dtype) for n in REDUCTION_SIZES]
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            opt = getattr(optim_core, name)(params, lr=0.01, weight_decay=0.1, impl="fused")
            for _ in range(2):
                opt.step([(rng.standard_normal(p.shape) * (1 + np.abs(p))).astype(dtype)
                          for p in opt.params])
        finally:
            numba.set_num_threads(before)
        assert opt.implementation.name == "fused-numba"
        return [np.array(p) for p in opt.params] + [
            np.array(value) for state in opt.state[0] for value in state.values()
            if np.ndim(value)]

    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    serial = run(False, 1)
    for got_threads in sorted({1, threads}):
        for got, want in zip(run(True, got_threads), serial, strict=True):
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (
                got_threads, got.shape)
