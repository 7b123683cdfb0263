"""``compare_throughput`` times the models it is given, side by side."""

from __future__ import annotations

import copy

import pytest
import torch
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


def test_paired_speedups_time_every_model_against_the_base_in_the_same_rounds(monkeypatch):
    """Every model's speed-up is the median of its per-round ratios to the base's timing of the same round."""
    from tokenreduce.eval import accuracy

    # "fast": ratios 2, 4, 0.5 (median 2), where the ratio of the medians would read 1
    rounds = {"base": [2.0, 8.0, 2.0], "fast": [1.0, 2.0, 4.0], "slow": [4.0, 4.0, 8.0]}
    monkeypatch.setattr(accuracy, "_alternate_seconds", lambda models, x, repeats, warmup: rounds)
    models = {name: nn.Identity() for name in rounds}
    speedups = accuracy.paired_speedups(models, torch.zeros(1), "base", repeats=3)
    assert speedups == {"fast": pytest.approx(2.0), "slow": pytest.approx(0.5)}
    with pytest.raises(KeyError, match="not one of the models"):
        accuracy.paired_speedups(models, torch.zeros(1), "missing")
