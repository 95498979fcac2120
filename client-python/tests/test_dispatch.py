"""How records reach handlers and subscribers: handlers that finish at once
and handlers that wait (a task only for those), failures before and after
a wait, context variables kept apart, a busy subscription that still lets
other tasks run, and publishers waiting for room in a small buffer."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import threading

import covet
from conftest import eventually, run, wait_until
from covet.testing import Broker

current: contextvars.ContextVar[int] = contextvars.ContextVar("current", default=-1)


def test_handlers_that_finish_at_once_or_wait_succeed_or_fail_alike(
    covet_broker: Broker,
) -> None:
    # Four kinds of record: the handler returns at once, returns after
    # waiting, raises at once, raises after waiting. Each must be acked or
    # retried then dead-lettered the same way whichever path ran it.
    kinds = [b"ok-now", b"ok-later", b"fail-now", b"fail-later"]
    n = 50

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="kinds", session_timeout=3.0)
        seen: dict[bytes, list[int]] = {}

        @app.on_event("kinds", retry=covet.Retry(max_deliveries=2, backoff=0.01))
        async def handle(e: covet.Event) -> None:
            seen.setdefault(e.value, []).append(e.delivery_count)
            if b"later" in e.value:
                await asyncio.sleep(0)  # a real suspension: the task path
            if e.value.startswith(b"fail"):
                raise RuntimeError("refused")

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("kinds")
            values = [k + b"-" + str(i).encode() for i in range(n) for k in kinds]
            runner = asyncio.create_task(app.run())
            await client.publish_batch("kinds", values)

            async def all_dead() -> bool:
                try:
                    info = await client.describe_topic("kinds.dlq")
                except covet.UnknownTopic:
                    return False
                return sum(p.high_watermark for p in info.partitions) == 2 * n

            await eventually("every failing record was dead-lettered", all_dead, 40)
            app.stop()
            await asyncio.wait_for(runner, 20)

            for v in values:
                expected = [1, 2] if v.startswith(b"fail") else [1]
                assert seen.get(v) == expected, (v, seen.get(v))
            async with client.subscribe("kinds.dlq", start="earliest") as dlq:
                dead = sorted(
                    [(await asyncio.wait_for(anext(dlq), 10)).value for _ in range(2 * n)]
                )
            assert dead == sorted(v for v in values if v.startswith(b"fail"))

            # Everything else was acked and committed: a new member of the
            # group starts after it, at a record published now.
            marker = await client.publish("kinds", b"marker")
            async with client.subscribe("kinds", group="kinds") as sub:
                first = await asyncio.wait_for(anext(sub), 20)
                assert (first.offset, first.value) == (marker.offset, b"marker")
                await first.ack()

    run(body())


def test_each_handler_call_has_its_own_context(covet_broker: Broker) -> None:
    # Context variables set by one call are not seen by another, whether
    # the calls finish at once or interleave while waiting.
    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="ctx", session_timeout=3.0)
        wrong: list[tuple[int, int]] = []
        handled = 0

        @app.on_event("ctx", max_in_flight=16)
        async def handle(e: covet.Event) -> None:
            nonlocal handled
            if current.get() != -1:
                wrong.append((e.offset, current.get()))
            current.set(e.offset)
            if e.offset % 2:
                await asyncio.sleep(0)
            if current.get() != e.offset:
                wrong.append((e.offset, current.get()))
            handled += 1

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("ctx")
            await client.publish_batch("ctx", [b"x"] * 500)
            runner = asyncio.create_task(app.run())
            await wait_until("500 records handled", lambda: handled == 500)
            app.stop()
            await asyncio.wait_for(runner, 20)
        assert current.get() == -1
        assert wrong == []

    run(body())


def test_a_busy_subscription_lets_other_tasks_run(covet_broker: Broker) -> None:
    # Records already buffered are taken without waiting; the iteration
    # must still give the event loop a turn, or a busy consumer starves
    # every other task of the process.
    n = 20_000

    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("busy")
            await client.publish_batch("busy", [b"r"] * n)
            ticks = 0
            ticks_at_end = -1

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            async with client.subscribe("busy", start="earliest") as sub:
                # Wait until the subscription's buffers hold records, so
                # the loop below mostly takes without waiting.
                first = await asyncio.wait_for(anext(sub), 10)
                assert first.offset == 0
                t = asyncio.create_task(ticker())
                got = 1
                async for _ in sub:
                    got += 1
                    if got == n:
                        break
                ticks_at_end = ticks
                t.cancel()
            # Turns all along (one per batch of at most 250 in fact).
            assert ticks_at_end >= n // 1000, ticks_at_end

    run(body())


def test_publishers_wait_for_room_in_a_small_buffer(covet_broker: Broker) -> None:
    # 200 concurrent 64 KiB publishes through a 256 KiB buffer: most must
    # wait for room (the producer's window), none may fail, and all land.
    value = b"v" * (64 << 10)

    async def body() -> None:
        async with covet.connect(covet_broker.address, buffer_bytes=256 << 10) as client:
            await client.create_topic("room")
            results = await asyncio.gather(*(client.publish("room", value) for _ in range(200)))
            assert sorted(r.offset for r in results) == list(range(200))
            info = await client.describe_topic("room")
            assert info.partitions[0].high_watermark == 200
            stats = client.producer_stats()
            # With room for 4 records at a time, batches stay small.
            assert stats.records == 200
            assert stats.records / stats.batches <= 4, stats

    run(body())


def test_bad_connect_options_are_refused() -> None:
    def refused(linger: float = 0.0, buffer_bytes: int = 1 << 20) -> bool:
        try:
            covet.connect("127.0.0.1:1", linger=linger, buffer_bytes=buffer_bytes)
        except covet.InvalidArgument as e:
            assert e.reason is None
            return True
        return False

    assert refused(buffer_bytes=0)
    assert refused(linger=-1.0)
    assert refused(linger=61.0)
    assert not refused(linger=0.005)


def test_plain_def_handlers_run_max_in_flight_at_once(covet_broker: Broker) -> None:
    # A plain `def` handler runs in threads: max_in_flight of them at
    # once, as for async handlers, not however many threads a shared pool
    # happens to have. 12 calls wait for each other at a barrier, which
    # breaks (and the calls fail) unless all 12 run together.
    width = 12

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="threads", session_timeout=3.0)
        barrier = threading.Barrier(width, timeout=10)
        passed: list[int] = []
        failed: list[int] = []

        @app.on_event("threads", max_in_flight=width, retry=covet.Retry(max_deliveries=1))
        def handle(e: covet.Event) -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                failed.append(e.offset)
                raise
            passed.append(e.offset)

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("threads")
            await client.publish_batch("threads", [b"t"] * width)
            runner = asyncio.create_task(app.run())
            await wait_until("every call returned", lambda: len(passed) + len(failed) == width, 30)
            app.stop()
            await asyncio.wait_for(runner, 20)
        assert failed == []
        assert sorted(passed) == list(range(width))

    run(body())


def test_per_key_order_holds_while_keys_run_in_parallel(covet_broker: Broker) -> None:
    # Records of one key are handled one at a time, in offset order, even
    # by handlers that wait; different keys are handled at the same time.
    keys = [f"k{i}".encode() for i in range(8)]
    per_key = 40

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="keys", session_timeout=3.0)
        order: dict[bytes, list[int]] = {k: [] for k in keys}
        busy: set[bytes] = set()
        overlap: list[bytes] = []
        most = 0

        @app.on_event("keys", max_in_flight=16)
        async def handle(e: covet.Event) -> None:
            nonlocal most
            assert e.key is not None
            if e.key in busy:
                overlap.append(e.key)
            busy.add(e.key)
            most = max(most, len(busy))
            for _ in range(e.offset % 3 + 1):
                await asyncio.sleep(0)
            order[e.key].append(int(e.value))
            busy.discard(e.key)

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("keys")
            for i in range(per_key):
                await asyncio.gather(
                    *(client.publish("keys", str(i).encode(), key=k) for k in keys)
                )
            runner = asyncio.create_task(app.run())
            await wait_until(
                "every record handled", lambda: sum(map(len, order.values())) == 8 * per_key
            )
            app.stop()
            await asyncio.wait_for(runner, 20)
        assert overlap == []
        assert all(order[k] == list(range(per_key)) for k in keys), order
        assert most > 1, "different keys never ran at the same time"

    run(body())


def test_the_traceparent_header_is_on_the_event(covet_broker: Broker) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="trace", session_timeout=3.0)
        seen: list[str | None] = []

        @app.on_event("trace")
        async def handle(e: covet.Event) -> None:
            seen.append(e.traceparent)

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("trace")
            await client.publish("trace", b"a", headers={"traceparent": tp})
            await client.publish("trace", b"b")
            runner = asyncio.create_task(app.run())
            await wait_until("both handled", lambda: len(seen) == 2)
            app.stop()
            await asyncio.wait_for(runner, 20)
        assert seen == [tp, None]

    run(body())


def eventfds() -> int:
    """Eventfds this process holds (each client has one)."""
    fds = os.listdir("/proc/self/fd")
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


def test_clients_that_are_gone_leave_no_eventfd_behind(covet_broker: Broker) -> None:
    # Each client watches an eventfd of its own; a client that is closed
    # and dropped must give it back, or a service that connects per
    # request runs out of descriptors.
    async def body() -> None:
        before = eventfds()
        for i in range(30):
            async with covet.connect(covet_broker.address) as client:
                if i == 0:
                    await client.create_topic("fds")
                await client.publish("fds", b"x")
                async with client.subscribe("fds", start="earliest") as sub:
                    await asyncio.wait_for(anext(sub), 10)
            del client, sub
        gc.collect()
        await wait_until("the eventfds were closed", lambda: eventfds() <= before + 1)

    run(body())


def test_polling_with_a_timeout_loses_nothing(covet_broker: Broker) -> None:
    # A consumer that polls with a short timeout cancels a wait per poll;
    # records published between polls still come, once each, in order.
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("poll")
            got: list[bytes] = []
            async with client.subscribe("poll", start="earliest") as sub:
                for i in range(300):
                    if i % 10 == 5:
                        await client.publish("poll", str(i).encode())
                    try:
                        got.append((await asyncio.wait_for(anext(sub), 0.001)).value)
                    except TimeoutError:
                        pass
                while len(got) < 30:
                    got.append((await asyncio.wait_for(anext(sub), 10)).value)
            assert got == [str(i).encode() for i in range(300) if i % 10 == 5]

    run(body())
