"""Timing one repeated operation: warm-up, then the median of many timed repeats.

On the CPU each repeat is timed with :func:`time.perf_counter`. On a GPU each
repeat is bracketed by CUDA events recorded on the stream the library launches
on (CuPy's or torch's current stream), read back after one final synchronize, so
the times are device times and no synchronization sits inside the timed loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Clock", "WallClock", "CupyEventClock", "TorchEventClock", "Measurement", "measure"]


class Clock:
    """Times a batch of repeats of one callable; subclasses choose what time means."""

    #: Recorded in the results so each number says how it was taken.
    method = "abstract"

    def synchronize(self) -> None:
        """Wait until all work launched so far has finished."""

    def time_each(self, fn: Callable[[], object], repeats: int) -> list[float]:
        """Call ``fn`` ``repeats`` times; return each call's duration in seconds."""
        raise NotImplementedError


class WallClock(Clock):
    """Host wall-clock time; ``sync`` (if given) runs inside each timed call.

    With ``sync`` the time covers the work the call launched (JAX's
    ``block_until_ready``); without it the call must be synchronous (NumPy).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self.method = "perf_counter" + ("+block_until_ready" if sync else "")

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()

    def time_each(self, fn: Callable[[], object], repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.synchronize()
            times.append(time.perf_counter() - start)
        return times


class _EventClock(Clock):
    def _new_event(self):  # pragma: no cover - GPU only
        raise NotImplementedError

    def time_each(self, fn: Callable[[], object], repeats: int) -> list[float]:
        events = [self._new_event() for _ in range(repeats + 1)]
        # Back-to-back repeats share events: the end of one is the start of the next, so
        # the time between launches is counted, as it is in a training loop.
        events[0].record()
        for i in range(repeats):
            fn()
            events[i + 1].record()
        events[-1].synchronize()
        return [self._elapsed_ms(events[i], events[i + 1]) / 1e3 for i in range(repeats)]

    def _elapsed_ms(self, start, end) -> float:  # pragma: no cover - GPU only
        raise NotImplementedError


class CupyEventClock(_EventClock):  # pragma: no cover - GPU only
    """CUDA events on CuPy's current stream."""

    method = "cuda-events (cupy)"

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy

    def _new_event(self):
        return self._cupy.cuda.Event()

    def _elapsed_ms(self, start, end) -> float:
        return self._cupy.cuda.get_elapsed_time(start, end)

    def synchronize(self) -> None:
        self._cupy.cuda.get_current_stream().synchronize()


class TorchEventClock(_EventClock):  # pragma: no cover - GPU only
    """CUDA events on torch's current stream."""

    method = "cuda-events (torch)"

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def _new_event(self):
        return self._torch.cuda.Event(enable_timing=True)

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        self._torch.cuda.synchronize()


@dataclass
class Measurement:
    """Per-repeat times of one operation and their summary."""

    times: list[float] = field(default_factory=list)
    warmup: int = 0
    method: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)


def measure(fn: Callable[[], object], clock: Clock, *, warmup: int = 3,
            budget_s: float = 1.0, min_repeats: int = 5, max_repeats: int = 200) -> Measurement:
    """Median-ready times of ``fn``: ``warmup`` untimed calls, then timed repeats.

    The number of timed repeats fills about ``budget_s`` seconds, judged from the
    last warm-up call, within ``[min_repeats, max_repeats]``.
    """
    if warmup < 1 or min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError("need warmup >= 1 and 1 <= min_repeats <= max_repeats")
    for _ in range(warmup - 1):
        fn()
    clock.synchronize()
    (estimate,) = WallClock(clock.synchronize).time_each(fn, 1)
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(estimate, 1e-9))))
    return Measurement(clock.time_each(fn, repeats), warmup, clock.method)
