"""The fused kernel with a floor on the received attention (LTMP's prune rule): the Jensen bound by hand and
against the exact values, the per-image fallback to the explicit softmax, when it applies, and LTMP models that
decide the same with and without it."""

from __future__ import annotations

import math
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_mode, make_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
import tokenreduce.ops.attention as attention_ops
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.attention import (
    AttentionNeeds,
    attention_and_received,
    attention_with_received_floor,
    received_floor_applies,
)
from tokenreduce.ops.received import received_log_lower_bound

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _lse(q, k, v, scale, bias):
    return FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)[1]


def test_bound_by_hand():
    # one head, d = 1, scale 1: queries +1 and −1, keys 1 and 0.  Logits [[1, 0], [−1, 0]]; each key receives
    # (e/(e+1) + e⁻¹/(e⁻¹+1)) / 2 = 1/2.  Mean query 0, mean log-sum-exp (log(e+1) + log(1+e⁻¹)) / 2, so both
    # keys' bound is exp(−that) = 0.4434 < 1/2.
    q = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
    k = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    lse = torch.tensor([math.log(math.e + 1), math.log(1 + 1 / math.e)]).view(1, 1, 2)
    bound = received_log_lower_bound(q, k, lse, 1.0, None, torch.ones(1, 2))
    expected = -(math.log(math.e + 1) + math.log(1 + 1 / math.e)) / 2
    torch.testing.assert_close(bound, torch.full((1, 2), expected))
    assert math.exp(expected) == pytest.approx(0.4434, abs=1e-4)
    # equal logits (zero queries): the bound is exact, 1/N, and a size bias moves it to s_j / Σ s
    zero = torch.zeros(1, 1, 2, 1)
    bias = torch.tensor([1.0, 3.0]).log().view(1, 1, 1, 2)
    lse = _lse(zero, k, k, 1.0, bias)
    bound = received_log_lower_bound(zero, k, lse, 1.0, bias, torch.ones(1, 2))
    torch.testing.assert_close(bound.exp(), torch.tensor([[0.25, 0.75]]))
    # two heads: the bound takes the best head's term over H (the sum over heads is at least its maximum), so
    # two identical heads give half the exact value
    zero2, k2 = zero.expand(1, 2, 2, 1), k.expand(1, 2, 2, 1)
    bound = received_log_lower_bound(zero2, k2, _lse(zero2, k2, k2, 1.0, bias), 1.0, bias, torch.ones(1, 2))
    torch.testing.assert_close(bound.exp(), torch.tensor([[0.125, 0.375]]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 4), n=st.integers(1, 20), d=st.sampled_from([1, 4, 8]),
    spread=st.floats(0.1, 4.0), sizes=st.booleans(), dead=st.booleans(), seed=st.integers(0, 2**16),
)
def test_bound_never_exceeds_the_exact_received_attention(batch, heads, n, d, spread, sizes, dead, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g) * spread for _ in range(3))
    live = torch.rand(batch, n, generator=g) > 0.4 if dead else torch.ones(batch, n, dtype=torch.bool)
    live[:, 0] = True
    bias = live.float().log().view(batch, 1, 1, n)
    if sizes:
        bias = bias + torch.randint(1, 5, (batch, 1, 1, n), generator=g).float().log()
    rows = live.float()
    scale = d ** -0.5
    bound = received_log_lower_bound(q, k, _lse(q, k, v, scale, bias), scale, bias, rows)
    _, exact = attention_and_received(q, k, v, scale, bias, rows)
    assert torch.isneginf(bound[~live]).all()
    assert (bound[live] <= exact[live].log() + 1e-4).all()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g) for _ in range(3))
    # image 1: queries near (1, 1, 1, 1) and key 5 at −10·(1, 1, 1, 1), so key 5 receives almost nothing
    q[1] = 1.0 + 0.1 * q[1]
    k[1, :, 5] = -10.0
    live = torch.ones(3, 6)
    live[2, 4:] = 0.0  # image 2 is padded
    bias = live.log().view(3, 1, 1, 6)
    return q, k, v, bias, live


def test_certified_images_keep_the_fused_output_and_get_a_bound_above_the_floor(monkeypatch):
    q, k, v, bias, live = _batch()
    calls = []
    real = attention_ops.attention_and_received
    monkeypatch.setattr(attention_ops, "attention_and_received", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    _, exact = real(q, k, v, 0.5, bias, live)
    floor = 1e-13  # below even image 1's starved key 5
    assert exact[live > 0].min() > 2 * floor
    out, received = attention_with_received_floor(q, k, v, 0.5, bias, live, floor)
    assert calls == []  # every image certified
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5))
    assert (received[live > 0] > 2 * floor).all() and (received[live > 0] <= exact[live > 0] * (1 + 1e-5)).all()
    assert (received[live == 0] == 0).all()


def test_an_image_the_bound_cannot_clear_gets_the_exact_values(monkeypatch):
    q, k, v, bias, live = _batch()
    _, exact = attention_and_received(q, k, v, 0.5, bias, live)
    floor = float(exact[1, 5]) * 1.5  # key 5 of image 1 is at or below the floor: it must be decided exactly
    assert float(exact[1, :5].min()) > 2 * floor and float(exact[0].min()) > 2 * floor
    calls = []
    real = attention_ops.attention_and_received
    monkeypatch.setattr(attention_ops, "attention_and_received", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    _, received = attention_with_received_floor(q, k, v, 0.5, bias, live, floor)
    assert calls == [1]  # the explicit pass for image 1 alone
    _, alone = real(q[1:2], k[1:2], v[1:2], 0.5, bias[1:2], live[1:2])
    assert torch.equal(received[1], alone[0])
    assert received[1, 5] <= floor
    # the certified images: a bound, at most the exact value, clear of the floor
    for image in (0, 2):
        assert (received[image][live[image] > 0] <= exact[image][live[image] > 0] * (1 + 1e-5)).all()
        assert (received[image][live[image] > 0] > 2 * floor).all()


def test_when_the_bound_applies():
    floor = AttentionNeeds(keys=True, received=True, received_floor=1e-6)
    with torch.no_grad():
        assert received_floor_applies(floor, "cpu", torch.float32)
        assert not received_floor_applies(floor, "cpu", torch.bfloat16)
        assert not received_floor_applies(floor, "cuda", torch.float32)
        assert not received_floor_applies(AttentionNeeds(received=True), "cpu", torch.float32)
        assert not received_floor_applies(AttentionNeeds(received=True, received_floor=1e-31), "cpu", torch.float32)
    assert not received_floor_applies(floor, "cpu", torch.float32)  # autograd on: the exact probabilities


@pytest.mark.parametrize("batch,mode", [(1, "on"), (6, "on"), (6, "off")])
def test_ltmp_decides_the_same_with_the_bound_and_with_the_exact_values(monkeypatch, kernel_state, batch, mode):
    cpu_kernels.set_cpu_kernels(mode)  # "on": a padded batch's buckets in the fused kernel; "off": the Python path
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if batch > 1:
        x[2] = x[2].mean()  # a flat image: a padded batch (length buckets)
    certified = []  # per certify call: which images the bound decided
    real = attention_ops.certify_received

    def spy(*args):
        out = real(*args)
        certified.append(out[1].tolist())
        return out

    monkeypatch.setattr(attention_ops, "certify_received", spy)
    real_fused = attention_ops.fused_bucketed_attention

    def spy_fused(*args):  # the fused kernel's certified images
        out = real_fused(*args)
        if out is not None:
            certified.append(out[2].tolist())
        return out

    monkeypatch.setattr(attention_ops, "fused_bucketed_attention", spy_fused)
    model = make_vit()
    # low floors in blocks 0-5 (the bound clears them), the pruning floor in blocks 6-11 (it cannot)
    tr.apply(model, "ltmp", untrained=True, merge_threshold=0.6, prune_threshold=(1e-6,) * 6 + (0.03,) * 6)
    with torch.no_grad():
        fused = model(x)
        counts = tr.last_forward(model).block_tokens
        flags = [flag for call in certified for flag in call]
        assert True in flags and False in flags  # some images decided by the bound, some exactly
        monkeypatch.setattr(attention_ops, "received_floor_applies", lambda *a: False)
        certified.clear()
        exact = model(x)
        assert certified == []
        exact_counts = tr.last_forward(model).block_tokens
        tr.reducer(model).module.prune_threshold.zero_()
        model(x)
        merge_only = tr.last_forward(model).block_tokens
    for (a_in, a_out), (b_in, b_out) in zip(counts, exact_counts, strict=True):
        assert torch.equal(torch.as_tensor(a_in), torch.as_tensor(b_in))
        assert torch.equal(torch.as_tensor(a_out), torch.as_tensor(b_out))
    torch.testing.assert_close(fused, exact, atol=1e-5, rtol=1e-5)
    # the threshold does prune here: merging alone keeps more tokens
    def kept(blocks):
        return sum(float(torch.as_tensor(out).sum()) for _, out in blocks)

    assert kept(counts) < kept(merge_only)


def _padded_batch(g: torch.Generator, lengths: torch.Tensor, n: int, heads: int, d: int, holes: bool = False):
    """A padded batch's live mask (B×N×1: each image's first ``lengths[b]`` positions, with ``holes`` some
    dead ones among them too), its ΣN live rows, their q/k/v head vectors (ΣN×3×H×d) and a size bias."""
    batch = lengths.numel()
    live = (torch.arange(n).view(1, n) < lengths.view(batch, 1)).float()
    if holes:
        live = live * (torch.rand(batch, n, generator=g) > 0.3).float()
        live[:, 0] = 1.0
    live = live.view(batch, n, 1)
    packed = live.reshape(-1).nonzero().squeeze(1)
    rows = torch.randn(packed.numel(), 3, heads, d, generator=g) * 2
    bias = torch.randint(1, 4, (batch, 1, 1, n), generator=g).float().log()
    return live, packed, rows, bias


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(2, 6), heads=st.integers(1, 4), n=st.integers(2, 40), seed=st.integers(0, 2**16),
       floor=st.sampled_from([1e-12, 1e-4, 0.01, 0.05]), holes=st.booleans(),
       overhead=st.sampled_from([0.0, 1e5, 1e30]))
@pytest.mark.parametrize("mode", ["on", "off"])
def test_length_buckets_with_a_floor_decide_as_the_exact_values(mode, batch, heads, n, seed, floor, holes, overhead):
    import tokenreduce.ops.buckets as buckets
    from tokenreduce.ops.attention import KeyMask, attend_bucketed
    from tokenreduce.ops.ragged import ragged_attention, ragged_layout

    g = torch.Generator().manual_seed(seed)
    d = 8
    live, packed, rows, bias = _padded_batch(g, torch.randint(1, n + 1, (batch,), generator=g), n, heads, d, holes)
    needs = AttentionNeeds(keys=True, received=True, received_floor=floor)
    with torch.no_grad():
        out, exact, keys = ragged_attention(rows, ragged_layout(packed, batch, n, heads, 1 << 12), d ** -0.5, bias,
                                            live, keys=True)
        # overhead 0: a bucket per length; 1e30: one bucket, the padded layout
        with unittest.mock.patch.object(buckets, "BUCKET_OVERHEAD", overhead), kernel_mode(mode):
            out_f, signals = attend_bucketed(rows, packed, d ** -0.5, bias, needs, KeyMask(live))
    torch.testing.assert_close(out_f, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(signals.keys, keys, atol=1e-6, rtol=1e-5)
    alive = live[..., 0] > 0
    received = signals.received
    assert torch.equal((received > floor) & alive, (exact > floor) & alive)  # every prune decision the same
    assert (received[alive] <= exact[alive] * (1 + 1e-5) + 1e-12).all()
    assert (received[~alive] == 0).all()


def test_bucket_plan_minimises_the_attention_work_plus_a_cost_per_bucket():
    from tokenreduce.ops.buckets import plan_buckets

    # cost per image 2·H·L²·d with H = 1, d = 1: 2L²; lengths 8, 8, 8, 64 → buckets of 8 and of 64
    histogram = {8: 3, 64: 1}
    # two buckets: 3·128 + 8192 + 2·overhead; one: 4·8192 + overhead → two while overhead < 24,192
    assert plan_buckets(histogram, 1, 1, overhead=24_000) == [8, 64]
    assert plan_buckets(histogram, 1, 1, overhead=24_500) == [64]
    # 16 is cheaper alone (2 images · (2·24² − 2·16²) = 1,280 saved) only while overhead < 1,280
    assert plan_buckets({16: 2, 24: 3}, 1, 1, overhead=1_000) == [16, 24]
    assert plan_buckets({16: 2, 24: 3}, 1, 1, overhead=1_500) == [24]
    # 8: 1 image, 16: 10, 24: 10.  One bucket: 24,192 + o; {8}, {16, 24}: 23,168 + 2o; {8, 16}, {24}:
    # 17,152 + 2o; each alone: 16,768 + 3o.  The lone 8 joins the 16s unless a bucket costs under 384
    assert plan_buckets({8: 1, 16: 10, 24: 10}, 1, 1, overhead=2_000) == [16, 24]
    assert plan_buckets({8: 1, 16: 10, 24: 10}, 1, 1, overhead=300) == [8, 16, 24]
    assert plan_buckets({40: 3}, 4, 16) == [40]


def test_a_bucket_layout_keeps_images_apart_and_reads_only_live_rows():
    from tokenreduce.ops.buckets import bucket_layout

    # 3 images of N = 6, live lengths 2, 5, 1 (rounded to multiples of 2: 2, 6, 2), every bucket its own
    lengths = torch.tensor([2, 5, 1])
    live = torch.arange(6).view(1, 6) < lengths.view(3, 1)
    packed = live.reshape(-1).nonzero().squeeze(1)  # rows 0 1 | 6 7 8 9 10 | 12
    layout = bucket_layout(packed, 3, 6, heads=1, head_dim=1, multiple=2, overhead=0.0)
    assert [(b.length, b.images.tolist(), b.first) for b in layout.buckets] == [(2, [0, 2], 0), (6, [1], 4)]
    assert layout.total == 10
    # image 0 at buffer rows 0-1, image 2 at 2-3 (1 live + 1 padding), image 1 at 4-9 (5 live + 1 padding)
    assert layout.slots.tolist() == [0, 1, 4, 5, 6, 7, 8, 2]
    # live rows are packed rows 0-7; padding rows read their own image's first live row
    assert layout.source.tolist() == [0, 1, 7, 7, 2, 3, 4, 5, 6, 2]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batch=st.integers(1, 40), n=st.integers(1, 70), multiple=st.sampled_from([1, 8, 16]),
       heads=st.integers(1, 6), overhead=st.sampled_from([0.0, 3e3, 1e5, 1.5e6]), seed=st.integers(0, 2**16))
def test_the_fused_kernel_plans_the_buckets_as_the_python_path(batch, n, multiple, heads, overhead, seed):
    from tokenreduce.ops.buckets import bucket_layout
    from tokenreduce.ops.cpu_kernels import fused_bucketed_attention

    g = torch.Generator().manual_seed(seed)
    live, packed, rows, _ = _padded_batch(g, torch.randint(1, n + 1, (batch,), generator=g), n, heads, 4)
    layout = bucket_layout(packed, batch, n, heads, 4, multiple, overhead)
    with kernel_mode("on"), torch.no_grad():
        fused = fused_bucketed_attention(rows, packed, live.view(batch, n), None, 0.5, math.log(1e-3), multiple,
                                         overhead, keys=False)
    assert fused is not None
    assert fused[4] == [bucket.length for bucket in layout.buckets]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(2, 6), heads=st.integers(1, 4), n=st.integers(2, 40), seed=st.integers(0, 2**16),
       holes=st.booleans(), overhead=st.sampled_from([0.0, 1e5, 1e30]), sized=st.booleans())
def test_length_buckets_without_received_attention_give_the_padded_output_and_keys(batch, heads, n, seed, holes,
                                                                                   overhead, sized):
    """A block that needs no received attention (LTMP's prune threshold 0) runs in length buckets in the fused
    kernel: the padded layout's outputs and head-mean keys."""
    import tokenreduce.ops.buckets as buckets
    from tokenreduce.ops.attention import KeyMask, attend, fused_bucketed_rows, merge_heads, pack_rows, unpack_rows

    g = torch.Generator().manual_seed(seed)
    d = 8
    live, packed, rows, bias = _padded_batch(g, torch.randint(1, n + 1, (batch,), generator=g), n, heads, d, holes)
    bias = bias if sized else None
    needs = AttentionNeeds(keys=True)
    with torch.no_grad():
        padded = unpack_rows(rows.reshape(rows.shape[0], -1), packed, KeyMask(live))
        q, k, v = padded.view(batch, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out, signals = attend(q, k, v, d ** -0.5, bias, needs, KeyMask(live))
        with unittest.mock.patch.object(buckets, "BUCKET_OVERHEAD", overhead), kernel_mode("on"):
            served = fused_bucketed_rows(rows, packed, d ** -0.5, bias, needs, KeyMask(live))
    assert served is not None
    torch.testing.assert_close(served[0], pack_rows(merge_heads(out), packed), atol=1e-5, rtol=1e-5)
    alive = live[..., 0] > 0
    torch.testing.assert_close(served[1].keys[alive], signals.keys[alive], atol=1e-6, rtol=1e-5)
    assert (served[1].keys[~alive] == 0).all() and served[1].received is None
