"""Python client rates, Covet's `covet` package against nats-py on
JetStream, the same loops for both (run by scripts/bench-python.sh, which
starts the brokers). Prints one JSON line per case; asserts nothing.

    python python_bench.py {covet|nats} ADDRESS [--records N] [--label NAME]

Cases (128-byte values, one partition or stream, each on a fresh topic):
  await1     one awaited publish at a time
  tasks1000  1,000 tasks publishing concurrently (each awaits its own)
  batch      the client's batch call (Covet: publish_batch; nats-py has
             none: every publish started, then all acknowledgements awaited)
  dispatch   records already stored, handed to a trivial async handler
             that acknowledges each (Covet: App/on_event, max_in_flight
             1000; nats-py: a durable pull consumer fetching 1,000 at a
             time, explicit ack per message)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

VALUE = b"x" * 128
# nats-py gives up on a JetStream publish after 0.5 s by default; with
# 100,000 outstanding against `sync_interval: always` most would, so its
# publishes get as long as they need, as Covet's do.


async def covet_cases(address: str, n: int) -> list[dict[str, Any]]:
    import covet

    out = []
    async with covet.connect(address) as client:
        for case in ("await1", "tasks1000", "batch", "dispatch"):
            topic = f"py-{case}-{time.monotonic_ns()}"
            await client.create_topic(topic)
            count = n // 10 if case == "await1" else n
            start = time.perf_counter()
            if case == "await1":
                for _ in range(count):
                    await client.publish(topic, VALUE)
            elif case == "tasks1000":
                per = count // 1000

                async def worker(topic: str = topic, per: int = per) -> None:
                    for _ in range(per):
                        await client.publish(topic, VALUE)

                await asyncio.gather(*(worker() for _ in range(1000)))
                count = per * 1000
            elif case == "batch":
                await client.publish_batch(topic, [VALUE] * count)
            else:
                await client.publish_batch(topic, [VALUE] * count)
                app = covet.App(brokers=address, name=f"bench-{topic}")
                done = asyncio.Event()
                seen = 0

                @app.on_event(topic, max_in_flight=1000)
                async def handle(e: covet.Event) -> None:
                    nonlocal seen
                    seen += 1
                    if seen == count:
                        done.set()

                start = time.perf_counter()
                runner = asyncio.create_task(app.run())
                await asyncio.wait_for(done.wait(), 300)
                elapsed = time.perf_counter() - start
                app.stop()
                await runner
                out.append(line("covet", case, count, elapsed))
                continue
            out.append(line("covet", case, count, time.perf_counter() - start))
    return out


async def nats_cases(address: str, n: int, label: str) -> list[dict[str, Any]]:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    out = []
    nc = await nats.connect(f"nats://{address}")
    js = nc.jetstream()
    for case in ("await1", "tasks1000", "batch", "dispatch"):
        name = f"py-{case}-{time.monotonic_ns()}"
        subject = f"{name}.s"
        await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
        count = n // 10 if case == "await1" else n
        start = time.perf_counter()
        if case == "await1":
            for _ in range(count):
                await js.publish(subject, VALUE, timeout=120)
        elif case == "tasks1000":
            per = count // 1000

            async def worker(subject: str = subject, per: int = per) -> None:
                for _ in range(per):
                    await js.publish(subject, VALUE, timeout=120)

            await asyncio.gather(*(worker() for _ in range(1000)))
            count = per * 1000
        elif case == "batch":
            await asyncio.gather(*(js.publish(subject, VALUE, timeout=120) for _ in range(count)))
        else:
            await asyncio.gather(*(js.publish(subject, VALUE, timeout=120) for _ in range(count)))
            sub = await js.pull_subscribe(
                subject,
                durable=f"d{name}".replace("-", "_"),
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000),
            )
            seen = 0

            async def handle(msg: Any) -> None:
                nonlocal seen
                seen += 1

            start = time.perf_counter()
            while seen < count:
                for msg in await sub.fetch(1000, timeout=30):
                    await handle(msg)
                    await msg.ack()
        out.append(line(label, case, count, time.perf_counter() - start))
    await nc.close()
    return out


def line(system: str, case: str, records: int, secs: float) -> dict[str, Any]:
    return {
        "system": system,
        "case": case,
        "records": records,
        "seconds": round(secs, 3),
        "records_per_sec": round(records / secs),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("system", choices=["covet", "nats"])
    p.add_argument("address")
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--label", default="nats-py", help="the system's name in the output (nats)")
    a = p.parse_args()
    if a.system == "covet":
        results = asyncio.run(covet_cases(a.address, a.records))
    else:
        results = asyncio.run(nats_cases(a.address, a.records, a.label))
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
