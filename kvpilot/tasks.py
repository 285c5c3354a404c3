"""Stopping background tasks: the one way every component does it."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Future[object] | None) -> None:
    """Cancel every task, then wait until each has finished.

    A task that had already failed is logged, not raised: a component that is stopping must not
    fail its caller's shutdown half way through (the rest would be left running).
    """
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        try:
            await t
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("background task failed before it was stopped: %r", t)
