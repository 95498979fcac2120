"""The plain client against a real broker: publish, subscribe, admin, errors."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import covet
from conftest import run
from covet.testing import Broker


async def take(sub: covet.Subscription, n: int) -> list[covet.Message]:
    out: list[covet.Message] = []
    async for msg in sub:
        out.append(msg)
        if len(out) == n:
            break
    return out


def test_round_trip_with_keys_and_headers(covet_broker: Broker) -> None:
    async def body() -> None:
        before = datetime.now(UTC) - timedelta(seconds=5)
        async with covet.connect(covet_broker.address) as client:
            info = await client.create_topic("orders", partitions=1)
            assert info.name == "orders" and len(info.partitions) == 1
            sent = [
                await client.publish("orders", b"first", key=b"k1", headers={"h": b"v"}),
                await client.publish("orders", "second", key="k2", headers={"trace": "abc"}),
                await client.publish("orders", bytearray(b"third")),
                await client.publish("orders", memoryview(b"fourth"), headers={}),
            ]
            assert [(r.partition, r.offset) for r in sent] == [(0, 0), (0, 1), (0, 2), (0, 3)]
            assert all(r.topic == "orders" for r in sent)

            async with client.subscribe("orders", start="earliest") as sub:
                got = await take(sub, 4)
            assert [m.value for m in got] == [b"first", b"second", b"third", b"fourth"]
            assert [m.key for m in got] == [b"k1", b"k2", None, None]
            assert [m.headers for m in got] == [{"h": b"v"}, {"trace": b"abc"}, {}, {}]
            assert [(m.topic, m.partition, m.offset) for m in got] == [
                ("orders", 0, i) for i in range(4)
            ]
            for m in got:
                # The zero-copy view holds the same bytes, read-only.
                view = m.value_view
                assert view.readonly and view.tobytes() == m.value and len(view) == len(m.value)
                with pytest.raises(TypeError):
                    view[0] = 0
                assert m.timestamp.tzinfo is not None
                assert before <= m.timestamp <= datetime.now(UTC) + timedelta(seconds=5)

            # From an offset, and from "latest": only what comes after.
            async with client.subscribe("orders", start=2) as sub:
                assert [m.offset for m in await take(sub, 2)] == [2, 3]
            async with client.subscribe("orders", start="latest") as sub:
                await client.publish("orders", b"fifth")
                [m] = await take(sub, 1)
                assert (m.offset, m.value) == (4, b"fifth")

    run(body())


def test_connect_awaited_with_a_seed_list_and_admin(covet_broker: Broker) -> None:
    async def body() -> None:
        # The first seed refuses connections; the second answers.
        client = await covet.connect(f"127.0.0.1:1,{covet_broker.address}")
        await client.create_topic("a", partitions=3)
        await client.create_topic("b")
        assert sorted(t.name for t in await client.list_topics()) == ["a", "b"]
        described = await client.describe_topic("a")
        assert [p.partition for p in described.partitions] == [0, 1, 2]
        assert all(p.high_watermark == 0 for p in described.partitions)
        with pytest.raises(covet.TopicExists) as exists:
            await client.create_topic("a")
        assert exists.value.reason == "TOPIC_EXISTS"
        await client.delete_topic("b")
        assert [t.name for t in await client.list_topics()] == ["a"]
        await client.close()

    run(body())


def test_publish_batch_of_100000_read_back_in_order_per_partition(covet_broker: Broker) -> None:
    n = 100_000
    partitions = 4

    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            # Small batches: the producer closes one every few thousand
            # records and moves unkeyed records on to the next partition
            # (sticky partitioning), so every partition gets many batches.
            await client.create_topic("big", partitions=partitions, max_batch_bytes=64 * 1024)
            values = [f"record-{i}".encode() for i in range(n)]
            results = await client.publish_batch("big", values)
            assert len(results) == n
            # Per partition, what publish_batch answered, in publish order:
            # the offsets must be 0, 1, 2, ... (no gap, no duplicate, in
            # the order the values were given).
            sent: dict[int, list[bytes]] = {}
            for value, r in zip(values, results, strict=True):
                assert r.topic == "big"
                assert r.offset == len(sent.setdefault(r.partition, [])), (r, value)
                sent[r.partition].append(value)
            assert set(sent) == set(range(partitions))
            assert all(len(v) >= n // (4 * partitions) for v in sent.values()), {
                p: len(v) for p, v in sent.items()
            }
            info = await client.describe_topic("big")
            assert {p.partition: p.high_watermark for p in info.partitions} == {
                p: len(sent.get(p, [])) for p in range(partitions)
            }

            async with client.subscribe("big", start="earliest") as sub:
                got = await take(sub, n)
            # Read back: every record once, and per partition in offset
            # order with the values publish_batch put there.
            read: dict[int, list[covet.Message]] = {}
            for m in got:
                read.setdefault(m.partition, []).append(m)
            for p, msgs in read.items():
                assert [m.offset for m in msgs] == list(range(len(msgs))), p
                assert [m.value for m in msgs] == sent[p], p
            assert set(read) == set(sent)
            assert sorted(m.value for m in got) == sorted(values)

    run(body(), timeout=100)


def test_concurrent_publishes_share_batches(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("many", partitions=2)
            results = await asyncio.gather(
                *(client.publish("many", f"v{i}", key=f"k{i % 10}") for i in range(2000))
            )
            per_partition: dict[int, list[int]] = {}
            for r in results:
                per_partition.setdefault(r.partition, []).append(r.offset)
            # Every record got its own offset: no gaps, no duplicates.
            for offsets in per_partition.values():
                assert sorted(offsets) == list(range(len(offsets)))
            assert sum(len(o) for o in per_partition.values()) == 2000
            # The Rust producer batched them: far fewer batches than records.
            stats = client.producer_stats()
            assert stats.records == 2000
            assert stats.batches <= 2000 // 4, stats

    run(body())


def test_wrong_value_type_is_a_type_error(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("t")
            with pytest.raises(TypeError, match="value must be bytes"):
                await client.publish("t", 42)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="key must be bytes"):
                await client.publish("t", b"v", key=1.5)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="header"):
                await client.publish("t", b"v", headers={"h": 3})  # type: ignore[dict-item]
            with pytest.raises(TypeError):
                await client.publish_batch("t", [b"ok", None])  # type: ignore[list-item]
            with pytest.raises(TypeError, match="not a single payload"):
                await client.publish_batch("t", "abc")
            with pytest.raises(TypeError, match="not a single payload"):
                await client.publish_batch("t", b"abc")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await client.subscribe("t", start=1.5).open()  # type: ignore[call-overload]
            with pytest.raises(covet.InvalidArgument):
                await client.subscribe("t", start="middle").open()  # type: ignore[call-overload]
            # Nothing of it was written.
            assert (await client.describe_topic("t")).partitions[0].high_watermark == 0

    run(body())


def test_unknown_topic(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            with pytest.raises(covet.UnknownTopic) as publish_err:
                await client.publish("nope", b"v")
            assert publish_err.value.reason == "UNKNOWN_TOPIC"
            assert isinstance(publish_err.value, covet.CovetError)
            with pytest.raises(covet.UnknownTopic) as describe_err:
                await client.describe_topic("nope")
            assert describe_err.value.reason == "UNKNOWN_TOPIC"
            with pytest.raises(covet.UnknownTopic):
                await client.subscribe("nope").open()

    run(body())


def test_oversized_value_is_batch_too_large(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("small", max_batch_bytes=4096)
            with pytest.raises(covet.BatchTooLarge) as err:
                await client.publish("small", b"x" * 10_000)
            assert err.value.reason == "BATCH_TOO_LARGE"
            # The topic still takes records that fit, from offset 0.
            ok = await client.publish("small", b"fits")
            assert ok.offset == 0

    run(body())


def test_invalid_topic_name_is_invalid_argument(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            with pytest.raises(covet.InvalidArgument) as err:
                await client.create_topic("no spaces allowed")
            assert err.value.reason == "INVALID_TOPIC_NAME"
            assert isinstance(err.value, ValueError)

    run(body())


def test_unreachable_broker_is_connection_lost() -> None:
    async def body() -> None:
        with pytest.raises(covet.ConnectionLost) as err:
            await covet.connect("127.0.0.1:1")
        assert err.value.reason is None

    run(body())


def test_cancelled_anext_loses_nothing(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("c")
            async with client.subscribe("c", start="earliest") as sub:
                # Cancelled (a timeout) while waiting for records that come
                # later: they all come to the next `__anext__`.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(anext(sub), 0.05)
                await client.publish("c", b"a")
                [first] = await asyncio.wait_for(take(sub, 1), 10)
                assert first.value == b"a"

                # Cancelled just as its records arrived: the native call has
                # taken them off the subscription, and the task is cancelled
                # before it runs again (white box: the callback is put ahead
                # of the task's own on the native call's future).
                assert sub._native is not None
                pending = sub._native.next_batch(256)
                sub._pending = pending
                waiting = asyncio.ensure_future(anext(sub))
                pending.add_done_callback(lambda _: waiting.cancel())
                await client.publish_batch("c", [b"b", b"c"])
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(waiting, 10)
                assert pending.done() and not pending.cancelled()
                got = await asyncio.wait_for(take(sub, 2), 10)
                assert [m.value for m in got] == [b"b", b"c"]

    run(body())


def test_subscribe_from_a_datetime(covet_broker: Broker) -> None:
    async def body() -> None:
        async with covet.connect([covet_broker.address]) as client:
            await client.create_topic("times")
            await client.publish("times", b"old")
            async with client.subscribe("times") as sub:
                [old] = await take(sub, 1)
            # A start strictly after the old record's millisecond.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (start := datetime.now(UTC)) <= old.timestamp + timedelta(milliseconds=1):
                assert loop.time() < deadline
                await asyncio.sleep(0.001)
            await client.publish("times", b"new")
            async with client.subscribe("times", start=start) as sub:
                [new] = await take(sub, 1)
            assert (new.offset, new.value) == (1, b"new")

    run(body())
