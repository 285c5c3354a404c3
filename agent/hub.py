"""The latest NodeState and everyone waiting for the next one.

Encoded once per cycle and handed to every watcher as bytes. Each watcher has a one-slot mailbox:
a slow reader skips states it had no time for and always gets the newest, so it can never make
the agent buffer without bound.
"""

from __future__ import annotations

import asyncio

from kvpilot.signals import NodeState, to_json


class StateHub:
    def __init__(self) -> None:
        self.latest: NodeState | None = None
        self.latest_json: bytes = b""
        self.version = 0
        self._watchers: set[asyncio.Queue[bytes]] = set()

    def publish(self, state: NodeState) -> None:
        self.latest = state
        self.latest_json = to_json(state)
        self.version += 1
        for q in self._watchers:
            if q.full():
                q.get_nowait()  # drop the state this reader had no time for
            q.put_nowait(self.latest_json)

    def close(self) -> None:
        """Tell every watcher to finish (an empty message), so shutdown never waits on streams."""
        for q in self._watchers:
            if q.full():
                q.get_nowait()
            q.put_nowait(b"")

    def subscribe(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        if self.latest_json:
            q.put_nowait(self.latest_json)
        self._watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes]) -> None:
        self._watchers.discard(q)

    @property
    def watchers(self) -> int:
        return len(self._watchers)
