"""Block checksums where the bytes are: the Triton kernel of the chunk sums (pages read in place)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.block_checksum import CHUNK_WORDS

# Chunks summed per program: a 16 x 128-word tile (16 KiB) keeps enough loads in flight to run at
# HBM speed without a second reduction pass.
_GROUP = 16


@triton.jit
def _chunk_sums_kernel(words_ptr, ids_ptr, out_ptr, words_per_page, chunks_per_page,
                       HAS_IDS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    page = tl.load(ids_ptr + i).to(tl.int64) if HAS_IDS else i
    chunk = tl.program_id(1).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    inside = chunk < chunks_per_page
    offs = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    words = tl.load(words_ptr + page * words_per_page + offs, mask=inside[:, None], other=0)
    tl.store(out_ptr + i * chunks_per_page + chunk, tl.sum(words, axis=1), mask=inside)


def chunk_sums_triton(words: Tensor, page_ids: Tensor | None) -> Tensor:
    """Same contract as ``kernels.block_checksum.chunk_sums_ref``."""
    num_pages = words.shape[0] if page_ids is None else page_ids.shape[0]
    chunks_per_page = words.shape[1] // CHUNK_WORDS
    out = torch.empty((num_pages, chunks_per_page), dtype=torch.int64, device=words.device)
    if num_pages:
        grid = (num_pages, triton.cdiv(chunks_per_page, _GROUP))
        _chunk_sums_kernel[grid](words, page_ids if page_ids is not None else words, out, words.shape[1],
                                 chunks_per_page, HAS_IDS=page_ids is not None, CHUNK=CHUNK_WORDS, GROUP=_GROUP)
    return out
