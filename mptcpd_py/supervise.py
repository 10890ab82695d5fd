"""Keep the daemon's long-running loops alive.

A loop that dies on an unexpected exception would otherwise leave a daemon
that looks healthy (the watchdog still pinged by the other loops) but no
longer reacts to the network. A crash is logged with its traceback, the loop's
state is recovered (re-read from the kernel) and the loop restarts after a
short backoff; one that keeps crashing is declared fatal, so the daemon exits
non-zero and systemd restarts it from scratch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

CRASH_LIMIT = 5  # crashes ...
CRASH_WINDOW = 60.0  # ... within this many seconds are fatal
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 5.0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    recover: Callable[[], Awaitable[None]],
    log: Any,
    on_fatal: Callable[[str], None],
    *,
    on_crash: Callable[[BaseException], None] = lambda exc: None,
) -> None:
    """Run ``run`` until it returns; after a crash, ``recover`` then run again."""
    crashes: deque[float] = deque(maxlen=CRASH_LIMIT)
    backoff = FIRST_BACKOFF
    while True:
        try:
            if crashes:  # restarting after a crash
                await recover()
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            on_crash(exc)
            now = time.monotonic()
            crashes.append(now)
            if len(crashes) == CRASH_LIMIT and now - crashes[0] < CRASH_WINDOW:
                reason = (f"{name} loop crashed {CRASH_LIMIT} times within "
                          f"{CRASH_WINDOW:g}s, last: {type(exc).__name__}: {exc}")
                log.error("event loop keeps crashing; stopping the daemon", loop=name,
                          error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                on_fatal(reason)
                return
            log.error("event loop crashed; restarting it", loop=name,
                      error=f"{type(exc).__name__}: {exc}", retry_in=backoff, exc_info=exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
