"""Paged KV cache bookkeeping: a block pool, per-request block tables and prefix reuse.

Invariants:
- Block 0 is the null block: never handed out; padded slots and padded block tables point at it.
- A block is *used* while ref_cnt > 0, *free* otherwise. Free blocks wait in an LRU queue;
  a free block that still holds a published hash is *cached* and can be revived by a later
  request with the same prefix, until it is evicted to serve a new allocation.
- Only full blocks are published. A block's hash chains its parent's hash with its token ids,
  so equal hashes mean equal prefixes; the token tuple is kept and compared on lookup, so a
  hash collision can never serve wrong K/V.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rtllm.runtime.request import Request


@dataclass
class KVCacheStats:
    num_blocks: int  # usable blocks (the null block excluded)
    used_blocks: int
    free_blocks: int
    cached_blocks: int  # blocks holding a published prefix (used or free)
    queried_tokens: int  # prompt tokens looked up in the prefix cache
    hit_tokens: int  # of which served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class _Block:
    __slots__ = ("block_id", "ref_cnt", "key", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.key: tuple | None = None  # (parent_hash, token tuple) when published
        self.hash: int | None = None


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_block_reuse: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"KV cache needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_block_reuse = enable_block_reuse
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.queried_tokens = 0
        self.hit_tokens = 0

    # -- capacity -----------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    # -- prefix cache ---------------------------------------------------------------------
    def _block_key(self, parent: int | None, tokens: list[int]) -> tuple[int, tuple]:
        key = (parent, tuple(tokens))
        return hash(key), key

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of req.token_ids in whole blocks -> (block ids, tokens covered).

        At least one token is always left to compute so the step yields logits to sample from.
        Does not take references: pass the blocks to allocate_slots.
        """
        if not self.enable_block_reuse or req.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            h, key = self._block_key(parent, req.token_ids[i * bs : (i + 1) * bs])
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].key != key:
                break
            hits.append(bid)
            parent = h
        self.queried_tokens += req.num_prompt_tokens
        self.hit_tokens += min(len(hits) * bs, req.num_prompt_tokens)
        return hits, len(hits) * bs

    def cache_full_blocks(self, req: Request) -> None:
        """Publish req's full blocks whose K/V are computed and whose token ids are all known
        (hashes chain over token ids; an overlap placeholder is not known yet)."""
        if not self.enable_block_reuse:
            return
        bs = self.block_size
        num_full = min(req.num_computed_tokens, req.num_tokens - req.num_placeholders) // bs
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), num_full):
            h, key = self._block_key(parent, req.token_ids[i * bs : (i + 1) * bs])
            req.block_hashes.append(h)
            parent = h
            block = self.blocks[req.block_ids[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.key = h, key
                self.cached[h] = block.block_id

    # -- allocation -----------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Make room for num_new_tokens more tokens of req (after num_computed_tokens, plus any
        prefix-cache blocks being adopted). Returns False, changing nothing, when the pool is short:
        the scheduler then preempts or waits."""
        computed_blocks = computed_blocks or []
        n_tokens = (len(computed_blocks) * self.block_size if computed_blocks else req.num_computed_tokens)
        need = self.blocks_for(n_tokens + num_new_tokens) - len(req.block_ids) - len(computed_blocks)
        # Reviving cached blocks that sit in the free queue also consumes free capacity.
        revive = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        if need + revive > len(self.free_queue):
            return False
        for bid in computed_blocks:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                del self.free_queue[bid]
            block.ref_cnt += 1
            req.block_ids.append(bid)
        if computed_blocks:
            req.block_hashes = [self.blocks[b].hash for b in computed_blocks]
        for _ in range(max(need, 0)):
            bid, _ = self.free_queue.popitem(last=False)  # LRU: oldest freed first
            block = self.blocks[bid]
            if block.hash is not None:  # evict a cached prefix
                del self.cached[block.hash]
                block.hash = block.key = None
            block.ref_cnt = 1
            req.block_ids.append(bid)
        return True

    def free(self, req: Request) -> None:
        """Release req's blocks. Full published blocks stay cached until evicted; the tail
        of a sequence is queued for eviction before its head (freed in reverse order)."""
        for bid in reversed(req.block_ids):
            block = self.blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[bid] = None
        req.block_ids = []
        req.block_hashes = []

    def stats(self) -> KVCacheStats:
        """O(1): a block is in the free queue exactly when its ref_cnt is 0 (cheap to send every step)."""
        used = self.num_blocks - 1 - len(self.free_queue)
        return KVCacheStats(
            num_blocks=self.num_blocks - 1,
            used_blocks=used,
            free_blocks=len(self.free_queue),
            cached_blocks=len(self.cached),
            queried_tokens=self.queried_tokens,
            hit_tokens=self.hit_tokens,
        )
