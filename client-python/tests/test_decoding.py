"""Handlers annotated with a pydantic model or a msgspec Struct get the
record decoded into it; a payload that does not validate is retried, then
dead-lettered, without the handler ever seeing it. Neither library is a
dependency: an app that does not name them does not import them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import msgspec
import pydantic

import covet
from conftest import eventually, run
from covet.testing import Broker


class PydanticOrder(pydantic.BaseModel):
    id: int
    amount: float


class MsgspecOrder(msgspec.Struct):
    id: int
    amount: float


async def dead_letters(client: covet.Client, topic: str, n: int) -> list[covet.Message]:
    """The first ``n`` records of ``topic``'s dead-letter topic, once there."""

    async def there() -> bool:
        try:
            info = await client.describe_topic(f"{topic}.dlq")
        except covet.UnknownTopic:
            return False
        return sum(p.high_watermark for p in info.partitions) >= n

    await eventually(f"{n} dead letters of {topic}", there)
    out: list[covet.Message] = []
    async with client.subscribe(f"{topic}.dlq", start="earliest") as sub:
        async for msg in sub:
            out.append(msg)
            if len(out) == n:
                break
    return out


def test_pydantic_and_msgspec_models_decoded_and_invalid_payloads_dead_lettered(
    covet_broker: Broker,
) -> None:
    async def body() -> None:
        app = covet.App(brokers=covet_broker.address, name="svc", session_timeout=3.0)
        retry = covet.Retry(max_deliveries=2, backoff=0.05)
        by_pydantic: list[PydanticOrder] = []
        by_msgspec: list[MsgspecOrder] = []

        @app.on_event("p", retry=retry)
        async def on_pydantic(order: PydanticOrder) -> None:
            by_pydantic.append(order)

        @app.on_event("m", retry=retry)
        def on_msgspec(order: MsgspecOrder) -> None:  # a plain def, in a thread
            by_msgspec.append(order)

        good = [f'{{"id": {i}, "amount": {i}.5}}' for i in range(10)]
        # Valid JSON with a wrong type, a missing field, and no JSON at all.
        bad = ['{"id": "seven", "amount": 1.0}', '{"id": 3}', "not json"]
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("p")
            await client.create_topic("m")
            runner = asyncio.create_task(app.run())
            for topic in ("p", "m"):
                await client.publish_batch(topic, good[:5] + bad + good[5:])
            dead_p = await dead_letters(client, "p", len(bad))
            dead_m = await dead_letters(client, "m", len(bad))

            async def all_good() -> bool:
                return len(by_pydantic) == len(good) and len(by_msgspec) == len(good)

            await eventually("every valid record handled", all_good)
            app.stop()
            await asyncio.wait_for(runner, 20)

        assert all(type(o) is PydanticOrder for o in by_pydantic)
        assert all(type(o) is MsgspecOrder for o in by_msgspec)
        assert sorted((o.id, o.amount) for o in by_pydantic) == [(i, i + 0.5) for i in range(10)]
        assert sorted((o.id, o.amount) for o in by_msgspec) == [(i, i + 0.5) for i in range(10)]
        for dead in (dead_p, dead_m):
            assert sorted(m.value for m in dead) == sorted(b.encode() for b in bad)
            assert all(m.headers["covet-dlq-deliveries"] == b"2" for m in dead)

    run(body())


def test_decoding_needs_neither_pydantic_nor_msgspec() -> None:
    # In a fresh interpreter: this one imported both above.
    script = textwrap.dedent(
        """
        import dataclasses, sys
        import covet

        @dataclasses.dataclass
        class Order:
            id: int

        app = covet.App(brokers="127.0.0.1:1", name="x")

        @app.on_event("t")
        async def a(order: Order) -> None: ...

        @app.on_event("t", group="g2")
        async def b(d: dict[str, int]) -> None: ...

        @app.on_event("t", group="g3")
        async def c(e: covet.Event) -> None: ...

        loaded = sorted({"msgspec", "pydantic"} & set(sys.modules))
        assert not loaded, f"imported {loaded}"
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
