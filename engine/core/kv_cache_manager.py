"""Per-request block tables on top of the block pool, with prefix-cache hits."""

from __future__ import annotations

from engine.core.block_pool import BlockPool, KVBlock
from engine.core.request import Request


class KVCacheManager:
    """Maps each request to the blocks holding its KV, reusing cached prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks already registered in the prefix cache
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0     # tokens found there

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_of(self, request_id: str) -> list[KVBlock]:
        return self.req_blocks.get(request_id, [])

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Longest run of cached blocks at the start of the request.

        At least one token is always left to compute, because the forward over it yields the
        logits for the first new token; so a prompt that is all cached hits one block less.
        """
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache query (vLLM's prefix_cache_queries/hits)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def num_blocks_needed(self, request: Request, num_new_tokens: int, num_new_computed: int = 0) -> int:
        total = request.num_computed_tokens + num_new_computed + num_new_tokens
        have = len(self.req_blocks.get(request.request_id, ())) + num_new_computed // self.block_size
        return max(0, -(-total // self.block_size) - have)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None, register: bool = True) -> bool:
        """Give the request room for `num_new_tokens` more tokens; False if the pool is short.

        `register=False` is for pages about to be filled by a load from the store: they become
        findable only once their KV is there, when the request is next scheduled.

        Blocks that become full with this step's tokens are registered in the prefix cache now:
        within one forward every layer writes all K/V before attending, so a batch-mate that
        hits such a block in the same step reads correct values.
        """
        if not new_computed_blocks and register:
            blocks = self.req_blocks.get(request.request_id)
            if blocks is not None and request.num_computed_tokens + num_new_tokens <= len(blocks) * self.block_size \
                    and min(request.num_computed_tokens + num_new_tokens, len(request.all_token_ids)) < \
                    (self._num_cached.get(request.request_id, 0) + 1) * self.block_size:
                return True  # the common decode step: room in its last block, no block newly full
        new_computed_blocks = new_computed_blocks or []
        # Reused blocks sitting in the free queue count against the free budget when touched.
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        need = self.num_blocks_needed(request, num_new_tokens, len(new_computed_blocks) * self.block_size)
        if need > self.pool.num_free_blocks - reclaimed:
            return False
        blocks = self.req_blocks.setdefault(request.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
        blocks.extend(self.pool.allocate(need))
        if not register:
            self._num_cached.setdefault(request.request_id, len(new_computed_blocks))
            return True
        num_full = min(request.num_computed_tokens + len(new_computed_blocks) * self.block_size
                       + num_new_tokens, request.num_tokens) // self.block_size
        num_full = min(num_full, len(request.block_hashes))
        for i in range(self._num_cached.get(request.request_id, 0), num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached[request.request_id] = max(num_full, self._num_cached.get(request.request_id, 0))
        return True

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))
