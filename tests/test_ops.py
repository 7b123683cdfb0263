"""Hand-worked checks of the shared primitives against the documented rules (docs/methods.md#common-conventions)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.budget import CostModel
from tokenreduce.methods.base import ModelInfo
from tokenreduce.methods.evit import EViT, EViTParams, kept_count
from tokenreduce.ops.attention import AttentionSignals
from tokenreduce.ops.matching import bipartite_soft_matching, max_merges
from tokenreduce.ops.merge import merge_wavg
from tokenreduce.ops.prune import keep_topk, masked_weighted_sum
from tokenreduce.state import TokenState

# Five tokens in 2-D: position 0 is the class token.  A = {0, 2, 4}, B = {1, 3}.
# Token 2 points exactly where token 3 points (cosine 1); token 4 is close to token 1.
METRIC = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.2, 1.0]]])
X = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [8.0]]])


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_matching_merges_most_similar_pair_and_keeps_tome_order():
    # Edge weights: a=2 -> b=3 with cos 1; a=4 -> b=1 with cos(4,1) < 1; the class row is masked.
    assert cos(METRIC[0, 4], METRIC[0, 1]) > cos(METRIC[0, 4], METRIC[0, 3])
    match = bipartite_soft_matching(METRIC, r=1, num_prefix=1)
    state = merge_wavg(TokenState(X, num_prefix=1), match)
    # Output = [class] ++ unmerged A (token 4) ++ B (token 1, token 3 absorbing token 2).
    assert state.x.flatten().tolist() == [10.0, 8.0, 1.0, 3.0]
    assert state.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]


def test_matching_two_merges_and_size_weighting():
    sizes = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]])
    match = bipartite_soft_matching(METRIC, r=2, num_prefix=1)
    state = merge_wavg(TokenState(X, size=sizes, num_prefix=1), match)
    # token 4 -> token 1: (8 + 1) / 2; token 2 (size 3) -> token 3: (3·2 + 4) / 4.
    assert state.x.flatten().tolist() == pytest.approx([10.0, 4.5, 2.5])
    assert state.size.flatten().tolist() == [1.0, 2.0, 4.0]


def test_matching_r_is_clamped_and_class_token_never_merges():
    assert max_merges(5, 1) == 2
    match = bipartite_soft_matching(METRIC, r=10, num_prefix=1)
    assert match.r == 2
    assert bipartite_soft_matching(METRIC, r=0, num_prefix=1) is None


def test_distillation_token_receives_no_merge():
    # Position 1 is a distillation token (B[0]); token 2 is identical to it but must go elsewhere.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.2], [5.0, 5.0], [1.0, 1.0]]])
    x = torch.arange(6.0).view(1, 6, 1)
    match = bipartite_soft_matching(metric, r=1, num_prefix=2)
    assert int(match.dst_idx) != 0
    out = merge_wavg(TokenState(x, num_prefix=2), match)
    assert out.x[0, :2].flatten().tolist() == [0.0, 1.0]  # class and distillation tokens first, unchanged


def test_matching_is_exact_under_duplicate_scores():
    # Ties in edge weights resolve by position (stable sort), so results are reproducible.
    metric = torch.ones(1, 7, 3)
    m1 = bipartite_soft_matching(metric, r=2, num_prefix=1)
    m2 = bipartite_soft_matching(metric, r=2, num_prefix=1)
    assert torch.equal(m1.src_idx, m2.src_idx)
    assert m1.src_idx.flatten().tolist() == [1, 2]


def test_sources_merge_with_max():
    source = torch.eye(5).unsqueeze(0)
    match = bipartite_soft_matching(METRIC, r=1, num_prefix=1)
    state = merge_wavg(TokenState(X, source=source, num_prefix=1), match)
    assert state.source[0, -1].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert torch.equal(state.source.sum(-1, keepdim=True), state.size)


def test_keep_topk_orders():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    assert keep_topk(scores, 2).tolist() == [[3, 1]]
    assert keep_topk(scores, 2, keep_order=True).tolist() == [[1, 3]]


def test_masked_weighted_sum_is_the_fused_token():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    w = torch.tensor([[0.2, 0.3, 0.1]])
    fused = masked_weighted_sum(x, w, torch.tensor([[1]]))
    assert fused.flatten().tolist() == pytest.approx([0.2 * 1 + 0.1 * 2, 0.1 * 2])


def test_kept_count_is_ceil_without_float_noise():
    assert kept_count(0.7, 196) == 138
    assert kept_count(0.7, 10) == 7
    assert kept_count(0.5, 139) == 70
    assert kept_count(1.0, 5) == 5


def _info(depth: int = 12, num_prefix: int = 1, num_patches: int = 4) -> ModelInfo:
    cost = CostModel((4,) * depth, (1,) * depth, (8,) * depth, 1, 1)
    return ModelInfo(depth=depth, dim=2, num_heads=2, num_prefix=num_prefix, num_patches=num_patches, cost=cost)


def test_evit_keeps_top_attention_and_fuses_rest_with_unnormalised_weights():
    # Class token + 4 patches; two heads whose mean class attention is [.., .1, .4, .2, .3].
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]])
    head0 = torch.tensor([0.0, 0.1, 0.5, 0.1, 0.3])
    head1 = torch.tensor([0.0, 0.1, 0.3, 0.3, 0.3])
    signals = AttentionSignals(cls_attn=torch.stack([head0, head1]).unsqueeze(0))
    evit = EViT(_info(), EViTParams(keep_rate=0.5, layers=(3,)))
    out = evit.reduce(3, TokenState(x, num_prefix=1), signals)
    # K = ceil(0.5·4) = 2: tokens 2 (0.4) then 4 (0.3); fused = 0.1·x1 + 0.2·x3 (weights sum to 0.3 < 1).
    expected_fused = [0.1 * 1 + 0.2 * 1, 0.2 * 1]
    assert out.x[0, :3].tolist() == [[9.0, 9.0], [0.0, 1.0], [2.0, 0.0]]
    assert out.x[0, 3].tolist() == pytest.approx(expected_fused)
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]
    assert math.isclose(float(out.size[0, 1:].sum()), 4.0)


def test_hashed_uniform_is_uniform_and_stateless():
    from tokenreduce.ops.prune import hashed_uniform

    u = hashed_uniform(64, 4096, key=7, device=torch.device("cpu"))
    assert torch.equal(u, hashed_uniform(64, 4096, key=7, device=torch.device("cpu")))
    assert not torch.equal(u, hashed_uniform(64, 4096, key=8, device=torch.device("cpu")))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    expected = u.numel() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # 9 degrees of freedom: p < 1e-5 for a uniform source
    # rows (images) and columns (tokens) are not correlated copies of each other
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.1


def test_random_keeps_each_patch_equally_often():
    from tokenreduce.ops.prune import hashed_uniform

    scores = hashed_uniform(4000, 20, key=3, device=torch.device("cpu"))
    kept = keep_topk(scores, 5)
    freq = torch.bincount(kept.flatten(), minlength=20).float() / 4000
    assert torch.allclose(freq, torch.full((20,), 0.25), atol=0.04)


def test_tome_r_schedules():
    from tokenreduce.methods.tome import parse_r

    assert parse_r(13, 12) == [13] * 12
    # (r, inflection=-1): linear from int(2r) = 8 down to 0 over 12 blocks, truncated toward zero
    assert parse_r((4, -1), 12) == [8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0, 0]
    assert parse_r((4, 1), 12) == [0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8]
    assert parse_r([5, 4], 4) == [5, 4, 0, 0]
    assert parse_r(4, 12, inflection=-1.0) == [8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0, 0]  # the same schedule, split


def test_tome_budget_keeps_the_inflection_it_is_given(vit, images):
    import tokenreduce as tr

    model = tr.apply(vit, "tome", budget=0.6, inflection=-1.0)
    with torch.no_grad():
        model(images)
    s = tr.stats(model)
    per_block = [b.tokens_in - b.tokens_out for b in s.blocks]
    assert per_block == sorted(per_block, reverse=True) and per_block[0] > per_block[-1]  # decreasing merges
    assert s.gmacs <= 0.6 * s.gmacs_unreduced * (1 + 1e-9)
    r = s.params["r"]  # the least-reducing int r whose decreasing schedule fits
    assert tr.gmacs(vit, "tome", r=r - 1, inflection=-1.0) > 0.6 * s.gmacs_unreduced
    tr.remove(model)
    with pytest.raises(ValueError, match="one place"):
        tr.apply(vit, "tome", r=(4, -1.0), inflection=-1.0)
    with pytest.raises(ValueError, match=r"inflection must be a number in \[-1, 1\]"):
        tr.apply(vit, "tome", inflection=2)


def test_batched_gather_and_scatter_add_match_their_definitions_per_image():
    from tokenreduce.ops.gather import batched_gather, batched_scatter_add, head_mean

    x = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    index = torch.tensor([[4, 0], [1, 1], [3, 2]])
    out = batched_gather(x, index)
    for b in range(3):
        for k in range(2):
            assert torch.equal(out[b, k], x[b, index[b, k]])
    groups = torch.tensor([[0, 2, 2, 1, 0], [1, 1, 1, 1, 1], [2, 0, 1, 0, 2]])
    summed = batched_scatter_add(x, groups, 3)
    for b in range(3):
        for g in range(3):
            assert torch.equal(summed[b, g], x[b][groups[b] == g].sum(dim=0))
    k = torch.randn(2, 6, 4, 3)
    assert torch.allclose(head_mean(k), k.mean(dim=1), atol=1e-6)
    assert torch.equal(head_mean(k[:, :1]), k[:, 0])
    big = torch.randn(2, 6, 197, 384)  # above the single-op size: the in-place chain
    assert torch.allclose(head_mean(big), big.mean(dim=1), atol=1e-5)


def test_merge_rows_cache_serves_inference_and_autograd_alike():
    """The cached position tensors are kept per inference mode: a merge computed under
    ``inference_mode`` and then the same shapes with autograd both work and agree."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4)
    with torch.inference_mode():
        expected = merge_wavg(TokenState(x.clone()), bipartite_soft_matching(x.clone(), 3, 1)).x
    leaf = x.clone().requires_grad_(True)
    merged = merge_wavg(TokenState(leaf), bipartite_soft_matching(leaf, 3, 1)).x
    merged.sum().backward()
    assert torch.allclose(merged.detach(), expected)
    # every output token is a convex combination of input tokens, so the gradient of the sum
    # totals one per output token (9 − 3 = 6) in every image and channel
    assert torch.allclose(leaf.grad.sum(dim=1), torch.full((2, 4), 6.0))
    assert (leaf.grad[:, 0] == 1).all()  # the class token is copied through
