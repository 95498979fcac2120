"""Covet for Python: an asyncio client over the native Rust client.

::

    import covet

    async with covet.connect("127.0.0.1:7420") as client:
        await client.create_topic("orders", partitions=3)
        result = await client.publish("orders", b"hello", key="customer-42")
        async with client.subscribe("orders", start="earliest") as sub:
            async for msg in sub:
                print(msg.offset, msg.value)

Everything that talks to the broker (connecting, batching, retries through
leader changes, credit-paced consumption) is `covet-client`'s, in Rust,
running on its own tokio threads without the GIL; this module only adds
``await``, ``async with`` and ``async for`` around it.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Generator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar, overload

from . import _covet
from ._covet import (
    DEFAULT_BROKER,
    GroupMessage,
    Message,
    PartitionInfo,
    ProducerStats,
    PublishResult,
    TopicInfo,
)
from .errors import (
    BatchTooLarge,
    Closed,
    ConnectionLost,
    CovetError,
    InvalidArgument,
    NotLeader,
    OffsetOutOfRange,
    Timeout,
    TopicExists,
    Unavailable,
    UnknownPartition,
    UnknownTopic,
)

M = TypeVar("M")

Payload = bytes | bytearray | memoryview | str
"""What ``value``, ``key`` and header values take; ``str`` is sent as UTF-8."""

Start = Literal["earliest", "latest"] | int | datetime
"""Where a subscription starts: the first record held, only new records, an
offset, or the first record written at or after a time."""


class Client:
    """A connection to a Covet cluster, with one batching producer.

    Made by :func:`connect`. Concurrent ``publish`` calls from many tasks
    share the producer and are batched together per partition.
    """

    __slots__ = ("_native",)

    def __init__(self, native: _covet.NativeClient) -> None:
        self._native = native

    async def publish(
        self,
        topic: str,
        value: Payload,
        key: Payload | None = None,
        headers: dict[str, bytes | str] | None = None,
    ) -> PublishResult:
        """Publishes one record; returns where it landed once it is
        committed (replicated to a majority and on disk)."""
        return await self._native.publish(topic, value, key, headers)

    async def publish_batch(self, topic: str, values: Iterable[Payload]) -> list[PublishResult]:
        """Publishes unkeyed values in order; returns one result per value
        once all are committed. Not atomic: on a failure, some may be."""
        return await self._native.publish_batch(topic, values)

    async def flush(self) -> None:
        """Waits until every record published so far is answered."""
        await self._native.flush()

    def producer_stats(self) -> ProducerStats:
        """Batches and records the producer sent so far: concurrent
        publishes share batches, so records per batch grows with load."""
        return self._native.producer_stats()

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 0,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        max_batch_bytes: int | None = None,
    ) -> TopicInfo:
        """Creates a topic; 0 for ``replication_factor`` means the broker's default."""
        return await self._native.create_topic(
            name, partitions, replication_factor, retention_ms, retention_bytes, max_batch_bytes
        )

    async def list_topics(self) -> list[TopicInfo]:
        return await self._native.list_topics()

    async def describe_topic(self, name: str) -> TopicInfo:
        """A topic with each partition's offsets as its leader reports them."""
        return await self._native.describe_topic(name)

    async def delete_topic(self, name: str) -> None:
        await self._native.delete_topic(name)

    @overload
    def subscribe(
        self, topic: str, start: Start = "earliest", *, window: int = 1000, group: None = None
    ) -> Subscription: ...

    @overload
    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        max_in_flight: int = 100,
        session_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        max_deliveries: int = 0,
        dead_letter_topic: str | None = None,
    ) -> GroupSubscription: ...

    def subscribe(
        self,
        topic: str,
        start: Start = "earliest",
        *,
        window: int = 1000,
        group: str | None = None,
        max_in_flight: int = 100,
        session_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        max_deliveries: int = 0,
        dead_letter_topic: str | None = None,
    ) -> Subscription | GroupSubscription:
        """Follows every partition of ``topic`` from ``start``, or, with
        ``group``, joins that consumer group (see :meth:`subscribe_group`).

        Use it as ``async with client.subscribe(...) as sub: async for msg
        in sub``. At most ``window`` records per partition are buffered on
        the client: the broker sends more as the application takes them.
        """
        if group is None:
            return Subscription(self._native, topic, start, window)
        if start != "earliest":
            raise InvalidArgument(
                "a group starts at its committed offset (a new group at the earliest "
                "record): move it with `covet group reset`, not with start="
            )
        return self.subscribe_group(
            topic,
            group,
            max_in_flight=max_in_flight,
            session_timeout=session_timeout,
            ack_timeout=ack_timeout,
            max_deliveries=max_deliveries,
            dead_letter_topic=dead_letter_topic,
        )

    def subscribe_group(
        self,
        topic: str,
        group: str,
        *,
        max_in_flight: int = 100,
        session_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        max_deliveries: int = 0,
        dead_letter_topic: str | None = None,
    ) -> GroupSubscription:
        """Joins consumer group ``group`` on ``topic``.

        The group's members share the topic's partitions; this one gets
        the records of its partitions from the group's committed offset,
        and settles each with ``await msg.ack()`` or ``await
        msg.nack(delay=...)``. At most ``max_in_flight`` records per
        partition are unacknowledged: that is the credit the broker sees,
        so a slow handler slows delivery and nothing piles up. A record not
        settled within ``ack_timeout`` seconds is delivered again; after
        ``max_deliveries`` deliveries (0: the broker's default, 5) it goes to
        ``dead_letter_topic`` (default ``<topic>.dlq``). Heartbeats run in
        Rust. Leaving (``async with`` exit) commits what was acked.
        """
        return GroupSubscription(
            self._native,
            topic,
            group,
            max_in_flight,
            session_timeout,
            ack_timeout,
            max_deliveries,
            dead_letter_topic,
        )

    async def close(self) -> None:
        """Waits for records published so far to be answered."""
        await self._native.flush()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Native(Protocol[M]):
    """What a native subscription offers :class:`_Batches`."""

    def take(self, max: int = ...) -> list[M]: ...
    def next_batch(self, max: int = ...) -> asyncio.Future[list[M]]: ...


class _Batches(Generic[M]):
    """An async iterator over records taken from a native subscription a
    batch at a time: what is buffered already is taken at once, and only
    an empty buffer costs a wait (one hop between tokio and the event loop
    per batch)."""

    __slots__ = ("_buffer", "_pending")

    def __init__(self) -> None:
        self._buffer: collections.deque[M] = collections.deque()
        # The native wait in progress, kept until its records are in the
        # buffer (see `__anext__`).
        self._pending: asyncio.Future[list[M]] | None = None

    async def _opened(self) -> _Native[M]:
        """The native subscription (opening it first)."""
        raise NotImplementedError

    def _batch_size(self) -> int:
        return 256

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> M:
        if self._buffer:
            return self._buffer.popleft()
        pending = self._pending
        if pending is not None and pending.cancelled():
            # A cancelled `__anext__` cancelled its wait; the native side
            # kept whatever that wait had taken, and `take` returns it.
            pending = self._pending = None
        if pending is None:
            native = await self._opened()
            batch = native.take(self._batch_size())
            if batch:
                self._buffer.extend(batch)
                # Records were ready: still let the event loop run once
                # per batch, or a busy subscription would starve every
                # other task. Cancelled here, the records stay buffered.
                await asyncio.sleep(0)
                return self._buffer.popleft()
            pending = self._pending = native.next_batch(self._batch_size())
        # Cancelling this wait cancels the native one, which keeps the
        # records it took for the next call; a task cancelled after the
        # wait ended but before it resumed leaves the finished wait in
        # `_pending`, and the next call takes its records.
        batch = await pending
        self._pending = None
        if not batch:
            raise StopAsyncIteration
        self._buffer.extend(batch)
        return self._buffer.popleft()


class Subscription(_Batches[Message]):
    """Records of a topic, in offset order per partition (partitions interleave).

    An async iterator; it opens on ``async with`` (or on the first
    ``async for``) and ends when closed.
    """

    __slots__ = ("_batch", "_client", "_native", "_start", "_topic", "_window")

    def __init__(self, client: _covet.NativeClient, topic: str, start: Start, window: int) -> None:
        super().__init__()
        self._client = client
        self._topic = topic
        self._start = start
        self._window = window
        # Records taken off the native subscription in one hop, at most a
        # quarter of the window, so credit flows back while they are handled.
        self._batch = max(1, min(256, window // 4))
        self._native: _covet.NativeSubscription | None = None

    async def open(self) -> Self:
        if self._native is None:
            self._native = await self._client.open_subscription(
                self._topic, self._start, self._window
            )
        return self

    def close(self) -> None:
        """Stops following; a pending ``__anext__`` ends the iteration."""
        self._buffer.clear()
        if self._native is not None:
            self._native.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _opened(self) -> _Native[Message]:
        native = self._native or (await self.open())._native
        assert native is not None
        return native

    def _batch_size(self) -> int:
        return self._batch


class GroupSubscription(_Batches[GroupMessage]):
    """A consumer group member's records, as an async iterator of
    :class:`GroupMessage` (each to be acked or nacked).

    It joins on ``async with`` (or the first ``async for``) and leaves the
    group on exit, committing what was acknowledged.
    """

    __slots__ = ("_args", "_client", "_native")

    def __init__(
        self,
        client: _covet.NativeClient,
        topic: str,
        group: str,
        max_in_flight: int,
        session_timeout: float,
        ack_timeout: float,
        max_deliveries: int,
        dead_letter_topic: str | None,
    ) -> None:
        super().__init__()
        if not 1 <= max_in_flight <= 10_000:
            raise InvalidArgument(f"max_in_flight must be between 1 and 10000, not {max_in_flight}")
        self._client = client
        self._args = (
            topic,
            group,
            max_in_flight,
            round(session_timeout * 1000),
            round(ack_timeout * 1000),
            max_deliveries,
            dead_letter_topic,
        )
        self._native: _covet.NativeGroupSubscription | None = None

    async def open(self) -> Self:
        if self._native is None:
            self._native = await self._client.open_group(*self._args)
        return self

    async def close(self) -> None:
        """Leaves the group; records taken and not settled are given to the
        next owner of their partition."""
        self._buffer.clear()
        if self._native is not None:
            await self._native.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _opened(self) -> _Native[GroupMessage]:
        native = self._native or (await self.open())._native
        assert native is not None
        return native


class _Connecting:
    """What :func:`connect` returns: ``await`` it for a :class:`Client`, or
    use it as ``async with`` (the client is closed at the end)."""

    __slots__ = ("_buffer_bytes", "_client", "_linger_ms", "_seeds")

    def __init__(self, seeds: str, linger_ms: int, buffer_bytes: int) -> None:
        self._seeds = seeds
        self._linger_ms = linger_ms
        self._buffer_bytes = buffer_bytes
        self._client: Client | None = None

    async def _connect(self) -> Client:
        loop = asyncio.get_running_loop()
        return Client(await _covet.connect(self._seeds, loop, self._linger_ms, self._buffer_bytes))

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._connect()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    brokers: str | Sequence[str] | None = None,
    *,
    linger: float = 0.0,
    buffer_bytes: int = 64 << 20,
) -> _Connecting:
    """Connects to a cluster: ``"host:port"``, a seed list ``"h:p,h:p"`` (or a
    list of them); by default ``$COVET_BROKER``, else ``127.0.0.1:7420``.
    Any one seed that answers is enough.

    The client's producer sends a record at once while its partition has a
    batch slot free and batches records that arrive meanwhile; ``linger``
    (seconds) makes it wait that long for more records first. At most
    ``buffer_bytes`` of records are published and not yet acknowledged:
    beyond that ``publish`` waits, it never fails for lack of room.
    """
    if brokers is None:
        brokers = os.environ.get("COVET_BROKER") or DEFAULT_BROKER
    if not isinstance(brokers, str):
        brokers = ",".join(brokers)
    if not 0.0 <= linger <= 60.0:
        raise InvalidArgument(f"linger must be between 0 and 60 seconds, not {linger}")
    if buffer_bytes < 1:
        raise InvalidArgument(f"buffer_bytes must be at least 1, not {buffer_bytes}")
    return _Connecting(brokers, round(linger * 1000), buffer_bytes)


from .app import App, Event, Retry, default_app, on_event, run  # noqa: E402

__all__ = [
    "DEFAULT_BROKER",
    "App",
    "BatchTooLarge",
    "Client",
    "Closed",
    "ConnectionLost",
    "CovetError",
    "Event",
    "GroupMessage",
    "GroupSubscription",
    "InvalidArgument",
    "Message",
    "NotLeader",
    "OffsetOutOfRange",
    "PartitionInfo",
    "Payload",
    "ProducerStats",
    "PublishResult",
    "Retry",
    "Start",
    "Subscription",
    "Timeout",
    "TopicExists",
    "TopicInfo",
    "Unavailable",
    "UnknownPartition",
    "UnknownTopic",
    "connect",
    "default_app",
    "on_event",
    "run",
]
