"""What the gateway's worker processes (`gateway.workers` > 1) share so that they route as one.

Each worker sends its own share of the traffic, keeps its own in-flight ledger, learns its own
per-replica speed corrections and cached-share estimates (headroom) and its own prefix index
(which replica holds which prompt blocks). Alone, each would see 1/N of what was sent between two
replica states, learn from 1/N of the answers and picks and find a shared prefix's home on its
own, and routing degrades with N (bench/gateway_workers.py, 8 workers: TTFT p99 2.4-2.8x, the
slow replicas 2.5x their share; prefix-cache hits 25 % where one worker got 56 %). So each
worker publishes, at most every `interval_s`:
- into a small memory-mapped file of its own, JSON behind a seqlock: its per-replica `InFlight`
  totals, and every LEARNED_EVERY intervals per pool the cumulative corrections its own
  observations made, `{"f": {replica_id: [requests, prompt_tokens, kv_blocks, unacked,
  prefill_tokens, demand_blocks]}, "l": {pool: [policy epoch, {replica_id or "": [d_ttft,
  d_tpot]}]}}` after a header of `seq` (u64) and `length` (u32); the writer makes `seq` odd
  while it writes and even when done, so a reader that sees an odd or changed `seq` keeps what
  it read last time instead of a torn copy;
- into a byte ring of its own (`w<index>.prefix`, gateway/ring.py), each of its picks: the
  replica, the prompt's block hashes and what the policy learns from a pick (PREFIX below).
Before a pick a worker reads its peers' files (again at most every `interval_s`), adds their
in-flight totals to its own, applies the increments of their corrections to its policy and
takes their picks in as its own. A busy worker (its last read younger than SYNC_AFTER
intervals) reads them right after the pick instead: the request is then already on its way
upstream, and the read (5-50 µs for 11 peers, bench/peers.py) stays off its latency.

"Right after" is `settle()`, which the proxy calls once the request's body is with the replica
and once the answer is sent: the publish a pick or an answer made due, and the read a pick
deferred, run there, in a step the loop takes anyway. Deferring them with `call_soon` instead
cost one or two extra turns of the event loop a request (on Python 3.11 aiohttp writes the
request from a task queued after the pick, so one turn would have run them first), each a
system call (a zero-timeout poll). A publish no settle point takes (a request that failed to
connect) goes out `interval_s` later from a timer.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import operator
import os
import struct
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.inflight import EMPTY, InFlight
from gateway.ring import RingReader, RingWriter, sized_file
from gateway.ring import create as create_ring

log = logging.getLogger(__name__)

ENV_DIR = "KVPILOT_GATEWAY_PEERS"  # set by the supervisor for its workers
HEADER = struct.Struct("<QI")
FILE_BYTES = 1 << 20  # ~15,000 replicas' worth of JSON; a larger fleet is not shared (logged)
RELIST_S = 1.0  # how often to look for peer files (they all appear at start-up)
# Learning moves slowly (an EWMA per replica) and its section grows with the fleet: it goes out
# with every this-many-th interval's publish only (cumulative, so a skipped one loses nothing).
LEARNED_EVERY = 10
# Prefix-index additions (which replica now holds which prompt blocks) go into a byte ring of
# their own per worker (gateway/ring.py): each written once, each read once by every peer, however
# seldom that peer looks. 8 MiB holds ~4,000 requests of 256 blocks; a peer further behind loses
# the oldest (the index is approximate anyway).
RING_BYTES = 8 << 20
# a record: pool name, replica id and note lengths; then both names, the note (f64 each: what
# the picking policy learns from a pick, gateway/headroom.py) and the block hashes (u64 each)
PREFIX = struct.Struct("<HHH")
# A pick waits for the peers' files only when this worker's copy is older than this many
# intervals; a younger copy is about as fresh as what the peers publish (a busy peer about once
# an interval, a quiet one within FLUSH_AFTER), so a busy worker reads them just after the pick
# instead.
SYNC_AFTER = 2
# A change that comes within `interval_s` of the last publish goes out with the first change
# after it, or this many intervals after that publish if no change comes (a worker gone quiet).
FLUSH_AFTER = 3


Learned = dict[str, tuple[float, float]]  # replica id ("" for the pool) -> (d_ttft, d_tpot)
# picks to pass on: (pool, replica id, block hashes, the policy's note)
Prefixes = list[tuple[str, str, tuple[int, ...], tuple[float, ...]]]
Picks = list[tuple[str, tuple[int, ...], tuple[float, ...]]]


ROW_FIELDS = len(InFlight.__slots__)  # the numbers a published row holds (`_row`)


def _row(f: InFlight) -> list[int]:
    return [f.requests, f.prompt_tokens, f.kv_blocks, f.unacked, f.prefill_tokens, f.demand_blocks]


def create_file(directory: Path, worker: int) -> Path:
    """Worker `worker`'s file, full size (zeros until it first writes). The supervisor makes all
    of them before it starts the workers, so each worker finds every peer at its first look;
    never shrunk, since a peer may have it mapped."""
    path = directory / f"w{worker}"
    sized_file(path, FILE_BYTES)
    create_ring(directory / f"w{worker}.prefix", RING_BYTES)
    return path


class PeerAccounts:
    """This worker's window on the other workers' in-flight totals and learning, and its own
    published copy. `learned` gives, per pool, this worker's policy epoch and cumulative
    corrections; `epoch(pool)` its current policy's epoch (None: no such pool here); `learn(pool,
    increments)` applies what peers learned."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        worker: int,
        source: Callable[[], dict[str, InFlight]],
        *,
        learned: Callable[[], dict[str, tuple[int, Learned]]] = dict,
        epoch: Callable[[str], int | None] = lambda pool: None,
        learn: Callable[[str, Learned], None] = lambda pool, d: None,
        prefixes: Callable[[], Prefixes] = list,
        add_prefixes: Callable[[str, Picks], None] = lambda p, e: None,
        touched: Callable[[set[str]], None] = lambda rids: None,
        interval_s: float = 0.01,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.name = f"w{worker}"
        self.source = source  # this worker's own totals per replica (the ledger's snapshots)
        self.learned, self.epoch, self.learn = learned, epoch, learn
        self.prefixes, self.add_prefixes = prefixes, add_prefixes
        self.touched = touched  # told which replicas' totals a deferred read changed
        self._rings: dict[str, RingReader] = {}
        # (peer, pool) -> (peer's epoch, our epoch, its cumulative corrections when last applied)
        self._applied: dict[tuple[str, str], tuple[int, int, Learned]] = {}
        self.interval_s = interval_s
        self.loop = loop  # publishes wait for `settle` or a timer on it; None: at once (tests)
        path = create_file(self.dir, worker)  # and its ring
        with open(path, "r+b") as f:
            self._own = mmap.mmap(f.fileno(), FILE_BYTES)
        self._ring = RingWriter(path.with_name(f"{self.name}.prefix"), RING_BYTES)
        self._seq = 0
        self._written = b""  # the payload last written, not written again
        self._write(b'{"f": {}, "l": {}}')
        # peer -> (its mapping, the seq and payload last read, its rows then: `_row` lists)
        self._peers: dict[str, tuple[mmap.mmap, int, bytes, dict[str, list[int]]]] = {}
        self._listed_at = -1e18
        self._read_at = -1e18
        self._published_at = -1e18
        self._learned_at = -1e18
        self._learn_dirty = True  # the first publish says what there is (nothing yet)
        self._due = False  # a publish for the next `settle`
        self._flush: asyncio.TimerHandle | None = None  # a publish at `_flush_at` at the latest
        self._flush_at = 0.0
        self._read_due = False  # a read for the next `settle`
        self._too_big = False
        self._closed = False  # a settle or change that comes after close (shutdown) is dropped
        self.totals: dict[str, InFlight] = {}  # replica id -> the peers' summed totals

    # ---- publishing this worker's totals --------------------------------------------------------

    def changed(self, learned: bool = False) -> None:
        """This worker's ledger changed (`learned`: its policy learned from an answer too).

        Published at the next `settle` (off the request's path; `interval_s` on from a timer if
        none comes) when the last publish is `interval_s` old; else left for the first change
        after that, or at the latest FLUSH_AFTER intervals on. A timer per interval would wake
        an idle worker once a request (a request's start publishes, its end comes within the
        interval), and at a paced load each wake-up of a sleeping process is the costly part of
        a hop (gVisor)."""
        self._learn_dirty |= learned
        if self._closed:
            return
        if self.loop is None:
            self.publish()
            return
        if self._due:
            return  # a publish is coming at the next settle
        now = time.monotonic()
        if now - self._published_at >= self.interval_s:
            self._due = True
            self._flush_by(now + self.interval_s)
        else:
            self._flush_by(self._published_at + FLUSH_AFTER * self.interval_s)

    def settle(self) -> None:
        """The request at hand has left for its replica, or its answer has gone out: publish
        what is due and read the peers if a pick deferred it, now, in this step."""
        if self._closed:
            return
        if self._due:
            self.publish()
        if self._read_due:
            rids = self._read(time.time())
            if rids:
                self.touched(rids)

    def _flush_by(self, at: float) -> None:
        """Publish at `at` at the latest, unless an earlier publish comes first."""
        assert self.loop is not None
        if self._flush is not None:
            if self._flush_at <= at:
                return
            self._flush.cancel()
        self._flush_at = at
        self._flush = self.loop.call_later(max(0.0, at - time.monotonic()), self._publish_flush)

    def _publish_flush(self) -> None:
        self._flush = None
        self.publish()

    def publish(self) -> None:
        self._due = False
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._published_at = time.monotonic()
        own = {rid: _row(f) for rid, f in self.source().items() if f != EMPTY}
        out: dict[str, Any] = {"f": own}
        for pool, rid, hashes, note in self.prefixes():
            p, r = pool.encode(), rid.encode()
            head = PREFIX.pack(len(p), len(r), len(note)) + p + r
            self._ring.append(head + array("d", note).tobytes() + array("Q", hashes).tobytes())
        if self._learn_dirty:
            due = self._learned_at + LEARNED_EVERY * self.interval_s
            if due <= self._published_at or self.loop is None:
                self._learned_at = self._published_at
                self._learn_dirty = False
                out["l"] = {pool: [ep, d] for pool, (ep, d) in self.learned().items() if d}
            else:  # with the first publish after `due`, or on its own then
                self._flush_by(due)
        payload = orjson.dumps(out)
        if payload != self._written:  # the same bytes (a request came and went): peers skip it
            self._write(payload)

    def _write(self, payload: bytes) -> None:
        if len(payload) > FILE_BYTES - HEADER.size:
            if not self._too_big:
                self._too_big = True
                log.warning("in-flight totals (%d bytes) too large to share", len(payload))
            return
        self._seq += 1  # odd: being written
        HEADER.pack_into(self._own, 0, self._seq, 0)
        self._own[HEADER.size : HEADER.size + len(payload)] = payload
        self._seq += 1
        HEADER.pack_into(self._own, 0, self._seq, len(payload))
        self._written = payload

    # ---- reading the peers' ---------------------------------------------------------------------

    def refresh(self, now: float) -> set[str]:
        """Before a pick: `poll` now if this worker's copy is SYNC_AFTER intervals old (or there
        is no loop), else leave it for the next `settle`, right after the pick (its changes go
        to `touched`); without one, the next pick past SYNC_AFTER intervals reads."""
        age = now - self._read_at
        if age < self.interval_s:
            return set()
        if self.loop is None or age >= SYNC_AFTER * self.interval_s:
            return self.poll(now)
        self._read_due = True
        return set()

    def poll(self, now: float) -> set[str]:
        """Re-read the peers' files if `interval_s` has passed; the replica ids whose summed
        peer totals changed (their views must be rebuilt)."""
        if now - self._read_at < self.interval_s:
            return set()
        return self._read(now)

    def _read(self, now: float) -> set[str]:
        self._read_at = now
        self._read_due = False
        if now - self._listed_at >= RELIST_S:
            self._listed_at = now
            self._relist()
        changed = False
        peers = self._peers  # (values replaced in place below: the keys stay as they are)
        unpack, at = HEADER.unpack_from, HEADER.size
        for name, (mm, seq, last, rows) in peers.items():
            s1, length = unpack(mm, 0)
            if s1 == seq or s1 & 1:
                continue  # nothing new, or being written: keep the last good copy
            raw = mm[at : at + length]
            if unpack(mm, 0)[0] != s1:
                continue  # overwritten while we copied
            if raw == last:  # rewritten as it was (a request came and went between two reads)
                peers[name] = (mm, s1, last, rows)
                continue
            try:
                data = orjson.loads(raw)
                new = data["f"]
                # rows stay lists (no InFlight per peer and read): summed once, below
                if any(len(row) != ROW_FIELDS for row in new.values()):
                    continue
            except (orjson.JSONDecodeError, TypeError, AttributeError, KeyError):
                continue
            if new != rows:
                changed = True
            peers[name] = (mm, s1, raw, new)
            if "l" in data:
                self._apply(name, data["l"])
        for reader in self._rings.values():
            self._apply_prefixes(reader.read())
        if not changed:
            return set()
        sums: dict[str, list[int]] = {}
        plus = operator.add
        for _, _, _, rows in peers.values():
            for rid, row in rows.items():
                t = sums.get(rid)
                # a new list per sum (a peer's own row is never written into)
                sums[rid] = row if t is None else list(map(plus, t, row))
        totals = {rid: InFlight(*row) for rid, row in sums.items()}
        touched = {
            rid
            for rid in totals.keys() | self.totals.keys()
            if totals.get(rid) != self.totals.get(rid)
        }
        self.totals = totals
        return touched

    def _apply(self, peer: str, learned: dict[str, Any]) -> None:
        """Hand the policies what `peer` learned since we last looked."""
        for pool, (peer_epoch, cumulative) in learned.items():
            ours = self.epoch(pool)
            if ours is None:
                continue
            last = self._applied.get((peer, pool))
            # a new policy there or here: everything it learned is new to us
            before = last[2] if last is not None and last[:2] == (peer_epoch, ours) else {}
            inc: Learned = {}
            for rid, (a, b) in cumulative.items():
                a0, b0 = before.get(rid, (0.0, 0.0))
                if a != a0 or b != b0:
                    inc[rid] = (a - a0, b - b0)
            self._applied[(peer, pool)] = (peer_epoch, ours, cumulative)
            if inc:
                self.learn(pool, inc)

    def _apply_prefixes(self, records: list[bytes]) -> None:
        """Add to our prefix indexes what a peer routed since we last looked."""
        by_pool: dict[str, Picks] = {}
        for rec in records:
            lp, lr, ln = PREFIX.unpack_from(rec, 0)
            at = PREFIX.size
            pool = rec[at : at + lp].decode()
            rid = rec[at + lp : at + lp + lr].decode()
            at += lp + lr
            note, hashes = array("d"), array("Q")
            note.frombytes(rec[at : at + 8 * ln])
            hashes.frombytes(rec[at + 8 * ln :])
            by_pool.setdefault(pool, []).append((rid, tuple(hashes), tuple(note)))
        for pool, entries in by_pool.items():
            if self.epoch(pool) is not None:
                self.add_prefixes(pool, entries)

    def _relist(self) -> None:
        for p in self.dir.iterdir():
            if p.name == self.name or p.name in self._peers or not p.name.startswith("w"):
                continue
            if "." in p.name:
                continue  # a ring: opened with its worker's file, below
            try:
                with open(p, "rb") as f:
                    mm = mmap.mmap(f.fileno(), FILE_BYTES, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                continue  # not sized yet: the next listing finds it
            try:
                ring = RingReader(p.with_name(f"{p.name}.prefix"), RING_BYTES)
            except (OSError, ValueError):
                mm.close()  # its ring is not there yet: both at the next listing
                continue
            self._peers[p.name] = (mm, -1, b"", {})
            self._rings[p.name] = ring

    def close(self) -> None:
        self._closed = True
        if self._flush is not None:
            self._flush.cancel()
        for mm, _, _, _ in self._peers.values():
            mm.close()
        for reader in self._rings.values():
            reader.close()
        self._peers.clear()
        self._rings.clear()
        self._own.close()
        self._ring.close()
