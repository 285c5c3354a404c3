"""The paged KV cache's block pool, with vLLM V1's prefix caching.

Blocks are numbered 0..n-1. A block held by a request has a reference count above zero; a free
block (count zero) waits in an LRU queue. A block that was full when it was written carries the
hash of its content — the chained hash of its parent block's hash and its own token ids — and stays
findable by that hash even after it is freed, until the queue hands it out again (eviction). Freed
blocks go to the tail of the queue and allocation takes from the head, so the least recently freed
cached block is evicted first; a request frees its blocks last-first, so the tail of a prompt is
evicted before its shared head (vLLM's ``FreeKVCacheBlockQueue`` does the same).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# Parent hash of a sequence's first block.
ROOT_HASH = 0x6B76_7069_6C6F_74


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """Chained content hash of one full block. Python's hash of a tuple of ints is the same in
    every process (only str and bytes hashing is salted), and costs ~0.2 us for 16 tokens."""
    return hash((parent, tuple(tokens)))


class BlockPool:
    __slots__ = ("num_blocks", "ref", "hash_of", "cached", "free")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # content hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes`` (at most ``max_blocks``)."""
        hit: list[int] = []
        cached = self.cached
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def num_free_after_touch(self, blocks: Sequence[int]) -> int:
        """Free blocks left once ``blocks`` (cache hits) are taken out of the free queue."""
        ref = self.ref
        return len(self.free) - sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Sequence[int]) -> None:
        ref, free = self.ref, self.free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue, evicting their cached content."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        out: list[int] = []
        free, ref, hash_of, cached = self.free, self.ref, self.hash_of, self.cached
        for _ in range(n):
            b, _none = free.popitem(last=False)
            h = hash_of[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                hash_of[b] = None
            ref[b] = 1
            out.append(b)
        return out

    def free_blocks(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block, last block first (it is the least shareable)."""
        ref, free = self.ref, self.free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None

    def cache(self, block: int, h: int) -> None:
        """Register a newly full block under its content hash (a duplicate stays unregistered)."""
        if h not in self.cached:
            self.cached[h] = block
            self.hash_of[block] = h

    def reset_prefix_cache(self) -> None:
        for b in self.cached.values():
            self.hash_of[b] = None
        self.cached.clear()
