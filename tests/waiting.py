"""Wait for a condition, never for a guessed time: the one polling helper of the tests.

``eventually(check)`` calls ``check`` every ``interval`` seconds until it returns something truthy
and returns that, so a test can wait for a value and use it::

    generation = eventually(lambda: pool.generation(request_id))  # None until the log has it

It fails the test (``AssertionError``) after ``timeout`` seconds, saying what ``check`` last
returned and, if given, what ``explain()`` says about the state then. ``eventually_async`` is the
same inside an event loop, where ``check`` may be a coroutine function.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _failure(check: object, timeout: float, result: object, explain: Callable[[], object] | None) -> AssertionError:
    detail = f"; {explain()}" if explain is not None else ""
    return AssertionError(f"not true within {timeout} s: {check!r} last returned {result!r}{detail}")


def eventually(
    check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, explain: Callable[[], object] | None = None
) -> T:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _failure(check, timeout, result, explain)
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[T] | T],
    timeout: float = 15.0,
    interval: float = 0.05,
    explain: Callable[[], object] | None = None,
) -> T:
    """:func:`eventually` inside an event loop; ``check`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _failure(check, timeout, result, explain)
        await asyncio.sleep(interval)
