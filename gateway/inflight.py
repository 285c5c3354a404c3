"""The gateway's own account of what it has sent to each replica and not yet seen finish.

Pure code, time passed in. Replica states arrive every scrape interval and are stale by the time
they are read; a burst routed on one stale state would all land on the replica that looked
emptiest. The ledger covers the gap: requests sent since the replica's last observed state are
"unacked", and their prompt work and KV blocks are added to what the state says.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gateway.estimate import RequestFeatures


@dataclass(frozen=True, slots=True)
class InFlight:
    requests: int = 0  # sent and not finished
    prompt_tokens: int = 0  # unacked prompt tokens whose prefill has not finished
    kv_blocks: int = 0  # estimated KV blocks the unacked requests will hold
    unacked: int = 0  # requests sent since the replica's last observed state
    # prompt tokens of every in-flight request whose first token has not come, acked or not: the
    # prefill work this gateway knows is queued there (exact while one gateway sends everything)
    prefill_tokens: int = 0
    # estimated KV blocks every in-flight request will hold at its end (prompt + expected
    # output), acked or not: what the replica's cache must eventually find room for, however
    # empty it looks now (decodes grow; a replica that runs out preempts by recompute)
    demand_blocks: int = field(default=0, compare=False)  # (compare: older equality checks)


EMPTY = InFlight()


def add(a: InFlight, b: InFlight) -> InFlight:
    """Two accounts of one replica summed (this gateway worker's and the others')."""
    return InFlight(
        a.requests + b.requests,
        a.prompt_tokens + b.prompt_tokens,
        a.kv_blocks + b.kv_blocks,
        a.unacked + b.unacked,
        a.prefill_tokens + b.prefill_tokens,
        a.demand_blocks + b.demand_blocks,
    )


@dataclass(slots=True)
class _Entry:
    prompt_tokens: int
    kv_blocks: int
    started_at: float
    acked: bool = False
    prefilled: bool = False


class _Account:
    __slots__ = (
        "entries",
        "pending",
        "prompt_tokens",
        "kv_blocks",
        "unacked",
        "prefill_tokens",
        "demand_blocks",
        "snapshot",
    )

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.pending: deque[tuple[str, _Entry]] = deque()  # unacked, in start order
        self.prompt_tokens = 0
        self.kv_blocks = 0
        self.unacked = 0
        self.prefill_tokens = 0
        self.demand_blocks = 0
        self.snapshot: InFlight = EMPTY

    def refresh(self) -> None:
        # one object per change, not per read: pickers read every replica on every pick
        self.snapshot = InFlight(
            len(self.entries),
            self.prompt_tokens,
            self.kv_blocks,
            self.unacked,
            self.prefill_tokens,
            self.demand_blocks,
        )

    def ack(self, e: _Entry) -> None:
        if e.acked:
            return
        e.acked = True
        self.unacked -= 1
        self.kv_blocks -= e.kv_blocks
        if not e.prefilled:
            self.prompt_tokens -= e.prompt_tokens


class InFlightLedger:
    """Per replica: requests in flight, and the unacked share of their prompt work and KV."""

    def __init__(self) -> None:
        self._acc: dict[str, _Account] = {}

    def start(
        self, replica_id: str, req: RequestFeatures, now: float, block_size: int = 16
    ) -> None:
        acc = self._acc.get(replica_id)
        if acc is None:
            acc = self._acc[replica_id] = _Account()
        old = acc.entries.pop(req.request_id, None)
        if old is not None:  # the same id sent again (a retry): the old one is over
            acc.ack(old)
            acc.demand_blocks -= old.kv_blocks
            if not old.prefilled:
                acc.prefill_tokens -= old.prompt_tokens
        tokens = req.prompt_tokens
        blocks = -(-(tokens + req.expected_output_tokens) // max(1, block_size))
        e = _Entry(tokens, blocks, now)
        acc.entries[req.request_id] = e
        acc.pending.append((req.request_id, e))
        acc.prompt_tokens += tokens
        acc.prefill_tokens += tokens
        acc.kv_blocks += blocks
        acc.demand_blocks += blocks
        acc.unacked += 1
        acc.refresh()

    def first_token(self, replica_id: str, request_id: str, now: float) -> None:
        acc = self._acc.get(replica_id)
        if acc is None:
            return
        e = acc.entries.get(request_id)
        if e is None or e.prefilled:
            return
        e.prefilled = True
        acc.prefill_tokens -= e.prompt_tokens
        if not e.acked:
            acc.prompt_tokens -= e.prompt_tokens
        acc.refresh()

    def finish(self, replica_id: str, request_id: str, now: float) -> None:
        acc = self._acc.get(replica_id)
        if acc is None:
            return
        e = acc.entries.pop(request_id, None)
        if e is None:
            return
        acc.ack(e)  # a finished request no longer adds to any state
        acc.demand_blocks -= e.kv_blocks
        if not e.prefilled:
            acc.prefill_tokens -= e.prompt_tokens
        if len(acc.pending) > 2 * len(acc.entries) + 64:
            # no state has arrived for a while (no agent): drop finished entries from the queue
            acc.pending = deque(p for p in acc.pending if not p[1].acked)
        acc.refresh()

    def observed(self, replica_id: str, observed_at: float) -> None:
        acc = self._acc.get(replica_id)
        if acc is None:
            return
        pending = acc.pending
        changed = False
        while pending and pending[0][1].started_at <= observed_at:
            _, e = pending.popleft()
            if not e.acked:
                acc.ack(e)
                changed = True
        if changed:
            acc.refresh()

    def get(self, replica_id: str) -> InFlight:
        acc = self._acc.get(replica_id)
        return EMPTY if acc is None else acc.snapshot

    def snapshots(self) -> dict[str, InFlight]:
        """Every replica's totals (what a worker shares with its peers)."""
        return {rid: acc.snapshot for rid, acc in self._acc.items()}

    def forget(self, replica_id: str) -> None:
        """The replica left the pool: drop its account."""
        self._acc.pop(replica_id, None)

    def replicas(self) -> list[str]:
        return list(self._acc)

    def total_requests(self) -> int:
        return sum(len(a.entries) for a in self._acc.values())
