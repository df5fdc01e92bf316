"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-request block tables, prefix caching.

This module decides which block holds which tokens; the runner owns the tensors. As in vLLM, a full
block is identified by a hash of its tokens chained with the hash of the block before it, so equal
hashes mean equal prefixes. Blocks no request uses stay in the cache, in least-recently-freed order,
until an allocation needs them (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .request import Request


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which found in the cache

    def record(self, queried: int, hit: int):
        self.queried_tokens += queried
        self.hit_tokens += hit

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in self.blocks)  # LRU first
        self.cached: dict[int, Block] = {}  # block hash -> block
        self.request_blocks: dict[str, list[Block]] = {}
        self.num_registered: dict[str, int] = {}  # how many of a request's blocks are in the prefix cache
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request: Request) -> list[int]:
        return [b.id for b in self.request_blocks.get(request.id, ())]

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of the prompt's full blocks already in the cache.

        At least one token is always left to compute, because the last one's logits start generation.
        A request that asks for prompt logprobs reuses nothing: every prompt position needs its logits.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        self._extend_block_hashes(request)
        limit = (len(request.token_ids) - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:limit]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after the cached prefix, on admission).

        Returns False and changes nothing when the pool is too small.
        """
        owned = self.request_blocks.setdefault(request.id, [])
        total_tokens = request.num_computed_tokens + len(cached_prefix) * self.block_size + num_new_tokens
        new_needed = self.blocks_needed(total_tokens) - len(owned) - len(cached_prefix)
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)  # taken out of the free list below
        if new_needed > self.num_free_blocks - revived:
            if not owned:
                del self.request_blocks[request.id]
            return False
        for block in cached_prefix:
            if block.ref_count == 0:
                del self.free_blocks[block.id]
            block.ref_count += 1
            owned.append(block)
        if cached_prefix:
            self.num_registered[request.id] = len(cached_prefix)
        for _ in range(new_needed):
            owned.append(self._take_free_block())
        return True

    def trim(self, request: Request, num_tokens: int):
        """Free the request's blocks past the first `num_tokens` tokens (rejected speculative drafts)."""
        owned = self.request_blocks.get(request.id, [])
        while len(owned) > self.blocks_needed(num_tokens):
            block = owned.pop()
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block.id] = block
                if block.hash is None:  # nothing worth keeping: the first to be reused
                    self.free_blocks.move_to_end(block.id, last=False)

    def register_full_blocks(self, request: Request):
        """Put the request's newly completed blocks into the prefix cache (called after each step)."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        done = self.num_registered.get(request.id, 0)
        if full <= done:
            return
        self._extend_block_hashes(request)
        owned = self.request_blocks[request.id]
        for i in range(done, full):
            block, block_hash = owned[i], request.block_hashes[i]
            if block_hash not in self.cached:  # an equal block computed by another request stays the one cached
                block.hash = block_hash
                self.cached[block_hash] = block
        self.num_registered[request.id] = full

    def free(self, request: Request):
        """Release a request's blocks; cached ones stay reusable until evicted, the tail going first."""
        self.num_registered.pop(request.id, None)
        for block in reversed(self.request_blocks.pop(request.id, [])):
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block.id] = block

    def reset_prefix_cache(self):
        for block in self.cached.values():
            block.hash = None
        self.cached.clear()

    def _take_free_block(self) -> Block:
        _, block = self.free_blocks.popitem(last=False)
        if block.hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.hash) is block:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block

    def _extend_block_hashes(self, request: Request):
        tokens, size, hashes = request.token_ids, self.block_size, request.block_hashes
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), len(tokens) // size):
            # Python's tuple hash: fast, and 64 bits make an accidental collision negligible.
            parent = hash((parent, tuple(tokens[i * size : (i + 1) * size])))
            hashes.append(parent)
