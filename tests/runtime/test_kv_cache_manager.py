"""KVCacheManager: allocation, prefix reuse by chained block hashes, LRU eviction, stats."""

from rtllm.runtime.kv_cache_manager import KVCacheManager
from rtllm.runtime.request import Request
from rtllm.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), frozenset(), 4)


def compute(kv, r, n, computed=None):
    """Allocate and pretend the model computed n tokens."""
    assert kv.allocate_slots(r, n, computed)
    r.num_computed_tokens += n
    kv.cache_full_blocks(r)


def test_allocation_and_free_counts():
    kv = KVCacheManager(num_blocks=9, block_size=4)
    r = req("a", range(10))
    compute(kv, r, 10)
    assert len(r.block_ids) == 3 and 0 not in r.block_ids  # block 0 is the null block
    s = kv.stats()
    assert (s.used_blocks, s.free_blocks, s.cached_blocks) == (3, 5, 2)  # 2 full blocks published
    kv.free(r)
    s = kv.stats()
    assert (s.used_blocks, s.free_blocks, s.cached_blocks) == (0, 8, 2)


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=17, block_size=4)
    a = req("a", range(12))
    compute(kv, a, 12)
    b = req("b", list(range(8)) + [99, 98, 97])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and blocks == a.block_ids[:2]
    compute(kv, b, b.num_tokens - n, blocks)  # num_computed starts at 0 and adopts 8 via blocks
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.blocks[a.block_ids[0]].ref_cnt == 2
    # an identical prompt hits all but the last token's block
    c = req("c", range(12))
    _, n = kv.get_computed_blocks(c)
    assert n == 8  # 12 tokens: (12 - 1) // 4 = 2 whole blocks may be reused
    assert kv.stats().hit_tokens == 16


def test_different_prefix_same_block_tokens_do_not_hit():
    kv = KVCacheManager(num_blocks=17, block_size=4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a, 9)
    b = req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # second block equal, first differs: chain breaks
    assert kv.get_computed_blocks(b) == ([], 0)


def test_allocate_fails_atomically_when_short():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable blocks
    a = req("a", range(8))
    compute(kv, a, 8)
    b = req("b", range(100, 109))
    assert not kv.allocate_slots(b, 9)
    assert b.block_ids == [] and kv.stats().free_blocks == 1


def test_lru_eviction_prefers_oldest_freed_and_tail_first():
    kv = KVCacheManager(num_blocks=5, block_size=2)  # 4 usable
    a = req("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    kv.free(a)  # blocks: [a0, a1] cached, a2 partial free
    b = req("b", [7, 8, 9])
    compute(kv, b, 3)  # takes the two oldest free blocks: the never-used one, then a's partial tail
    assert kv.stats().cached_blocks == 3  # a0, a1 and b's first block
    c = req("c", [11, 12])
    compute(kv, c, 2)  # must evict one cached block: a's tail a1 goes before a0
    hits, n = kv.get_computed_blocks(req("d", [1, 2, 3, 4, 5]))
    assert n == 2 and len(hits) == 1  # a0 survived, a1 evicted


def test_disabled_reuse():
    kv = KVCacheManager(num_blocks=9, block_size=4, enable_block_reuse=False)
    a = req("a", range(12))
    compute(kv, a, 12)
    assert kv.get_computed_blocks(req("b", range(12))) == ([], 0)
    assert kv.stats().cached_blocks == 0
