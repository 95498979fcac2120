"""The NATS side of scripts/bench-bridge.sh (nats-py): creates streams,
publishes a backlog into one, and waits until one holds a number of
messages. Prints one JSON line per action; asserts nothing.

    python bridge_nats.py URL stream NAME SUBJECT
    python bridge_nats.py URL publish SUBJECT COUNT SIZE
    python bridge_nats.py URL wait NAME COUNT TIMEOUT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def main(url: str, action: str, args: list[str]) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    if action == "stream":
        name, subject = args
        await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
        print(json.dumps({"stream": name, "subject": subject}))
    elif action == "publish":
        subject, count, size = args[0], int(args[1]), int(args[2])
        value = b"x" * size
        start = time.perf_counter()
        window = 2000
        pending: list[asyncio.Future[object]] = []
        for i in range(count):
            pending.append(asyncio.ensure_future(js.publish(subject, value, timeout=120)))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
            if i % 10_000 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*pending)
        seconds = time.perf_counter() - start
        print(json.dumps({"published": count, "seconds": round(seconds, 3), "records_per_sec": count / seconds}))
    elif action == "wait":
        name, count, timeout = args[0], int(args[1]), float(args[2])
        deadline = time.monotonic() + timeout
        while True:
            info = await js.stream_info(name)
            if info.state.messages >= count:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"stream {name} holds {info.state.messages} of {count}")
            await asyncio.sleep(0.02)
        print(json.dumps({"stream": name, "messages": info.state.messages}))
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
