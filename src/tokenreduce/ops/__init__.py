"""Shared primitives: matching, merging, pruning, clustering, attention with size bias.

Import the modules themselves (``from tokenreduce.ops.merge import bipartite_merge``).  This package
re-exports only the primitives that do not depend on :mod:`tokenreduce.state`, so that importing it
never depends on the order in which the package's modules are first imported.
"""

from .attention import AttentionNeeds, AttentionSignals, attention_with_signals, size_bias
from .gather import batched_gather
from .matching import BipartiteMatch, bipartite_soft_matching, max_merges
from .prune import keep_topk, masked_weighted_sum

__all__ = [
    "AttentionNeeds",
    "AttentionSignals",
    "attention_with_signals",
    "size_bias",
    "BipartiteMatch",
    "batched_gather",
    "bipartite_soft_matching",
    "keep_topk",
    "masked_weighted_sum",
    "max_merges",
]
