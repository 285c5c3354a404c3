"""Faults the agent survives: each is counted by kind and logged once when it starts and ends.

A server that hangs is scraped four times a second; logging every failure would bury the one line
that matters. `ErrorLog` logs the first failure of a key (a target, a GPU, the socket), then stays
quiet until that key recovers or fails differently, while `kvpilot_agent_errors_total{kind}`
counts every occurrence.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("kvpilot.agent")

KINDS = ("scrape", "timeout", "parse", "gpu", "pod_resources", "kubernetes", "engine_state")


class ErrorLog:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "kvpilot_agent_errors_total",
            "Faults the agent met and survived, by kind.",
            ["kind"],
            registry=registry,
        )
        for kind in KINDS:  # publish zeros so rate() works from the first failure
            self.counter.labels(kind)
        self._failing: dict[str, str] = {}

    def report(self, kind: str, key: str, message: str) -> None:
        self.counter.labels(kind).inc()
        if self._failing.get(key) != message:
            self._failing[key] = message
            log.warning("%s %s: %s", kind, key, message)

    def clear(self, key: str) -> None:
        if self._failing.pop(key, None) is not None:
            log.info("%s recovered", key)

    def count(self, kind: str) -> float:
        return self.counter.labels(kind)._value.get()
