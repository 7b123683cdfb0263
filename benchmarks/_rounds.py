"""Interleaved timing of several training-step callables, shared by the training-speed benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from tokenreduce.eval.throughput import interleaved_seconds, wall_clock


def median_rates(
    steps: Sequence[Callable[[], None]], rounds: int, steps_per_round: int, batch_size: int
) -> list[float]:
    """Median images/s of each step function, the functions taking turns round after round.

    Every round runs ``steps_per_round`` calls of each function in turn
    (:func:`tokenreduce.eval.throughput.interleaved_seconds`), so slow drifts of a shared
    machine hit all of them alike.
    """

    def run_round(step: Callable[[], None]) -> Callable[[], float]:
        return wall_clock(lambda: [step() for _ in range(steps_per_round)])

    seconds = interleaved_seconds({str(i): run_round(step) for i, step in enumerate(steps)}, rounds)
    return [steps_per_round * batch_size / statistics.median(seconds[str(i)]) for i in range(len(steps))]
