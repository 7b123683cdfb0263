"""DPC-kNN clustering (ops/cluster.py) on toy sets worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce.ops.cluster import (
    DISTANCE_SCALES,
    cluster_mean,
    dpc_knn,
    knn_log_density,
    pairwise_distance,
    ranks_above,
)


def _points(values):
    """B=1 batch of points; a list of numbers gives 1-D points (distance scale 1/√1 = 1)."""
    t = torch.tensor(values, dtype=torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    return t.unsqueeze(0)


def test_distance_is_scaled_by_sqrt_width():
    d = pairwise_distance(_points([[0.0, 0.0], [3.0, 4.0]]))
    torch.testing.assert_close(d[0], torch.tensor([[0.0, 5.0], [5.0, 0.0]]) / math.sqrt(2))


def test_knn_density_by_hand():
    # points 0, 1, 3 with k=2: neighbour distances (1,3), (1,2), (2,3)
    dist = pairwise_distance(_points([0.0, 1.0, 3.0]))
    log_rho = knn_log_density(dist, k=2)
    torch.testing.assert_close(log_rho, torch.tensor([[-(1 + 9) / 2, -(1 + 4) / 2, -(4 + 9) / 2]]))
    # k larger than M-1 is capped; a single point has density exp(0)
    torch.testing.assert_close(knn_log_density(dist, k=10), log_rho)
    assert knn_log_density(pairwise_distance(_points([4.0])), k=5).tolist() == [[0.0]]


def test_density_ties_go_to_the_lower_position():
    above = ranks_above(torch.tensor([[-1.0, -1.0, -0.5]]))[0]
    # token 2 is densest; 0 and 1 tie, 0 ranks above 1
    assert above.tolist() == [
        [False, False, True],
        [True, False, True],
        [False, False, False],
    ]


def test_dpc_by_hand_with_tied_densities():
    # 1-D points 0, 1, 2, 5, 6 with k=1: every nearest-neighbour distance is 1, so all densities tie
    # and rank by position: 0 is the peak (δ = max distance 6); δ(1)=1, δ(2)=1, δ(5)=3, δ(6)=1.
    # ρ·δ ranks 0 (e^-1·6) then 5 (e^-1·3): centres [0, 3]; 0,1,2 join 0; 5,6 join 5.
    assign, centres = dpc_knn(_points([0.0, 1.0, 2.0, 5.0, 6.0]), num_clusters=2, k=1)
    assert centres.tolist() == [[0, 3]]
    assert assign.tolist() == [[0, 0, 0, 1, 1]]


def test_dpc_prefers_dense_points_over_far_outliers():
    # 0, 1, 2, 10, 13 with k=1: log ρ = (-1, -1, -1, -9, -9); δ = (13, 1, 1, 8, 3).
    # scores e^-1·13, e^-1, e^-1, e^-9·8, e^-9·3: centres 0 then 1 (tie with 2, lower position).
    assign, centres = dpc_knn(_points([0.0, 1.0, 2.0, 10.0, 13.0]), num_clusters=2, k=1)
    assert centres.tolist() == [[0, 1]]
    assert assign.tolist() == [[0, 1, 1, 1, 1]]


def test_two_d_toy_set_with_obvious_clusters():
    torch.manual_seed(0)
    blob_centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    labels = torch.tensor([0, 1, 2, 0, 2, 1, 1, 0, 2, 0, 1, 2])
    pts = blob_centres[labels] + 0.3 * torch.randn(len(labels), 2)
    assign, centres = dpc_knn(pts.unsqueeze(0), num_clusters=3, k=3)
    assert sorted(labels[centres[0]].tolist()) == [0, 1, 2]  # one centre per blob
    same_cluster = assign[0].unsqueeze(0) == assign[0].unsqueeze(1)
    same_blob = labels.unsqueeze(0) == labels.unsqueeze(1)
    assert torch.equal(same_cluster, same_blob)


def test_a_centre_always_joins_itself():
    # duplicate points: token 1 is as close to centre 0 as to itself, but it is a centre
    assign, centres = dpc_knn(_points([0.0, 0.0, 5.0]), num_clusters=3, k=1)
    assert centres.tolist() == [[0, 2, 1]]
    assert assign.tolist() == [[0, 2, 1]]


def test_num_clusters_is_clamped():
    assign, centres = dpc_knn(_points([0.0, 1.0]), num_clusters=5)
    assert centres.shape == (1, 2)
    assert sorted(assign[0].tolist()) == [0, 1]
    assign, centres = dpc_knn(_points([0.0, 1.0]), num_clusters=0)
    assert assign.tolist() == [[0, 0]]


def test_cluster_mean_weights_are_normalised_within_the_cluster():
    x = torch.tensor([[[0.0], [2.0], [10.0]]])
    out = cluster_mean(x, torch.tensor([[0, 0, 1]]), torch.tensor([[1.0, 3.0, 5.0]]), 2)
    torch.testing.assert_close(out, torch.tensor([[[(0 * 1 + 2 * 3) / 4], [10.0]]]))


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), m=st.integers(1, 20), c=st.integers(1, 8), k=st.integers(1, 6), seed=st.integers(0, 999),
    include_self=st.booleans(), scale=st.sampled_from(DISTANCE_SCALES),
)
def test_assignment_invariants_and_batch_independence(batch, m, c, k, seed, include_self, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m, 4, generator=g)
    if seed % 3 == 0:
        x = x.round()  # many duplicates and ties
    assign, centres = dpc_knn(x, c, k, include_self, scale)
    cc = min(c, m)
    assert centres.shape == (batch, cc)
    assert assign.min() >= 0 and assign.max() < cc
    for b in range(batch):
        assert len(set(centres[b].tolist())) == cc
        assert assign[b, centres[b]].tolist() == list(range(cc))  # every cluster has its centre
        dist = pairwise_distance(x[b : b + 1], scale)[0]
        to_centres = dist[:, centres[b]]
        torch.testing.assert_close(to_centres.gather(1, assign[b].unsqueeze(1)).squeeze(1), to_centres.amin(1))
        single_assign, single_centres = dpc_knn(x[b : b + 1], c, k, include_self, scale)
        assert torch.equal(single_assign[0], assign[b])
        assert torch.equal(single_centres[0], centres[b])


def _line_in_4d(values):
    """1-D positions t embedded as (t, t, t, t): raw distance 2|Δt|, ÷√4 scaled distance |Δt|."""
    return _points([[v] * 4 for v in values])


def test_distance_scale_sqrt_dim_or_none():
    x = _line_in_4d([0.0, 1.0, 3.0])
    raw = torch.tensor([[0.0, 2.0, 6.0], [2.0, 0.0, 4.0], [6.0, 4.0, 0.0]])
    torch.testing.assert_close(pairwise_distance(x)[0], raw / 2)  # default ÷√C
    torch.testing.assert_close(pairwise_distance(x, "sqrt_dim")[0], raw / 2)
    torch.testing.assert_close(pairwise_distance(x, "none")[0], raw)
    with pytest.raises(ValueError, match="distance_scale"):
        pairwise_distance(x, "sqrt")


@pytest.mark.parametrize(
    "scale,include_self,k,expected",
    [
        # scaled distances |Δt| for t = 0, 1, 3: other-token neighbours (1, 3), (1, 2), (2, 3)
        ("sqrt_dim", False, 2, [-(1 + 9) / 2, -(1 + 4) / 2, -(4 + 9) / 2]),
        # self counts at distance 0: neighbours (0, 1), (0, 1), (0, 2)
        ("sqrt_dim", True, 2, [-(0 + 1) / 2, -(0 + 1) / 2, -(0 + 4) / 2]),
        # k = M with self: every token, (0, 1, 3), (0, 1, 2), (0, 2, 3); k = 10 is capped at M = 3
        ("sqrt_dim", True, 3, [-(0 + 1 + 9) / 3, -(0 + 1 + 4) / 3, -(0 + 4 + 9) / 3]),
        ("sqrt_dim", True, 10, [-(0 + 1 + 9) / 3, -(0 + 1 + 4) / 3, -(0 + 4 + 9) / 3]),
        # raw distances 2|Δt|: squared distances four times larger
        ("none", False, 2, [-(4 + 36) / 2, -(4 + 16) / 2, -(16 + 36) / 2]),
        ("none", True, 2, [-(0 + 4) / 2, -(0 + 4) / 2, -(0 + 16) / 2]),
    ],
)
def test_knn_density_with_and_without_self_and_scaling(scale, include_self, k, expected):
    dist = pairwise_distance(_line_in_4d([0.0, 1.0, 3.0]), scale)
    torch.testing.assert_close(knn_log_density(dist, k, include_self=include_self), torch.tensor([expected]))


def test_knn_density_of_a_lone_token_with_self():
    dist = pairwise_distance(_points([4.0]))
    assert knn_log_density(dist, k=5, include_self=True).tolist() == [[0.0]]


def test_dpc_including_self_changes_the_centres():
    # 1-D points 0, 1, 5, 6, 7 with k=2.
    # Without self: mean squared neighbour distances 13, 8.5, 2.5, 1, 2.5; rank 6 > 5 > 7 > 1 > 0;
    # δ = (1, 4, 1, 6 (peak: row max), 1); log ρ + log δ ranks 6 (-1 + log 6) then 5 (-2.5, tie with 7,
    # lower position): centres [3, 2]; 0, 1, 5 join 5 and 6, 7 join 6.
    pts = _points([0.0, 1.0, 5.0, 6.0, 7.0])
    assign, centres = dpc_knn(pts, num_clusters=2, k=2)
    assert centres.tolist() == [[3, 2]]
    assert assign.tolist() == [[1, 1, 1, 0, 0]]
    # With self: every token's neighbours are itself and one at distance 1, so all log ρ = -0.5 tie
    # and rank by position; δ = (7 (peak), 1, 4, 1, 1): centres 0 then 5; 0, 1 join 0 and 5, 6, 7 join 5.
    assign, centres = dpc_knn(pts, num_clusters=2, k=2, include_self=True)
    assert centres.tolist() == [[0, 2]]
    assert assign.tolist() == [[0, 0, 1, 1, 1]]


def test_dpc_distance_scale_changes_the_centres():
    # t = 0, 0.5, 2, 3 in 4-D, k=1.  Scaled (|Δt|): log ρ = (-.25, -.25, -1, -1), δ = (3, .5, 1.5, 1);
    # log ρ + log δ = (.85, -.94, -.59, -1): centres 0 and 2, clusters {0, .5}, {2, 3}.
    x = _line_in_4d([0.0, 0.5, 2.0, 3.0])
    assign, centres = dpc_knn(x, num_clusters=2, k=1)
    assert centres.tolist() == [[0, 2]]
    assert assign.tolist() == [[0, 0, 1, 1]]
    # Raw (2|Δt|): log ρ = (-1, -1, -4, -4), δ = (6, 1, 3, 2); scores (.79, -1, -2.9, -3.3): density
    # weighs four times more, centres 0 and 1 (t = .5), which also takes 2 and 3 (nearer than t = 0).
    assign, centres = dpc_knn(x, num_clusters=2, k=1, distance_scale="none")
    assert centres.tolist() == [[0, 1]]
    assert assign.tolist() == [[0, 1, 1, 1]]
    with pytest.raises(ValueError, match="distance_scale"):
        dpc_knn(x, 2, distance_scale="unit")
