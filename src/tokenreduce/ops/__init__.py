"""Shared primitives: matching, merging, pruning, attention with size bias."""

from .attention import AttentionNeeds, AttentionSignals, attention_with_signals, size_bias
from .gather import batched_gather
from .matching import BipartiteMatch, bipartite_soft_matching, max_merges
from .merge import bipartite_merge, merge_wavg
from .prune import keep_topk, masked_weighted_sum

__all__ = [
    "AttentionNeeds",
    "AttentionSignals",
    "attention_with_signals",
    "size_bias",
    "BipartiteMatch",
    "batched_gather",
    "bipartite_merge",
    "bipartite_soft_matching",
    "keep_topk",
    "masked_weighted_sum",
    "max_merges",
    "merge_wavg",
]
