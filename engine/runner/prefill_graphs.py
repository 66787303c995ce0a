"""CUDA graphs of a one-sequence prefill of up to 512 tokens, over any context.

The step that computes the tail of a prompt whose prefix was just loaded from the store (255 new
tokens over 7,936 loaded ones, say), and the whole prefill of a short prompt, run alone when the
engine is not busy, and run eagerly they are launch-bound: on an H100 the Llama-3-8B-shape tail
step took ~45 ms of host time (32 layers, ~1,700 torch and Triton calls) for 13.7 ms of GPU work, a
third of a hit's time to first token. Replaying a graph issues it in one call.

One graph per padded token count (16, 32, ... 512), each captured twice like the decode graphs
(cuda_graphs.py): as is, and with the attention kernel's keys split for long contexts. The one
sequence owns every row of the graph: the padding rows come after the real ones, so each real row
keeps its causal position (`seq_len - query_len + i`); they write no KV (slot -1) and their
attention reads pages the block table names past the prompt's end (valid pages, stale bytes) and
is discarded, as are their hidden states. A step whose padded end would pass the block table's
width runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.models.attention import AttentionMetadata
from engine.runner.batch_state import PreparedStep
from engine.runner.cuda_graphs import LONG_CONTEXT_TOKENS, capture_graphs

logger = logging.getLogger(__name__)

PREFILL_GRAPH_SIZES = (16, 32, 64, 128, 256, 512)


class PrefillGraphs:
    """Captures `forward(input_ids, positions, attn) -> hidden` for one padded sequence and replays it."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
                 max_blocks: int, block_size: int, device: torch.device) -> None:
        self.forward = forward
        self.sizes = PREFILL_GRAPH_SIZES
        self.max_tokens = max_blocks * block_size   # positions the block table row reaches
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        self._query_start_loc = {size: torch.tensor([0, size], dtype=torch.int32, device=device)
                                 for size in self.sizes}
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _attn(self, size: int, long: bool) -> AttentionMetadata:
        # Long: the kernel picks as many key splits as fill the GPU for the longest context.
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables, seq_lens=self.seq_lens,
            query_start_loc=self._query_start_loc[size], max_query_len=size, max_seq_len=self.max_tokens,
            num_splits=None if long else 1)

    def capture(self, pool) -> None:
        """Capture every size in `pool` (the decode graphs': never replayed at the same time)."""
        inputs = {(size, long): self.inputs(size, long) for size in reversed(self.sizes) for long in (False, True)}
        self._graphs = capture_graphs(self.forward, inputs, pool)
        logger.info("captured CUDA graphs for one-sequence prefills of %s tokens", list(self.sizes))

    def padded_size(self, num_tokens: int, seq_len: int) -> int | None:
        """The graph size for a one-sequence step of `num_tokens` ending at `seq_len`, or None."""
        for size in self.sizes:
            if size >= num_tokens:
                return size if seq_len - num_tokens + size <= self.max_tokens else None
        return None

    def replay(self, step: PreparedStep, size: int) -> torch.Tensor:
        """Run a step prepared with `num_tokens_padded=size`; returns hidden states [size, H]."""
        graph, hidden = self._graphs[self.stage(step, size)]
        graph.replay()
        return hidden

    def stage(self, step: PreparedStep, size: int) -> tuple[int, bool]:
        """Copy a step's inputs into the static buffers, the sequence padded to `size` tokens; the
        key of the graph to replay."""
        self.input_ids[:size].copy_(step.input_ids)
        self.positions[:size].copy_(step.positions)
        self.slot_mapping[:size].copy_(step.attn.slot_mapping)
        self.block_tables.copy_(step.attn.block_tables)
        torch.add(step.attn.seq_lens, size - step.num_tokens, out=self.seq_lens)
        return size, step.attn.max_seq_len >= LONG_CONTEXT_TOKENS

    def inputs(self, size: int, long: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """What the graph of (`size`, `long`) was captured over."""
        return self.input_ids[:size], self.positions[:size], self._attn(size, long)


def graph_output_bytes(hidden_size: int, element_size: int) -> int:
    """What the prefill graphs' outputs keep allocated in the shared pool."""
    return 2 * sum(PREFILL_GRAPH_SIZES) * hidden_size * element_size
