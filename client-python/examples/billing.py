"""Bills each order published on the ``orders`` topic, at most 4 at a time.

Run it: ``COVET_BROKER=127.0.0.1:7420 python -m covet run billing``.
Test it: ``pytest test_billing.py`` (a real broker, started for the test).
"""

import asyncio
from typing import Any

import covet


@covet.on_event("orders", group="billing", max_in_flight=4)
async def bill(order: dict[str, Any]) -> None:
    print(f"billing order {order['id']}", flush=True)
    await asyncio.sleep(0.05)  # stands for the call to the payment provider
    print(f"billed order {order['id']}", flush=True)
