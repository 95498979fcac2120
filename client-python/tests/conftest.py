"""Fixtures: a real `covet broker` per test (see covet.testing)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from covet.testing import Broker

T = TypeVar("T")

# Every test's body runs under this bound, below pytest-timeout's.
TEST_TIMEOUT = 60.0


def _binary() -> str | None:
    """`$COVET_BIN`, else the debug build under CARGO_TARGET_DIR (what
    scripts/test builds), else None (covet.testing looks on PATH)."""
    if os.environ.get("COVET_BIN"):
        return os.environ["COVET_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/covet/target")
    path = os.path.join(target, "debug", "covet")
    return path if os.path.exists(path) else None


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker(binary=_binary()) as b:
        yield b


def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_TIMEOUT) -> T:
    """Runs a test's coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
