"""BAT's fused CPU DPC-kNN (ops/csrc/dpc_knn.cpp): hand-worked clusterings on both paths, the clusters bit for bit
those of the PyTorch path on the same distances (ties included), the distances against torch.cdist, and when the
kernels are (not) used."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_mode, make_vit, run_with_and_without_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.cluster import cluster_merge, clusters_from_distances, dpc_knn, pairwise_distance

# (1-D points, clusters, k, include_self, centres, assignment), each worked out by hand in test_cluster.py
HAND_WORKED = [
    # all nearest-neighbour distances 1: densities tie, rank by position; ρ·δ: 0 (δ 6), then 5 (δ 3)
    ([0.0, 1.0, 2.0, 5.0, 6.0], 2, 1, False, [0, 3], [0, 0, 0, 1, 1]),
    # the far pair has log ρ = −9: centres 0 (δ 13) and 1 (a density tie with 2, the lower position)
    ([0.0, 1.0, 2.0, 10.0, 13.0], 2, 1, False, [0, 1], [0, 1, 1, 1, 1]),
    # duplicates: token 1 is as near to centre 0 as to itself, but a centre joins itself
    ([0.0, 0.0, 5.0], 3, 1, False, [0, 2, 1], [0, 2, 1]),
    # counting itself at distance 0 with k=2: log ρ = (−1/2, −1/2, −9/2), 0 ranks above 1 (a tie, the lower
    # position); δ = (4, 1, 3): scores −1/2 + log 4, −1/2, −9/2 + log 3; centres 0, 1; token 2 is nearer to 1
    ([0.0, 1.0, 4.0], 2, 2, True, [0, 1], [0, 1, 1]),
    # one token: its own cluster
    ([3.0], 1, 5, False, [0], [0]),
]


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("points, clusters, k, include_self, centres, assign", HAND_WORKED)
def test_hand_worked_clusters_on_both_paths(kernel_state, mode, points, clusters, k, include_self, centres, assign):
    cpu_kernels.set_cpu_kernels(mode)
    x = torch.tensor(points).view(1, -1, 1)
    got_assign, got_centres = dpc_knn(x, clusters, k, include_self)
    assert got_centres.tolist() == [centres]
    assert got_assign.tolist() == [assign]


def _with_mode(mode: str, fn, *args):
    with kernel_mode(mode):
        return fn(*args)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 40),
    channels=st.integers(1, 40),
    k=st.integers(0, 7),
    include_self=st.booleans(),
    integer_features=st.booleans(),
    data=st.data(),
)
def test_clusters_match_the_python_path_bit_for_bit(batch, tokens, channels, k, include_self, integer_features, data):
    clusters = data.draw(st.integers(1, tokens))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(batch, tokens, channels, generator=g)
    if integer_features:  # small integers: many exact distance, density and score ties
        x = (x * 1.5).round()
    if tokens > 2:
        x[:, 1] = x[:, 0]  # a duplicate: a zero distance, δ = 0, log δ = −inf
    dist = pairwise_distance(x)
    fused = _with_mode("on", clusters_from_distances, dist, clusters, k, include_self)
    python = _with_mode("off", clusters_from_distances, dist, clusters, k, include_self)
    assert torch.equal(fused[0], python[0]) and torch.equal(fused[1], python[1])
    assert fused[1].shape == (batch, clusters)
    # every centre joins its own cluster, every token some cluster
    assert torch.equal(fused[0].gather(1, fused[1]), torch.arange(clusters).expand(batch, clusters))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    prefix=st.integers(0, 2),
    patches=st.integers(1, 30),
    channels=st.integers(1, 20),
    with_size=st.booleans(),
    data=st.data(),
)
def test_cluster_tokens_match_the_python_path_bit_for_bit(batch, prefix, patches, channels, with_size, data):
    members = data.draw(st.integers(1, patches))
    clusters = data.draw(st.integers(1, members + 1))  # one more than the members: an empty cluster too
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    rest = torch.stack([torch.randperm(patches, generator=g)[:members] for _ in range(batch)])
    x = torch.randn(batch, members, channels, generator=g)
    assign = torch.randint(0, clusters, (batch, members), generator=g)
    importance = torch.rand(batch, patches, generator=g)
    importance[:, 0] = 0.0  # a zero weight: a cluster of only such tokens is a zero token
    size = torch.randint(1, 6, (batch, prefix + patches, 1), generator=g).float() if with_size else None
    fused = _with_mode("on", cluster_merge, x, assign, importance, rest, size, prefix, clusters)
    python = _with_mode("off", cluster_merge, x, assign, importance, rest, size, prefix, clusters)
    assert torch.equal(fused[0], python[0]) and torch.equal(fused[1], python[1])
    member_sizes = torch.ones(batch, members, 1) if size is None else size[:, prefix:].gather(1, rest.unsqueeze(-1))
    assert torch.equal(fused[1].sum(dim=1), member_sizes.sum(dim=1))


def test_cluster_tokens_by_hand(kernel_state):
    # patches 2 and 4 (weights 1 and 3) form cluster 0, patch 1 (weight 2) cluster 1; one prefix token before them
    x = torch.tensor([[[4.0, 0.0], [1.0, 1.0], [0.0, 8.0]]])
    importance = torch.tensor([[9.0, 2.0, 1.0, 9.0, 3.0]])
    rest, assign = torch.tensor([[2, 1, 4]]), torch.tensor([[0, 1, 0]])
    size = torch.tensor([[[1.0], [9.0], [1.0], [2.0], [9.0], [5.0]]])
    for mode in ("on", "off"):
        cpu_kernels.set_cpu_kernels(mode)
        merged, merged_size = cluster_merge(x, assign, importance, rest, size, 1, 2)
        torch.testing.assert_close(merged, torch.tensor([[[1.0, 6.0], [1.0, 1.0]]]))
        assert merged_size.flatten().tolist() == [2.0 + 5.0, 1.0]


@pytest.mark.parametrize("channels", [1, 7, 16, 33, 384])
def test_distances_agree_with_cdist_and_are_exactly_symmetric(kernel_state, channels):
    cpu_kernels.set_cpu_kernels("on")
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(3, 29, channels, generator=g) * 4
    x[:, 5] = x[:, 11]
    fused = cpu_kernels.fused_token_distances(x, math.sqrt(channels))
    assert fused is not None
    torch.testing.assert_close(fused, pairwise_distance(x), rtol=2e-6, atol=1e-6)
    assert torch.equal(fused, fused.transpose(1, 2))
    assert torch.equal(fused.diagonal(dim1=1, dim2=2), torch.zeros(3, 29))
    assert torch.equal(fused[:, 5, 11], torch.zeros(3))
    raw = cpu_kernels.fused_token_distances(x.round(), 1.0)  # integer features: every partial sum is exact
    assert torch.equal(raw, pairwise_distance(x.round(), "none"))


def test_dpc_knn_matches_the_python_path_on_random_features(kernel_state):
    g = torch.Generator().manual_seed(0)
    for tokens, channels in [(79, 384), (51, 64), (8, 3)]:
        x = torch.randn(4, tokens, channels, generator=g)
        for include_self in (False, True):
            for scale in ("sqrt_dim", "none"):
                fused = _with_mode("on", dpc_knn, x, 7, 5, include_self, scale)
                python = _with_mode("off", dpc_knn, x, 7, 5, include_self, scale)
                assert torch.equal(fused[0], python[0]) and torch.equal(fused[1], python[1])


def test_kernels_are_used_only_on_cpu_float32_outside_capture(kernel_state, monkeypatch):
    cpu_kernels.set_cpu_kernels("on")
    real = cpu_kernels.load_cpu_kernels()
    calls = []
    spy = type("Spy", (), {
        "token_distances": staticmethod(lambda *args: calls.append("dist") or real.token_distances(*args)),
        "dpc_clusters": staticmethod(lambda *args: calls.append("clusters") or real.dpc_clusters(*args)),
        "cluster_merge": staticmethod(lambda *args: calls.append("merge") or real.cluster_merge(*args)),
    })
    monkeypatch.setattr(cpu_kernels, "_module", spy)
    x = torch.randn(2, 10, 8)
    dpc_knn(x, 3)
    assert calls == ["dist", "clusters"]
    dpc_knn(x.clone().requires_grad_(), 3)  # the clustering takes no gradient: still fused
    assert calls == ["dist", "clusters"] * 2
    # other dtypes: torch.cdist's float32 distances, whose clusters the kernel gives bit for bit
    dpc_knn(x.double(), 3)
    dpc_knn(x.bfloat16(), 3)
    assert calls == ["dist", "clusters"] * 2 + ["clusters"] * 2
    del calls[:]
    monkeypatch.setattr(cpu_kernels, "tracing", lambda: True)
    dpc_knn(x, 3)
    monkeypatch.setattr(cpu_kernels, "tracing", lambda: False)
    cpu_kernels.set_cpu_kernels("off")
    dpc_knn(x, 3)
    assert calls == []
    cpu_kernels.set_cpu_kernels("on")
    assign, rest, importance = torch.zeros(2, 10, dtype=torch.long), torch.arange(10).expand(2, 10), torch.rand(2, 10)
    cluster_merge(x, assign, importance, rest, None, 0, 3)
    assert calls == ["merge"]
    cluster_merge(x.clone().requires_grad_(), assign, importance, rest, None, 0, 3)  # training: autograd's path
    cluster_merge(x, assign, importance.clone().requires_grad_(), rest, None, 0, 3)
    cluster_merge(x.double(), assign, importance, rest, None, 0, 3)
    assert calls == ["merge"]


def test_kernel_rejects_bad_arguments(kernel_state):
    cpu_kernels.set_cpu_kernels("on")
    module = cpu_kernels.load_cpu_kernels()
    dist = pairwise_distance(torch.randn(1, 4, 3))
    with pytest.raises(RuntimeError, match="num_clusters"):
        module.dpc_clusters(dist, 5, 2, False)
    with pytest.raises(RuntimeError, match="B×M×M"):
        module.dpc_clusters(dist[:, :3], 2, 2, False)
    with pytest.raises(RuntimeError, match="scale"):
        module.token_distances(torch.randn(1, 4, 3), 0.0)


def test_bat_logits_with_and_without_the_kernels(kernel_state):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    model = tr.apply(make_vit(), "bat", budget=0.6)
    runs = run_with_and_without_kernels(model, images)
    (on, counts_on), (off, counts_off) = runs["on"], runs["off"]
    assert counts_on == counts_off and counts_on[-1] < 65
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
