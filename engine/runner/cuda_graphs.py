"""CUDA graphs of the decode forward, one per padded batch size.

A pure-decode step (one new token per request, every request sampling) replays the graph of the
smallest captured size that holds it: its inputs are copied into the graph's static buffers, the
padding rows write no KV (slot -1) and attend to one position of their (stale but valid) block-table
row, and their hidden states are ignored. A one-sequence prefill of up to 512 tokens replays a graph
of prefill_graphs.py; other prefill and mixed steps run eagerly. The graphs end at the
final hidden states: each graph's output stays allocated for its replays, and [size, vocab] logits
per graph would hold gigabytes at a max_num_seqs of 1024, so the logits (one matmul over the real
rows only) run outside. Triton's launch overhead —
tens of microseconds per kernel, hundreds of kernels per step — is what the graphs remove.

Each size is captured twice: as is, and with each sequence's keys split across
`LONG_CONTEXT_SPLITS` programs, replayed when the batch holds a sequence of `LONG_CONTEXT_TOKENS`
or more. A decode's attention is one program per sequence and KV head walking all its keys: with
one 16k-token sequence among short ones, that program set the step (0.5 ms a layer on an H100,
a 2.4 ms decode step took 16 ms, the step where a request whose prefix was loaded joins). The split
variant is not used for short contexts: its combine costs every layer a few small kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.models.attention import AttentionMetadata
from engine.runner.batch_state import PreparedStep

logger = logging.getLogger(__name__)

LONG_CONTEXT_TOKENS = 4096
LONG_CONTEXT_SPLITS = 8


def capture_graphs(forward: Callable[..., torch.Tensor], inputs: dict, pool) -> dict:
    """key -> (graph, its output) of `forward(*args)` for every (key, args) of `inputs`, in order,
    into `pool`; each is run once outside its capture first (Triton compiles its kernels then)."""
    graphs = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for key, args in inputs.items():
            forward(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = forward(*args)
            graphs[key] = (graph, hidden)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captures `forward(input_ids, positions, attn) -> hidden` for padded decode batches and replays it."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
                 max_num_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.forward = forward
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        # In a decode step sequence b owns query row b: the offsets never change.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None   # the graphs' memory pool, once captured

    def _attn(self, size: int, long: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
            max_query_len=1, max_seq_len=self.block_tables.shape[1],
            num_splits=LONG_CONTEXT_SPLITS if long else 1)

    def capture(self) -> None:
        """Capture every size, largest first, all sharing one memory pool (`self.pool`)."""
        self.pool = torch.cuda.graph_pool_handle()
        inputs = {(size, long): (self.input_ids[:size], self.positions[:size], self._attn(size, long))
                  for size in reversed(self.sizes) for long in (False, True)}
        self._graphs = capture_graphs(self.forward, inputs, self.pool)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def padded_size(self, num_reqs: int) -> int | None:
        """The graph size that serves `num_reqs` decodes, or None when none is big enough."""
        for size in self.sizes:
            if size >= num_reqs:
                return size
        return None

    def replay(self, step: PreparedStep, size: int) -> torch.Tensor:
        """Run a decode step prepared with `num_tokens_padded=size`; returns hidden states [num_reqs, H]."""
        b = step.num_reqs
        self.input_ids[:size].copy_(step.input_ids)
        self.positions[:size].copy_(step.positions)
        self.slot_mapping[:size].copy_(step.attn.slot_mapping)
        self.block_tables[:b].copy_(step.attn.block_tables)
        self.seq_lens[:b].copy_(step.attn.seq_lens)
        self.seq_lens[b:size].fill_(1)
        graph, hidden = self._graphs[(size, step.attn.max_seq_len >= LONG_CONTEXT_TOKENS)]
        graph.replay()
        return hidden[:b]
