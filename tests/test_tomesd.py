"""ToMe for SD's merged branches (tomesd): the window matching worked by hand, a block against a plain
re-computation, the full stream kept, batch independence, GMACs and the parameter checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

import tokenreduce as tr
from tokenreduce.dense.segmenter import LinearSegmenter
from tokenreduce.ops.cpu_kernels import load_cpu_kernels
from tokenreduce.ops.unmerge import max_window_merges, window_groups


def tiny_vit(depth: int = 3, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10,
                             **kwargs).eval()


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_window_matching_by_hand():
    """A 4×4 grid, one prefix token, stride 2: destinations are patches 0, 2, 8, 10 (the windows'
    top-left corners).  Patches 5 and 1 point exactly at destinations 0 and 2; the other sources
    point at them less well, so r=2 merges exactly those two."""
    e = torch.eye(5)
    dst_vectors = {0: e[0], 2: e[1], 8: e[2], 10: e[3]}
    tokens = [torch.ones(5)]  # the class token
    for patch in range(16):
        if patch in dst_vectors:
            tokens.append(dst_vectors[patch])
        elif patch == 5:
            tokens.append(e[0])  # cosine 1 with destination 0
        elif patch == 1:
            tokens.append(2 * e[1])  # cosine 1 with destination 2 (the scale does not matter)
        else:
            tokens.append(e[patch % 4] + e[4])  # cosine 1/√2 with destination patch % 4's vector
    x = torch.stack(tokens).unsqueeze(0)  # 1×17×5
    groups = window_groups(x, r=2, num_prefix=1, grid=(4, 4), stride=2)
    assert groups.num_merged == 17 - 2
    slot = groups.slot[0]
    assert slot[0] == 0  # the class token is its own group
    assert slot[1 + 5] == slot[1 + 0] and slot[1 + 1] == slot[1 + 2]  # the two merges, stream positions +1
    assert len(set(slot.tolist())) == 15
    assert sorted(groups.src[0].tolist()) == [1 + 1, 1 + 5]
    sizes = groups.size[0, :, 0]
    assert sizes.sum() == 17 and sorted(sizes.tolist())[-2:] == [2.0, 2.0]
    assert groups.rep[0, slot[1 + 5]] == 1 + 0 and groups.rep[0, slot[1 + 1]] == 1 + 2  # destinations' places
    merged = groups.merge(x)
    assert torch.allclose(merged[0, slot[1 + 0]], (x[0, 1 + 0] + x[0, 1 + 5]) / 2)
    assert torch.allclose(merged[0, slot[1 + 2]], (x[0, 1 + 2] + x[0, 1 + 1]) / 2)
    assert torch.equal(merged[0, slot[1 + 3]], x[0, 1 + 3])  # a source left alone
    back = groups.unmerge(merged)
    assert torch.equal(back[0, 1 + 5], back[0, 1 + 0]) and torch.equal(back[0, 1 + 3], x[0, 1 + 3])
    assert max_window_merges(16, (4, 4), 2) == 12
    assert window_groups(x, r=99, num_prefix=1, grid=(4, 4), stride=2).num_merged == 17 - 12  # clamped


def plain_merged_block(block: torch.nn.Module, x: torch.Tensor, r: int) -> torch.Tensor:
    """One timm block with merged branches, written out with explicit loops over groups and an explicit
    softmax (the reference the library's batched version must match)."""
    groups = window_groups(x, r, 1, (4, 4), 2)
    slot = groups.slot[0]
    members = [torch.nonzero(slot == g).flatten() for g in range(groups.num_merged)]

    def merge(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[0, idx].mean(0) for idx in members]).unsqueeze(0)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        return t[:, slot]

    sizes = torch.tensor([float(len(idx)) for idx in members])
    attn = block.attn
    xm = block.norm1(merge(x))
    b, m, c = xm.shape
    q, k, v = attn.qkv(xm).reshape(b, m, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale + sizes.log()
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, m, c)
    x = x + unmerge(attn.proj(out))
    return x + unmerge(block.mlp(block.norm2(merge(x))))


def test_a_merged_block_matches_the_plain_computation():
    model = tiny_vit()
    x = images(1, seed=3)
    tr.apply(model, "tomesd", r=5, layers=(1,))
    with torch.no_grad():
        got = model.forward_features(x)
        stock = Block.forward  # timm's own block forward, for the unmerged blocks
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = stock(model.blocks[0], h)
        h = plain_merged_block(model.blocks[1], h, 5)
        h = stock(model.blocks[2], h)
        expected = model.norm(h)
    assert got.shape == (1, 17, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [b.tokens_in for b in tr.stats(model).blocks] == [17, 12, 17]


def test_no_merge_is_the_stock_model_and_remove_is_bit_exact():
    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        stock = model(x)
        tr.apply(model, "tomesd", r=0)
        torch.testing.assert_close(model(x), stock, rtol=0, atol=1e-6)
        tr.remove(model)
        assert torch.equal(model(x), stock)


def test_the_stream_keeps_every_token_and_images_are_independent():
    model = tiny_vit(depth=4)
    x = images(5, seed=1)
    tr.apply(model, "tomesd", r=6)
    with torch.no_grad():
        batch = model.forward_features(x)
        alone = torch.cat([model.forward_features(x[i : i + 1]) for i in range(5)])
    assert batch.shape == (5, 17, 32)  # a full grid for a dense head, no restore= needed
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    seg = LinearSegmenter(model, num_classes=3)
    assert seg(x).shape == (5, 3, 32, 32)


def test_gmacs_count_the_merged_branches():
    model = tiny_vit(depth=4)
    info = tr.reducer(tr.apply(model, "tomesd", r=6)).info
    cost = info.cost
    full, merged = 17, 17 - 6
    expected = 16 * cost.patch_embed + cost.head
    for i, n in enumerate([full, merged, merged, full]):  # default: every block but the first and the last
        expected += cost.block_macs(i, n, n * n, n)
    assert tr.gmacs(model, "tomesd", r=6) == pytest.approx(expected / 1e9)
    with torch.no_grad():
        model(images(2))
    assert tr.stats(model).gmacs == pytest.approx(expected / 1e9)
    tr.remove(model)
    budget = 0.7
    r = tr.reducer(tr.apply(model, "tomesd", budget=budget)).r
    assert tr.gmacs(model, "tomesd", r=r) <= budget * tr.gmacs(model) < tr.gmacs(model, "tomesd", r=r - 1)


def test_an_attention_pool_after_a_merging_last_block_counts_the_full_stream():
    model = tiny_vit(depth=2, global_pool="map", class_token=False)
    cost = tr.reducer(tr.apply(model, "tomesd", r=6, layers=(1,))).info.cost
    assert cost.pool_token > 0
    expected = 16 * cost.patch_embed + cost.head + cost.block_macs(0, 16, 256, 16) + cost.block_macs(1, 10, 100, 10)
    expected += cost.pool_macs(16)  # the pool reads all 16 stream tokens, not the 10 groups
    assert tr.gmacs(model, "tomesd", r=6, layers=(1,)) == pytest.approx(expected / 1e9)
    with torch.no_grad():
        model(images(2))
    assert tr.stats(model).gmacs == pytest.approx(expected / 1e9)


def test_bad_parameters_and_grids_are_refused():
    model = tiny_vit()
    for bad in ({"stride": 1}, {"r": -1}, {"grid": (4,)}, {"layers": (7,)}, {"grid": (2, 8, 1)}):
        with pytest.raises(ValueError):
            tr.apply(model, "tomesd", **bad)
    with pytest.raises(ValueError, match="holds 12 patches"):
        tr.apply(model, "tomesd", grid=(3, 4))
    wide = VisionTransformer(img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2).eval()
    with pytest.raises(ValueError, match="square grid"):
        tr.apply(wide, "tomesd")
    tr.apply(wide, "tomesd", grid=(4, 6), r=8)  # 24 patches: 6 window destinations, up to 18 merges
    assert tr.reducer(wide).r == 8
    with torch.no_grad():
        assert wide(torch.randn(2, 3, 32, 48)).shape == (2, 1000)
    assert max_window_merges(24, (4, 6), 2) == 24 - 6 and math.isfinite(tr.gmacs(wide, "tomesd", grid=(4, 6)))


def test_merging_is_differentiable_for_fine_tuning():
    model = tiny_vit().train()
    tr.apply(model, "tomesd", r=5)
    loss = F.cross_entropy(model(images(2)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.blocks[1].parameters())


def test_token_maps_show_the_groups_each_merging_block_saw():
    model = tiny_vit(depth=4)
    tr.apply(model, "tomesd", r=6, trace_source=True)
    with torch.no_grad():
        model(images(2))
    stages = tr.last_forward(model).stages
    assert [label for label, _ in stages] == ["block 1 branches", "block 2 branches"]
    for _, members in stages:
        assert members.shape == (2, 17 - 6, 17)
        assert torch.equal(members.sum(1), torch.ones(2, 17))  # every token in exactly one group
        assert torch.equal(members.sum(2).sum(1), torch.full((2,), 17.0))


def test_listed_for_dense_prediction_only():
    from tokenreduce.eval.sweep import reference_sweep_methods
    from tokenreduce.methods import get_method

    names, _ = reference_sweep_methods()
    assert "tomesd" not in names and "tome" in names
    assert get_method("tomesd").tasks == ("segmentation",)


def test_forward_intermediates_read_the_full_stream():
    model = tiny_vit(depth=4)
    x = images(3, seed=2)
    tr.apply(model, "tomesd", r=6, restore="frozen")
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1, 3], norm=True)
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(3, 32, 4, 4), (3, 32, 4, 4)]
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), features[:, 1:])


def test_grid_entry_points_need_no_restoration():
    """The stream keeps every token in its place, so forward_intermediates reads it as it is: the same maps
    as with restore='frozen', and each one the stream after its block."""
    model = tiny_vit(depth=4)
    x = images(3, seed=4)
    with torch.no_grad():
        tr.apply(model, "tomesd", r=6, restore="frozen")
        restored = model.forward_intermediates(x, indices=[0, 2], norm=False)
        tr.apply(model, "tomesd", r=6)
        final, maps = model.forward_intermediates(x, indices=[0, 2], norm=False)
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        streams = [h := block(h) for block in model.blocks]
    torch.testing.assert_close(final, restored[0], rtol=0, atol=0)
    for got, expected, block in zip(maps, restored[1], (0, 2), strict=True):
        assert got.shape == (3, 32, 4, 4)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), streams[block][:, 1:], rtol=0, atol=0)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n=2)  # the last two blocks' outputs, patch tokens
    for layer, block in zip(layers, (2, 3), strict=True):
        torch.testing.assert_close(layer, streams[block][:, 1:], rtol=0, atol=0)
    tr.apply(model, "tome", r=2)  # a method that reduces the stream still refuses without restoration
    with pytest.raises(NotImplementedError, match="restore="):
        model.forward_intermediates(x, indices=[1])


@pytest.mark.parametrize("num_prefix,r", [(1, 0), (1, 30), (0, 48), (2, 17)])
def test_the_fused_kernel_gives_the_python_maps(num_prefix, r):
    """The C++ index maps equal the PyTorch path's, bit for bit, ties included (repeated tokens)."""
    generator = torch.Generator().manual_seed(r + num_prefix)
    x = torch.randn(3, num_prefix + 64, 16, generator=generator)
    x[1, num_prefix + 10 : num_prefix + 20] = x[1, num_prefix + 30]  # equal scores: the stable order decides
    x[2] = 0.0  # all-zero tokens: every norm is clamped, every score ties
    outputs = {}
    for mode in ("on", "off"):
        tr.set_cpu_kernels(mode)
        try:
            assert (mode == "on") == hasattr(load_cpu_kernels(), "window_groups")  # the kernel runs in "on"
            with torch.inference_mode():
                outputs[mode] = window_groups(x, r, num_prefix, (8, 8), 2)
        finally:
            tr.set_cpu_kernels("auto")
    fused, python = outputs["on"], outputs["off"]
    for name in ("slot", "rep", "src", "into", "size"):
        assert torch.equal(getattr(fused, name), getattr(python, name)), name


@pytest.mark.parametrize("nan_at", [None, "source", "destination"])
def test_the_fused_kernel_gives_the_python_maps_with_many_windows(nan_at):
    """A 14×14 grid has 49 windows: the kernel's vectorised arg-max over 16 lanes runs (rows of 32 or more
    scores), with equal best scores, and falls back to the sequential scan where a NaN is present; the maps
    equal the PyTorch path's."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1 + 196, 8, generator=generator)
    x[0, 1 + 3] = x[0, 1 + 0]  # a source equal to the first window's destination ...
    x[0, 1 + 2 * 14 + 2] = x[0, 1 + 0]  # ... and a later destination equal to both: the first maximum wins
    if nan_at == "source":
        x[1, 1 + 1, 0] = float("nan")
    elif nan_at == "destination":
        x[1, 1 + 2 * 14 + 4, 0] = float("nan")  # a NaN in every source's row of scores
    outputs = {}
    for mode in ("on", "off"):
        tr.set_cpu_kernels(mode)
        try:
            with torch.inference_mode():
                outputs[mode] = window_groups(x, 90, 1, (14, 14), 2)
        finally:
            tr.set_cpu_kernels("auto")
    fused, python = outputs["on"], outputs["off"]
    for name in ("slot", "rep", "src", "into", "size"):
        assert torch.equal(getattr(fused, name), getattr(python, name)), name
    assert python.slot[0, 1 + 3] == python.slot[0, 1 + 0]  # merged into the first of the equal destinations


@pytest.mark.parametrize("num_prefix,r,batch", [(1, 0, 2), (1, 30, 1), (0, 48, 3), (2, 17, 4)])
def test_the_fused_merge_and_unmerge_give_the_python_numbers(num_prefix, r, batch, monkeypatch):
    """The C++ group means and the stream-plus-group-rows equal the PyTorch path's bit for bit (sums in
    index_add's order, then the division), and the kernels are what runs in mode "on"."""
    from tokenreduce.ops import cpu_kernels

    x = torch.randn(batch, num_prefix + 64, 24, generator=torch.Generator().manual_seed(100 + r))
    calls = []

    class Spy:  # the built module, counting the calls of the two kernels
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            if name in ("group_mean", "unmerge_add"):
                calls.append(name)
            return getattr(self.module, name)

    original = cpu_kernels._kernels_for
    monkeypatch.setattr(cpu_kernels, "_kernels_for",
                        lambda t, s: None if original(t, s) is None else Spy(original(t, s)))
    outputs = {}
    for mode in ("on", "off"):
        tr.set_cpu_kernels(mode)
        try:
            with torch.inference_mode():
                groups = window_groups(x, r, num_prefix, (8, 8), 2)
                merged = groups.merge(x)
                y = torch.randn(merged.shape, generator=torch.Generator().manual_seed(7))
                outputs[mode] = (merged, groups.unmerge_add(x, y), x + groups.unmerge(y))
        finally:
            tr.set_cpu_kernels("auto")
    assert calls == ["group_mean", "unmerge_add"]
    (fused_merged, fused_added, _), (merged, added, plain) = outputs["on"], outputs["off"]
    assert torch.equal(fused_merged, merged)
    assert torch.equal(fused_added, added) and torch.equal(added, plain)
    for b in range(batch):  # the group means by hand
        for g in range(groups.num_merged):
            members = torch.nonzero(groups.slot[b] == g).flatten()
            torch.testing.assert_close(merged[b, g], x[b, members].mean(0), rtol=1e-6, atol=1e-6)


def test_the_fused_merge_is_not_used_with_autograd_or_other_dtypes():
    x = torch.randn(2, 65, 16, requires_grad=True)
    tr.set_cpu_kernels("on")
    try:
        groups = window_groups(x.detach(), 20, 1, (8, 8), 2)
        merged = groups.merge(x)
        merged.sum().backward()  # the PyTorch path: gradients flow back to every stream token
        assert x.grad is not None and torch.count_nonzero(x.grad.abs().sum(-1)) == 2 * 65
        with torch.no_grad():
            half = groups.merge(x.detach().double())
        assert half.dtype == torch.float64
        torch.testing.assert_close(half.float(), merged.detach(), rtol=1e-6, atol=1e-6)
    finally:
        tr.set_cpu_kernels("auto")
