"""Compute kernels of the engine: each op has a plain-PyTorch reference and a Triton kernel.

The functions exported here dispatch on the device of their first tensor: CUDA tensors run the
Triton kernel, anything else runs the reference. Signatures are in the engine contract.
Import the reference modules by their full name (``from kernels.rms_norm import rms_norm_ref``);
``kernels.rms_norm`` and ``kernels.paged_attention`` as attributes are the dispatchers.
"""

from torch import Tensor

from kernels.activation import silu_and_mul_ref
from kernels.kv_cache_ops import gather_blocks_ref, scatter_blocks_ref, write_kv_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_embedding_ref

__all__ = [
    "gather_blocks",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "scatter_blocks",
    "silu_and_mul",
    "write_kv",
]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """RMSNorm of ``x`` [T, H]; with ``residual`` returns ``(rms_norm(x + residual), x + residual)``."""
    return rms_norm_ref(x, weight, eps, residual)


def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] by ``positions``; returns ``(q_out, k_out)``."""
    return rotary_embedding_ref(positions, q, k, cos_sin_cache)


def silu_and_mul(x: Tensor) -> Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for ``x`` [T, 2*I]."""
    return silu_and_mul_ref(x)


def write_kv(k: Tensor, v: Tensor, kv_cache: Tensor, layer: int, slot_mapping: Tensor) -> None:
    """Write ``k``/``v`` [T, Hk, D] of ``layer`` into the cache at ``slot_mapping`` (negative = skip)."""
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
) -> Tensor:
    """Causal paged attention for prefill chunks and decodes in one call; returns [T, Hq, D]."""
    return paged_attention_ref(
        q, kv_cache, layer, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale
    )


def gather_blocks(kv_cache: Tensor, block_ids: Tensor) -> Tensor:
    """Pack blocks ``block_ids`` into a new [n, L, 2, bs, Hk, D] tensor."""
    return gather_blocks_ref(kv_cache, block_ids)


def scatter_blocks(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> None:
    """Copy ``src`` [n, L, 2, bs, Hk, D] into blocks ``block_ids`` of the cache."""
    scatter_blocks_ref(kv_cache, block_ids, src)
