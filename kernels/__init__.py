"""Compute kernels of the engine: each op has a plain-PyTorch reference and a Triton kernel.

The functions exported here dispatch on the device of their first tensor: CUDA tensors run the
Triton kernel (``kernels/<op>_triton.py``, imported on first CUDA use, so the CPU path never needs
triton), anything else runs the reference. Signatures are in the engine contract.
Import the reference modules by their full name (``from kernels.rms_norm import rms_norm_ref``);
``kernels.rms_norm`` and ``kernels.paged_attention`` as attributes are the dispatchers.
"""

from torch import Tensor

from kernels.activation import silu_and_mul_ref
from kernels.block_checksum import as_words, chunk_sums_host, chunk_sums_ref, combine
from kernels.input_prep import StepTensors, prepare_inputs_ref
from kernels.kv_cache_ops import gather_blocks_ref, scatter_blocks_ref, write_kv_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref

__all__ = [
    "block_checksums",
    "gather_blocks",
    "paged_attention",
    "prepare_inputs",
    "rms_norm",
    "rotary_embedding",
    "scatter_blocks",
    "silu_and_mul",
    "write_kv",
]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm of each [D] row of ``x``: [T, D], or a strided [T, H, D] view (Qwen3's q/k norm, read in
    place, contiguous result). With ``residual`` returns ``(rms_norm(x + residual), x + residual)``."""
    if x.is_cuda:
        from kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] by ``positions``; returns ``(q_out, k_out)``."""
    if q.is_cuda:
        from kernels.rotary_triton import rotary_embedding_triton

        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    return rotary_embedding_ref(positions, q, k, cos_sin_cache)


def silu_and_mul(x: Tensor) -> Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [T, 2*I]."""
    if x.is_cuda:
        from kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def write_kv(k: Tensor, v: Tensor, kv_cache: Tensor, layer: int, slot_mapping: Tensor) -> None:
    """Write ``k``/``v`` [T, Hk, D] of ``layer`` into the cache at ``slot_mapping`` (negative = skip)."""
    if kv_cache.is_cuda:
        from kernels.kv_cache_ops_triton import write_kv_triton

        write_kv_triton(k, v, kv_cache, layer, slot_mapping)
    else:
        write_kv_ref(k, v, kv_cache, layer, slot_mapping)


def paged_attention(
    q: Tensor,
    kv_cache: Tensor,
    layer: int,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    num_splits: int | None = None,
) -> Tensor:
    """Causal paged attention for prefill chunks and decodes in one call; returns [T, Hq, D].
    ``num_splits`` fixes how many programs share each sequence's keys (the kernel chooses if None;
    the result is the same either way)."""
    args = (q, kv_cache, layer, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale)
    if q.is_cuda:
        from kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(*args, num_splits=num_splits)
    return paged_attention_ref(*args)


def gather_blocks(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Pack blocks ``block_ids`` into a [n, L, 2, bs, Hk, D] tensor: a new one, or ``out``."""
    if kv_cache.is_cuda:
        from kernels.kv_cache_ops_triton import gather_blocks_triton

        return gather_blocks_triton(kv_cache, block_ids, out)
    return gather_blocks_ref(kv_cache, block_ids, out)


def scatter_blocks(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> None:
    """Copy ``src`` [n, L, 2, bs, Hk, D] into blocks ``block_ids`` of the cache."""
    if kv_cache.is_cuda:
        from kernels.kv_cache_ops_triton import scatter_blocks_triton

        scatter_blocks_triton(kv_cache, block_ids, src)
    else:
        scatter_blocks_ref(kv_cache, block_ids, src)


def prepare_inputs(
    block_tables: Tensor,
    num_computed_tokens: Tensor,
    token_ids: Tensor,
    req_indices: Tensor,
    num_scheduled_tokens: Tensor,
    block_size: int,
    num_tokens: int,
    num_tokens_padded: int | None = None,
) -> StepTensors:
    """A step's input ids, positions, slot mapping, query offsets and lengths from device-side state."""
    args = (block_tables, num_computed_tokens, token_ids, req_indices, num_scheduled_tokens, block_size,
            num_tokens, num_tokens_padded)
    if token_ids.is_cuda:
        from kernels.input_prep_triton import prepare_inputs_triton

        return prepare_inputs_triton(*args)
    return prepare_inputs_ref(*args)


def block_checksums(pages: Tensor, page_ids: Tensor | None, pages_per_block: int) -> Tensor:
    """Data checksums [n] int64 of the blocks made of pages ``page_ids`` (ppb per block, in order) of
    ``pages`` (any contiguous tensor whose first dim is the page); all pages in order if None."""
    words = as_words(pages)
    if words.is_cuda:
        from kernels.block_checksum_triton import chunk_sums_triton

        return combine(chunk_sums_triton(words, page_ids), pages_per_block)
    if page_ids is None:
        return combine(chunk_sums_host(words), pages_per_block)
    return combine(chunk_sums_ref(words, page_ids), pages_per_block)
