"""fit caps BLAS threads for the duration of the call only: restored afterwards, also when it
raises and when fits overlap in threads; results are those of the same BLAS thread count."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from optim_core.models import MLP
from threadpoolctl import threadpool_limits

from optim_core import fit
from optim_core.train.threads import blas_threads, limited_blas

# A count no machine gives BLAS by default, so a restored count is told from a default one.
OUTSIDE = 3


@pytest.fixture
def outside():
    """BLAS set to OUTSIDE threads around the test (skipped without a BLAS that takes it).

    A first fit loads what fit loads (numba's import loads SciPy's BLAS, which a call
    that loads it leaves as it finds it), so every library is there before the test."""
    _fit()
    with threadpool_limits(OUTSIDE, user_api="blas"):
        counts = blas_threads()
        if not counts or set(counts.values()) != {OUTSIDE}:
            pytest.skip(f"no BLAS library here that runs {OUTSIDE} threads: {counts}")
        yield counts


# Products large enough for OpenBLAS to split them over threads, which then sums in another
# order (on 3 threads 64-128-3 training differs in the last bits; 20-32-3 does not).
N_FEATURES, HIDDEN, BATCH = 64, 128, 128


def _data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = rng.integers(0, 3, n)
    return X, y


class _SeenThreads:
    """A callback recording the BLAS thread counts at the end of every epoch."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, logs, model):
        self.seen.append(set(blas_threads().values()))
        return False


def _fit(callbacks=(), **kwargs):
    X, y = _data()
    model = MLP((N_FEATURES, HIDDEN, 3))
    fit(model, X, y, optimizer="sgd", lr=0.05, epochs=2, batch_size=BATCH, seed=1,
        progress=False, callbacks=callbacks, **kwargs)
    return model


def test_fit_runs_blas_on_one_thread_and_puts_the_count_back(outside):
    seen = _SeenThreads()
    _fit([seen])
    assert seen.seen == [{1}, {1}]
    assert blas_threads() == outside


def test_a_given_count_is_used_and_none_leaves_blas_alone(outside):
    for threads, during in ((2, {2}), (None, {OUTSIDE})):
        seen = _SeenThreads()
        _fit([seen], blas_threads=threads)
        assert seen.seen == [during, during]
        assert blas_threads() == outside


def test_the_count_is_put_back_when_fit_raises(outside):
    class Fails:
        def on_epoch_end(self, epoch, logs, model):
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        _fit([Fails()])
    assert blas_threads() == outside


def test_a_bad_count_is_refused_before_anything_changes(outside):
    model = MLP((N_FEATURES, HIDDEN, 3))
    X, y = _data()
    for bad in (0, -1, 1.5, "1"):
        with pytest.raises((TypeError, ValueError), match="blas_threads"):
            fit(model, X, y, epochs=1, progress=False, blas_threads=bad)
        assert model.params is None
    assert blas_threads() == outside


def test_results_are_those_of_blas_on_one_thread_whatever_the_outside_count(outside):
    limited = _fit()
    with threadpool_limits(1, user_api="blas"):
        by_hand = _fit(blas_threads=None)
    for name, value in by_hand.params.items():
        np.testing.assert_array_equal(limited.params[name], value)



def test_overlapping_fits_in_threads_leave_the_outside_count(outside):
    barrier = threading.Barrier(3)
    errors = []

    def work(threads):
        try:
            barrier.wait(timeout=30)
            _fit(blas_threads=threads)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in (1, 2, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors
    assert blas_threads() == outside


def test_nested_limits_take_the_lowest_and_the_outermost_restores(outside):
    with limited_blas(2):
        assert set(blas_threads().values()) == {2}
        with limited_blas(1):
            assert set(blas_threads().values()) == {1}
        assert set(blas_threads().values()) == {1}  # until the outermost block ends
        with limited_blas(None):
            assert set(blas_threads().values()) == {1}
    assert blas_threads() == outside
