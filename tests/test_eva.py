"""The timm Eva adapter (EVA-02 and other rotary-position ViTs): every method runs, ``remove`` is exact, zero
reduction is the stock model, rotary positions follow the tokens, GMACs, compile, training and checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
import torch._dynamo
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils import flop_counter
from torch.utils.data import TensorDataset

import tokenreduce as tr
from tokenreduce.checkpoint import save_reducer
from tokenreduce.models import adapter_for
from tokenreduce.models.timm_eva import TimmEva, rope_rows, rotate, rotation_partners, signed_table
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.matching import bipartite_soft_matching
from tokenreduce.ops.merge import bipartite_merge, merge_wavg
from tokenreduce.ops.squeeze import squeeze_state
from tokenreduce.state import NO_POSITION, TokenState

DEPTH = 4
LAYERED = ("bat", "dtps", "dynamicvit", "evit", "ppt", "random", "tps")


def make_eva(**overrides) -> Eva:
    """A 4-block EVA-02-style model (rotary positions, SwiGLU) on 32×32 images with 8×8 patches: 16 patches."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=4, use_rot_pos_emb=True,
                  swiglu_mlp=True, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = Eva(**kwargs).eval()
    with torch.no_grad():  # timm's init gives near-uniform attention and a tiny head: sharpen both
        for blk in model.blocks:
            for proj in (blk.attn.qkv, blk.attn.q_proj, blk.attn.k_proj):
                if proj is not None:
                    proj.weight.mul_(8.0)
            for gamma in (getattr(blk, "gamma_1", None), getattr(blk, "gamma_2", None)):
                if gamma is not None:
                    gamma.uniform_(0.5, 1.5)
        if isinstance(model.head, nn.Linear):
            model.head.weight.normal_(0, 0.2)
    return model


CONFIGS = {
    "cls-avg": {},
    "cls-token": dict(global_pool="token"),
    "no-cls-avg": dict(class_token=False, global_pool="avg"),
    "registers": dict(num_reg_tokens=2, global_pool="token"),
    "map": dict(global_pool="map"),
    "split-qkv-subln-qknorm-ls": dict(qkv_fused=False, qk_norm=True, scale_attn_inner=True, init_values=0.1),
    "post-norm": dict(use_post_norm=True),
    "mixed-rope": dict(rope_type="mixed", global_pool="token"),
    "half-rope-gelu": dict(rope_rotate_half=True, swiglu_mlp=False, scale_mlp=True),
    "no-rope": dict(use_rot_pos_emb=False),
}


def method_params(method: str) -> dict:
    """Parameters that make every method reduce on the 4-block test model."""
    params: dict = {"layers": (1, 2)} if method in LAYERED else {}
    if method == "cropr":
        params = {"p": 2}
    if method == "ppt":
        params.update(r=4, threshold=1e-4)
    if method == "tome":
        params = {"r": 3}
    if method == "dtps":
        params["prop_attn"] = False  # trainable form
    return params


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


# -- every method, every configuration -------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_method_runs_and_remove_is_bit_exact(config, images):
    model = make_eva(**CONFIGS[config])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        stock = model(images)
    for method in tr.methods():
        tr.apply(model, method, untrained=True, **method_params(method))
        assert adapter_for(model) is TimmEva
        with torch.no_grad():
            out = model(images)
        assert out.shape == stock.shape and torch.isfinite(out).all(), method
        blocks = tr.stats(model).blocks
        # some block works on fewer tokens (tomesd: its branches; the stream keeps them all)
        assert min(b.tokens_out for b in blocks) < blocks[0].tokens_in or method in ("ltmp", "cropr"), method
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        tr.remove(model)
        with torch.no_grad():
            assert torch.equal(model(images), stock), method


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method,params", [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0, "layers": (1, 2)})])
def test_zero_reduction_equals_stock(config, method, params, images):
    model = make_eva(**CONFIGS[config])
    with torch.no_grad():
        stock = model(images)
        tr.apply(model, method, **params)
        got = model(images)
    torch.testing.assert_close(got, stock, atol=1e-6, rtol=0)


def test_unfused_attention_path_matches_at_zero_reduction(images):
    model = make_eva()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        stock = model(images)
        tr.apply(model, "tome", r=0)
        torch.testing.assert_close(model(images), stock, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,params", [("tome", {"r": 3}), ("random", {"layers": (1, 2)})])
def test_the_fused_attention_kernel_is_kept(method, params, images):
    """Every block still calls ``F.scaled_dot_product_attention``, ToMe's size bias included."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    model = tr.apply(make_eva(), method, **params)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(kwargs.get("attn_mask")) or real(*args, **kwargs))
        model(images)
    assert len(calls) == DEPTH
    assert (calls[-1] is not None) == (method == "tome")  # log size rides in as a float mask


@pytest.mark.parametrize("method", ["bat", "cropr", "dtps", "dynamicvit", "evit", "ltmp", "ppt", "tome", "tps"])
def test_prefix_tokens_are_never_reduced(method, images):
    model = make_eva(num_reg_tokens=2)
    tr.apply(model, method, untrained=True, trace_source=True, **method_params(method))
    with torch.no_grad():
        model(images)
    record = tr.last_forward(model)
    eye = torch.eye(record.num_tokens_in)[:3]
    assert all(torch.equal(record.source[b, :3], eye) for b in range(images.shape[0]))
    pos = tr.last_forward(model).pos
    assert torch.equal(pos[:, :3, 0], torch.arange(3).expand(images.shape[0], 3))


# -- rotary positions follow the tokens ------------------------------------------------------------


def _block_io(model: nn.Module, index: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output tokens (B×N×C) of block ``index`` during one forward."""
    seen = {}
    hook = model.blocks[index].register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


def _stock_block_with_rows(model: nn.Module, block: int, x: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """The stock block on tokens ``x`` (B×N×C) rotated by their original rope rows, built independently:
    token ``i`` of image ``b`` at original sequence position ``positions[b][i]`` (−1: no rotation)."""
    p = model.num_prefix_tokens
    table = model.rope.get_embed()  # N0×2d
    half = table.shape[-1] // 2
    identity = torch.cat([torch.zeros(half), torch.ones(half)])
    rows = torch.stack([
        torch.stack([table[j - p] if j >= p else identity for j in image[p:]]) for image in positions
    ]).unsqueeze(1)  # B×1×(N−P)×2d
    blk = model.blocks[block]
    base = getattr(blk, "_tr_base", type(blk))
    with torch.no_grad():
        return base.forward(blk, x, rope=rows)


def _origins(source: torch.Tensor) -> list[list[int]]:
    """Original position of every token from a B×N×N0 source map: its one source, or −1 for a combination."""
    return [[int(row.argmax()) if int(row.sum()) == 1 else -1 for row in image] for image in source]


def test_rope_follows_pruned_tokens(images):
    # random keeps tokens in their original order, EViT in score order with a fused (unrotated) token last
    for method in ("random", "evit"):
        params = {"keep_rate": 0.5, "layers": (1,)}
        model = make_eva(num_reg_tokens=1)
        tr.apply(model, method, trace_source=True, **params)
        x, y = _block_io(model, 2, images)
        origins = _origins(tr.last_forward(model).stages[0][1])
        assert x.shape[1] == 2 + 8 + (method == "evit")
        if method == "evit":
            assert all(o[-1] == -1 for o in origins)  # the fused token stands for several patches
            assert any(o[2:-1] != sorted(o[2:-1]) for o in origins)  # score order, not position order
        expected = _stock_block_with_rows(model, 2, x, origins)
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
        # and the rotation matters: the rows of the unreduced order would give another output
        wrong = _stock_block_with_rows(model, 2, x, [list(range(x.shape[1]))] * x.shape[0])
        assert (wrong - y).abs().max() > 1e-3


def test_merged_token_keeps_its_destinations_position(images):
    model = make_eva()
    tr.apply(model, "tome", r=[5], prop_attn=False, trace_source=True)  # merges in block 0 only
    x, y = _block_io(model, 1, images)
    source = tr.last_forward(model).stages[0][1]
    # bipartite matching with a class token: set B (destinations) holds the odd positions
    positions = [[int(row.argmax()) if int(row.sum()) == 1 else
                  next(j for j in row.nonzero().flatten().tolist() if j % 2 == 1) for row in image] for image in source]
    assert any(int(row.sum()) > 1 for row in source[0])
    expected = _stock_block_with_rows(model, 1, x, positions)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)
    assert torch.equal(tr.last_forward(model).pos[..., 0], torch.tensor(positions))


@pytest.mark.parametrize("method", sorted(set(tr.methods())))
def test_a_tokens_position_is_one_of_its_patches(method, images):
    """In every method, a token's position is one of the patches it stands for, or none (−1) for a combination."""
    model = make_eva(num_reg_tokens=1)
    tr.apply(model, method, untrained=True, trace_source=True, **method_params(method))
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            model(images)
        record = tr.last_forward(model)
        pos, source = record.pos[..., 0], record.source
        live = torch.ones_like(pos, dtype=torch.bool) if record.mask is None else record.mask[..., 0] > 0
        has_pos = pos >= 0
        member = source.gather(2, pos.clamp_min(0).unsqueeze(-1))[..., 0] > 0
        assert bool((member | ~has_pos)[live].all()), method
        if method not in ("evit", "bat"):  # only their appended combinations have no position
            assert bool(has_pos[live].all()), method
    model.eval()


def test_rope_rows_shapes_and_identity():
    table = torch.randn(6, 8)
    pos = torch.tensor([[[0], [5], [2], [-1]], [[0], [1], [6], [3]]])  # one prefix token
    rows = rope_rows(table, pos, 1)
    assert rows.shape == (2, 1, 3, 8)
    assert torch.equal(rows[0, 0, 0], table[4]) and torch.equal(rows[1, 0, 1], table[5])
    assert torch.equal(rows[0, 0, 2], torch.tensor([0.0] * 4 + [1.0] * 4))
    per_head = torch.randn(4, 6, 8)
    assert torch.equal(rope_rows(per_head, pos, 1)[1, :, 2], per_head[:, 2])
    batched = torch.randn(2, 4, 6, 8)
    assert torch.equal(rope_rows(batched, pos, 1)[1, :, 0], batched[1, :, 0])


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_rotation_is_timms_rotation_bit_for_bit(half, dtype):
    # The adapter folds the rotation partner's sign into the sin half of the table once per forward and rotates
    # q and k together; every number must be timm's apply_rot_embed_cat's.
    g = torch.Generator().manual_seed(int(half))
    x = torch.randn(2, 3, 4, 7, 16, generator=g).to(dtype)  # 2 (q, k) × B × H × M × d
    table = torch.randn(7, 32, generator=g)  # [sin | cos], float32 as timm makes it
    # in x's dtype, as the adapter casts it (timm >= 1.0.31 casts inside apply_rot_embed_cat, earlier ones after)
    got = rotate(x, signed_table(table, half), half).to(dtype)
    assert torch.equal(got, apply_rot_embed_cat(x, table, half=half).to(dtype))
    per_head = torch.randn(4, 7, 32, generator=g)  # rope_type='mixed': one table per head
    got = rotate(x, signed_table(per_head, half), half).to(dtype)
    assert torch.equal(got, apply_rot_embed_cat(x, per_head, half=half).to(dtype))


def test_rotation_partners_by_hand():
    coordinates = torch.arange(6.0)
    assert rotation_partners(coordinates, False).tolist() == [1, 0, 3, 2, 5, 4]
    assert rotation_partners(coordinates, True).tolist() == [3, 4, 5, 0, 1, 2]
    table = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]])  # d = 4: sin 1..4, cos 10..40
    assert signed_table(table, False).tolist() == [[-1.0, 2.0, -3.0, 4.0, 10.0, 20.0, 30.0, 40.0]]
    assert signed_table(table, True).tolist() == [[-1.0, -2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]]


def test_positions_through_the_reduction_ops():
    pos = torch.arange(9).view(1, 9, 1)
    state = TokenState(torch.randn(1, 9, 4), num_prefix=1, pos=pos)
    assert state.gather(torch.tensor([[0, 5, 2]])).pos.flatten().tolist() == [0, 5, 2]
    appended = state.append(torch.randn(1, 2, 4), torch.ones(1, 2, 1), None)
    assert appended.pos.flatten().tolist()[-2:] == [NO_POSITION, NO_POSITION]
    back = state.append(torch.randn(1, 1, 4), torch.ones(1, 1, 1), None, torch.tensor([[[7]]]))
    assert back.pos.flatten().tolist()[-1] == 7
    metric = torch.randn(1, 9, 3)
    match = bipartite_soft_matching(metric, 3, 1)
    merged = merge_wavg(state, match)
    # [prefix] ++ unmerged A′ ++ B′: a destination keeps its own position
    expected = [0, *(2 + 2 * match.unm[0]).tolist(), 1, 3, 5, 7]
    assert merged.pos.flatten().tolist() == expected
    squeezed = squeeze_state(state, torch.tensor([[4, 0]]), torch.tensor([[1, 2, 3, 5, 6, 7]]))
    assert squeezed.pos.flatten().tolist() == [0, 5, 1]  # hosts keep theirs


@pytest.mark.parametrize("mode", ["on", "off"])
def test_fused_cpu_merge_carries_the_same_positions(mode):
    saved = cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure
    try:
        cpu_kernels.set_cpu_kernels(mode)
        x, metric = torch.randn(3, 11, 8), torch.randn(3, 11, 5)
        pos = torch.arange(11).view(1, 11, 1).expand(3, 11, 1)
        for p in (0, 1, 2):
            with torch.inference_mode():
                fast = bipartite_merge(TokenState(x, num_prefix=p, pos=pos), metric, 4)
                slow = merge_wavg(TokenState(x, num_prefix=p, pos=pos), bipartite_soft_matching(metric, 4, p))
            assert torch.equal(fast.pos, slow.pos)
            torch.testing.assert_close(fast.x, slow.x)
    finally:
        cpu_kernels._mode, cpu_kernels._module, cpu_kernels._failure = saved


# -- batch independence ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bat", "cropr", "dtps", "dynamicvit", "evit", "ltmp", "ppt", "tome", "tps"])
def test_an_images_output_does_not_depend_on_its_batch_mates(method):
    model = make_eva(num_reg_tokens=1)
    tr.apply(model, method, untrained=True, **method_params(method))
    torch.manual_seed(2)
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(batch[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# -- GMACs ---------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs):
    """FLOPs of the CPU fused attention op, which torch's counter does not know."""
    return flop_counter.sdpa_flop_count(query, key, value)


def _counted_macs(model: nn.Module, x: torch.Tensor) -> float:
    sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={sdpa: _sdpa_cpu_flops} if sdpa else {})
    model.requires_grad_(False)  # the counter's module tracker trips over the attention pool's expanded latent
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("config", ["cls-avg", "map", "split-qkv-subln-qknorm-ls", "half-rope-gelu"])
@pytest.mark.parametrize("fused", [True, False])
def test_analytic_gmacs_equal_the_flop_counter_unreduced(config, fused, images):
    model = make_eva(**CONFIGS[config])
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    assert _counted_macs(model, images) == pytest.approx(tr.gmacs(model) * 1e9, rel=1e-9)


def test_swiglu_mlps_are_counted_whole():
    packed, split = make_eva(), make_eva(scale_mlp=True)  # GluMlp (one fc1 of 2×hidden) / SwiGLU (two fc1)
    for model in (packed, split):
        cost = tr.reducer(tr.apply(model, "tome", r=0)).info.cost
        assert cost.mlp_linear[0] == sum(m.in_features * m.out_features for m in model.blocks[0].mlp.modules()
                                         if isinstance(m, nn.Linear))
        assert cost.mlp_linear[0] == 64 * 512 + 256 * 64


def test_reduced_gmacs_follow_the_token_counts(images):
    model = make_eva()
    tr.apply(model, "tome", r=3)
    counted = _counted_macs(model, images)
    analytic = tr.stats(model).gmacs * 1e9
    assert analytic <= counted <= analytic * 1.05  # the counter also sees the matching's small matmuls
    assert tr.stats(model).gmacs == pytest.approx(tr.gmacs(model, "tome", r=3))


def test_budget_resolves_on_eva():
    model = make_eva()
    tr.apply(model, "evit", budget=0.7, layers=(1, 2))
    assert tr.gmacs(model, "evit", **tr.reducer(model).config()) <= 0.7 * tr.gmacs(model) * (1 + 1e-9)


# -- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "evit", "cropr", "tps"])
def test_reduced_eva_traces_without_graph_breaks(method):
    model = make_eva()
    tr.apply(model, method, untrained=True, **method_params(method))
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# -- learned methods: training, checkpoints ------------------------------------------------------------------


def _data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("method", ["cropr", "dtps", "dynamicvit", "ltmp"])
def test_learned_methods_train_and_load_on_eva(method, tmp_path):
    from tokenreduce.training.learned import train_reducer

    params = {"p": 2} if method == "cropr" else {"layers": (1, 2)} if method in LAYERED else {}
    if method == "dtps":
        params["prop_attn"] = False
    model = make_eva()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_reducer(model, method, _data(), out_dir=str(tmp_path), batch_size=8, epochs=1, lr=0.05,
                        progress=False, **params)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # backbone frozen
    trained = tr.reducer(model).module.state_dict()
    fresh = make_eva()
    tr.apply(fresh, method, checkpoint=out["checkpoint"])
    loaded = tr.reducer(fresh).module.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    with torch.no_grad():
        assert torch.isfinite(fresh(torch.randn(2, 3, 32, 32))).all()


def test_a_timm_vit_checkpoint_is_refused_on_eva(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=4, num_classes=10)
    tr.apply(vit, "cropr", untrained=True, p=2)
    path = tmp_path / "vit_cropr.safetensors"
    save_reducer(tr.reducer(vit), path)
    eva = make_eva()
    # same depth, width, heads, tokens and classes: only the family differs
    assert tr.reducer(vit).info.num_tokens == tr.reducer(tr.apply(eva, "tome", r=0)).info.num_tokens
    with pytest.raises(ValueError, match="'family': \\('timm-vit', 'timm-eva'\\)"):
        tr.apply(eva, "cropr", checkpoint=path)


def test_training_forward_with_patch_dropout_runs():
    model = make_eva(patch_drop_rate=0.25)  # training: timm passes per-image rope rows (B×1×N×2d)
    tr.apply(model, "cropr", untrained=True, p=2)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


# -- refusals -----------------------------------------------------------------------------------------------


def test_unsupported_configurations_are_refused():
    with pytest.raises(TypeError, match="attn_type='rope'"):
        tr.apply(make_eva(attn_type="rope", qkv_fused=False), "tome")
    model = make_eva(global_pool="map")
    model.attn_pool.pos_embed = nn.Parameter(torch.zeros(17, 64))
    with pytest.raises(TypeError, match="pos_embed='abs'"):
        tr.apply(model, "tome")
    model = make_eva()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tr.apply(model, "tome")


def test_reduced_eva_refuses_what_it_cannot_honour(images):
    model = make_eva()
    tr.apply(model, "tome", r=2)
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(images)
    with pytest.raises(NotImplementedError, match="attention masks"):
        model.blocks[0](torch.randn(1, 17, 64), attn_mask=torch.zeros(1, 1, 17, 17))
    with pytest.raises(RuntimeError, match="set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    with tr.unreduced(model):
        assert len(model.forward_intermediates(images, intermediates_only=True)) == DEPTH


def test_a_reduction_that_drops_positions_is_refused(images, monkeypatch):
    model = make_eva()
    tr.apply(model, "random", keep_rate=0.5, layers=(1,))
    reducer = tr.reducer(model)
    original = reducer.reduce
    monkeypatch.setattr(reducer, "reduce", lambda *a: TokenState(original(*a).x, num_prefix=1))
    with pytest.raises(RuntimeError, match="positions"):
        with torch.no_grad():
            model(images)


def test_pretrained_style_eva02_small_builds_and_reduces():
    with torch.device("meta"):
        model = timm.create_model("eva02_small_patch14_224", pretrained=False)
    assert tr.gmacs(model, "tome", r=8) < 0.8 * tr.gmacs(model)
    mlp = model.blocks[0].mlp  # a SwiGLU MLP (packed GluMlp here)
    cost = TimmEva.model_info(model).cost
    assert cost.mlp_linear[0] == sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
