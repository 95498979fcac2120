"""The `App` / `on_event` framework against a real broker: decoding by
annotation, retries then dead letters, handler concurrency bounded by
max_in_flight, stop draining and committing, `python -m covet run` stopped
by SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import covet
from conftest import eventually, run, wait_until
from covet.testing import Broker


@dataclasses.dataclass
class Order:
    id: int
    amount: float


async def next_for_group(client: covet.Client, topic: str, group: str) -> int:
    """The offset a new member of ``group`` gets first."""
    async with client.subscribe(topic, group=group) as sub:
        msg = await anext(sub)
        await msg.ack()
        return msg.offset


def test_handlers_get_decoded_payloads_and_stop_commits(covet_broker: Broker) -> None:
    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="svc", session_timeout=3.0)
        dicts: list[dict[str, int]] = []
        orders: list[Order] = []
        texts: list[str] = []

        @app.on_event("a", group="g1")
        async def on_dict(d: dict[str, int]) -> None:
            dicts.append(d)

        @app.on_event("a", group="g2")
        async def on_order(o: Order) -> None:
            orders.append(o)

        @app.on_event("b")
        def on_text(s: str) -> None:  # a plain def: run in a thread
            texts.append(s)

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("a", partitions=2)
            await client.create_topic("b")
            runner = asyncio.create_task(app.run())
            payloads = [json.dumps({"id": i, "amount": i / 2}) for i in range(50)]
            await client.publish_batch("a", payloads)
            await client.publish_batch("b", [f"t{i}" for i in range(20)])
            await wait_until(
                "every record handled",
                lambda: len(dicts) == 50 and len(orders) == 50 and len(texts) == 20,
            )
            app.stop()
            await asyncio.wait_for(runner, 20)
            assert sorted(d["id"] for d in dicts) == list(range(50))
            assert sorted(o.id for o in orders) == list(range(50))
            assert orders[0].amount == orders[0].id / 2
            assert sorted(texts) == sorted(f"t{i}" for i in range(20))
            # What the app acked was committed when it stopped.
            await client.publish("b", "after")
            assert await next_for_group(client, "b", "svc") == 20

    run(body())


def test_a_failing_handler_is_retried_then_dead_lettered(covet_broker: Broker) -> None:
    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="svc", session_timeout=3.0)
        attempts: dict[bytes, int] = {}

        @app.on_event("jobs", retry=covet.Retry(max_deliveries=3, backoff=0.05))
        async def handle(e: covet.Event) -> None:
            attempts[e.value] = attempts.get(e.value, 0) + 1
            assert e.delivery_count == attempts[e.value]
            if e.value == b"bad":
                raise ValueError("cannot handle this one")

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("jobs")
            runner = asyncio.create_task(app.run())
            await client.publish_batch("jobs", [b"ok1", b"bad", b"ok2"])

            # The dead-letter topic is made by the first dead letter.
            async def dead_lettered() -> bool:
                try:
                    info = await client.describe_topic("jobs.dlq")
                except covet.UnknownTopic:
                    return False
                return info.partitions[0].high_watermark == 1

            await eventually("the record went to the dead-letter topic", dead_lettered)
            async with client.subscribe("jobs.dlq", start="earliest") as dlq:
                dead = await asyncio.wait_for(anext(dlq), 20)
            assert dead.value == b"bad"
            assert dead.headers["covet-dlq-deliveries"] == b"3"
            assert attempts == {b"ok1": 1, b"bad": 3, b"ok2": 1}
            app.stop()
            await asyncio.wait_for(runner, 20)

    run(body())


def test_handler_concurrency_is_bounded_by_max_in_flight(covet_broker: Broker) -> None:
    n = 2_000

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="slow", session_timeout=3.0)
        now = 0
        peak = 0
        done = 0

        @app.on_event("work", max_in_flight=4)
        async def slow(e: covet.Event) -> None:
            nonlocal now, peak, done
            now += 1
            peak = max(peak, now)
            await asyncio.sleep(0.001)  # the handler's work (not a wait)
            now -= 1
            done += 1

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("work", partitions=2)
            runner = asyncio.create_task(app.run())
            await client.publish_batch("work", [b"x"] * n)
            await wait_until("every record handled", lambda: done == n, within=60)
            app.stop()
            await asyncio.wait_for(runner, 20)
        assert 1 <= peak <= 4, f"{peak} handlers ran at once"

    run(body(), timeout=90)


def test_python_m_covet_run_stops_on_sigterm_and_commits(
    covet_broker: Broker, tmp_path: Path
) -> None:
    out = tmp_path / "handled.txt"
    (tmp_path / "service.py").write_text(
        textwrap.dedent(
            f"""
            import covet

            app = covet.App(name="service", session_timeout=3.0)

            @app.on_event("events")
            def handle(text: str) -> None:
                with open({str(out)!r}, "a") as f:
                    f.write(text + "\\n")
            """
        )
    )
    env = dict(os.environ, COVET_BROKER=covet_broker.address)

    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("events")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "covet", "run", "service:app", cwd=tmp_path, env=env
            )
            try:
                await client.publish_batch("events", [f"e{i}" for i in range(30)])
                await wait_until(
                    "the service handled every event",
                    lambda: out.exists() and len(out.read_text().splitlines()) == 30,
                )
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await client.publish("events", "later")
            assert await next_for_group(client, "events", "service") == 30

    run(body())


def test_a_broker_killed_and_restarted_under_a_running_app_loses_nothing() -> None:
    async def body() -> None:
        async with Broker() as broker:
            app = covet.App(brokers=broker.address, name="svc", session_timeout=3.0)
            handled: set[str] = set()

            @app.on_event("events", max_in_flight=8)
            async def handle(text: str) -> None:
                handled.add(text)

            async with covet.connect(broker.address) as client:
                await client.create_topic("events", partitions=2)
                runner = asyncio.create_task(app.run())
                first = [f"before-{i}" for i in range(100)]
                await client.publish_batch("events", first)
                await wait_until("the first records handled", lambda: handled >= set(first))
                await asyncio.to_thread(broker.kill)
                try:
                    await covet.connect(broker.address)
                except covet.ConnectionLost:
                    pass
                else:
                    raise AssertionError("the broker still answered after the kill")
                await asyncio.to_thread(broker.restart)
                later = [f"after-{i}" for i in range(100)]
                await client.publish_batch("events", later)
                await wait_until(
                    "every record handled after the restart",
                    lambda: handled >= set(first) | set(later),
                    within=45,
                )
                app.stop()
                await asyncio.wait_for(runner, 20)

    run(body(), timeout=90)


def rss_mb() -> float:
    """This process's resident set size in MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def test_a_slow_consumer_holds_at_most_max_in_flight_and_memory_stays_flat(
    covet_broker: Broker,
) -> None:
    n = 200_000
    chunk = 10_000

    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="flat", session_timeout=5.0)
        now = peak = done = 0
        rss: dict[str, float] = {}

        @app.on_event("firehose", max_in_flight=4)
        async def handle(e: covet.Event) -> None:
            nonlocal now, peak, done
            now += 1
            peak = max(peak, now)
            await asyncio.sleep(0)  # yields, as a handler doing I/O would
            now -= 1
            done += 1
            if done == n // 4:
                rss["quarter"] = rss_mb()

        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("firehose", partitions=2)
            runner = asyncio.create_task(app.run())
            # Published while the handler runs, in chunks whose results
            # are dropped, so the test's own memory does not grow either.
            for _ in range(n // chunk):
                await client.publish_batch("firehose", [b"x" * 100] * chunk)
            await wait_until("every record handled", lambda: done == n, within=240)
            rss["end"] = rss_mb()
            app.stop()
            await asyncio.wait_for(runner, 20)
        growth = rss["end"] - rss["quarter"]
        print(f"RSS at a quarter {rss['quarter']:.1f} MB, at the end {rss['end']:.1f} MB")
        assert peak <= 4, f"{peak} handlers ran at once"
        assert growth < 30, f"RSS grew {growth:.1f} MB over the last 150,000 records"

    run(body(), timeout=300)


def test_annotations_naming_a_local_import_are_understood() -> None:
    import covet as cv  # only here: `cv` is not a module global

    app = cv.App(brokers="127.0.0.1:1", name="x")

    @app.on_event("t")
    async def raw(e: cv.Event) -> None: ...

    @app.on_event("t", group="g2")
    async def text(s: str) -> None: ...

    try:

        @app.on_event("t", group="g3")
        async def bad(x: cv.Unknown) -> None: ...  # type: ignore[name-defined]

    except TypeError as e:
        assert "cannot resolve" in str(e)
    else:
        raise AssertionError("an unresolvable annotation was accepted")
