"""gateway/peers.py: gateway workers see each other's in-flight totals (real mmap'd files)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from gateway.estimate import Estimator
from gateway.fleet import Endpoint, Fleet
from gateway.inflight import InFlight
from gateway.peers import FLUSH_AFTER, HEADER, PeerAccounts

NOW = 1_000.0


@contextmanager
def two_workers(
    tmp_path: Path, mine: dict[str, InFlight]
) -> Iterator[tuple[PeerAccounts, PeerAccounts]]:
    """Worker 0 publishes `mine` (at once: no loop), worker 1 reads; both closed after."""
    a = PeerAccounts(tmp_path, 0, lambda: dict(mine), interval_s=0.01)
    b = PeerAccounts(tmp_path, 1, dict, interval_s=0.01)
    with closing(a), closing(b):
        yield a, b


def test_a_worker_reads_what_another_published(tmp_path: Path) -> None:
    mine: dict[str, InFlight] = {"r1": InFlight(2, 100, 10, 1, 100, 20)}
    with two_workers(tmp_path, mine) as (a, b):
        a.changed()  # no loop: published at once
        assert b.poll(NOW) == {"r1"}
        assert b.totals == {"r1": InFlight(2, 100, 10, 1, 100, 20)}
        assert a.poll(NOW) == set() and a.totals == {}  # b publishes nothing in flight
        mine.clear()
        a.changed()
        assert b.poll(NOW + 0.001) == set()  # read at most once per interval
        assert b.poll(NOW + 0.02) == {"r1"} and b.totals == {}


def test_a_torn_write_keeps_the_last_good_copy(tmp_path: Path) -> None:
    mine = {"r1": InFlight(1, 10, 1, 1, 10, 2)}
    with two_workers(tmp_path, mine) as (a, b):
        a.changed()
        b.poll(NOW)
        seq, length = HEADER.unpack_from(a._own, 0)
        HEADER.pack_into(a._own, 0, seq + 1, length)  # odd: a writer is mid-way
        a._own[HEADER.size : HEADER.size + 2] = b"{x"
        assert b.poll(NOW + 1) == set()
        assert b.totals == {"r1": InFlight(1, 10, 1, 1, 10, 2)}


def test_peers_learning_arrives_as_increments_and_starts_over_with_a_new_policy(
    tmp_path: Path,
) -> None:
    theirs = {"p": (1, {"r1": (0.2, 0.0), "": (0.05, 0.0)})}
    ours = {"p": 7}
    got: list[tuple[str, dict]] = []
    a = PeerAccounts(tmp_path, 0, dict, learned=lambda: dict(theirs), interval_s=0.01)
    b = PeerAccounts(
        tmp_path, 1, dict, epoch=ours.get, learn=lambda pool, d: got.append((pool, d)),
        interval_s=0.01,
    )  # fmt: skip
    with closing(a), closing(b):
        a.changed(learned=True)
        b.poll(NOW)
        assert got == [("p", {"r1": (0.2, 0.0), "": (0.05, 0.0)})]
        theirs["p"] = (1, {"r1": (0.5, 0.25), "": (0.05, 0.0)})
        a.changed(learned=True)
        b.poll(NOW + 1)
        assert got[-1][0] == "p" and got[-1][1] == {"r1": pytest.approx((0.3, 0.25))}
        theirs["p"] = (2, {"r1": (0.1, 0.0)})  # their policy was replaced: all of it is new
        a.changed(learned=True)
        b.poll(NOW + 2)
        assert got[-1] == ("p", {"r1": (0.1, 0.0)})
        ours["p"] = 8  # ours was replaced: it has learned none of theirs yet
        theirs["p"] = (2, {"r1": (0.1, 0.0), "x": (0.0, 0.1)})
        a.changed(learned=True)
        b.poll(NOW + 3)
        assert got[-1] == ("p", {"r1": (0.1, 0.0), "x": (0.0, 0.1)})
        n = len(got)
        theirs["q"] = (1, {"r9": (0.4, 0.0)})  # a pool this worker does not have
        a.changed(learned=True)
        b.poll(NOW + 4)
        assert len(got) == n


def _fleet(tmp_path: Path, worker: int) -> Fleet:
    f = Fleet(stale_after_s=5.0)
    f.set_endpoints("p", [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000") for i in range(2)])
    f.peers = PeerAccounts(tmp_path, worker, f.ledger.snapshots, interval_s=0.01)
    return f


def test_fleets_of_two_workers_add_each_others_requests(tmp_path: Path) -> None:
    a, b = _fleet(tmp_path, 0), _fleet(tmp_path, 1)
    try:
        req = Estimator().features("q1", "m", "hello " * 40, 8)
        first = {v.replica_id: v for v in b.views("p", NOW)}
        a.start("r0", req, NOW)
        seen = {v.replica_id: v for v in b.views("p", NOW + 1)}
        assert seen["r0"].inflight.requests == 1
        assert seen["r0"].inflight.prompt_tokens == req.prompt_tokens
        assert seen["r1"] is first["r1"]  # untouched replicas keep their view
        b.start("r0", Estimator().features("q2", "m", "hi", 8), NOW + 1)
        both = {v.replica_id: v for v in b.views("p", NOW + 1)}["r0"].inflight
        assert both.requests == 2  # its own and its peer's
        a.finish("r0", "q1", NOW + 2)
        assert {v.replica_id: v for v in b.views("p", NOW + 3)}["r0"].inflight.requests == 1
    finally:
        for f in (a, b):
            assert f.peers is not None
            f.peers.close()


async def test_learning_goes_out_at_most_every_tenth_interval_and_is_not_lost(
    tmp_path: Path,
) -> None:
    theirs = {"p": (1, {"r1": (0.1, 0.0)})}
    got: list[dict] = []
    a = PeerAccounts(
        tmp_path, 0, dict, learned=lambda: dict(theirs), interval_s=0.05,
        loop=asyncio.get_running_loop(),
    )  # fmt: skip
    b = PeerAccounts(
        tmp_path, 1, dict, epoch=lambda pool: 1, learn=lambda pool, d: got.append(d),
        interval_s=0.0,
    )  # fmt: skip
    with closing(a), closing(b):
        a.changed(learned=True)
        a.settle()
        b.poll(NOW)
        assert got == [{"r1": (0.1, 0.0)}]
        theirs["p"] = (1, {"r1": (0.3, 0.0)})
        # within 10 intervals of the last learning: in-flight only now, the learning later
        a.changed(learned=True)
        # its publish (in-flight only, three intervals on) is out; the learning is due at 0.5 s
        await asyncio.sleep(0.2)
        b.poll(NOW + 1)
        assert len(got) == 1
        await asyncio.sleep(0.6)  # a's follow-up publish carries it, with no further change
        b.poll(NOW + 2)
        assert got[-1] == {"r1": pytest.approx((0.2, 0.0))}


async def test_deferred_work_waits_for_the_settle_point_and_takes_no_loop_turn(
    tmp_path: Path,
) -> None:
    """The publish and the read a pick defers run when the proxy says the request has left
    (`settle`): not before it, however many turns the loop takes, and with no turn of their
    own; a publish that no settle point takes goes out `interval_s` on."""
    mine = {"r1": InFlight(1, 10, 1, 1, 10, 1)}
    order: list[str] = []
    loop = asyncio.get_running_loop()
    a = PeerAccounts(tmp_path, 0, lambda: dict(mine), interval_s=0.01)  # publishes at once
    b_rows = {"r2": InFlight(2, 20, 2, 2, 20, 2)}
    b = PeerAccounts(
        tmp_path, 1, lambda: dict(b_rows), touched=lambda r: order.append("read"),
        interval_s=0.05, loop=loop,
    )  # fmt: skip
    c = PeerAccounts(tmp_path, 2, dict, interval_s=0.0)  # reads whenever asked
    with closing(a), closing(b), closing(c):
        t = time.time()
        b.refresh(t)
        a.changed()
        assert b.refresh(t + 0.06) == set()  # busy: the read is left for the settle point
        b.changed()  # and so is b's publish
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == [] and "r2" not in (c.poll(NOW) | set(c.totals))
        b.settle()  # the request is with its replica
        assert order == ["read"] and b.totals == {"r1": mine["r1"]}
        assert c.poll(NOW + 1) == {"r2"}
        b_rows["r2"] = InFlight(1, 10, 1, 1, 10, 1)
        await asyncio.sleep(0.06)  # past the interval since b's publish
        b.changed()  # a change no settle point follows (a connection refused)
        await asyncio.sleep(0)
        assert c.poll(NOW + 2) == set()  # not at once, nor on the next loop turn
        await asyncio.sleep(0.08)  # the timer, interval_s on
        assert c.poll(NOW + 3) == {"r2"} and c.totals["r2"] == b_rows["r2"]


async def test_a_change_or_settle_after_close_is_dropped(tmp_path: Path) -> None:
    """A request still writing its body as the worker shuts down must not touch the unmapped
    files (its body's settle hook was bound before the close)."""
    a = PeerAccounts(tmp_path, 0, dict, interval_s=0.01, loop=asyncio.get_running_loop())
    a.changed()
    settle = a.settle
    a.close()
    a.changed()
    settle()
    await asyncio.sleep(0.03)  # no timer left to publish into a closed file


async def test_a_busy_worker_reads_its_peers_just_after_the_pick_an_idle_one_before(
    tmp_path: Path,
) -> None:
    mine = {"r1": InFlight(3, 30, 3, 3, 30, 3)}
    a = PeerAccounts(tmp_path, 0, lambda: dict(mine), interval_s=0.01)  # publishes at once
    got: list[set[str]] = []
    b = PeerAccounts(
        tmp_path, 1, dict, touched=got.append, interval_s=0.01, loop=asyncio.get_running_loop()
    )
    with closing(a), closing(b):
        t = time.time()
        assert b.refresh(t) == set()  # first read: a has nothing in flight yet
        a.changed()
        assert b.refresh(t + 0.001) == set()  # within the interval: nothing to do
        assert b.refresh(t + 0.015) == set() and b.totals == {}  # busy: read after the pick
        assert b.refresh(t + 0.018) == set()  # one read pending is enough
        b.settle()  # the request has left
        assert got == [{"r1"}] and b.totals == {"r1": mine["r1"]}
        mine.clear()
        a.changed()
        # idle for two intervals and more: the pick waits for the read
        assert b.refresh(time.time() + 0.03) == {"r1"} and b.totals == {}
        b.settle()  # nothing left to read
        assert got == [{"r1"}]


def test_a_peer_rewriting_the_same_totals_changes_nothing(tmp_path: Path) -> None:
    mine = {"r1": InFlight(1, 10, 1, 1, 10, 1)}
    with two_workers(tmp_path, mine) as (a, b):
        a.changed()
        a.changed()  # (the first publish also said what a had learned: nothing)
        assert b.poll(NOW) == {"r1"}
        before = HEADER.unpack_from(a._own, 0)[0]
        a.changed()  # a request came and went between two reads: the same bytes again
        assert HEADER.unpack_from(a._own, 0)[0] == before  # not written: nothing for b to read
        assert b.poll(NOW + 1) == set() and b.totals == {"r1": mine["r1"]}
        mine["r1"] = InFlight(2, 20, 2, 2, 20, 2)
        a.changed()
        assert b.poll(NOW + 2) == {"r1"} and b.totals == {"r1": mine["r1"]}


def counted_publisher(tmp_path: Path) -> tuple[PeerAccounts, list[int]]:
    """Worker 0 on the running loop (interval 0.05 s); each publish appends to the list."""
    published: list[int] = []

    def source() -> dict[str, InFlight]:
        published.append(1)
        return {"r1": InFlight(len(published))}

    loop = asyncio.get_running_loop()
    return PeerAccounts(tmp_path, 0, source, interval_s=0.05, loop=loop), published


async def test_publishes_are_deferred_and_coalesced(tmp_path: Path) -> None:
    a, published = counted_publisher(tmp_path)
    with closing(a):
        for _ in range(10):
            a.changed()
        await asyncio.sleep(0.12)
        assert len(published) == 1  # ten changes within one interval: one publish
        a.changed()
        await asyncio.sleep(0.12)
        assert len(published) == 2


async def test_a_change_soon_after_a_publish_waits_for_the_next_change_not_a_timer(
    tmp_path: Path,
) -> None:
    """A request's end, within the interval of its start's publish, must not wake an idle worker
    one interval on: it goes out with the next change, or FLUSH_AFTER intervals on."""
    a, published = counted_publisher(tmp_path)
    with closing(a):
        a.changed()  # a request starts: published once it has left
        a.settle()
        assert len(published) == 1
        a.changed()  # it ends at once: not yet
        await asyncio.sleep(0.08)  # past the interval, short of FLUSH_AFTER intervals
        assert len(published) == 1
        a.changed()  # the next request: both go out now
        a.settle()
        assert len(published) == 2
        a.changed()
        await asyncio.sleep(FLUSH_AFTER * 0.05 + 0.05)  # no further change: the flush
        assert len(published) == 3
        await asyncio.sleep(0.2)
        assert len(published) == 3  # nothing changed since: nothing published


@pytest.mark.parametrize("bad", [-0.1, 2])
def test_peer_sync_is_checked(bad: float) -> None:
    from kvpilot.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="gateway.peer_sync_s"):
        parse_config({"gateway": {"peer_sync_s": bad}})


def test_prefix_index_journals_its_own_additions_only() -> None:
    from gateway.prefix import PrefixIndex

    idx = PrefixIndex()
    idx.add("r0", (1, 2, 3))  # no journal kept: nothing recorded
    idx.keep_journal()
    idx.add("r0", (1, 2, 3))
    idx.add("r1", (7, 8), from_peer=True)  # another worker's: not passed on again
    idx.add("r1", (4, 5, 6, 9))
    idx.add("r2", (), note=(1.0,))  # no whole block: not worth every peer's read
    idx.add("r2", (5,), note=(1.0,))
    assert idx.drain() == [("r0", (1, 2, 3), ()), ("r1", (4, 5, 6, 9), ()), ("r2", (5,), (1.0,))]
    assert idx.drain() == []
    assert idx.match((7, 8)) == {"r1": 2}  # the peer's addition is in the index all the same


def test_ring_gives_each_reader_every_record_once_across_wrap_and_loses_when_overtaken(
    tmp_path: Path,
) -> None:
    from gateway.ring import RingReader, RingWriter

    w = RingWriter(tmp_path / "r", 64)
    fast, slow = RingReader(tmp_path / "r", 64), RingReader(tmp_path / "r", 64)
    with closing(w), closing(fast), closing(slow):
        seen: list[bytes] = []
        for i in range(20):  # 20 x 14 bytes through a 64-byte ring: wraps four times
            assert w.append(b"record-%04d" % i)
            seen += fast.read()
        assert seen == [b"record-%04d" % i for i in range(20)]
        assert fast.read() == []
        assert slow.read() == [] and slow.lost > 0  # overtaken: what it missed is gone
        w.append(b"after")
        assert slow.read() == [b"after"] and fast.read() == [b"after"]
        assert not w.append(b"x" * 20)  # over a quarter of the ring: refused


def test_peers_prefix_additions_arrive_once_each(tmp_path: Path) -> None:
    queued: list[tuple[str, str, tuple[int, ...], tuple[float, ...]]] = [
        ("p", "r0", (11, 12), (300.0, 1000, 16.0))
    ]
    got: list[tuple[str, list]] = []

    def drain() -> list[tuple[str, str, tuple[int, ...], tuple[float, ...]]]:
        out = list(queued)
        queued.clear()
        return out

    a = PeerAccounts(tmp_path, 0, dict, prefixes=drain, interval_s=0.01)
    b = PeerAccounts(
        tmp_path, 1, dict, epoch={"p": 5}.get, add_prefixes=lambda pool, e: got.append((pool, e)),
        interval_s=0.01,
    )  # fmt: skip
    with closing(a), closing(b):
        a.changed()
        b.poll(NOW)
        assert got == [("p", [("r0", (11, 12), (300.0, 1000.0, 16.0))])]
        queued += [("p", "r1", (13,), ()), ("q", "r9", (1,), ()), ("p", "r2", (2**64 - 1,), ())]
        a.changed()
        a.changed()  # a publish with nothing new adds nothing
        b.poll(NOW + 1)  # pool q is not this worker's: left out
        assert got[1:] == [("p", [("r1", (13,), ()), ("r2", (2**64 - 1,), ())])]
        b.poll(NOW + 2)
        assert len(got) == 2


def test_a_worker_routes_to_where_another_sent_the_same_prefix(tmp_path: Path) -> None:
    from gateway.proxy import Gateway
    from kvpilot.config import parse_config

    cfg = parse_config(
        {
            "pools": [
                {"name": "p", "models": ["m"], "endpoints": [f"http://10.0.0.{i}:8000" for i in range(4)]}
            ],
            "gateway": {"policy": "headroom"},
        }
    )  # fmt: skip
    gateways = []
    for w in (0, 1):
        f = Fleet(stale_after_s=5.0)
        g = Gateway(cfg, f)
        f.set_endpoints("p", [Endpoint(f"r{i}", f"http://10.0.0.{i}:8000") for i in range(4)])
        f.peers = PeerAccounts(
            tmp_path, w, f.ledger.snapshots, learned=g.learned, epoch=g.policy_epoch,
            learn=g.learn_from_peers, prefixes=g.drain_picks, add_prefixes=g.peer_picked,
            interval_s=0.0,
        )  # fmt: skip
        g.share_with_peers()
        gateways.append(g)
    one, two = gateways
    try:
        doc = "A long document both workers' clients ask about. " * 60
        est = Estimator()
        # `one` sends it to r3 (the others excluded, as after failures): not where a tie goes
        first = one._pick(
            one.pools["p"],
            est.features("q1", "m", doc + "first?", 16),
            frozenset({"r0", "r1", "r2"}),
        )
        assert first.replica_id == "r3"
        one.fleet.finish(first.replica_id, "q1", NOW)
        # `two` never routed this prefix; with `one`'s additions it finds where it lives
        d = two._pick(two.pools["p"], est.features("q2", "m", doc + "second?", 16), frozenset())
        assert d.replica_id == first.replica_id
    finally:
        for g in gateways:
            assert g.fleet.peers is not None
            g.fleet.peers.close()
