"""Covet's small service framework: decorated handlers run as consumer
group members.

::

    import covet

    app = covet.App(brokers="127.0.0.1:7420", name="billing")

    @app.on_event("orders.created", group="billing", max_in_flight=32)
    async def bill(order: dict) -> None:
        ...

    asyncio.run(app.run())      # or: python -m covet run service:app

Each handler is a member of its consumer group. At most ``max_in_flight``
of its calls run at once, and that is also the credit the broker sees per
partition: a slow handler holds its records unacknowledged, the broker
stops sending, and nothing piles up in memory. A handler that returns acks
its record; one that raises nacks it, to be delivered again after the
retry policy's backoff, until the group's ``max_deliveries`` sends it to
the dead-letter topic. Group membership, heartbeats, acks, commits and
per-key order are the Rust client's; this module only calls handlers.

The argument a handler gets follows its annotation: :class:`Event` (the
record with its metadata), ``bytes``, ``str``, ``dict`` or ``list``
(JSON), or a dataclass (JSON object fields); without an annotation it gets
the :class:`Event`. Plain ``def`` handlers run in a thread pool, so they
never block the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import json
import os
import signal
import types
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar, get_type_hints

from . import _covet

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Retry:
    """How a failed handling is retried.

    A record whose handler raised is delivered again after ``backoff``
    seconds times ``multiplier`` to the power of its deliveries so far (at
    most ``max_backoff``); after ``max_deliveries`` deliveries the broker
    writes it to the dead-letter topic (``<topic>.dlq``) instead.
    """

    max_deliveries: int = 5
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 60.0

    def delay(self, deliveries: int) -> float:
        """Seconds before the next delivery of a record delivered
        ``deliveries`` times."""
        return float(
            min(self.max_backoff, self.backoff * self.multiplier ** max(0, deliveries - 1))
        )


class Event:
    """A record as a handler sees it: payload and metadata."""

    __slots__ = ("_message",)

    def __init__(self, message: _covet.GroupMessage) -> None:
        self._message = message

    @property
    def value(self) -> bytes:
        return self._message.value

    @property
    def key(self) -> bytes | None:
        return self._message.key

    @property
    def headers(self) -> dict[str, bytes]:
        return self._message.headers

    @property
    def topic(self) -> str:
        return self._message.topic

    @property
    def partition(self) -> int:
        return self._message.partition

    @property
    def offset(self) -> int:
        return self._message.offset

    @property
    def timestamp(self) -> datetime:
        return self._message.timestamp

    @property
    def delivery_count(self) -> int:
        return self._message.delivery_count

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` header, if the publisher set one."""
        value = self._message.headers.get("traceparent")
        return None if value is None else value.decode("ascii", "replace")

    def json(self) -> Any:
        return json.loads(self._message.value)

    def __repr__(self) -> str:
        return (
            f"Event(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"delivery_count={self.delivery_count})"
        )


def _decoder(handler: Callable[..., Any]) -> Callable[[Event], Any]:
    """How a record becomes the handler's argument, from its annotation."""
    params = list(inspect.signature(handler).parameters.values())
    if len(params) != 1:
        raise TypeError(f"a handler takes one argument, {handler.__name__} takes {len(params)}")
    try:
        hints = get_type_hints(handler)
    except NameError:
        # A string annotation (`from __future__ import annotations`) naming
        # something only the handler's enclosing function imported.
        hints = {}
    kind = hints.get(params[0].name, params[0].annotation)
    if isinstance(kind, str):
        kind = _by_name(handler, kind)
    if kind is Event or kind is inspect.Parameter.empty:
        return lambda e: e
    if kind is bytes:
        return lambda e: e.value
    if kind is str:
        return lambda e: e.value.decode()
    origin = getattr(kind, "__origin__", kind)
    if origin in (dict, list):
        return lambda e: e.json()
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        cls = kind
        return lambda e: cls(**e.json())
    # A msgspec Struct: msgspec is loaded already if the annotation is one,
    # so it is looked up, never imported (it is not a dependency).
    import sys

    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        decode = msgspec.json.Decoder(kind).decode
        return lambda e: decode(e.value)
    validate = getattr(kind, "model_validate_json", None)  # pydantic, when installed
    if callable(validate):
        return lambda e: validate(e.value)
    raise TypeError(
        f"{handler.__name__}: cannot decode records into {kind!r} (use covet.Event, bytes, "
        "str, dict, list, a dataclass, a pydantic model or a msgspec Struct)"
    )


def _by_name(handler: Callable[..., Any], name: str) -> Any:
    """The type an unresolvable string annotation names, among those a
    handler can take without importing anything."""
    bare = name.replace(" ", "")
    if bare == "Event" or bare.endswith(".Event"):
        return Event
    simple = {"bytes": bytes, "str": str}
    if bare in simple:
        return simple[bare]
    if bare.startswith(("dict", "list")):
        return dict
    raise TypeError(
        f"{handler.__name__}: cannot resolve the annotation {name!r}; "
        "import what it names at module level"
    )


@dataclasses.dataclass
class _Handler:
    topic: str
    group: str
    max_in_flight: int
    retry: Retry
    call: Callable[[Any], Coroutine[Any, Any, None]]
    decode: Callable[[Event], Any]
    name: str
    # Threads for a plain `def` handler while the app runs: max_in_flight
    # of them, so that many calls run at once (a shared pool has a few).
    threads: ThreadPoolExecutor | None = None

    def in_thread(
        self, handler: Callable[[Any], Any]
    ) -> Callable[[Any], Coroutine[Any, Any, None]]:
        """An async handler running ``handler`` on the handler's threads,
        in a copy of the caller's context (as ``asyncio.to_thread``)."""

        async def call(arg: Any) -> None:
            if self.threads is None:
                self.threads = ThreadPoolExecutor(
                    max_workers=self.max_in_flight, thread_name_prefix=f"covet-{self.name}"
                )
            ctx = contextvars.copy_context()
            await asyncio.get_running_loop().run_in_executor(
                self.threads, functools.partial(ctx.run, handler, arg)
            )

        return call


class App:
    """A set of handlers, run as consumer group members by :meth:`run`."""

    def __init__(
        self,
        brokers: str | None = None,
        name: str = "covet-app",
        *,
        session_timeout: float = 10.0,
        ack_timeout: float = 30.0,
    ) -> None:
        self._brokers = brokers
        self.name = name
        self.session_timeout = session_timeout
        self.ack_timeout = ack_timeout
        self._handlers: list[_Handler] = []
        self._client: Any = None
        self._stopping: asyncio.Event | None = None
        self._members: list[_Member] = []

    @property
    def brokers(self) -> str:
        """The seed list the app connects to: as given, else
        ``$COVET_BROKER`` when the app starts (so a test can point a
        module-level service at its broker), else ``127.0.0.1:7420``."""
        return self._brokers or os.environ.get("COVET_BROKER") or _covet.DEFAULT_BROKER

    @brokers.setter
    def brokers(self, value: str) -> None:
        self._brokers = value

    def on_event(
        self,
        topic: str,
        group: str | None = None,
        *,
        max_in_flight: int = 32,
        retry: Retry | None = None,
    ) -> Callable[[F], F]:
        """Registers a handler for ``topic``'s records, as a member of
        ``group`` (default: the app's name)."""

        def register(handler: F) -> F:
            decode = _decoder(handler)
            h = _Handler(
                topic=topic,
                group=group or self.name,
                max_in_flight=max_in_flight,
                retry=retry or Retry(),
                call=handler,
                decode=decode,
                name=getattr(handler, "__qualname__", repr(handler)),
            )
            if not inspect.iscoroutinefunction(handler):
                h.call = h.in_thread(handler)
            self._handlers.append(h)
            return handler

        return register

    async def publish(
        self,
        topic: str,
        value: bytes | bytearray | memoryview | str,
        key: bytes | bytearray | memoryview | str | None = None,
        headers: dict[str, bytes | str] | None = None,
    ) -> Any:
        """Publishes through the app's connection (opened on first use)."""
        client = await self._connection()
        return await client.publish(topic, value, key, headers)

    async def _connection(self) -> Any:
        if self._client is None:
            from . import connect

            self._client = await connect(self.brokers)
        return self._client

    def stop(self) -> None:
        """Asks :meth:`run` to stop: no new records are taken, handlers in
        flight finish, what they acked is committed, members leave."""
        if self._stopping is not None:
            self._stopping.set()
        for member in self._members:
            member.stop()

    async def run(self) -> None:
        """Runs every handler until :meth:`stop`, SIGINT or SIGTERM."""
        if not self._handlers:
            raise RuntimeError("the app has no handlers: decorate some with @app.on_event")
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        client = await self._connection()
        try:
            async with asyncio.TaskGroup() as tasks:
                for h in self._handlers:
                    tasks.create_task(self._serve(client, h, self._stopping))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
            await client.close()
            self._client = None

    async def _serve(self, client: Any, h: _Handler, stopping: asyncio.Event) -> None:
        sub = client.subscribe(
            h.topic,
            group=h.group,
            max_in_flight=h.max_in_flight,
            session_timeout=self.session_timeout,
            ack_timeout=self.ack_timeout,
            max_deliveries=h.retry.max_deliveries,
        )
        try:
            async with sub:
                assert sub._native is not None  # opened by `async with`
                member = _Member(h, sub._native, stopping)
                self._members.append(member)
                try:
                    await member.run()
                finally:
                    self._members.remove(member)
        finally:
            if h.threads is not None:
                # Every call has returned (the member drained them).
                h.threads.shutdown(wait=False)
                h.threads = None


class _Member:
    """One handler's consumer group member: takes records as handler slots
    free up and runs the handler on each.

    A handler call starts at once, on the dispatching task, and runs as far
    as it can without waiting: one that finishes without waiting (the
    common case for a quick handler) costs no task, and one that waits
    continues in a task of its own (see :func:`_resume`). Either way the
    record is acked when the handler returns and nacked when it raises.
    """

    def __init__(
        self, h: _Handler, native: _covet.NativeGroupSubscription, stopping: asyncio.Event
    ) -> None:
        self.h = h
        self.native = native
        self.stopping = stopping
        self.free = h.max_in_flight
        # Set when a slot frees while the member waits for one.
        self.room: asyncio.Future[None] | None = None
        self.running: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """Takes no more records; handlers in flight finish."""
        self.native.stop_reading()
        self._wake()

    def _wake(self) -> None:
        if self.room is not None and not self.room.done():
            self.room.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        native = self.native
        try:
            while not self.stopping.is_set():
                if self.free == 0:
                    # Every slot is busy: no record is taken, the broker's
                    # credit runs out, and it stops sending.
                    self.room = loop.create_future()
                    await self.room
                    self.room = None
                    continue
                batch = native.take(self.free)
                if batch:
                    self._start_all(loop, batch)
                    # Let the event loop run between batches: handlers that
                    # wait, signals, other members.
                    await asyncio.sleep(0)
                    continue
                batch = await native.next_batch(self.free)
                if not batch:
                    break  # stopped, or the member left
                self._start_all(loop, batch)
        finally:
            # Drain: handlers in flight finish and settle their records
            # before the member leaves (which commits).
            if self.running:
                await asyncio.gather(*self.running, return_exceptions=True)

    def _start_all(self, loop: asyncio.AbstractEventLoop, batch: list[_covet.GroupMessage]) -> None:
        h = self.h
        for message in batch:
            self.free -= 1
            ctx = contextvars.copy_context()
            try:
                coro = h.call(h.decode(Event(message)))
                step = ctx.run(coro.send, None)
            except StopIteration:
                message.ack()
                self._settled()
            except Exception:
                message.nack(h.retry.delay(message.delivery_count))
                self._settled()
            else:
                task = loop.create_task(self._finish(message, coro, step), context=ctx)
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _finish(
        self, message: _covet.GroupMessage, coro: Coroutine[Any, Any, None], step: Any
    ) -> None:
        try:
            await _resume(coro, step)
        except Exception:
            message.nack(self.h.retry.delay(message.delivery_count))
        else:
            message.ack()
        finally:
            self._settled()

    def _settled(self) -> None:
        self.free += 1
        self._wake()


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], step: Any) -> Generator[Any, Any, None]:
    """Continues a coroutine that was started outside any task and is
    waiting on ``step`` (what its last step yielded): yields ``step`` to the
    task running this, and passes every answer back in, as the task would
    have done had it run the coroutine from the start."""
    while True:
        try:
            answer = yield step
        except BaseException as exc:  # handed to the coroutine, as a task would
            try:
                step = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                step = coro.send(answer)
            except StopIteration:
                return


_default: App | None = None


def default_app() -> App:
    """The app module-level :func:`on_event` registers on, configured from
    ``COVET_BROKER``."""
    global _default
    if _default is None:
        _default = App()
    return _default


def on_event(
    topic: str,
    group: str | None = None,
    *,
    max_in_flight: int = 32,
    retry: Retry | None = None,
) -> Callable[[F], F]:
    """:meth:`App.on_event` on the default app."""
    return default_app().on_event(topic, group, max_in_flight=max_in_flight, retry=retry)


def run(app: App | None = None) -> None:
    """Runs ``app`` (default: the default app) until SIGINT or SIGTERM."""
    asyncio.run((app or default_app()).run())
