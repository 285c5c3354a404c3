"""Prompt token ids and prefix hashes from trace segments, cheaply and deterministically.

A segment's ids are a slice of one fixed random pool, prefixed by two ids that spell its key, so
different segments never share a first block (no false cache hits) and equal segments are equal.
Shared system prompts are built once and reused. The prefix hashes chain xxhash over blocks of
BLOCK_TOKENS ids -- the same blocks the engine's prefix cache hashes -- and stand in for the
gateway's 64-character blocks (16 tokens ~ 64 characters at ~4 characters per token).
"""

from __future__ import annotations

import random
from array import array
from functools import lru_cache

import xxhash

from sim.traces import UNIQUE_BASE, SimRequest

BLOCK_TOKENS = 16
CHARS_PER_TOKEN = 4
_VOCAB = 30000  # below every profiled model's vocabulary size
_POOL_SIZE = 1 << 18
_POOL: list[int] = [random.Random(12345).randrange(100, _VOCAB) for _ in range(_POOL_SIZE)]


def _segment(key: int, length: int) -> list[int]:
    head = [key % _VOCAB, (key // _VOCAB) % _VOCAB]
    if length <= 2:
        return head[:length]
    body = length - 2
    start = (key * 2654435761) % (_POOL_SIZE - min(body, _POOL_SIZE - 1))
    ids = head + _POOL[start : start + body]
    while len(ids) < length:  # only for segments longer than the pool
        ids += _POOL[: length - len(ids)]
    return ids


@lru_cache(maxsize=4096)
def _shared_segment(key: int, length: int) -> tuple[int, ...]:
    return tuple(_segment(key, length))


def prompt_token_ids(req: SimRequest) -> list[int]:
    ids: list[int] = []
    for key, length in req.segments:
        ids.extend(_shared_segment(key, length) if key < UNIQUE_BASE else _segment(key, length))
    return ids


def prefix_hashes(
    ids: list[int], block: int = BLOCK_TOKENS, *, seed: int = 0, max_blocks: int = 1 << 30
) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `ids` (at most `max_blocks`, like the gateway's):
    equal hashes mean equal prefixes."""
    raw = array("i", ids).tobytes()
    step = block * 4
    out = []
    h = seed
    for off in range(0, min(len(ids) // block, max_blocks) * step, step):
        h = xxhash.xxh64_intdigest(raw[off : off + step], seed=h)
        out.append(h)
    return tuple(out)
