"""Wait for a condition, never for a guessed time: the one polling helper of the tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check!r} last returned {result!r}")
        time.sleep(interval)


async def eventually_async(check: Callable[[], Awaitable[T] | T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """:func:`eventually` inside an event loop; ``check`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check!r} last returned {result!r}")
        await asyncio.sleep(interval)
