"""A byte ring in a memory-mapped file: one writing process, any number of reading processes.

The gateway's workers use one per worker for their prefix-index additions (gateway/peers.py):
each addition is written once and each reader reads only what is new to it, however often it
looks. The header holds `written` (u64): how many bytes were ever appended; record i lives at
[start, start + length) modulo the ring's size. The writer copies a record in first and then
moves `written`, so a reader never sees a half-written record; a reader that falls more than
the ring's size behind (or is overtaken while it copies) loses what was overwritten and starts
again at the writer's position.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

HEADER = struct.Struct("<Q")
LENGTH = struct.Struct("<I")


def sized_file(path: Path, nbytes: int) -> None:
    """`path` at least `nbytes` long (zeros where new); never shrunk, since others may map it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < nbytes:
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def create(path: Path, size: int) -> None:
    """The ring's file, full size (zeros: nothing written)."""
    sized_file(path, HEADER.size + size)


class RingWriter:
    def __init__(self, path: Path, size: int) -> None:
        create(path, size)
        self.size = size
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), HEADER.size + size)
        self.written = HEADER.unpack_from(self._mm, 0)[0]

    def append(self, record: bytes) -> bool:
        """Append one record (False: larger than a quarter of the ring, not written)."""
        data = LENGTH.pack(len(record)) + record
        if len(data) > self.size // 4:
            return False
        start = self.written % self.size
        first = min(len(data), self.size - start)
        base = HEADER.size
        self._mm[base + start : base + start + first] = data[:first]
        if first < len(data):  # wraps around
            self._mm[base : base + len(data) - first] = data[first:]
        self.written += len(data)
        HEADER.pack_into(self._mm, 0, self.written)
        return True

    def close(self) -> None:
        self._mm.close()


class RingReader:
    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), HEADER.size + size, access=mmap.ACCESS_READ)
        self.pos = 0  # from the start: what the writer wrote before we looked is news too
        self.lost = 0  # bytes overwritten before we read them

    def read(self) -> list[bytes]:
        """The records appended since the last read, oldest first."""
        written = HEADER.unpack_from(self._mm, 0)[0]
        if written == self.pos:
            return []
        if written - self.pos > self.size:  # overtaken: what we had not read is gone
            self.lost += written - self.pos
            self.pos = written
            return []
        start, n = self.pos % self.size, written - self.pos
        base = HEADER.size
        first = min(n, self.size - start)
        chunk = self._mm[base + start : base + start + first]
        if first < n:
            chunk += self._mm[base : base + n - first]
        if HEADER.unpack_from(self._mm, 0)[0] - self.pos > self.size:
            self.lost += n  # overwritten while we copied
            self.pos = HEADER.unpack_from(self._mm, 0)[0]
            return []
        self.pos = written
        out, i = [], 0
        while i + LENGTH.size <= len(chunk):
            (length,) = LENGTH.unpack_from(chunk, i)
            out.append(chunk[i + LENGTH.size : i + LENGTH.size + length])
            i += LENGTH.size + length
        return out

    def close(self) -> None:
        self._mm.close()
