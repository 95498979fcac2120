"""The issue's walk-through with the example service (examples/billing.py),
as a new user would do it: run it with ``python -m covet run billing``
(configured by ``COVET_BROKER``), publish to it from another process (the
``covet`` CLI), watch it work through the backlog at most ``max_in_flight``
orders at a time (``covet group describe``), stop it with SIGTERM, and run
its own test (examples/test_billing.py) with pytest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import covet
from conftest import run
from covet.testing import Broker, covet_binary

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_IN_FLIGHT = 4  # what billing.py asks for
ORDERS = 200  # 50 ms each, 4 at a time: about 2.5 s of work


async def cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Runs the ``covet`` CLI; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        covet_binary(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_billing(broker: str, **env: str) -> asyncio.subprocess.Process:
    """``python -m covet run billing`` in examples/, on ``broker``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "covet",
        "run",
        "billing",
        cwd=EXAMPLES,
        env=dict(os.environ, COVET_BROKER=broker, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def describe_group(broker: str) -> list[dict[str, Any]] | None:
    """``covet group describe billing --format json``: one object per
    partition, or None while the group has neither members nor progress."""
    code, out, err = await cli(
        "group", "describe", "billing", "--format", "json", "--broker", broker
    )
    if code != 0:
        assert "no members and no progress" in err, err
        return None
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r for row in rows for r in (row if isinstance(row, list) else [row])]


def test_billing_example_runs_processes_with_backpressure_and_stops_on_sigterm(
    covet_broker: Broker,
) -> None:
    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("orders", partitions=2)
        service = await start_billing(covet_broker.address, PYTHONUNBUFFERED="1")
        lines: list[str] = []
        now = peak = 0

        async def follow() -> None:
            # The service prints a line as each order starts and ends: the
            # number running at once, seen from outside.
            nonlocal now, peak
            assert service.stdout is not None
            async for raw in service.stdout:
                line = raw.decode().strip()
                lines.append(line)
                if line.startswith("billing order"):
                    now += 1
                    peak = max(peak, now)
                elif line.startswith("billed order"):
                    now -= 1

        reader = asyncio.create_task(follow())
        try:
            # Published from another process: the CLI, one order per line.
            orders = "".join(json.dumps({"id": i}) + "\n" for i in range(ORDERS))
            code, _, err = await cli(
                "publish", "orders", "--broker", covet_broker.address, stdin=orders.encode()
            )
            assert code == 0, err

            # The broker's view while the service works through the backlog:
            # lag falls to 0; never more than max_in_flight records of a
            # partition delivered and not yet acknowledged (the credit).
            samples: list[list[dict[str, Any]]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 40
            while True:
                rows = await describe_group(covet_broker.address)
                if rows:
                    samples.append(rows)
                    if (
                        sum(r["lag"] for r in rows) == 0
                        and sum(r["committed"] for r in rows) == ORDERS
                    ):
                        break
                assert loop.time() < deadline, f"lag never fell to 0: {samples[-1:]}"
                await asyncio.sleep(0.05)
            lags = [sum(r["lag"] for r in rows) for rows in samples]
            assert max(lags) > 0, f"no backlog was ever seen: {lags}"
            unacked = [r["delivered_unacked"] for rows in samples for r in rows]
            assert max(unacked) <= MAX_IN_FLIGHT, unacked

            billed = [int(line.split()[-1]) for line in lines if line.startswith("billed order")]
            assert sorted(billed) == list(range(ORDERS)), "each order billed once"
            # Handler concurrency is max_in_flight: reached, never exceeded.
            assert peak == MAX_IN_FLIGHT, f"{peak} orders were billed at once"

            service.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(service.wait(), 20) == 0
            await asyncio.wait_for(reader, 10)
            assert service.stderr is not None
            err_out = (await service.stderr.read()).decode()
            assert "Traceback" not in err_out, err_out
        finally:
            if service.returncode is None:
                service.kill()
                await service.wait()
            reader.cancel()
        # Stopped cleanly: left the group with everything committed.
        rows = await describe_group(covet_broker.address)
        assert rows is not None
        assert sum(r["committed"] for r in rows) == ORDERS and all(r["lag"] == 0 for r in rows)
        assert all(r["member"] is None for r in rows), rows

    run(body())


def test_the_service_exits_0_on_sigterm_every_time(covet_broker: Broker) -> None:
    """Started, given a few orders and stopped, several times over: a clean
    stop is exit code 0 every time, not most of the time."""
    runs = 8

    async def body() -> None:
        async with covet.connect(covet_broker.address) as client:
            await client.create_topic("orders")
            failures: list[str] = []
            for i in range(runs):
                service = await start_billing(covet_broker.address, PYTHONFAULTHANDLER="1")
                try:
                    assert service.stdout is not None and service.stderr is not None
                    await client.publish_batch("orders", [json.dumps({"id": i}) for _ in range(3)])
                    billed = 0
                    while billed < 3:
                        line = await asyncio.wait_for(service.stdout.readline(), 20)
                        assert line, "the service ended early"
                        billed += line.startswith(b"billed order")
                    service.send_signal(signal.SIGTERM)
                    _, err = await asyncio.wait_for(service.communicate(), 20)
                    if service.returncode != 0:
                        failures.append(
                            f"run {i}: exit {service.returncode}: {err.decode()[-500:]}"
                        )
                finally:
                    if service.returncode is None:
                        service.kill()
                        await service.wait()
            assert not failures, f"{len(failures)} of {runs} stops were not clean:\n" + "\n".join(
                failures
            )

    run(body())


def test_the_example_test_passes_with_pytest() -> None:
    async def body() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_billing.py",
            cwd=EXAMPLES,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        text = out.decode()
        assert proc.returncode == 0, text
        assert "1 passed" in text, text

    run(body())
