"""Test set-up: the `covet` binary the `covet_broker` fixture runs (from
covet's pytest plugin, covet/pytest_plugin.py), and a bounded runner."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Every test's body runs under this bound, below pytest-timeout's.
TEST_TIMEOUT = 60.0

# `$COVET_BIN` (scripts/test-python sets it), else the debug build under
# CARGO_TARGET_DIR, else covet.testing looks on PATH.
if not os.environ.get("COVET_BIN"):
    _target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/covet/target")
    _path = os.path.join(_target, "debug", "covet")
    if os.path.exists(_path):
        os.environ["COVET_BIN"] = _path


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Runs a test's coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(what: str, cond: Callable[[], bool], within: float = 20.0) -> None:
    """:func:`eventually` for a plain predicate."""

    async def check() -> bool:
        return cond()

    await eventually(what, check, within)


async def eventually(what: str, check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Asks ``check()`` every 10 ms until true, failing after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
