"""Covet's exceptions.

Every failure of a client call raises a :class:`CovetError`. When the
broker refused the request, ``reason`` is its stable reason string
(``"UNKNOWN_TOPIC"``, ``"BATCH_TOO_LARGE"``, ...; see the broker's
``protocol/src/reason.rs``); match on the class or on ``reason``, never on
the message. Failures of the client itself (a lost connection, a closed
subscription) have ``reason`` ``None``.

The native module raises these classes; it maps each broker reason to one
of them (``class_of`` in ``src/lib.rs``).
"""

from __future__ import annotations


class CovetError(Exception):
    """A Covet call failed."""

    reason: str | None
    """The broker's stable reason string, or ``None`` for client-side failures."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class NotLeader(CovetError):
    """The node asked does not lead the partition (retried by the client first)."""


class Unavailable(CovetError):
    """The broker is shutting down, not ready yet, or its replica is faulted."""


class UnknownTopic(CovetError):
    """No topic of that name."""


class UnknownPartition(CovetError):
    """The topic has no such partition."""


class TopicExists(CovetError):
    """``create_topic`` for a name already taken."""


class BatchTooLarge(CovetError):
    """A record (or batch) larger than the topic's ``max_batch_bytes``."""


class OffsetOutOfRange(CovetError):
    """A start offset beyond the partition's high watermark."""


class Timeout(CovetError):
    """The broker did not commit the request in time."""


class InvalidArgument(CovetError, ValueError):
    """A bad argument: a topic name, a setting, a start position."""


class ConnectionLost(CovetError):
    """No broker could be reached, or a connection broke."""


class Closed(CovetError):
    """The client or subscription was closed."""


__all__ = [
    "BatchTooLarge",
    "Closed",
    "ConnectionLost",
    "CovetError",
    "InvalidArgument",
    "NotLeader",
    "OffsetOutOfRange",
    "Timeout",
    "TopicExists",
    "Unavailable",
    "UnknownPartition",
    "UnknownTopic",
]
