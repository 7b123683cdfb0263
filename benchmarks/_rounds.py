"""Interleaved timing of several training-step callables, shared by the training-speed benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median_rates(
    steps: Sequence[Callable[[], None]], rounds: int, steps_per_round: int, batch_size: int
) -> list[float]:
    """Median images/s of each step function, the functions taking turns round after round.

    Every round runs ``steps_per_round`` calls of each function in turn, so slow drifts of
    a shared machine hit all of them alike.
    """
    rates: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            rates[i].append(steps_per_round * batch_size / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]
