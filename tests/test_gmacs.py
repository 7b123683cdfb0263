"""Analytic GMACs against the reference table (docs/methods.md#gmacs-counting) and torch's FLOP counter."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import tokenreduce as tr

# (model, method, params) -> GMACs in the reference table of docs/methods.md#gmacs-counting (2 decimals).
TABLE = [
    ("deit_tiny_patch16_224", None, {}, 1.25),
    ("deit_small_patch16_224", None, {}, 4.60),
    ("deit_base_patch16_224", None, {}, 17.56),
    ("deit_tiny_patch16_224", "tome", {"r": 8}, 0.92),
    ("deit_small_patch16_224", "tome", {"r": 8}, 3.42),
    ("deit_base_patch16_224", "tome", {"r": 8}, 13.10),
    ("deit_tiny_patch16_224", "tome", {"r": 13}, 0.73),
    ("deit_small_patch16_224", "tome", {"r": 13}, 2.70),
    ("deit_base_patch16_224", "tome", {"r": 13}, 10.37),
    ("deit_small_patch16_224", "tome", {"r": 16}, 2.29),
    ("deit_base_patch16_224", "tome", {"r": 16}, 8.77),
    ("deit_tiny_patch16_224", "evit", {"keep_rate": 0.7}, 0.82),
    ("deit_small_patch16_224", "evit", {"keep_rate": 0.7}, 3.03),
    ("deit_base_patch16_224", "evit", {"keep_rate": 0.7}, 11.61),
    ("deit_small_patch16_224", "evit", {"keep_rate": 0.5}, 2.31),
    ("deit_base_patch16_224", "evit", {"keep_rate": 0.5}, 8.82),
]


@pytest.fixture(scope="module")
def deits():
    with torch.device("meta"):  # no memory for weights: the count only needs shapes
        return {name: timm.create_model(name, pretrained=False) for name in {row[0] for row in TABLE}}


@pytest.mark.parametrize("name,method,params,expected", TABLE)
def test_spec_table(deits, name, method, params, expected):
    assert round(tr.gmacs(deits[name], method, **params), 2) == pytest.approx(expected)


def test_evit_schedule_counts_from_the_spec(deits):
    model = deits["deit_small_patch16_224"]
    tr.apply(model, "evit", keep_rate=0.7)
    schedule = tr.reducer(model).schedule(197)
    assert [m for n, m in schedule if n != m] == [140, 100, 72]
    tr.remove(model)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a fused attention call, counted as torch counts its other SDPA ops: QKᵀ and P·V."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def _missing_flop_formulas() -> dict:
    """Formulas for the ops the models run that this torch's FLOP counter has none for.

    Where ``F.scaled_dot_product_attention`` runs the CPU flash kernel, some torch
    versions' counters have no formula for it and count its QKᵀ and P·V as zero. (They
    go in as the counter's ``custom_mapping``, which leaves torch's own registry as it was.)
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None or op in flop_registry else {op: _cpu_sdpa_flop}


def _counted_macs(model, x):
    counter = FlopCounterMode(display=False, custom_mapping=_missing_flop_formulas())
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def test_analytic_count_equals_flop_counter_unreduced():
    model = make_vit()
    counted = _counted_macs(model, torch.randn(2, 3, 64, 64))
    assert counted == pytest.approx(tr.gmacs(model) * 1e9, rel=1e-9)


@pytest.mark.parametrize("method,params", [("tome", {"r": 4}), ("evit", {"keep_rate": 0.5}), ("random", {})])
def test_analytic_count_matches_flop_counter_reduced(method, params):
    model = make_vit()
    tr.apply(model, method, untrained=True, **params)
    counted = _counted_macs(model, torch.randn(2, 3, 64, 64))
    analytic = tr.stats(model).gmacs * 1e9
    # The counter also sees the methods' own small matmuls (similarity, class-attention row),
    # which the papers' GMACs leave out: at most a few percent here.
    assert analytic <= counted <= analytic * 1.05
    assert analytic < 0.9 * tr.gmacs(model) * 1e9


def test_cropr_scorer_cost_is_what_runs():
    """Cropr sums its M queries before scoring (``Σ_q q·x = x·Σ_q q``): the counted MACs do not grow with M, and the
    analytic count grows only by the query sum's M·C per module (additions the counter does not see)."""
    counted, analytic = {}, {}
    for m in (1, 64):
        model = make_vit()
        tr.apply(model, "cropr", untrained=True, p=2, num_queries=m)
        counted[m] = _counted_macs(model.eval(), torch.randn(2, 3, 64, 64))
        analytic[m] = tr.stats(model).gmacs * 1e9
        modules = len(tr.reducer(model).after_blocks)
    assert counted[64] == counted[1]
    assert analytic[64] - analytic[1] == pytest.approx(63 * 64 * modules)
    assert counted[1] == pytest.approx(analytic[1], rel=1e-4)
