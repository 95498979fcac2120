"""The pytest plugin of ``covet`` (loaded by pytest through the ``pytest11``
entry point): the ``covet_broker`` fixture, a real single-node broker per
test (see :mod:`covet.testing`)::

    async def test_publish(covet_broker: covet.testing.Broker) -> None:
        async with covet.connect(covet_broker.address) as client: ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from covet.testing import Broker


@pytest.fixture
def covet_broker() -> Iterator[Broker]:
    """A ``covet broker`` on a free loopback port in a temporary
    directory, killed after the test."""
    with Broker() as broker:
        yield broker
