"""Consumer groups from Python against a real broker: two members share a
topic, every record handled once; a nack comes again with its delivery
count raised; what a member acked is committed when it leaves, and the next
member starts after it."""

from __future__ import annotations

import asyncio

import covet
from conftest import run
from covet.testing import Broker


async def take(sub: covet.GroupSubscription, n: int) -> list[covet.GroupMessage]:
    out: list[covet.GroupMessage] = []
    async for msg in sub:
        out.append(msg)
        if len(out) == n:
            break
    return out


def test_two_members_share_a_topic(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("jobs", partitions=4)
            handled: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
            progress = asyncio.Condition()

            async def member(name: str, sub: covet.GroupSubscription) -> None:
                async for msg in sub:
                    handled[name].append((msg.partition, msg.offset))
                    await msg.ack()
                    async with progress:
                        progress.notify_all()

            async with (
                client.subscribe_group("jobs", "workers", session_timeout=3.0) as a,
                client.subscribe_group("jobs", "workers", session_timeout=3.0) as b,
            ):
                tasks = [asyncio.create_task(member("a", a)), asyncio.create_task(member("b", b))]
                # Published in rounds until both handle records: b gets its
                # share once a released it (about one heartbeat).
                published = 0
                while not (handled["a"] and handled["b"]):
                    values = [f"job-{published + i}".encode() for i in range(100)]
                    await client.publish_batch("jobs", values)
                    published += 100
                    await asyncio.sleep(0.05)
                async with progress:
                    await progress.wait_for(
                        lambda: len(handled["a"]) + len(handled["b"]) >= published
                    )
                for t in tasks:
                    t.cancel()
            every = handled["a"] + handled["b"]
            assert len(every) == published, "each record handled once (nobody died)"
            assert len(set(every)) == published
            parts_a = {p for p, _ in handled["a"]}
            parts_b = {p for p, _ in handled["b"]}
            assert parts_a | parts_b == {0, 1, 2, 3}

    run(body())


def test_a_nack_comes_again_and_acks_are_committed_on_leaving(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("orders", partitions=1)
            await client.publish_batch("orders", [b"0", b"1", b"2"])
            async with client.subscribe_group("orders", "billing", max_in_flight=10) as sub:
                first = await take(sub, 3)
                assert [(m.offset, m.delivery_count) for m in first] == [(0, 1), (1, 1), (2, 1)]
                await first[0].ack()
                await first[1].nack()
                await first[2].ack()
                again = await take(sub, 1)
                assert (again[0].offset, again[0].delivery_count, again[0].value) == (1, 2, b"1")
                await again[0].ack()
                # Settling twice does nothing.
                await again[0].ack()
            await client.publish("orders", b"3")
            async with client.subscribe("orders", group="billing") as later:
                nxt = await take(later, 1)
                assert (nxt[0].offset, nxt[0].delivery_count) == (3, 1), (
                    "the next member starts after what was acked"
                )
                await nxt[0].ack()

    run(body())


def test_bad_group_settings_are_refused(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            try:
                client.subscribe_group("t", "g", max_in_flight=0)
            except covet.InvalidArgument:
                pass
            else:
                raise AssertionError("max_in_flight 0 was accepted")
            await client.create_topic("t", partitions=1)
            try:
                async with client.subscribe_group("t", "bad group name!"):
                    pass
            except covet.InvalidArgument as e:
                assert e.reason is not None
            else:
                raise AssertionError("a bad group name was accepted")

    run(body())
