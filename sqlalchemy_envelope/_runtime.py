"""Blocking work without blocking an event loop.

Under SQLAlchemy's asyncio extension, statements run inside a greenlet that
SQLAlchemy spawned from the event loop. There a blocking call (a KMS request)
is handed to a worker thread and awaited with SQLAlchemy's own ``await_``, so
the loop keeps serving other tasks; database I/O on the async engine already
yields the same way. Outside such a greenlet, calls simply block the caller's
thread, as ordinary synchronous code does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.util import concurrency

T = TypeVar("T")

in_greenlet: Callable[[], bool] = concurrency.in_greenlet
_await: Callable[[Any], Any] = getattr(concurrency, "await_", None) or concurrency.await_only


class WouldBlock(RuntimeError):
    """Waiting would block the running event loop (outside SQLAlchemy's greenlet)."""


def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when called from an asyncio greenlet."""
    if in_greenlet():
        result: T = _await(asyncio.to_thread(fn, *args))
        return result
    return fn(*args)


def sleep(seconds: float) -> None:
    """Pause this caller; inside an asyncio greenlet, without pausing the event loop."""
    if in_greenlet():
        _await(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def wait(future: concurrent.futures.Future[T]) -> T:
    """The future's result, without blocking the event loop inside a greenlet."""
    if future.done():
        return future.result()
    if in_greenlet():
        # Shielded: a waiter cancelled (a timeout) must not cancel the load others wait on.
        result: T = _await(asyncio.shield(asyncio.wrap_future(future)))
        return result
    if _loop_running():
        # Blocking here would stall the very loop that has to finish the load.
        raise WouldBlock("the result is being computed by another task of this event loop")
    return future.result()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
