"""Two `covet.App` instances in one consumer group share a topic's work:
every record handled exactly once across the two (nobody dies, so the
group promises exactly once, ADR 0009), both handle some, and each key's
records are handled one at a time, in offset order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import covet
from conftest import run
from covet.testing import Broker

KEYS = 20
PER_ROUND = 200
AT_LEAST = 2_000


def test_two_apps_in_one_group_share_the_work(covet_broker: Broker) -> None:
    async def body() -> None:
        # In handling order (both apps run on this event loop, so one list
        # is the order the handlers started in): (app, key, partition, offset).
        handled: list[tuple[str, bytes, int, int]] = []
        in_flight: dict[bytes, int] = {}
        overlaps: list[bytes] = []
        apps: list[covet.App] = []

        for name in ("one", "two"):
            app = covet.App(brokers=covet_broker.address, name=name, session_timeout=3.0)

            def handler(app_name: str) -> Callable[[covet.Event], Awaitable[None]]:
                async def handle(e: covet.Event) -> None:
                    assert e.key is not None
                    if in_flight.get(e.key, 0):
                        overlaps.append(e.key)  # two records of one key at once
                    in_flight[e.key] = in_flight.get(e.key, 0) + 1
                    handled.append((app_name, e.key, e.partition, e.offset))
                    await asyncio.sleep(0.001)  # the handler's work, so keys overlap
                    in_flight[e.key] -= 1

                return handle

            app.on_event("orders", group="billing", max_in_flight=8)(handler(name))
            apps.append(app)

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("orders", partitions=4)
            runners = [asyncio.create_task(a.run()) for a in apps]
            published: dict[tuple[int, int], bytes] = {}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 40
            # Published in rounds until both apps handle records (the second
            # gets its share once the first released it: about a heartbeat)
            # and at least AT_LEAST records are out.
            while len(published) < AT_LEAST or {a for a, *_ in handled} != {"one", "two"}:
                assert loop.time() < deadline, (
                    f"both apps never handled records: {len(published)} published, "
                    f"{len(handled)} handled, by {sorted({a for a, *_ in handled})}"
                )
                round_no = len(published) // PER_ROUND
                keys = [f"customer-{i % KEYS}".encode() for i in range(PER_ROUND)]
                results = await asyncio.gather(
                    *(
                        client.publish("orders", f"order-{round_no}-{i}", key=k)
                        for i, k in enumerate(keys)
                    )
                )
                for k, r in zip(keys, results, strict=True):
                    published[(r.partition, r.offset)] = k
                await asyncio.sleep(0.05)

            while len(handled) < len(published):
                assert loop.time() < deadline, f"{len(handled)} of {len(published)} records handled"
                await asyncio.sleep(0.01)
            for a in apps:
                a.stop()
            await asyncio.wait_for(asyncio.gather(*runners), 20)

        # Exactly once across the two apps, and nothing else.
        seen = [(p, o) for _, _, p, o in handled]
        assert len(seen) == len(set(seen)), "a record was handled twice"
        assert set(seen) == set(published)
        assert all(published[(p, o)] == k for _, k, p, o in handled)
        by_app = {name: sum(1 for a, *_ in handled if a == name) for name in ("one", "two")}
        moved = {p for p in range(4) if len({a for a, _, q, _ in handled if q == p}) == 2}
        print(f"handled per app {by_app}; partitions handled by both: {sorted(moved)}")
        assert all(by_app.values()), by_app
        # Per key: one record at a time, in offset order (a key lives in one
        # partition), even across the hand-over between the apps.
        assert not overlaps, f"records of keys {sorted(set(overlaps))} ran at once"
        per_key: dict[bytes, list[tuple[int, int]]] = {}
        for _, k, p, o in handled:
            per_key.setdefault(k, []).append((p, o))
        for k, order in per_key.items():
            assert order == sorted(order), k
            assert len({p for p, _ in order}) == 1, k

    run(body())
