"""``compare_throughput`` times the models it is given, side by side."""

from __future__ import annotations

import copy

import pytest
from conftest import make_vit
from torch import nn

from tokenreduce.eval.throughput import compare_throughput, paired_speedup


class CountingWrapper(nn.Module):
    """Forwards to a model and counts the calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_shared_baseline_is_timed_as_the_unreduced_model():
    network = make_vit()
    baseline = CountingWrapper(copy.deepcopy(network)).eval()
    row = compare_throughput(
        copy.deepcopy(network), "evit", batch_size=2, repeats=3, warmup=1, progress=False, baseline=baseline
    )
    assert baseline.calls == 1 + 3  # warm-up plus every timed repeat
    assert row["shared_baseline"] is True
    assert len(row["timings"]["unreduced"]["seconds"]) == 3
    assert row["gmacs_ratio"] < 1.0


def test_shared_baseline_must_be_in_eval_mode():
    network = make_vit()
    with pytest.raises(ValueError, match="eval mode"):
        compare_throughput(copy.deepcopy(network), "evit", batch_size=1, repeats=1, progress=False,
                           baseline=copy.deepcopy(network).train())


def test_paired_speedup_is_the_median_of_the_per_round_ratios():
    # rounds: ratios 1, 2 and 0.5 → median 1; the ratio of the medians (1 / 2) would say 0.5
    assert paired_speedup([1.0, 10.0, 1.0], [1.0, 5.0, 2.0]) == pytest.approx(1.0)
    # a machine that slows down 3× over the run: every round is 2× faster reduced
    assert paired_speedup([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([], [])
