"""The daemon's C allocator: at most MALLOC_ARENAS glibc arenas, so the buffers one thread frees are
reused by the next thread's, and RSS follows the bytes the daemon holds.

A block passes through several buffers of about its chunk's size (1 MiB) on its way in and out:
gRPC's, the request's bytes, the parsed message, the payload. glibc serves them from its heaps (the
first such buffer freed raises its mmap threshold above them) and by default gives a thread that
finds the arenas busy a new one, up to 8 per core; every arena keeps the pages freed in it for its
own threads. With the daemon's dozens of RPC threads that stranded memory was most of the RSS above
what the tiers and the Put streams hold. Measured with `kvstore soak` (64 clients, 45 s, same
machine; docs/reliability.md): RSS max 530-567 MiB with glibc's defaults, 409 MiB with 2 arenas,
for the same CPU per block moved. (A fixed mmap threshold gave 343-374 MiB, but at up to three
times the CPU per block: every buffer was then a fresh mapping, faulted in page by page.)
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# glibc's mallopt parameter number.
_M_ARENA_MAX = -8
# As measured; one arena would make gRPC's own threads wait for the Python threads' allocations.
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let this process's threads share at most `arenas` glibc arenas from now on; False where the
    C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # musl, macOS: allocators without glibc's arenas
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) failed: freed buffers may stay in per-thread arenas", arenas)
        return False
    return True
