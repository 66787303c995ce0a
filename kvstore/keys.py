"""Block keys: a chained hash over token ids, seeded by a namespace.

`key_i = H(key_{i-1} || token_ids of block i)` with `key_{-1}` = the namespace digest, so a key
names the whole prefix up to and including its block. The engine's GPU prefix cache and the
store use the same chain: an offloaded block of `k` GPU blocks is keyed by the chain value of its
last GPU block, so a store hit and a GPU prefix-cache hit agree on what a prefix is.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass

KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything the bytes of a KV block depend on; two namespaces never share a key."""

    model: str
    revision: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def id(self) -> str:
        """A short, stable printable name (used as the store's namespace string)."""
        return self.digest().hex()

    def digest(self) -> bytes:
        text = "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a block whose predecessor's key is `parent`."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=KEY_BYTES).digest()


def block_keys(token_ids: Sequence[int], block_size: int, seed: bytes, parent: bytes | None = None) -> list[bytes]:
    """Keys of every full block of `token_ids` (a trailing partial block has no key)."""
    keys: list[bytes] = []
    prev = seed if parent is None else parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_hash(prev, token_ids[start : start + block_size])
        keys.append(prev)
    return keys
