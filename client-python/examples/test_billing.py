"""Tests billing.py against a real broker: the ``covet_broker`` fixture
(covet's pytest plugin) starts one in a temporary directory for the test
and stops it after; nothing is started by hand. Run: pytest test_billing.py
"""

import asyncio
import json

import pytest

import billing  # noqa: F401  (registers bill() on covet's default app)
import covet
from covet.testing import Broker


def test_bills_every_order(
    covet_broker: Broker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service reads COVET_BROKER when it starts, as in production.
    monkeypatch.setenv("COVET_BROKER", covet_broker.address)

    async def body() -> None:
        app = covet.default_app()  # the app module-level @covet.on_event registers on
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("orders", partitions=2)
            service = asyncio.create_task(app.run())
            await client.publish_batch("orders", [json.dumps({"id": i}) for i in range(20)])
            out = ""
            async with asyncio.timeout(30):
                while out.count("billed order") < 20:
                    await asyncio.sleep(0.05)
                    out += capsys.readouterr().out
            app.stop()  # as SIGTERM would: in-flight orders finish, progress is committed
            await asyncio.wait_for(service, 30)
        billed = sorted(int(line.split()[-1]) for line in out.splitlines() if "billed" in line)
        assert billed == list(range(20))

    asyncio.run(body())
