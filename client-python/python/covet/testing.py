"""A real single-node Covet broker for tests, in a temporary directory.

::

    from covet.testing import Broker

    with Broker() as broker:            # or: async with Broker() as broker:
        async with covet.connect(broker.address) as client: ...

It runs the ``covet`` binary: ``$COVET_BIN`` if set, else ``covet`` on
``PATH``, else the one the repository's scripts built (see
:func:`covet_binary`). The broker listens on a free loopback port;
``start`` returns once the broker printed its ``ready`` line (or raises
after ``ready_timeout``).
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Self

READY_TIMEOUT = 30.0


def covet_binary() -> str:
    """The ``covet`` binary tests run: ``$COVET_BIN``, else ``covet`` on
    PATH, else the one the repository's scripts build (``scripts/broker``
    a release build, ``scripts/test`` a debug one) in ``$CARGO_TARGET_DIR``
    or ``~/.cache/covet/target``."""
    path = os.environ.get("COVET_BIN") or shutil.which("covet")
    if path and os.path.exists(path):
        return path
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/covet/target")
    for profile in ("release", "debug"):
        built = os.path.join(target, profile, "covet")
        if os.access(built, os.X_OK):
            return built
    raise FileNotFoundError(
        "no covet binary: set COVET_BIN, put `covet` on PATH, or build it "
        "(bash scripts/broker, or cargo build --bin covet)"
    )


class Broker:
    """One ``covet broker`` process on ``127.0.0.1:<free port>``."""

    def __init__(
        self,
        *extra_args: str,
        binary: str | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self._binary = binary
        self._extra = list(extra_args)
        self._ready_timeout = ready_timeout
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.address = ""

    @property
    def data_dir(self) -> str:
        if self._dir is None:
            raise RuntimeError("broker not started")
        return self._dir.name

    def start(self) -> Self:
        self._dir = tempfile.TemporaryDirectory(prefix="covet-test-")
        return self._spawn("127.0.0.1:0")

    def kill(self) -> None:
        """Kills the broker process (SIGKILL) as a crash would, keeping its
        data directory and address for :meth:`restart`."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> Self:
        """Starts the broker again on the same data directory and address
        (after :meth:`kill`), so connected clients find it again."""
        if self._dir is None or not self.address:
            raise RuntimeError("broker not started")
        self.kill()
        return self._spawn(self.address)

    def _spawn(self, listen: str) -> Self:
        binary = self._binary or covet_binary()
        assert self._dir is not None
        self._lines = queue.Queue()
        self._process = subprocess.Popen(
            [
                binary,
                "broker",
                "--data-dir",
                self._dir.name,
                "--listen",
                listen,
                "--log-level",
                "warn",
                *self._extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        # A thread keeps reading stdout so the broker never blocks on a full
        # pipe; the ready line is awaited with a deadline, never a sleep.
        # The thread gets this process's queue: the previous process's pump
        # (after a kill) may still be running, and its end-of-output marker
        # must not land in this queue (it made `restart` wait on a broker
        # that was up).
        threading.Thread(
            target=self._pump, args=(self._process.stdout, self._lines), daemon=True
        ).start()
        deadline = time.monotonic() + self._ready_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.0))
            except queue.Empty:
                self.stop()
                raise TimeoutError(
                    f"covet broker did not print a ready line within {self._ready_timeout} s"
                ) from None
            if line is None:
                try:
                    code = self._process.wait(timeout=max(left, 1.0))
                except subprocess.TimeoutExpired:
                    code = None
                    self._process.kill()
                self.stop()
                raise RuntimeError(
                    f"covet broker closed its output before ready (exit status {code})"
                )
            if "ready" in line and "listening on " in line:
                self.address = line.split("listening on ", 1)[1].split(",", 1)[0].strip()
                return self

    @staticmethod
    def _pump(stdout: IO[str], lines: queue.Queue[str | None]) -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        """Kills the broker (SIGKILL) and removes its data directory."""
        self.kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


__all__ = ["READY_TIMEOUT", "Broker", "covet_binary"]
