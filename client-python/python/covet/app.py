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
import dataclasses
import inspect
import json
import os
import signal
from collections.abc import Awaitable, Callable
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
    call: Callable[[Any], Awaitable[None]]
    decode: Callable[[Event], Any]
    name: str


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
        self.brokers = brokers or os.environ.get("COVET_BROKER") or _covet.DEFAULT_BROKER
        self.name = name
        self.session_timeout = session_timeout
        self.ack_timeout = ack_timeout
        self._handlers: list[_Handler] = []
        self._client: Any = None
        self._stopping: asyncio.Event | None = None

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
            if inspect.iscoroutinefunction(handler):
                call: Callable[[Any], Awaitable[None]] = handler
            else:

                async def call(arg: Any) -> None:
                    await asyncio.to_thread(handler, arg)

            self._handlers.append(
                _Handler(
                    topic=topic,
                    group=group or self.name,
                    max_in_flight=max_in_flight,
                    retry=retry or Retry(),
                    call=call,
                    decode=decode,
                    name=getattr(handler, "__qualname__", repr(handler)),
                )
            )
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
        slots = asyncio.Semaphore(h.max_in_flight)
        running: set[asyncio.Task[None]] = set()
        async with sub:
            stop = asyncio.ensure_future(stopping.wait())
            try:
                while True:
                    # A slot first: with every slot busy, no record is
                    # taken, the broker's credit runs out, and it stops.
                    await slots.acquire()
                    nxt = asyncio.ensure_future(sub.__anext__())
                    done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        # Stopping: the pending call keeps its records for
                        # the next owner (the subscription is shielded).
                        nxt.cancel()
                        slots.release()
                        break
                    try:
                        message = nxt.result()
                    except StopAsyncIteration:
                        slots.release()
                        break
                    task = asyncio.create_task(self._handle(h, message, slots))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                stop.cancel()
                # Drain: handlers in flight finish and settle their records
                # before the member leaves (which commits).
                if running:
                    await asyncio.gather(*running, return_exceptions=True)

    async def _handle(
        self, h: _Handler, message: _covet.GroupMessage, slots: asyncio.Semaphore
    ) -> None:
        try:
            event = Event(message)
            try:
                await h.call(h.decode(event))
            except Exception:
                await message.nack(h.retry.delay(message.delivery_count))
            else:
                await message.ack()
        finally:
            slots.release()


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
