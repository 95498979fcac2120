"""covet.testing itself: a broker killed and restarted at once comes back,
every time, on the same address and data."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import covet
from conftest import run
from covet.testing import Broker, covet_binary

RESTARTS = 30


def test_a_broker_killed_and_restarted_at_once_comes_back_every_time() -> None:
    broker = Broker().start()
    try:
        address = broker.address

        async def publish(value: bytes) -> int:
            async with covet.connect(broker.address) as client:
                if value == b"0":
                    await client.create_topic("t")
                return (await client.publish("t", value)).offset

        assert run(publish(b"0")) == 0
        failed: list[BaseException] = []

        def restart() -> None:
            try:
                broker.restart()
            except BaseException as e:
                failed.append(e)

        for i in range(RESTARTS):
            # No pause between the kill and the restart: the old process's
            # output reader may still be finishing while the new one starts.
            broker.kill()
            waiter = threading.Thread(target=restart, daemon=True)
            waiter.start()
            waiter.join(15)
            assert not waiter.is_alive(), f"restart {i} did not return within 15 s"
            assert not failed, f"restart {i}: {failed[0]!r}"
            assert broker.address == address
        # Same data: the record from before the restarts is still there.
        assert run(publish(b"1")) == 1
    finally:
        broker.stop()  # also ends a hung restart's wait: its process is killed


def test_the_binary_is_found_where_the_scripts_build_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = covet_binary()
    monkeypatch.delenv("COVET_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no covet binary"):
        covet_binary()
    (tmp_path / "debug").mkdir()
    (tmp_path / "debug" / "covet").symlink_to(real)
    assert covet_binary() == str(tmp_path / "debug" / "covet")
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "covet").symlink_to(real)
    assert covet_binary() == str(tmp_path / "release" / "covet")
    with Broker() as broker:  # and it runs
        assert broker.address.startswith("127.0.0.1:")
