"""TPS's squeeze operator (ops/squeeze.py) on hand-worked examples and random states."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreduce.ops.squeeze import SELF_WEIGHT, squeeze_hosts, squeeze_mean, squeeze_state
from tokenreduce.state import TokenState

E = math.e


def _state(rows, size=None, num_prefix=1, trace=True):
    x = torch.tensor([rows], dtype=torch.float32)
    n = x.shape[1]
    size_t = None if size is None else torch.tensor([size], dtype=torch.float32).unsqueeze(-1)
    source = torch.eye(n).unsqueeze(0) if trace else None
    return TokenState(x, size_t, source, num_prefix)


def test_self_weight_is_the_constant_e():
    assert SELF_WEIGHT == E


def test_four_token_example_by_hand():
    # tokens: CLS, r0=(1,0), p0=(2,0), r1=(0,1), p1=(3,4); keep r0, r1; squeeze p0, p1.
    # cos(p0, r0)=1, cos(p0, r1)=0  -> host r0, weight e^1
    # cos(p1, r0)=0.6, cos(p1, r1)=0.8 -> host r1, weight e^0.8
    state = _state([[5, 5], [1, 0], [2, 0], [0, 1], [3, 4]], size=[1, 1, 2, 1, 3])
    out = squeeze_state(state, keep_index=torch.tensor([[0, 2]]), drop_index=torch.tensor([[1, 3]]))
    r0 = [(E * 1 + E * 2) / (2 * E), 0.0]  # = (1.5, 0)
    w = math.exp(0.8)
    r1 = [(w * 3) / (E + w), (E * 1 + w * 4) / (E + w)]
    expected = torch.tensor([[[5.0, 5.0], r0, r1]])
    torch.testing.assert_close(out.x, expected)
    assert out.x[0, 1].tolist() == [1.5, 0.0]
    # sizes: host + guests; the CLS token is untouched
    assert out.size.squeeze(-1).tolist() == [[1.0, 1.0 + 2.0, 1.0 + 3.0]]
    # sources: union of host and guests
    assert out.source[0].tolist() == [
        [1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
    ]


def test_kept_order_follows_keep_index_and_unchosen_hosts_are_unchanged():
    state = _state([[9, 9], [1, 0], [0, 1], [1, 0.1]], trace=False)
    # keep r=(0,1) first then (1,0); the pruned (1,0.1) picks (1,0); (0,1) is nobody's host
    out = squeeze_state(state, keep_index=torch.tensor([[1, 0]]), drop_index=torch.tensor([[2]]))
    assert out.x[0, 1].tolist() == [0.0, 1.0]
    cos = 1 / math.sqrt(1.01)
    w = math.exp(cos)
    torch.testing.assert_close(out.x[0, 2], torch.tensor([(E + w) / (E + w), 0.1 * w / (E + w)]))
    assert out.size.squeeze(-1).tolist() == [[1.0, 1.0, 2.0]]
    assert out.source is None


def test_tie_goes_to_exactly_one_host():
    # (1,1) is equally similar to (1,0) and (0,1): it must land in one host only (the first).
    state = _state([[0, 0], [1, 0], [0, 1], [1, 1]])
    out = squeeze_state(state, keep_index=torch.tensor([[0, 1]]), drop_index=torch.tensor([[2]]))
    w = math.exp(1 / math.sqrt(2))
    torch.testing.assert_close(out.x[0, 1], torch.tensor([(E + w) / (E + w), w / (E + w)]))
    assert out.x[0, 2].tolist() == [0.0, 1.0]
    assert out.size.squeeze(-1).tolist() == [[1.0, 2.0, 1.0]]
    assert out.source[0, 1:, 1:].sum().item() == 3  # no original token counted twice


def test_temperature_scales_the_guest_weight_only():
    kept = torch.tensor([[[1.0, 0.0]]])
    pruned = torch.tensor([[[3.0, 4.0]]])
    host, weight = squeeze_hosts(pruned, kept, temperature=2.0)
    assert host.tolist() == [[0]]
    torch.testing.assert_close(weight, torch.tensor([[math.exp(0.6 / 2)]]))
    out = squeeze_mean(kept, pruned, host, weight)
    w = math.exp(0.3)
    torch.testing.assert_close(out, torch.tensor([[[(E + 3 * w) / (E + w), 4 * w / (E + w)]]]))


def test_zero_vector_does_not_produce_nan():
    kept = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    pruned = torch.tensor([[[0.0, 0.0]]])
    host, weight = squeeze_hosts(pruned, kept)
    assert torch.isfinite(weight).all()
    assert torch.isfinite(squeeze_mean(kept, pruned, host, weight)).all()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    patches=st.integers(2, 12),
    prefix=st.integers(0, 3),
    data=st.data(),
)
def test_bookkeeping_and_convexity(batch, patches, prefix, data):
    keep = data.draw(st.integers(1, patches - 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    n = prefix + patches
    x = torch.randn(batch, n, 5, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    state = TokenState(x, size, torch.eye(n).expand(batch, n, n), prefix)
    perm = torch.stack([torch.randperm(patches, generator=g) for _ in range(batch)])
    out = squeeze_state(state, perm[:, :keep], perm[:, keep:])
    assert out.x.shape == (batch, prefix + keep, 5)
    # prefix untouched, sizes conserved, every original patch in exactly one token
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])
    torch.testing.assert_close(out.size[:, prefix:].sum(1), size[:, prefix:].sum(1))
    assert torch.equal(out.source[:, prefix:, prefix:].sum(1), torch.ones(batch, patches))
    torch.testing.assert_close(out.source @ size, out.size)  # a token's size = its members' sizes
    # each output token is a convex combination of the tokens it absorbed
    for b in range(batch):
        for t in range(prefix, prefix + keep):
            members = x[b, out.source[b, t].bool()]
            assert (out.x[b, t] >= members.min(0).values - 1e-5).all()
            assert (out.x[b, t] <= members.max(0).values + 1e-5).all()
    # batch independence
    single = squeeze_state(
        TokenState(x[-1:], size[-1:], state.source[-1:], prefix), perm[-1:, :keep], perm[-1:, keep:]
    )
    torch.testing.assert_close(single.x, out.x[-1:])
