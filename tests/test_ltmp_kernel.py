"""LTMP's fused CPU kernel (ops/csrc/ltmp_merge_prune.cpp): a hand-worked padded batch on both paths, its
similarities against the PyTorch path's to rounding, bit-equality with the PyTorch path after them, and when it
is (not) used."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from conftest import kernel_mode, make_vit, run_with_and_without_kernels
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ltmp import _info

import tokenreduce as tr
import tokenreduce.methods.ltmp as ltmp_module
from tokenreduce.methods.ltmp import LTMP, LTMPParams
from tokenreduce.ops import cpu_kernels
from tokenreduce.ops.attention import AttentionSignals, flash_multiple, size_bias
from tokenreduce.ops.similarity import alternate, unit_rows
from tokenreduce.state import TokenState


def _ltmp(merge: float, prune: float, num_patches: int = 4, num_prefix: int = 1) -> LTMP:
    ltmp = LTMP(_info(num_patches=num_patches, num_prefix=num_prefix),
                LTMPParams(merge_threshold=merge, prune_threshold=prune))
    ltmp.training = False
    return ltmp


def _positions(batch: int, n: int) -> torch.Tensor:
    return torch.arange(n).view(1, n, 1).expand(batch, n, 1)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hand_worked_padded_batch(kernel_state, mode):
    cpu_kernels.set_cpu_kernels(mode)
    # Class token + 4 patches; A = positions {0, 2, 4}, B = {1, 3}.
    # Image 0: cos(2, 3) = 1 and cos(4, 1) = 0.98 > 0.9, so 2 → 3 and 4 → 1 merge.  Group importances:
    # 1: max(0.1, 0.05) = 0.1 < 0.2, pruned; 3: max(0.05, 0.3) = 0.3, kept.  Live: [0, 3'].
    # Image 1: every A·B cosine is 0, nothing merges, every importance 0.5: all five live.
    keys = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [0.2, 1.0]],
        [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]],
    ])
    received = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05], [0.5] * 5])
    x = torch.tensor([[10.0, 1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 3.0, 4.0, 5.0]]).unsqueeze(-1)
    state = TokenState(x, num_prefix=1, pos=_positions(2, 5))
    out = _ltmp(0.9, 0.2).reduce(0, state, AttentionSignals(keys=keys, received=received))
    # Padded to 5 rows: image 0 has its live tokens [0, 3'] first, then the dead ones in layout order
    # [2, 4, 1'] (A tokens as they were, B token 1 with token 4 merged in: (1 + 8) / 2).
    assert out.pos[..., 0].tolist() == [[0, 3, 2, 4, 1], [0, 2, 4, 1, 3]]
    assert out.x[..., 0].tolist() == [[10.0, 3.0, 2.0, 8.0, 4.5], [1.0, 3.0, 5.0, 2.0, 4.0]]
    assert out.size[..., 0].tolist() == [[1.0, 2.0, 1.0, 1.0, 2.0], [1.0] * 5]
    assert out.mask[..., 0].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 5]


def _random_case(batch, n, channels, dim, prefix, dead, with_size, merge, prune, seed):
    g = torch.Generator().manual_seed(seed)
    prefix = min(prefix, n)
    x = torch.randn(batch, n, channels, generator=g)
    x[:, -1, 0] = -0.0  # a signed zero: the Python path's (s·x + 0) / s turns a B token's into +0, so must the kernel
    keys = torch.randn(batch, n, dim, generator=g)
    if n > 3:
        keys[:, 3] = keys[:, 2]  # an exact cosine-1 pair, and a tie for the partner of position 2
        keys[:, 1] = keys[:, 2] * 2
    received = torch.rand(batch, n, generator=g) * 0.1
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float() if with_size else None
    mask = None
    if dead:
        live = torch.rand(batch, n, generator=g) > 0.3
        live[:, :prefix] = True
        mask = live.unsqueeze(-1).float()
    state = TokenState(x, size=size, num_prefix=prefix, mask=mask, pos=_positions(batch, n))
    ltmp = _ltmp(merge, prune, num_patches=max(n - prefix, 1), num_prefix=prefix)
    return ltmp, state, AttentionSignals(keys=keys, received=received)


@contextlib.contextmanager
def _kernel_fed_python_similarities() -> Iterator[None]:
    """The fused kernel given ``LTMP._similarity``'s values instead of computing its own from the keys (which
    agree with them to rounding only): what it does after the similarities, which is the Python path's bit for
    bit."""
    real = ltmp_module.fused_ltmp_merge_prune

    def fed(x, size, sim, *args, keys=None, **kwargs):
        if keys is not None:
            sim = LTMP._similarity(AttentionSignals(head_keys=keys) if keys.dim() == 4 else AttentionSignals(keys=keys))
        return real(x, size, sim, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ltmp_module, "fused_ltmp_merge_prune", fed)
        yield


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 30),
    channels=st.integers(1, 6),
    dim=st.sampled_from([1, 3, 8]),
    prefix=st.integers(0, 3),
    dead=st.booleans(),
    with_size=st.booleans(),
    merge=st.floats(0.0, 1.0),
    prune=st.sampled_from([0.0, 0.02, 0.05, 0.09]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_python_path_bit_for_bit_after_the_similarities(batch, n, channels, dim, prefix, dead,
                                                                      with_size, merge, prune, seed):
    outs = {}
    for mode in ("on", "off"):
        with kernel_mode(mode), _kernel_fed_python_similarities():
            ltmp, state, signals = _random_case(batch, n, channels, dim, prefix, dead, with_size, merge, prune, seed)
            outs[mode] = ltmp.reduce(0, state, signals)
    fused, python = outs["on"], outs["off"]
    assert torch.equal(fused.pos, python.pos)
    assert torch.equal(fused.x.view(torch.int32), python.x.view(torch.int32))  # bits: +0 and −0 differ
    assert torch.equal(fused.size, python.size)
    assert (fused.mask is None) == (python.mask is None)
    if fused.mask is not None:
        assert torch.equal(fused.mask, python.mask)


def _keys(batch: int, heads: int, n: int, dim: int, seed: int, per_head: bool) -> torch.Tensor:
    """B×N×d keys, or B×H×N×d per-head keys laid out as a fused qkv projection leaves them (strided views)."""
    g = torch.Generator().manual_seed(seed)
    if not per_head:
        return torch.randn(batch, n, dim, generator=g)
    qkv = torch.randn(batch, n, 3, heads, dim, generator=g)
    return qkv.permute(2, 0, 3, 1, 4)[1]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), n=st.integers(1, 40), dim=st.sampled_from([1, 3, 8, 64]),
       per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_similarities_are_the_python_ones_to_rounding(batch, heads, n, dim, per_head, seed):
    keys = _keys(batch, heads, n, dim, seed, per_head)
    with kernel_mode("on"):
        fused = cpu_kernels.load_cpu_kernels().ltmp_similarities(keys)
    python = LTMP._similarity(AttentionSignals(head_keys=keys) if per_head else AttentionSignals(keys=keys))
    assert fused.shape == python.shape == (batch, (n + 1) // 2, n // 2)
    torch.testing.assert_close(fused, python, atol=1e-6, rtol=0)
    assert (fused <= 1).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_kernel_similarities_of_keys_below_the_norm_clamp_are_the_python_ones(per_head):
    """Keys whose (head-mean) norm is below the clamp (``unit_rows``' eps, 1e-6) are divided by the clamp, not by their
    norm; the kernel sums the heads instead of averaging them, with the clamp scaled by the head count."""
    keys = _keys(2, 3, 12, 64, 0, per_head)
    token_axis = 2 if per_head else 1
    keys.narrow(token_axis, 2, 3).mul_(1e-9)  # tokens 2-4: norms ~1e-8 (and their heads' mean too)
    keys.narrow(token_axis, 6, 1).zero_()
    with kernel_mode("on"):
        fused = cpu_kernels.load_cpu_kernels().ltmp_similarities(keys)
    python = LTMP._similarity(AttentionSignals(head_keys=keys) if per_head else AttentionSignals(keys=keys))
    torch.testing.assert_close(fused, python, atol=1e-6, rtol=0)
    assert (fused <= 1).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.integers(1, 4), heads=st.integers(1, 3), n=st.integers(1, 30), prefix=st.integers(0, 3),
       dead=st.booleans(), with_size=st.booleans(), with_importance=st.booleans(), packed=st.booleans(),
       merge=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_the_step_from_keys_is_the_step_from_its_own_similarities(batch, heads, n, prefix, dead, with_size,
                                                                  with_importance, packed, merge, seed):
    """The kernel computes an image's similarities row by row from the keys, never the whole matrix; that gives
    exactly what it gives when handed the matrix of the same similarities (``ltmp_similarities``), with dead,
    prefix and packed tokens."""
    with kernel_mode("on"):
        module = cpu_kernels.load_cpu_kernels()
    g = torch.Generator().manual_seed(seed)
    prefix = min(prefix, n)
    keys = _keys(batch, heads, n, 8, seed, per_head=True)
    keys[:, :, n // 2] = keys[:, :, n // 3]  # a cosine-1 pair (and ties)
    x = torch.randn(batch, n, 5, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float() if with_size else None
    importance = torch.rand(batch, n, generator=g) * 0.1 if with_importance else None
    counts = mask = None
    if packed:
        counts = torch.randint(max(prefix, 1), n + 1, (batch,), generator=g)
        x = x.reshape(-1, 5)[: int(counts.sum())]
    elif dead:
        live = torch.rand(batch, n, generator=g) > 0.3
        live[:, :prefix] = True
        mask = live.unsqueeze(-1).float()
    args = (importance, mask, merge, 0.05, prefix, 8, counts, packed)
    from_keys = module.ltmp_merge_prune(x, size, keys, *args, True)
    from_sim = module.ltmp_merge_prune(x, size, module.ltmp_similarities(keys), *args, False)
    for got, expected in zip(from_keys, from_sim, strict=True):
        assert (got is None and expected is None) or torch.equal(got, expected)


def test_at_batch_one_the_attention_hands_ltmp_the_per_head_keys(kernel_state, monkeypatch):
    """With the kernel, no separate head-mean op runs at batch 1: the attention returns the per-head keys
    (``AttentionNeeds.keys_as_heads``) and the kernel averages them itself; the result is the one without
    the kernel, which takes the head mean in PyTorch."""
    import tokenreduce.ops.attention as attention

    means = []
    real = attention.head_mean
    monkeypatch.setattr(attention, "head_mean", lambda k: means.append(k.shape) or real(k))
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=0.5, prune_threshold=0.004)
    runs = run_with_and_without_kernels(model, image)
    (on, counts_on), (off, counts_off) = runs["on"], runs["off"]
    assert counts_on == counts_off and counts_on[-1] < 65
    assert torch.equal(on, off)
    assert tr.reducer(model).needs(0).keys_as_heads
    assert means == []  # with the kernel on (first) and off: the Python path takes the mean in LTMP itself


def test_kernel_is_used_only_where_it_gives_the_python_result(kernel_state, monkeypatch):
    cpu_kernels.set_cpu_kernels("on")
    real = cpu_kernels.load_cpu_kernels()
    calls = []
    monkeypatch.setattr(cpu_kernels, "_module", type("Spy", (), {"ltmp_merge_prune": staticmethod(
        lambda *args: calls.append(1) or real.ltmp_merge_prune(*args))}))
    ltmp, state, signals = _random_case(2, 9, 4, 3, 1, True, True, 0.5, 0.05, 0)
    ltmp.reduce(0, state, signals)
    assert len(calls) == 1  # eligible: CPU, float32, inference form, no sources or restoration

    n = state.num_tokens
    ltmp.reduce(0, TokenState(state.x, state.size, torch.eye(n).expand(2, n, n), 1, state.mask), signals)
    ltmp.reduce(0, TokenState(state.x, state.size, None, 1, state.mask, owner=torch.arange(n).expand(2, n)),
                signals)
    ltmp.reduce(0, TokenState(state.x.bfloat16(), state.size, None, 1, state.mask), signals)
    ltmp.training = True
    ltmp.reduce(0, state, signals)
    assert len(calls) == 1

    ltmp.training = False
    cpu_kernels.set_cpu_kernels("off")
    ltmp.reduce(0, state, signals)
    assert len(calls) == 1


def test_reduced_model_gives_identical_logits_with_and_without_the_kernel(kernel_state):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    images[1] = images[1].mean()  # a flat image merges far more than the others: a padded batch
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=0.6, prune_threshold=0.004)
    runs = run_with_and_without_kernels(model, images)
    (on, counts_on), (off, counts_off) = runs["on"], runs["off"]
    assert counts_on == counts_off and counts_on[-1] < 65
    assert torch.equal(on, off)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_block_without_received_attention_prunes_nothing_as_with_infinite_importance(kernel_state, mode):
    # A block whose prune threshold is 0 computes no received attention (signals.received is None): the
    # kernel and the Python path must then keep exactly what an importance of +inf everywhere keeps.
    cpu_kernels.set_cpu_kernels(mode)
    ltmp, state, signals = _random_case(3, 21, 4, 8, 1, True, True, 0.2, 0.0, seed=5)
    without = ltmp.reduce(0, state, AttentionSignals(keys=signals.keys, received=None))
    infinite = ltmp.reduce(0, state, AttentionSignals(keys=signals.keys,
                                                      received=torch.full_like(signals.received, torch.inf)))
    for got, expected in zip((without.x, without.size, without.pos), (infinite.x, infinite.size, infinite.pos),
                             strict=True):
        assert torch.equal(got, expected)
    assert without.num_tokens < state.num_tokens  # something merged, so the case is not trivial


def test_thresholds_changed_between_forwards_take_effect(kernel_state):
    # At inference the thresholds are read to the host once per forward and kept for its blocks: a change in
    # place (an optimiser step, load_state_dict, through .data) or a new parameter module must be seen by the
    # next forward.
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=1.0)
    reducer = tr.reducer(model)

    def final_tokens() -> float:
        with torch.no_grad():
            model(images)
        return tr.stats(model).blocks[-1].tokens_out

    assert final_tokens() == 65  # a cosine never exceeds 1: nothing merges
    with torch.no_grad():
        reducer.module.merge_threshold.fill_(0.0)
    merged = final_tokens()
    assert merged < 65
    reducer.module.load_state_dict({"merge_threshold": torch.ones(12), "prune_threshold": torch.zeros(12)})
    assert final_tokens() == 65
    fresh = type(reducer.module)([0.0] * 12, [0.0] * 12)
    reducer.module = fresh
    assert final_tokens() == merged
    reducer.module.merge_threshold.data.fill_(1.0)  # no autograd version bump: seen by the next forward
    assert final_tokens() == 65


def test_a_reduce_outside_a_forward_reads_the_thresholds_again(kernel_state):
    """During a forward the blocks compare with the thresholds read at its start; after it, a direct call of
    ``reduce`` reads the parameters as they are then."""
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=1.0)
    reducer = tr.reducer(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
        reducer.module.merge_threshold.fill_(0.0)
    assert tr.stats(model).blocks[-1].tokens_out == 65
    keys = _keys(1, 1, 9, 8, 0, per_head=False)
    state = TokenState(torch.randn(1, 9, 4), num_prefix=1)
    out = reducer.reduce(0, state, AttentionSignals(keys=keys))
    assert out.num_tokens < 9


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_merge_threshold_of_one_merges_nothing_even_where_rounding_puts_a_cosine_above_one(kernel_state, mode):
    # Two identical keys (positions 2 and 3) whose float32 cosine, computed as LTMP computes it, comes out a
    # few ulps above 1 (about a fifth of random vectors do); without the clamp a threshold of 1 merges them.
    other = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    candidates = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    for key in candidates:
        keys = torch.stack([other, other.flip(0), key, key, -other])[None]  # class token + 4; A = {0, 2, 4}
        metric_a, metric_b = alternate(unit_rows(keys))
        if float((metric_a @ metric_b.transpose(-1, -2))[0, 1, 1]) > 1.0:
            break
    else:
        raise AssertionError("no key with a cosine above 1 among the candidates")
    received = torch.full((1, 5), 0.2)
    state = TokenState(torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(0)), num_prefix=1)
    for threshold, expected in ((1.0, 5), (0.999, 4)):  # at 0.999 token 2 merges into its duplicate 3
        out = _ltmp(threshold, 0.0).reduce(0, state, AttentionSignals(keys=keys, received=received))
        assert out.num_tokens == expected


def test_a_zero_prune_threshold_skips_the_attention_probabilities_at_inference(kernel_state, monkeypatch):
    import tokenreduce.ops.attention as attention

    calls = {"bound": 0, "explicit": 0}  # the fused kernel's bound (per length bucket); the explicit pass
    real_bound, real = attention.certify_received, attention.attention_and_received
    real_ragged = attention.attend_ragged

    def counted(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(attention, "certify_received", counted("bound", real_bound))
    real_fused = attention.fused_bucketed_attention

    def fused(*args):  # the fused kernel with the bound (a log floor), or with the output and keys only
        calls["bound"] += args[5] is not None
        return real_fused(*args)

    monkeypatch.setattr(attention, "fused_bucketed_attention", fused)
    monkeypatch.setattr(attention, "attention_and_received", counted("explicit", real))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    thresholds = [0.0] * 6 + [1e-12] * 6  # blocks 0-5 cannot prune; 6-11 can (but prune nothing here)
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=0.6, prune_threshold=tuple(thresholds))
    with torch.inference_mode():
        fast = model(images)
    counts = [b.tokens_out for b in tr.stats(model).blocks]
    # the received attention only where the threshold is positive, and there the fused kernel's bound clears it
    assert calls == {"bound": 6, "explicit": 0}
    calls.update(bound=0, explicit=0)
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=0.6, prune_threshold=1e-12)
    monkeypatch.setattr(attention, "received_floor_applies", lambda *args: False)  # every probability, explicitly
    monkeypatch.setattr(attention, "attend_ragged", counted("explicit", real_ragged))
    with torch.inference_mode():
        explicit = model(images)
    assert calls == {"bound": 0, "explicit": 12}
    assert [b.tokens_out for b in tr.stats(model).blocks] == counts and counts[-1] < 65
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    model.train()  # the training form needs the exact probabilities in every block (its gradients)
    model(images)
    assert tr.reducer(model).needs(0).received and tr.reducer(model).needs(0).received_floor is None
    model.eval()
    with torch.no_grad():
        model(images)
    assert tr.reducer(model).needs(0).received_floor == pytest.approx(1e-12)


@pytest.mark.parametrize("multiple,batch,expected", [(16, 2, 32), (8, 2, 24), (16, 1, 20), (8, 1, 20)])
def test_a_padded_batch_is_cut_to_a_multiple_of_the_vector_width(kernel_state, monkeypatch, multiple, batch,
                                                                  expected):
    """Every image keeps 20 of its 40 tokens (orthogonal keys: no merges; the odd positions pruned): a batch
    of two is cut to 20 rounded up to the CPU's multiple (32 rows with 16, 24 with 8), the rows past 20 dead;
    one image alone to its own 20 rows (a single image is never padded)."""
    monkeypatch.setattr(ltmp_module, "flash_multiple", lambda: multiple)
    for mode in ("on", "off"):
        cpu_kernels.set_cpu_kernels(mode)
        n = 40
        keys = torch.eye(n)[:, :n].unsqueeze(0).repeat(batch, 1, 1)  # orthogonal keys: nothing merges
        received = torch.where(torch.arange(n) % 2 == 0, 0.5, 0.01).repeat(batch, 1)  # odd positions pruned
        x = torch.randn(batch, n, 4)
        out = _ltmp(0.9, 0.1, num_patches=n - 1).reduce(0, TokenState(x, num_prefix=1, pos=_positions(batch, n)),
                                                          AttentionSignals(keys=keys, received=received))
        assert out.num_tokens == expected, mode
        live = (out.mask[..., 0] > 0).sum(dim=1) if out.mask is not None else torch.full((batch,), out.num_tokens)
        assert live.tolist() == [20] * batch, mode
        if batch == 2:  # rows past the longest image's 20 are dead and hold real (finite) tokens
            assert torch.isfinite(out.x).all() and out.mask[:, 20:].eq(0).all()


@pytest.mark.parametrize("capability,multiple", [("AVX2", 8), ("AVX512", 16), ("DEFAULT", 16)])
def test_the_padding_multiple_is_the_cpus_vector_width(monkeypatch, capability, multiple):
    """8 float32 lanes with AVX2, 16 with AVX-512 (and where the width is unknown)."""
    flash_multiple.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    try:
        assert flash_multiple() == multiple
    finally:
        flash_multiple.cache_clear()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batch=st.integers(2, 4),
    n=st.integers(2, 30),
    channels=st.integers(1, 6),
    prefix=st.integers(0, 2),
    with_size=st.booleans(),
    merge=st.floats(0.0, 1.0),
    prune=st.sampled_from([0.0, 0.02, 0.05, 0.09]),
    seed=st.integers(0, 2**16),
)
def test_the_packed_stream_gives_the_padded_result(batch, n, channels, prefix, with_size, merge, prune, seed):
    """A packed state (only the live rows of x, each image's live tokens its first positions, as LTMP's
    compaction leaves them) reduces to the padded result's live rows, with the kernel and without it."""
    ltmp, state, signals = _random_case(batch, n, channels, 3, prefix, False, with_size, merge, prune, seed)
    g = torch.Generator().manual_seed(seed + 1)
    counts = torch.randint(max(prefix, 1), n + 1, (batch,), generator=g)
    counts[0] = n  # the padded length is the longest image's
    live = torch.arange(n).view(1, n) < counts.view(batch, 1)
    padded_in = dataclasses.replace(state, x=state.x * live.unsqueeze(-1), mask=live.unsqueeze(-1).float())
    packed_in = padded_in.packed()
    assert packed_in.packing.counts.tolist() == counts.tolist() and packed_in.x.shape[0] == int(counts.sum())
    assert torch.equal(packed_in.unpacked().x, padded_in.x)
    for mode in ("on", "off"):
        with kernel_mode(mode):
            padded = ltmp.reduce(0, padded_in, signals)
            packed = ltmp.reduce(0, packed_in, signals)
        if mode == "off":  # the Python path unpacks: the caller packs its result again
            assert packed.packing is None
            packed = packed.packed()
        assert torch.equal(packed.pos, padded.pos) and torch.equal(packed.size, padded.size), mode
        assert (packed.mask is None) == (padded.mask is None), mode
        if padded.mask is None:  # every row live: the stream is a plain B×M×C again
            assert packed.packing is None and torch.equal(packed.x, padded.x), mode
            continue
        assert torch.equal(packed.mask, padded.mask), mode
        alive = padded.mask[..., 0] > 0
        assert packed.packing.rows.tolist() == alive.reshape(-1).nonzero().squeeze(1).tolist(), mode
        assert packed.packing.counts.tolist() == alive.sum(dim=1).tolist(), mode
        assert torch.equal(packed.x, padded.x[alive]), mode


@pytest.mark.parametrize("packed", [False, True])
def test_the_kernel_returns_positions_and_log_sizes_only_where_asked(packed):
    with kernel_mode("on"):
        module = cpu_kernels.load_cpu_kernels()
    g = torch.Generator().manual_seed(0)
    keys = _keys(3, 2, 11, 8, 0, per_head=True)
    x = torch.randn(3, 11, 5, generator=g)
    size = torch.randint(1, 4, (3, 11, 1), generator=g).float()
    counts = None
    if packed:
        counts = torch.tensor([11, 7, 9])
        x = x.reshape(-1, 5)[:27]
    args = (x, size, keys, torch.rand(3, 11, generator=g) * 0.2, None, 0.2, 0.05, 1, 1, counts, packed, True)
    full = module.ltmp_merge_prune(*args, True, True)
    lean = module.ltmp_merge_prune(*args, False, False)
    assert lean[3] is None and lean[6] is None and full[3] is not None
    for i in (0, 1, 2, 4, 5):  # hidden states, sizes, mask, counts and rows: the same either way
        assert (lean[i] is None and full[i] is None) or torch.equal(lean[i], full[i])
    assert torch.equal(full[6], size_bias(full[1]))  # the same ATen op as the attention's bias: the same bits
    assert full[6].shape == (3, 1, 1, full[1].shape[1])


def test_the_reduced_model_takes_the_kernels_size_bias_and_never_a_stale_one(kernel_state, monkeypatch):
    """With the kernel the proportional-attention bias comes with the step (``TokenState.size_bias``): no block
    computes it again, and the logits are those of the Python path, which computes it in every block.  A state
    whose sizes were replaced after the bias was made does not pass it on."""
    import tokenreduce.models.base as model_base

    computed = []
    monkeypatch.setattr(model_base, "size_bias", lambda size: computed.append(1) or size_bias(size))
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    model = tr.apply(make_vit(), "ltmp", untrained=True, merge_threshold=0.5)
    runs = {}
    for mode in ("on", "off"):
        cpu_kernels.set_cpu_kernels(mode)
        computed.clear()
        with torch.inference_mode():
            runs[mode] = model(image)
        runs[mode + " biases"] = len(computed)
    assert torch.equal(runs["on"], runs["off"])
    assert runs["on biases"] == 0 and runs["off biases"] > 0
    assert tr.stats(model).blocks[-1].tokens_out < 65  # sizes changed: the bias was needed

    from tokenreduce.models import adapter_for
    from tokenreduce.models.base import ReductionContext

    context = ReductionContext(tr.reducer(model), adapter_for(model), "ltmp", trace_source=False)
    context.start(torch.zeros(1, 5, 8), training=False)
    size, other = torch.ones(1, 5, 1), torch.full((1, 5, 1), 2.0)
    context.update(TokenState(torch.zeros(1, 5, 8), size=size, size_bias=(size, size_bias(size) + 1)))
    assert torch.equal(context.key_bias(), size_bias(size) + 1)  # taken as it came, not computed again
    context.update(TokenState(torch.zeros(1, 5, 8), size=other, size_bias=(size, size_bias(size))))
    assert torch.equal(context.key_bias(), size_bias(other))


def test_the_fused_steps_state_is_what_dataclasses_replace_gives():
    """``TokenState.stepped`` builds the state field by field: every other field keeps its value, for every field
    the dataclass has (a field added later without updating ``stepped`` fails here)."""
    originals = {field.name: object() for field in dataclasses.fields(TokenState)}
    state = TokenState(**originals)
    new = {name: object() for name in ("x", "size", "mask", "pos", "packing")}
    for log_size in (None, object()):  # the old size's bias never carries over to the new size
        stepped = state.stepped(**new, log_size=log_size)
        replaced = dataclasses.replace(state, **new, size_bias=None if log_size is None else (new["size"], log_size))
        for field in dataclasses.fields(TokenState):
            got, expected = getattr(stepped, field.name), getattr(replaced, field.name)
            if field.name == "size_bias" and expected is not None:
                assert got[0] is expected[0] and got[1] is expected[1]
            else:
                assert got is expected, field.name
