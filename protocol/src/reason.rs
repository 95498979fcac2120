//! Stable, machine-readable failure reasons.
//!
//! A reason travels in two places: the `covet-reason` metadata of a gRPC
//! status (unary calls and stream failures) and the `reason` field of an
//! `api::Error` (one failed request inside a stream). Clients match on the
//! [`Reason`], never on message text. The strings are part of the public
//! contract: add new ones, never rename.

use std::fmt;

/// gRPC metadata key holding the reason string of a failed call.
pub const REASON_METADATA_KEY: &str = "covet-reason";
/// gRPC metadata key holding the leader hint (a node id) of `NOT_LEADER`.
pub const LEADER_HINT_METADATA_KEY: &str = "covet-leader-hint";

macro_rules! reasons {
    ($($variant:ident => $text:literal, $code:ident;)*) => {
        /// Why a request failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)*
        }

        impl Reason {
            /// Every reason, for tests and documentation.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The stable reason string.
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $text,)* }
            }

            /// Parses a reason string; unknown strings (from a newer broker)
            /// give `None`.
            pub fn parse(s: &str) -> Option<Reason> {
                match s { $($text => Some(Reason::$variant),)* _ => None }
            }

            /// The gRPC status code a reason is sent with.
            pub fn code(self) -> tonic::Code {
                match self { $(Reason::$variant => tonic::Code::$code,)* }
            }
        }
    };
}

reasons! {
    NotLeader => "NOT_LEADER", Unavailable;
    UnknownTopic => "UNKNOWN_TOPIC", NotFound;
    UnknownPartition => "UNKNOWN_PARTITION", NotFound;
    TopicExists => "TOPIC_EXISTS", AlreadyExists;
    InvalidTopicName => "INVALID_TOPIC_NAME", InvalidArgument;
    InvalidConfig => "INVALID_CONFIG", InvalidArgument;
    InvalidRequest => "INVALID_REQUEST", InvalidArgument;
    BatchTooLarge => "BATCH_TOO_LARGE", InvalidArgument;
    CorruptBatch => "CORRUPT_BATCH", InvalidArgument;
    OffsetOutOfRange => "OFFSET_OUT_OF_RANGE", OutOfRange;
    OutOfOrderSequence => "OUT_OF_ORDER_SEQUENCE", FailedPrecondition;
    Timeout => "TIMEOUT", DeadlineExceeded;
    ShuttingDown => "SHUTTING_DOWN", Unavailable;
    StorageError => "STORAGE_ERROR", Internal;
    Internal => "INTERNAL", Internal;
    MembershipConflict => "MEMBERSHIP_CONFLICT", FailedPrecondition;
    ReplicaFaulted => "REPLICA_FAULTED", Unavailable;
    DuplicateSequence => "DUPLICATE_SEQUENCE", FailedPrecondition;
    UnknownProducerId => "UNKNOWN_PRODUCER_ID", FailedPrecondition;
    ProducerTableFull => "PRODUCER_TABLE_FULL", ResourceExhausted;
    Fenced => "FENCED", FailedPrecondition;
    GroupActive => "GROUP_ACTIVE", FailedPrecondition;
    UnknownMember => "UNKNOWN_MEMBER", NotFound;
    NotReady => "NOT_READY", Unavailable;
}

impl Reason {
    /// Whether a client may retry the same request unchanged and expect a
    /// different outcome (after refreshing metadata or backing off).
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            Reason::NotLeader
                | Reason::Timeout
                | Reason::ShuttingDown
                | Reason::UnknownPartition
                | Reason::OutOfOrderSequence
                | Reason::ReplicaFaulted
                | Reason::UnknownProducerId
                | Reason::NotReady
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds the gRPC status for a failure. The broker converts its errors to
/// statuses only through this function, so the reason is always attached.
pub fn status(reason: Reason, message: impl Into<String>) -> tonic::Status {
    let mut status = tonic::Status::new(reason.code(), message);
    if let Ok(v) = reason.as_str().parse() {
        status.metadata_mut().insert(REASON_METADATA_KEY, v);
    }
    status
}

/// Reads the reason of a status built by [`status`]. Statuses from
/// elsewhere (transport failures, proxies) have none.
pub fn reason_of(status: &tonic::Status) -> Option<Reason> {
    status
        .metadata()
        .get(REASON_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(Reason::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_status() {
        for &r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            let s = status(r, "boom");
            assert_eq!(reason_of(&s), Some(r));
            assert_eq!(s.code(), r.code());
        }
        assert_eq!(Reason::parse("NO_SUCH_REASON"), None);
    }
}
