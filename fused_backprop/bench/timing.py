"""Timing with the right clock for the device.

A measurement is ``repeat`` samples; each sample runs the statement ``number`` times back to back
(``number`` chosen so that one sample lasts at least ``min_sample_s``) and gives the mean time of
one call. On the CPU the clock is ``time.perf_counter``; on a GPU a pair of CUDA events recorded
on the current stream around the sample (the launches are asynchronous: a host clock would time
the launches, not the kernels), with a synchronize before reading them.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

MAX_NUMBER = 10_000


@dataclass
class Measurement:
    times: list  # seconds per call, one entry per sample
    number: int  # calls per sample

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile of the samples (q in [0, 1])."""
        xs = sorted(self.times)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def q25(self) -> float:
        return self.quantile(0.25)

    @property
    def q75(self) -> float:
        return self.quantile(0.75)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.05 = ±5 % around the median, roughly)."""
        return (self.q75 - self.q25) / self.median if self.median > 0 else 0.0


class Clock:
    """Times ``number`` calls of a statement; ``sync`` waits until the device has finished."""

    name = "perf_counter"

    def sync(self) -> None:
        pass

    def time(self, stmt: Callable[[], object], number: int) -> float:
        """Seconds for ``number`` calls."""
        start = time.perf_counter()
        for _ in range(number):
            stmt()
        return time.perf_counter() - start


class CudaClock(Clock):
    name = "cuda-events"

    def __init__(self, device):
        self.device = torch.device(device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def time(self, stmt, number):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        start.record()
        for _ in range(number):
            stmt()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device) -> Clock:
    device = torch.device(device)
    return CudaClock(device) if device.type == "cuda" else Clock()


def measure_interleaved(stmts: dict, clock: Clock, *, warmup: int = 3, repeat: int = 15,
                        min_sample_s: float = 0.02, on_error=None) -> dict:
    """Times several statements: each is warmed up (``warmup`` calls, at least one), its ``number``
    is picked from the fastest timed call after the first, then ``repeat`` samples are taken
    round-robin (sample 1 of each, then sample 2 of each, ...), so that a burst of load from
    elsewhere on the machine hits all of them alike and their ratios stay fair. Returns
    {name: Measurement}; a statement that raises is left out and reported to ``on_error(name, exc)``."""
    numbers, alive = {}, {}
    for name, stmt in stmts.items():
        try:
            # The warm-up calls are timed too: the number comes from the fastest call after the
            # first, so one burst of load cannot leave a 10 ms statement at one call per sample.
            warm = [clock.time(stmt, 1) for _ in range(max(warmup, 1))]
            once = min(warm[1:] + [clock.time(stmt, 1)])
        except Exception as exc:  # noqa: BLE001  (reported, the others go on)
            if on_error is None:
                raise
            on_error(name, exc)
            continue
        numbers[name] = 1 if once >= min_sample_s else min(MAX_NUMBER, max(1, math.ceil(min_sample_s / max(once, 1e-9))))
        alive[name] = stmt
    times = {name: [] for name in alive}
    for _ in range(max(repeat, 1)):
        for name, stmt in list(alive.items()):
            try:
                times[name].append(clock.time(stmt, numbers[name]) / numbers[name])
            except Exception as exc:  # noqa: BLE001
                if on_error is None:
                    raise
                on_error(name, exc)
                del alive[name]
    return {name: Measurement(times[name], numbers[name]) for name in alive}
