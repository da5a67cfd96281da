"""BLAS threads during :func:`~optim_core.fit`: measured or capped, scoped to the call.

A training step on NumPy arrays alternates the model's matrix products (NumPy's BLAS,
OpenBLAS in NumPy's wheels, with a pool of one thread per core) with the optimizer's
fused kernels (numba, a pool of its own, threaded for tensors of 2**20 elements or
more). On idle cores the products are faster on every core (one epoch of an MLP
784-256-10 at batch 128: 0.62 s on 2 threads, 0.83 s on one); beside other busy
processes a multi-threaded product waits for time slices at every barrier and is far
slower (the same epoch beside one busy process: 3.0 s on 2 threads, 0.83 s on one).
No fixed count is right on both, and load comes and goes during a run, so
:class:`BlasThreadChoice` (``fit``'s default, ``blas_threads="auto"``) measures as it
trains.

:func:`limited_blas` sets the BLAS libraries that threadpoolctl finds loaded in the
process for the duration of a ``with`` block and puts back what they had when the
outermost block ends, also when it raises. Each open block requests a count (its
limit, or for a measured choice the count it chose last); the libraries run the lowest
request of the blocks open now, never more than each had on entry. Concurrent and
nested blocks (fits in several Python threads) share one scope: the first saves the
libraries' settings and the last one to leave restores them, so no interleaving of
calls leaves a limit behind. A library loaded inside the block (the first import of
numba loads SciPy's BLAS, which NumPy does not use) keeps the count it starts with.
numba's pool is left alone: which loop its kernels run is chosen by measurement too
(:class:`optim_core.backends._numba._ThreadChoice`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["limited_blas", "blas_threads", "BlasScope", "BlasThreadChoice"]

_LOCK = threading.Lock()
# The BLAS libraries the outermost block found and their thread counts before it.
_saved: list[tuple[Any, int]] = []
_requests: dict[int, int] = {}  # id of an open BlasScope -> the count it asks for
_applied: int | None = None  # the lowest request, as the libraries were last set


def _controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _apply_lowest() -> None:
    """Set the libraries to the lowest open request (under _LOCK; a no-op if unchanged)."""
    global _applied
    lowest = min(_requests.values())
    if lowest != _applied:
        for library, count in _saved:
            library.set_num_threads(min(lowest, count))
        _applied = lowest


class BlasScope:
    """An open :func:`limited_blas` block: the count it requests, changeable inside it.

    Attributes
    ----------
    ceiling : int
        The most threads any BLAS library had on entry to the outermost block (1 if
        none is loaded): more is never set.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling

    def request(self, threads: int) -> None:
        """Ask for ``threads`` (at least 1); the libraries run the lowest open request."""
        with _LOCK:
            if _requests.get(id(self)) != threads:
                _requests[id(self)] = threads
                _apply_lowest()


@contextlib.contextmanager
def limited_blas(threads: int | None) -> Iterator[BlasScope | None]:
    """At most ``threads`` BLAS threads inside the block (None: nothing done, yields None).

    Parameters
    ----------
    threads : int or None
        The count requested on entry, at least 1; the block's :class:`BlasScope`
        changes it (:meth:`BlasScope.request`).
    """
    global _saved, _applied
    if threads is None:
        yield None
        return
    with _LOCK:
        if not _requests:
            # Found once per outermost block (a scan of the loaded libraries, ~5 ms).
            _saved = [(library, library.num_threads)
                      for library in _controller().lib_controllers]
            _applied = None
        scope = BlasScope(max((count for _, count in _saved), default=1))
        _requests[id(scope)] = threads
        _apply_lowest()
    try:
        yield scope
    finally:
        with _LOCK:
            del _requests[id(scope)]
            if _requests:
                _apply_lowest()
            else:
                for library, count in _saved:
                    library.set_num_threads(count)
                _saved, _applied = [], None


def blas_threads() -> dict[str, int]:
    """The thread count of every BLAS library loaded now, by file (for tests and reports)."""
    return {info["filepath"]: info["num_threads"] for info in _controller().info()}


class BlasThreadChoice:
    """``fit(blas_threads="auto")``: each step's BLAS thread count, one or all, measured.

    Each training step (the batch's loss and gradient, then the optimizer's step) is
    timed per sample of its batch. Steps run on the current count; now and then a probe
    runs the next steps on the other count, :data:`PROBE_STEPS` of them, and the current
    count changes when their median beats the median of the current count's last
    :data:`PROBE_STEPS` steps by :data:`MARGIN`. A probe step slower than :data:`ABORT`
    times that median ends the probe at once, lost (a probe of all threads first runs
    one step that is not judged, as it wakes BLAS's worker threads): beside busy processes a
    multi-threaded step can take ten times a serial one, and a lost probe then costs
    one step. When the median of the current count's last steps grows past
    :data:`ABORT` times what it was when the count was chosen (load came), the other
    count is probed at once, so a change of load is followed within a few steps.

    Each count waits its own interval before it is probed: :data:`FIRST_INTERVAL` steps
    at first, doubled (up to :data:`MAX_INTERVAL`) each time a probe of it loses or it
    is left within :data:`HOLD` steps of being chosen, and after a lost probe at least
    long enough that the probe's extra time is :data:`BUDGET` of the steps between (on 2
    cores beside a busy process a step on 2 BLAS threads took 30 ms against 1.8 ms on
    one: the next probe of 2 threads then waits 800 steps). Under bursty load, where all
    threads win a probe in a quiet moment and lose the next busy one, they are tried
    less and less often; a count left after holding :data:`HOLD` steps waits
    :data:`FIRST_INTERVAL` again. The run starts on one thread and probes all of
    them after :data:`PROBE_STEPS` steps. Without a second count to choose (BLAS on one
    thread already) nothing is timed or changed.

    The counts give the same results to rounding only (BLAS may split a product among
    its threads and then sum in another order), so which steps ran on which count
    depends on timing: ``history.blas_threads`` says how many steps of each epoch ran on
    each count, and ``fit(blas_threads=k)`` repeats a run bit for bit.

    Parameters
    ----------
    scope : BlasScope
        The open :func:`limited_blas` block the counts are requested through.
    clock : callable, optional
        Seconds, monotonic (:func:`time.perf_counter`); tests pass a fake one.
    """

    PROBE_STEPS = 3
    MARGIN = 0.95
    ABORT = 1.5
    FIRST_INTERVAL = 8
    HOLD = 256
    MAX_INTERVAL = 4096
    BUDGET = 0.02

    def __init__(self, scope: BlasScope,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.scope, self.clock = scope, clock
        self.many = scope.ceiling
        self.current = 1
        self.recent: list[float] = []  # the current count's last PROBE_STEPS step times
        self.baseline: float | None = None  # their median when the count was last chosen
        self.held = 0  # steps on the current count since it was chosen
        self.probe: list[float] | None = None  # a probe's step times, while one runs
        self.warm_up: float | None = None  # its untimed first step on all threads
        self.intervals = {self.many: self.FIRST_INTERVAL, 1: self.FIRST_INTERVAL}
        self.countdown = self.PROBE_STEPS
        self.running = 1
        self.started = 0.0
        self.steps: dict[int, int] = {}  # count -> steps, since the last take_steps()

    def _other(self) -> int:
        return 1 if self.current == self.many else self.many

    def start(self) -> None:
        """Before a step: request the count it runs on and start its clock."""
        if self.many > 1:
            self.running = self.current if self.probe is None else self._other()
            self.scope.request(self.running)
        self.started = self.clock()

    def stop(self, samples: int) -> None:
        """After the step that :meth:`start` began, on a batch of ``samples`` rows."""
        self.steps[self.running] = self.steps.get(self.running, 0) + 1
        if self.many == 1:
            return
        seconds = (self.clock() - self.started) / max(samples, 1)
        if self.probe is None:
            self.recent = [*self.recent[1 - self.PROBE_STEPS:], seconds]
            self.held += 1
            self.countdown -= 1
            if self.baseline is None and len(self.recent) == self.PROBE_STEPS:
                self.baseline = statistics.median(self.recent)
            elif self.baseline is not None \
                    and statistics.median(self.recent) > self.ABORT * self.baseline:
                self.countdown = 0  # the current count got slower (load came)
            if self.countdown <= 0:
                self.probe, self.warm_up = [], 0.0 if self._other() == self.many else None
            return
        if self.warm_up == 0.0:
            # The first step on all threads after steps on one wakes BLAS's worker threads
            # (measured: 2.9 ms against 1.1-1.3 for the next ones): not judged, only paid.
            self.warm_up = seconds
            return
        self.probe.append(seconds)
        usual = statistics.median(self.recent)
        if seconds <= self.ABORT * usual and len(self.probe) < self.PROBE_STEPS:
            return
        probed = self.running
        if len(self.probe) == self.PROBE_STEPS \
                and statistics.median(self.probe) < self.MARGIN * usual:
            left = self.current
            self.intervals[left] = self.FIRST_INTERVAL if self.held >= self.HOLD \
                else min(2 * self.intervals[left], self.MAX_INTERVAL)
            self.current, self.recent, self.held = probed, self.probe, 0
        else:
            # What the lost probe cost beyond steps on the current count, in such steps:
            # the next one waits until that is at most BUDGET of the steps between.
            spent = sum(self.probe) + (self.warm_up or 0.0)
            taken = len(self.probe) + (self.warm_up is not None)
            extra = spent / usual - taken if usual > 0 else 0.0
            self.intervals[probed] = min(max(2 * self.intervals[probed],
                                             math.ceil(extra / self.BUDGET)),
                                         self.MAX_INTERVAL)
        self.probe, self.countdown = None, self.intervals[self._other()]
        self.baseline = statistics.median(self.recent)

    def take_steps(self) -> dict[int, int]:
        """The steps run on each count since the last call (and start counting afresh)."""
        steps, self.steps = self.steps, {}
        return steps
