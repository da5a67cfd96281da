"""fit sets BLAS threads for the duration of the call only (measured by default, or a given
cap): restored afterwards, also when it raises and when fits overlap in threads; results are
those of the same BLAS thread count, and the measured choice's probes change nothing."""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pytest
from optim_core.models import MLP
from threadpoolctl import threadpool_limits

from optim_core import fit
from optim_core.train.threads import BlasThreadChoice, blas_threads, limited_blas

fit_module = importlib.import_module("optim_core.train.fit")

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


def _fit(callbacks=(), epochs=2, **kwargs):
    X, y = _data()
    model = MLP((N_FEATURES, HIDDEN, 3))
    model.history = fit(model, X, y, optimizer="sgd", lr=0.05, epochs=epochs,
                        batch_size=BATCH, seed=1, progress=False, callbacks=callbacks,
                        **kwargs)
    return model


def test_fit_chooses_between_one_and_the_outside_count_and_puts_the_count_back(outside):
    seen = _SeenThreads()
    history = _fit([seen]).history
    assert all(counts <= {1, OUTSIDE} and len(counts) == 1 for counts in seen.seen)
    assert [sum(steps.values()) for steps in history.blas_threads] == [4, 4]  # 512 / 128
    assert set().union(*history.blas_threads) <= {1, OUTSIDE}
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
    for bad in (0, -1, 1.5, "1", "Auto", "all"):
        with pytest.raises((TypeError, ValueError), match="blas_threads"):
            fit(model, X, y, epochs=1, progress=False, blas_threads=bad)
        assert model.params is None
    assert blas_threads() == outside


def test_results_are_those_of_the_same_blas_thread_count_whatever_the_outside_count(outside):
    for threads in (1, 2):
        limited = _fit(blas_threads=threads)
        with threadpool_limits(threads, user_api="blas"):
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


def test_open_blocks_run_the_lowest_request_and_the_outermost_restores(outside):
    with limited_blas(2) as scope:
        assert scope.ceiling == OUTSIDE
        assert set(blas_threads().values()) == {2}
        with limited_blas(1):
            assert set(blas_threads().values()) == {1}
        assert set(blas_threads().values()) == {2}  # the inner block's request is gone
        with limited_blas(None) as nothing:
            assert nothing is None
            assert set(blas_threads().values()) == {2}
        scope.request(OUTSIDE + 5)  # never more than a library had on entry
        assert set(blas_threads().values()) == {OUTSIDE}
        scope.request(1)
        assert set(blas_threads().values()) == {1}
    assert blas_threads() == outside


class _FakeScope:
    def __init__(self, ceiling):
        self.ceiling, self.current, self.requests = ceiling, None, []

    def request(self, threads):
        self.current = threads
        self.requests.append(threads)


def _run_steps(choice, scope, seconds_by_threads, n, samples=10):
    """``n`` steps timed by a fake clock: a step on ``k`` threads takes
    ``seconds_by_threads[k]`` per sample. The counts the steps ran on."""
    now, ran = [0.0], []
    choice.clock = lambda: now[0]
    for _ in range(n):
        choice.start()
        ran.append(scope.current)
        now[0] += seconds_by_threads[scope.current] * samples
        choice.stop(samples)
    return ran


def _runs(ran):
    """Run-length encoding: [(count, steps), ...]."""
    runs = []
    for threads in ran:
        if runs and runs[-1][0] == threads:
            runs[-1][1] += 1
        else:
            runs.append([threads, 1])
    return [tuple(run) for run in runs]


def test_a_faster_count_is_taken_after_a_probe_of_three_steps_and_probed_back_rarely():
    scope = _FakeScope(ceiling=4)
    ran = _run_steps(BlasThreadChoice(scope), scope, {4: 1.0, 1: 3.0}, 520)
    runs = _runs(ran)
    # Three steps on one thread, a probe of all four (a step not judged, as it wakes the
    # threads, then three: won, they stay), then probes of one thread, each lost at its
    # first step. One thread was left within HOLD steps of being chosen: its interval
    # doubled from 8 to 16. A lost probe cost 2 steps more than a step on four threads:
    # the next waits max(2 x, 2 / BUDGET = 100) steps.
    assert runs == [(1, 3), (4, 1 + 3 + 16), (1, 1), (4, 100), (1, 1), (4, 200), (1, 1),
                    (4, 520 - 326)]


def test_a_slower_count_costs_two_steps_per_probe_at_growing_intervals():
    scope = _FakeScope(ceiling=4)
    choice = BlasThreadChoice(scope)
    ran = _run_steps(choice, scope, {4: 3.0, 1: 1.0}, 600)
    runs = _runs(ran)
    # Each lost probe of four threads (its first step not judged, the next one lost) cost
    # 4 steps more than two on one: the next waits max(2 x, 4 / BUDGET = 200) steps.
    assert runs == [(1, 3), (4, 2), (1, 200), (4, 2), (1, 600 - 207)]
    assert choice.take_steps() == {1: 600 - 4, 4: 4}
    assert choice.take_steps() == {}


def test_a_change_of_load_moves_the_steps_to_the_other_count():
    scope = _FakeScope(ceiling=2)
    choice = BlasThreadChoice(scope)
    assert set(_run_steps(choice, scope, {2: 1.0, 1: 2.0}, 300)[-40:]) == {2}
    # Another process takes a core: all threads become 5x slower than one. Once the
    # median of the last three steps shows it, one thread is probed, and wins.
    after = _run_steps(choice, scope, {2: 10.0, 1: 2.0}, 300)
    switched = after.index(1)
    assert switched == 2
    assert _runs(after[switched:])[0][1] >= 3 + BlasThreadChoice.FIRST_INTERVAL
    assert after[switched:].count(2) <= 5  # lost probes only, one step each
    # The load goes away: the next probe of all threads wins again. Lost probes of 5x
    # slower steps spaced the probes to 200 steps at least (4 extra steps / BUDGET).
    wait = choice.intervals[2]
    assert wait >= 200
    back = _run_steps(choice, scope, {2: 1.0, 1: 2.0}, wait + 100)
    assert back[wait + 3:].count(2) >= 95


def test_under_bursty_load_all_threads_are_tried_less_and_less():
    # All threads win a probe in a quiet moment, then are slow again at once: each time
    # they are left soon after being chosen, their interval doubles.
    scope = _FakeScope(ceiling=2)
    choice = BlasThreadChoice(scope)
    now, ran = [0.0], []
    choice.clock = lambda: now[0]
    for _ in range(2000):
        choice.start()
        ran.append(scope.current)
        probing = choice.probe is not None
        # A probe of all threads meets a quiet moment; after it, load is back.
        seconds = 1.0 if scope.current == 1 else (0.5 if probing else 10.0)
        now[0] += seconds * 10
        choice.stop(10)
    starts = [i for i in range(1, len(ran)) if ran[i] == 2 and ran[i - 1] == 1]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > 256  # rarer and rarer
    assert ran.count(2) < 0.05 * len(ran)


def test_nothing_is_timed_or_changed_without_a_second_count():
    scope = _FakeScope(ceiling=1)
    choice = BlasThreadChoice(scope, clock=lambda: 0.0)
    for _ in range(20):
        choice.start()
        choice.stop(10)
    assert scope.requests == [] and choice.take_steps() == {1: 20}


def test_auto_follows_the_faster_count_in_fit_and_records_each_epochs_steps(
        outside, monkeypatch):
    def running():
        (count,) = set(blas_threads().values())
        return count

    def timed_choice(scope):
        # A clock on which a step on one thread takes 3 units and on OUTSIDE threads 1.
        now = [0.0]
        choice = BlasThreadChoice(scope, clock=lambda: now[0])
        start = choice.start

        def timed_start():
            start()
            now[0] += 1.0 if running() == OUTSIDE else 3.0

        choice.start = timed_start
        return choice

    monkeypatch.setattr(fit_module, "BlasThreadChoice", timed_choice)
    seen = _SeenThreads()
    auto = _fit([seen], epochs=3)
    # 4 steps an epoch: 3 on one thread, a won probe of 3 on OUTSIDE, which stays for 8
    # steps, then a lost probe of one thread.
    assert auto.history.blas_threads == [{1: 3, OUTSIDE: 1}, {OUTSIDE: 4}, {OUTSIDE: 4}]
    assert blas_threads() == outside
    # The counts agree to rounding: the run is close to one on a fixed count.
    fixed = _fit(epochs=3, blas_threads=OUTSIDE)
    for name, value in fixed.params.items():
        np.testing.assert_allclose(auto.params[name], value, rtol=1e-4, atol=1e-6)
    assert fixed.history.blas_threads == [{OUTSIDE: 4}] * 3
