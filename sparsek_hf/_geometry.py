"""Query-block geometry shared by the reference, the fake (meta) kernels and the cache.

Queries sit at absolute positions ``p = num_keys - num_queries + r``; block ``t`` covers positions
``[t * block_q, (t + 1) * block_q)``. Only the blocks that hold at least one query of the call
are selected for, so a decode step (one query) selects for one block.
"""

from __future__ import annotations


def query_block_range(num_queries: int, num_keys: int, block_q: int) -> tuple[int, int]:
    """(index of the first query block, number of query blocks) touched by the call."""
    if num_queries == 0:
        return 0, 0
    first = (num_keys - num_queries) // block_q
    last = (num_keys - 1) // block_q
    return first, last - first + 1


def selection_width(
    num_queries: int, num_keys: int, budget: int, window: int, sinks: int, block_q: int
) -> int:
    """Length of the per-block list of selected keys: no block of the call selects more."""
    first, count = query_block_range(num_queries, num_keys, block_q)
    if count == 0:
        return 0
    last_block_start = (first + count - 1) * block_q
    most_candidates = max(0, last_block_start - window - sinks + 1)
    return min(budget, most_candidates)
