"""Block checksums where the bytes are: the torch reference of the chunk sums, and their combination.

The function is `kvstore.checksum`'s block checksum (its docstring says why it is built from 64-bit
chunk sums): each 1 KiB chunk of a block is summed as 128 int64 words, then the chunk sums are
combined by a plain and a position-weighted sum. A block is `pages_per_block` KV pages in order;
a page is a whole number of chunks, so the sums can be taken page by page wherever the pages lie
(scattered in the paged cache, or contiguous in a slab slot). All arithmetic wraps modulo 2^64,
so the Triton kernel, this reference and numpy agree bit for bit in any reduction order.
"""

import numpy as np
import torch
from torch import Tensor

from kvstore.checksum import CHUNK_BYTES, MIX, to_int64

CHUNK_WORDS = CHUNK_BYTES // 8
_MIX = to_int64(MIX)


def as_words(pages: Tensor) -> Tensor:
    """A contiguous tensor of pages (any dtype, first dim = page) as [num_pages, words] int64."""
    flat = pages.view(pages.shape[0], -1)
    if flat.element_size() != 8:
        flat = flat.view(torch.uint8).view(torch.int64)
    return flat.view(torch.int64) if flat.dtype != torch.int64 else flat


def chunk_sums_ref(words: Tensor, page_ids: Tensor | None) -> Tensor:
    """Sums of each 1 KiB chunk of pages `page_ids` (all pages if None): [m, chunks_per_page] int64."""
    rows = words if page_ids is None else words.index_select(0, page_ids)
    return rows.view(rows.shape[0], -1, CHUNK_WORDS).sum(dim=2)


def chunk_sums_host(words: Tensor) -> Tensor:
    """`chunk_sums_ref(words, None)` for CPU tensors, read in place through numpy: its int64 sum over a
    chunk's 128 words runs ~2.5x torch's on a CPU (the engine's CPU loads verify every block), and
    wraps modulo 2^64 the same way, so the sums are the same."""
    rows = words.numpy().reshape(words.shape[0], -1, CHUNK_WORDS)
    return torch.from_numpy(rows.sum(axis=2, dtype=np.int64))


def combine(chunk_sums: Tensor, pages_per_block: int) -> Tensor:
    """The data checksum of each block from its pages' chunk sums: [n * ppb, C] -> [n] int64."""
    per_block = chunk_sums.view(chunk_sums.shape[0] // pages_per_block, -1)
    weights = torch.arange(1, per_block.shape[1] + 1, dtype=torch.int64, device=per_block.device)
    return per_block.sum(dim=1) ^ ((per_block * weights).sum(dim=1) * _MIX)
