"""Token restoration (``tr.apply(..., restore="frozen" | "fusion")``): the owner-map bookkeeping of every
reduction, the restored grid against hand-worked values, the source maps and hook-captured features, the
grid entry points (``forward_intermediates``), last-layer fusion, and Cropr's segmentation form."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_eva import make_eva, method_params

import tokenreduce as tr
from tokenreduce.checkpoint import save_reducer
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.matching import bipartite_soft_matching
from tokenreduce.ops.merge import bipartite_merge, merge_wavg
from tokenreduce.ops.squeeze import squeeze_state
from tokenreduce.state import TokenState

# Five tokens, position 0 the class token; A = {0, 2, 4}, B = {1, 3}.  Token 2 points where token 3
# points (cosine 1); token 4 is closest to token 1 (tests/test_ops.py works the merges out by hand).
METRIC = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.2, 1.0]]])
X = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [8.0]]])


def tracked(x: torch.Tensor, num_prefix: int = 1, **kwargs) -> TokenState:
    """A state at the start of a forward with restoration tracked: every token owns itself."""
    b, n = x.shape[:2]
    return TokenState(x, num_prefix=num_prefix, owner=torch.arange(n).expand(b, n), **kwargs)


def small_params(method: str) -> dict:
    """Parameters that make every method reduce on the 12-block, 64-patch test ViT (:func:`vit_for`)."""
    return {"cropr": {"p": 4}, "ltmp": {"merge_threshold": 0.75, "prune_threshold": 0.015}}.get(method, {})


def vit_for(method: str):
    """The test ViT; for LTMP with sharpened attention (timm's initialisation gives every token nearly the
    same received attention, so a prune threshold removes all or none): it then both merges and prunes,
    a different count per image (a padded, masked batch)."""
    model = make_vit()
    if method == "ltmp":
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight.mul_(4.0)
    return model


# -- the bookkeeping, by hand --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["off", "on"])
def test_unmerge_sends_a_merged_token_to_exactly_its_source_patches(kernel):
    saved = cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure
    try:
        cpu_kernels.set_cpu_kernels(kernel)
        # r=2: token 2 -> token 3 ((2 + 4) / 2 = 3) and token 4 -> token 1 ((8 + 1) / 2 = 4.5)
        state = bipartite_merge(tracked(X), METRIC, 2)
        assert state.x.flatten().tolist() == [10.0, 4.5, 3.0]
        assert state.owner.tolist() == [[0, 1, 2, 2, 1]]
        assert state.restore().flatten().tolist() == [10.0, 4.5, 3.0, 3.0, 4.5]
    finally:
        cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure = saved


def test_pruned_tokens_are_archived_frozen_and_merges_follow_through_later_steps():
    state = tracked(X)
    pruned = state.prefix_and_patches(torch.tensor([[2, 0, 1]]))  # keeps tokens 3, 1, 2; prunes token 4
    assert pruned.x.flatten().tolist() == [10.0, 4.0, 1.0, 2.0]
    assert pruned.owner.tolist() == [[0, 2, 3, 1, -1]] and len(pruned.archive) == 1
    later = pruned.with_x(pruned.x + 100)  # the survivors go on being processed; the archive does not
    merged = merge_wavg(later, bipartite_soft_matching(torch.tensor([[[1.0, 0], [0, 1], [0, 1], [1, 0]]]), 1, 1))
    # A' = {2}, B' = {1, 3}: token at position 2 (original 1, feature 101) joins position 1 (original 3, 104)
    assert merged.x.flatten().tolist() == [110.0, 102.5, 102.0]
    assert merged.restore().flatten().tolist() == [110.0, 102.5, 102.0, 102.5, 8.0]


def test_squeeze_guests_follow_their_hosts_and_clusters_their_cluster_token():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    state = squeeze_state(tracked(x), torch.tensor([[0, 1]]), torch.tensor([[2, 3]]))
    # patch 2 (token 3) is closest to kept patch 0 (token 1), patch 3 (token 4) to patch 1 (token 2)
    assert state.owner.tolist() == [[0, 1, 2, 1, 2]]
    torch.testing.assert_close(state.restore(), state.x[:, [0, 1, 2, 1, 2]])
    # dropped tokens sent to appended tokens (BAT's clusters): positions >= K name the appended ones
    kept = tracked(x).prefix_and_patches(torch.tensor([[1]]), torch.tensor([[0, 2, 3]]), torch.tensor([[2, 3, 2]]))
    out = kept.append(torch.tensor([[[7.0, 7.0], [9.0, 9.0]]]), torch.ones(1, 2, 1), None)
    assert out.owner.tolist() == [[0, 2, 1, 3, 2]]
    assert out.restore()[0, :, 0].tolist() == [0.0, 7.0, 0.0, 9.0, 7.0]


def test_a_masked_compaction_archives_the_dead_tokens_that_still_stand_for_patches():
    x = torch.arange(12.0).view(2, 6, 1)
    mask = torch.tensor([[1.0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0]]).unsqueeze(-1)
    state = tracked(x, mask=mask).redirect(torch.tensor([[0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 3]]))
    out = state.gather(torch.tensor([[0, 1, 3, 4], [0, 2, 3, 1]]))  # image 1 keeps dead token 1 as padding
    # image 0: token 5 merged into 4, token 2 pruned; image 1: token 5 merged into 3, tokens 1 and 4 pruned
    assert out.owner.tolist() == [[0, 1, -1, 2, 3, 3], [0, -1, 1, 2, -2, 2]]
    assert out.archive[0].mask[..., 0].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert out.restore()[..., 0].tolist() == [[0, 1, 2, 3, 4, 4], [6, 7, 8, 9, 10, 9]]
    rejoined = out.rejoin()
    assert rejoined.num_tokens == 6 and rejoined.mask[..., 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1]]
    torch.testing.assert_close(rejoined.restore(), out.restore())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.lists(st.sampled_from(["prune", "merge", "squeeze"]), max_size=4))
def test_owner_map_agrees_with_the_source_map_through_any_reductions(seed, steps):
    g = torch.Generator().manual_seed(seed)
    b, n, p = 2, 13, 1
    x = torch.randn(b, n, 3, generator=g)
    state = tracked(x, num_prefix=p, source=torch.eye(n).expand(b, n, n))
    archived = {}  # (image, original token) -> frozen feature
    for step in steps:
        patches = state.num_tokens - p
        if patches < 4:
            break
        if step == "prune":
            order = torch.rand(b, patches, generator=g).argsort(dim=1)
            keep = order[:, : patches - 2]
            for i in range(b):
                for t in order[i, patches - 2 :].tolist():
                    for j in state.source[i, p + t].nonzero().flatten().tolist():
                        archived[i, j] = state.x[i, p + t].clone()
            state = state.prefix_and_patches(keep)
        elif step == "merge":
            state = merge_wavg(state, bipartite_soft_matching(torch.randn(b, state.num_tokens, 3, generator=g), 2, p))
        else:
            order = torch.rand(b, patches, generator=g).argsort(dim=1)
            state = squeeze_state(state, order[:, 2:], order[:, :2])
        state = state.with_x(state.x + 1.0)  # the stream goes on; archived tokens stay frozen
    grid = state.restore()
    for i in range(b):
        for j in range(n):
            owners = state.source[i, :, j].nonzero().flatten().tolist()
            if owners:
                assert state.owner[i, j].item() == owners[0] and len(owners) == 1
                assert torch.equal(grid[i, j], state.x[i, owners[0]])
            else:
                assert state.owner[i, j] < 0 and torch.equal(grid[i, j], archived[i, j])


# -- on models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["frozen", "fusion"])
@pytest.mark.parametrize("method,params", [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0})])
def test_zero_reduction_restores_the_unreduced_model_exactly(images, method, params, mode):
    with torch.no_grad():
        stock = make_vit().forward_features(images)
        model = tr.apply(make_vit(), method, restore=mode, **params)
        assert torch.equal(model.forward_features(images), stock)
        eva_stock = make_eva().forward_features(images[:, :, :32, :32])
        eva = tr.apply(make_eva(), method, restore=mode, **{**method_params(method), **params})
        assert torch.equal(eva.forward_features(images[:, :, :32, :32]), eva_stock)


@pytest.mark.parametrize("method,params", [
    ("tome", {"r": 6}), ("ppt", {"r": 8, "threshold": 1.0}), ("bat", {"num_attentive_merges": 4}), ("tps", {}),
    ("ltmp", small_params("ltmp")),
])
def test_restored_grid_is_what_the_source_map_says_for_merges(images, method, params):
    with torch.no_grad():
        traced = tr.apply(vit_for(method), method, untrained=True, trace_source=True, **params)
        reduced = traced.forward_features(images)  # B×N×C, after the final norm (per token)
        record = tr.last_forward(traced)
        restored = tr.apply(vit_for(method), method, untrained=True, restore="frozen", **params).forward_features(
            images)
    source = record.source if record.mask is None else record.source * record.mask
    covered = source.sum(dim=1) > 0  # B×N0: patches some final token stands for (not pruned)
    assert covered.float().mean() > 0.5 and torch.equal(source.sum(dim=1)[covered], torch.ones(int(covered.sum())))
    expected = source.transpose(1, 2) @ reduced  # each covered patch: its token's feature
    torch.testing.assert_close(restored[covered], expected[covered], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params,hooked", [
    ("random", {"layers": (3,), "keep_rate": 0.5}, 2),  # pruned inside block 3, after its attention
    ("dynamicvit", {"layers": (3,), "keep_rate": 0.5}, 2),  # pruned between blocks 2 and 3
    ("cropr", {"p": 4, "llf": False}, 0),  # first pruned after block 0
])
def test_pruned_patches_carry_the_feature_of_the_block_that_pruned_them(images, method, params, hooked):
    model = tr.apply(make_vit(), method, untrained=True, trace_source=True, restore="frozen", **params)
    captured = {}
    blocks = model.blocks
    handles = [blocks[hooked].register_forward_hook(lambda m, a, out: captured.__setitem__("before", out)),
               blocks[-1].register_forward_hook(lambda m, a, out: captured.__setitem__("grid", out))]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    x, blk = captured["before"], blocks[3]
    with torch.no_grad():  # in-block pruning: the feature after the block's attention residual, before its MLP
        frozen = x + blk.ls1(blk.attn(blk.norm1(x))) if method == "random" else x
    first = tr.last_forward(model).stages[0][1]  # B×N×N0 after the first reduction
    pruned = first.sum(dim=1) == 0
    assert pruned.any() and captured["grid"].shape == (4, 65, 64)
    torch.testing.assert_close(captured["grid"][pruned], frozen[pruned], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tome", "evit", "ppt", "ltmp", "cropr", "bat"])
def test_an_image_restored_output_does_not_depend_on_its_batch_mates(images, method):
    model = tr.apply(vit_for(method), method, untrained=True, restore="frozen", **small_params(method))
    with torch.no_grad():
        together = model.forward_features(images)
        alone = torch.cat([model.forward_features(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def stream_and_sources(model, images, blocks):
    """Per block in ``blocks``: the reduced stream it outputs (B×N×C) and the source map after it (B×N×N0)."""
    outs = {}
    handles = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in blocks]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    stages = dict(tr.last_forward(model).stages)
    sources = {}
    current = torch.eye(65).expand(len(images), 65, 65)
    for i in range(12):
        current = stages.get(f"before block {i}", current)
        current = stages.get(f"block {i}", current)
        sources[i] = current
    return outs, sources


@pytest.mark.parametrize("method,params", [("tome", {"r": 4}), ("dynamicvit", {})])
def test_forward_intermediates_returns_the_restored_grid_at_every_requested_block(images, method, params):
    model = tr.apply(make_vit(), method, untrained=True, trace_source=True, restore="frozen", **params)
    indices = [2, 5, 8]
    outs, sources = stream_and_sources(model, images, indices)
    with torch.no_grad():
        final, inter = model.forward_intermediates(images, indices=indices, output_fmt="NLC")
        assert torch.equal(final, model.forward_features(images))  # the stream itself stayed reduced
        nchw = model.forward_intermediates(images, indices=indices, norm=True, intermediates_only=True)
        last_two = model.get_intermediate_layers(images, n=2, reshape=True)
    assert [tuple(t.shape) for t in inter] == [(4, 64, 64)] * 3
    assert [tuple(t.shape) for t in nchw] == [(4, 64, 8, 8)] * 3
    assert [tuple(t.shape) for t in last_two] == [(4, 64, 8, 8)] * 2
    for got, i in zip(inter, indices, strict=True):
        live = sources[i].sum(dim=1) > 0
        expected = sources[i].transpose(1, 2) @ outs[i]  # B×N0×C: each live patch's token
        torch.testing.assert_close(got[live[:, 1:]], expected[:, 1:][live[:, 1:]], atol=1e-5, rtol=1e-5)
    grid = inter[1].transpose(1, 2).reshape(4, 64, 8, 8)
    torch.testing.assert_close(nchw[1], model.norm(inter[1]).transpose(1, 2).reshape(4, 64, 8, 8))
    assert not torch.equal(nchw[1], grid)


def test_grid_entry_points_refuse_without_restore_and_serve_eva(images):
    model = tr.apply(make_vit(), "tome", r=4)
    for call in (lambda: model.forward_intermediates(images), lambda: model.get_intermediate_layers(images)):
        with pytest.raises(NotImplementedError, match="restore='frozen'"):
            call()
    eva = tr.apply(make_eva(), "evit", restore="frozen", **method_params("evit"))
    x = images[:, :, :32, :32]
    with torch.no_grad():
        final, inter = eva.forward_intermediates(x, indices=[0, 2], return_prefix_tokens=True)
        assert torch.equal(final, eva.forward_features(x))
    assert [(tuple(g.shape), tuple(pre.shape)) for g, pre in inter] == [((4, 64, 4, 4), (4, 1, 64))] * 2
    with pytest.raises(NotImplementedError, match="restore="):
        tr.apply(eva, "evit", **method_params("evit")).forward_intermediates(x)


@pytest.mark.parametrize("method,params", [("random", {}), ("dynamicvit", {}), ("cropr", {"p": 4, "llf": False}),
                                           ("evit", {"fuse_token": False})])
def test_fusion_runs_the_last_block_on_every_token_then_restores_the_order(images, method, params):
    model = tr.apply(make_vit(), method, untrained=True, restore="fusion", **params)
    seen = []
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    with torch.no_grad():
        fused = model.forward_features(images)
    handle.remove()
    assert seen == [(4, 65, 64)] and tr.stats(model).blocks[-1].tokens_in == 65
    frozen = tr.apply(make_vit(), method, untrained=True, restore="frozen", **params)
    with torch.no_grad():
        assert fused.shape == frozen.forward_features(images).shape == (4, 65, 64)
    assert tr.reducer(model).restore == "fusion" and "restore" not in tr.reducer(model).config()


def test_cropr_llf_is_the_generic_rejoin_and_keeps_rotary_positions():
    eva = tr.apply(make_eva(), "cropr", untrained=True, p=2)  # llf=True, no restore
    with torch.no_grad():
        out = eva.forward_features(torch.randn(3, 3, 32, 32))
    record = tr.last_forward(eva)
    assert out.shape == (3, 17, 64) and record.block_tokens[-1] == (17, 17)
    assert torch.equal(record.pos[..., 0].sort(dim=1).values, torch.arange(17).expand(3, 17))  # each rejoined once


def test_archive_without_owner_map_rejoins_exactly_what_the_tracked_state_rejoins():
    # Cropr's llf without restore= archives pruned tokens but keeps no owner map; the rejoined sequence must
    # equal the one the owner-tracked state rejoins: survivors, then each pruning's tokens in `dropped` order
    x = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    pos = torch.arange(6).view(1, 6, 1).expand(2, 6, 1)
    keep, drop = torch.tensor([[4, 0], [1, 2]]), torch.tensor([[2, 3, 1], [4, 0, 3]])  # patch positions
    plain = TokenState(x, pos=pos, archives=True)
    with_owner = tracked(x, pos=pos)
    results = []
    for state in (plain, with_owner):
        state = state.prefix_and_patches(torch.cat([keep, drop[:, :1]], 1), drop[:, 1:])
        state = state.prefix_and_patches(torch.tensor([[0, 2], [2, 1]]))  # no `dropped`: position order
        results.append(state.rejoin())
    plain_out, tracked_out = results
    assert plain_out.owner is None and plain_out.archive == () and tracked_out.archive == ()
    assert torch.equal(plain_out.x, tracked_out.x) and torch.equal(plain_out.pos, tracked_out.pos)
    assert torch.equal(plain_out.sizes(), tracked_out.sizes())
    # image 0: patches 4, 0, 2 kept (3, 1 archived); then patches 4, 2 kept (0 archived); then the archive
    assert plain_out.pos[0, :, 0].tolist() == [0, 5, 3, 4, 2, 1]
    # a live mask cannot be archived without an owner map: a clear error, not a wrong rejoin
    masked = TokenState(x, mask=torch.ones(2, 6, 1), archives=True)
    with pytest.raises(RuntimeError, match="owner map"):
        masked.prefix_and_patches(keep)
    with pytest.raises(RuntimeError, match="owner map"):
        plain.masked(torch.ones(2, 6, 1))


def test_cropr_llf_without_restore_gives_the_logits_of_the_owner_tracked_run(images):
    # restore="fusion" tracks the owner map; the default llf only archives; the class token sees the same tokens
    torch.manual_seed(0)
    archived = tr.apply(make_vit(), "cropr", untrained=True, p=4)
    tracked_model = tr.apply(make_vit(), "cropr", untrained=True, p=4, restore="fusion")
    tracked_model.load_state_dict(archived.state_dict())
    tr.reducer(tracked_model).module.load_state_dict(tr.reducer(archived).module.state_dict())
    with torch.no_grad():
        assert torch.equal(archived(images), tracked_model(images))
    assert tr.last_forward(archived).block_tokens[-1] == (65, 65)


def test_remove_is_still_bit_exact_after_restoration(images):
    stock = make_vit()
    with torch.no_grad():
        expected = stock(images)
        model = tr.apply(make_vit(), "ppt", restore="fusion", r=8, threshold=1e-4)
        model(images)
        model.forward_intermediates(images, indices=[3])
        tr.remove(model)
        assert torch.equal(model(images), expected)
        assert torch.equal(model.forward_intermediates(images)[0], stock.forward_intermediates(images)[0])


@pytest.mark.parametrize("method", tr.methods())
def test_every_method_restores_the_full_grid_on_vit_and_eva(method):
    x = torch.randn(2, 3, 64, 64)
    model = tr.apply(vit_for(method), method, untrained=True, restore="frozen", **small_params(method))
    eva = tr.apply(make_eva(), method, untrained=True, restore="frozen", **method_params(method))
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 65, 64)
        assert eva.forward_features(x[:, :, :32, :32]).shape == (2, 17, 64)
        assert model(x).shape == eva(x[:, :, :32, :32]).shape == (2, 10)
    assert tr.stats(model).gmacs < tr.stats(model).gmacs_unreduced


@pytest.mark.parametrize("method", ["dynamicvit", "ltmp", "dtps", "cropr"])
def test_training_forms_restore_too(method):
    model = tr.apply(vit_for(method).train(), method, untrained=True, restore="frozen", **small_params(method))
    out = model.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 65, 64)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# -- Cropr's segmentation form ------------------------------------------------------------------------

def test_cropr_segmentation_heads_predict_per_query_and_p_override_sets_the_schedule(tmp_path):
    model = tr.apply(make_vit().train(), "cropr", untrained=True, p=4, aux="segmentation", num_queries=64,
                     num_classes=5, restore="frozen")
    reducer = tr.reducer(model)
    reducer.p_override = 1
    out = model.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 65, 64)
    assert len(reducer.aux_logits) == 10 and reducer.aux_logits[0].shape == (2, 64, 5)
    assert [b.tokens_in for b in tr.stats(model).blocks][:4] == [65, 63, 62, 61]  # the first adds first_extra
    reducer.p_override = 0
    model(torch.randn(2, 3, 64, 64))
    assert [b.tokens_in for b in tr.stats(model).blocks][:3] == [65, 64, 64]
    reducer.p_override = None
    model(torch.randn(2, 3, 64, 64))
    assert [b.tokens_in for b in tr.stats(model).blocks][:3] == [65, 60, 56]
    path = tmp_path / "seg.safetensors"
    save_reducer(reducer, path)
    again = tr.apply(make_vit(), "cropr", checkpoint=path)
    assert tr.reducer(again).config() == reducer.config()
    assert tr.reducer(again).config()["aux"] == "segmentation" and tr.reducer(again).module[0].head.out_features == 5
    with pytest.raises(ValueError, match="p_override"):
        reducer.p_override = -1
    with pytest.raises(ValueError, match="aux"):
        tr.apply(make_vit(), "cropr", untrained=True, aux="detection")
    with pytest.raises(ValueError, match="restore"):
        tr.apply(make_vit(), "tome", restore="grid")
