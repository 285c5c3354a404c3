"""An approximate index of which prefix blocks each replica's KV cache holds.

Built only from the gateway's own routing (no model-server cooperation): every pick adds the
request's chained block hashes to the picked replica, and each replica's entries are bounded by an
LRU, as the model server's prefix cache is. The same structure serves the GIE prefix scorer
(per-server LRU of 64-character block hashes) and the SGLang/vLLM router's approximate radix tree
(match length and tree size per replica, at block rather than character granularity).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

DEFAULT_CAPACITY = 31_250  # blocks per replica: the GIE default (an 8B model's cache on an H100)


class PrefixIndex:
    """hash -> replicas holding it, and per replica an LRU of its hashes.

    Chained hashes make a replica's holdings prefix-closed in practice: a request's blocks are
    added last-first, so its leading blocks are the most recently used and are evicted last (as
    vLLM frees a sequence's tail blocks first). `match` relies on that to bisect instead of
    walking every block.
    """

    def __init__(self, capacity_per_replica: int = DEFAULT_CAPACITY) -> None:
        self.default_capacity = max(1, capacity_per_replica)
        # hash -> its holder: a replica id while there is one (most blocks: a prompt's unique
        # tail), a set once there are several; saves a set per block on the hot path
        self._by_hash: dict[int, str | set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        # With several gateway workers: this worker's own additions not yet passed to the others
        # (gateway/peers.py drains it); None: not kept. Bounded: an undrained one drops the oldest.
        self.journal: deque[tuple[str, tuple[int, ...], tuple[float, ...]]] | None = None

    def keep_journal(self, entries: int = 4096) -> None:
        if self.journal is None:
            self.journal = deque(maxlen=entries)

    def drain(self) -> list[tuple[str, tuple[int, ...], tuple[float, ...]]]:
        """This worker's own additions since the last drain, oldest first: (replica, hashes,
        the picking policy's note)."""
        if not self.journal:
            return []
        out = list(self.journal)
        self.journal.clear()
        return out

    def holders(self, h: int) -> set[str]:
        """The replicas holding block hash `h`."""
        s = self._by_hash.get(h)
        if s is None:
            return set()
        return {s} if s.__class__ is str else set(s)  # type: ignore[arg-type]

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each replica holding the first block, how many leading blocks it holds.

        Replicas are split into groups by bisection on the block index, with set intersections
        per step: O(log blocks) set operations per distinct match length, not O(blocks x holders).
        """
        n = len(hashes)
        if n == 0:
            return {}
        get = self._by_hash.get
        first = get(hashes[0])
        if first is None:
            return {}
        if first.__class__ is str:  # one holder: walk its own LRU, no sets needed
            lru = self._lru[first]  # type: ignore[index]
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if hashes[mid - 1] in lru:
                    lo = mid
                else:
                    hi = mid - 1
            return {first: lo}  # type: ignore[dict-item]
        res: dict[str, int] = {}
        stack: list[tuple[set[str], int, int]] = [(first, 1, n)]  # type: ignore[list-item]
        while stack:
            active, lo, hi = stack.pop()  # every member holds blocks [0, lo); length <= hi
            if lo >= hi:
                res.update(dict.fromkeys(active, lo))
                continue
            mid = (lo + hi + 1) >> 1
            holders = get(hashes[mid - 1])
            if holders is None:
                inside: set[str] = set()
            elif holders.__class__ is str:
                inside = {holders} if holders in active else set()  # type: ignore[set-item]
            else:
                inside = active & holders  # type: ignore[operator]
            if inside:
                stack.append((inside, mid, hi))
            if len(inside) < len(active):
                stack.append((active - inside, lo, mid - 1))
        return res

    def add(
        self,
        replica_id: str,
        hashes: Sequence[int],
        *,
        from_peer: bool = False,
        note: tuple[float, ...] = (),
    ) -> None:
        """The request with these hashes was sent to `replica_id`: its blocks are now cached there.
        `from_peer`: another gateway worker sent it (not journaled again); `note`: what the
        picking policy wants its peers to learn from the pick. Only picks with whole blocks are
        journaled: every peer reads every record (~3 µs each), and a prompt too short for one
        block (a probe, a health check) teaches little."""
        if not hashes:
            return
        if self.journal is not None and not from_peer:
            self.journal.append((replica_id, tuple(hashes), note))
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
        by_hash = self._by_hash
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
                s = by_hash.get(h)
                if s is None:
                    by_hash[h] = replica_id
                elif s.__class__ is str:
                    by_hash[h] = {s, replica_id}  # type: ignore[arg-type]
                else:
                    s.add(replica_id)  # type: ignore[union-attr]
        over = len(lru) - self._capacity.get(replica_id, self.default_capacity)
        if over > 0:
            pop = lru.popitem
            for _ in range(over):
                self._drop(pop(False)[0], replica_id)  # the least recently used

    def _drop(self, h: int, replica_id: str) -> None:
        s = self._by_hash.get(h)
        if s is None:
            return
        if s.__class__ is str:
            if s == replica_id:
                del self._by_hash[h]
        else:
            s.discard(replica_id)  # type: ignore[union-attr]
            if len(s) == 1:
                self._by_hash[h] = next(iter(s))
            elif not s:
                del self._by_hash[h]

    def set_capacity(self, replica_id: str, blocks: int) -> None:
        """Bound `replica_id`'s entries, e.g. to its KV cache size expressed in prefix blocks."""
        blocks = max(1, int(blocks))
        if self._capacity.get(replica_id) == blocks:
            return
        self._capacity[replica_id] = blocks
        lru = self._lru.get(replica_id)
        while lru is not None and len(lru) > blocks:
            self._drop(lru.popitem(False)[0], replica_id)

    def capacity(self, replica_id: str) -> int:
        return self._capacity.get(replica_id, self.default_capacity)

    def size(self, replica_id: str) -> int:
        """Blocks held for `replica_id` (the router's "tree size")."""
        lru = self._lru.get(replica_id)
        return 0 if lru is None else len(lru)

    def remove(self, replica_id: str) -> None:
        """The replica left (or restarted with an empty cache): forget everything it held."""
        lru = self._lru.pop(replica_id, None)
        self._capacity.pop(replica_id, None)
        for h in lru or ():
            self._drop(h, replica_id)

    def replicas(self) -> Iterable[str]:
        return self._lru.keys()
