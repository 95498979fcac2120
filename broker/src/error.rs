//! The broker's error type and its one conversion to a gRPC status.

use covet_protocol::reason::{self, Reason};

/// Longest error message sent to a client, in bytes. Errors echo what the
/// client sent (a topic name may be any length on the wire), and gRPC
/// C-core clients refuse a status whose metadata passes 8 KiB, reporting
/// `RESOURCE_EXHAUSTED` instead of the reason; 1 KiB keeps every message
/// readable with room for the reason and leader hint.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Cuts `text` to at most [`MAX_ERROR_MESSAGE_BYTES`] on a character boundary,
/// saying how much was cut.
fn bounded(mut text: String) -> String {
    if text.len() <= MAX_ERROR_MESSAGE_BYTES {
        return text;
    }
    let total = text.len();
    // Room for the marker, which is under 48 bytes.
    let mut keep = MAX_ERROR_MESSAGE_BYTES - 48;
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    text.truncate(keep);
    text.push_str(&format!("… ({} bytes cut)", total - keep));
    text
}

/// What can go wrong serving a request. Each variant maps to one stable
/// [`Reason`]; the conversion to `tonic::Status` lives only in
/// [`BrokerError::to_status`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("this node is not the leader of the group (leader hint: {leader_hint})")]
    NotLeader { leader_hint: u64 },
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("topic '{topic}' has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("invalid topic name: {0}")]
    InvalidTopicName(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("batch of {size} bytes exceeds the topic's limit of {limit} bytes")]
    BatchTooLarge { size: usize, limit: usize },
    #[error("request too large: {0}")]
    RequestTooLarge(String),
    #[error("corrupt batch: {0}")]
    CorruptBatch(String),
    #[error("offset {requested} is out of range: the partition holds [{start}, {end})")]
    OffsetOutOfRange {
        requested: u64,
        start: u64,
        end: u64,
    },
    #[error("producer {producer_id} sent sequence {got}, expected {expected}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// A heartbeat or leave from a member the coordinator does not know.
    #[error("unknown member: {0}")]
    UnknownMember(String),
    /// A consumer group cannot be reset or deleted on a partition while a
    /// member consumes it (without `force`).
    #[error("group active: {0}")]
    GroupActive(String),
    /// A consumer group's session for a partition was taken over by one
    /// of a newer generation (or this one is older than the current).
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The node started and has not yet applied what its groups had
    /// committed: its answer could be older than one it gave before it
    /// stopped.
    #[error("this node is starting: {0}")]
    NotReady(String),
    #[error("membership change refused: {0}")]
    MembershipConflict(String),
    #[error("this node's replica of group {group} is out of service: {reason}")]
    ReplicaFaulted { group: u64, reason: String },
    /// A batch reuses a sequence number a different batch of the same
    /// producer already holds (two clients share a producer id).
    #[error("producer {producer_id} sent a different batch with sequence {sequence}, already used by the batch stored at offset {stored_at}")]
    DuplicateSequence {
        producer_id: i64,
        sequence: i32,
        stored_at: u64,
    },
    /// A batch carries a producer id the cluster never handed out.
    #[error("producer id {producer_id} was never allocated by this cluster (ids below {allocated} were); call InitProducer for one")]
    UnknownProducerId { producer_id: i64, allocated: i64 },
    /// The partition remembers as many producers as it may.
    #[error("partition remembers {limit} idempotent producers, its limit; a new one may write once an idle producer expires")]
    ProducerTableFull { limit: usize },
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// The stable reason clients match on.
    pub fn reason(&self) -> Reason {
        match self {
            BrokerError::NotLeader { .. } => Reason::NotLeader,
            BrokerError::UnknownTopic(_) => Reason::UnknownTopic,
            BrokerError::UnknownPartition { .. } => Reason::UnknownPartition,
            BrokerError::TopicExists(_) => Reason::TopicExists,
            BrokerError::InvalidTopicName(_) => Reason::InvalidTopicName,
            BrokerError::InvalidConfig(_) => Reason::InvalidConfig,
            BrokerError::InvalidRequest(_) => Reason::InvalidRequest,
            BrokerError::BatchTooLarge { .. } | BrokerError::RequestTooLarge(_) => {
                Reason::BatchTooLarge
            }
            BrokerError::CorruptBatch(_) => Reason::CorruptBatch,
            BrokerError::OffsetOutOfRange { .. } => Reason::OffsetOutOfRange,
            BrokerError::OutOfOrderSequence { .. } => Reason::OutOfOrderSequence,
            BrokerError::Timeout(_) => Reason::Timeout,
            BrokerError::Fenced(_) => Reason::Fenced,
            BrokerError::GroupActive(_) => Reason::GroupActive,
            BrokerError::UnknownMember(_) => Reason::UnknownMember,
            BrokerError::ShuttingDown => Reason::ShuttingDown,
            BrokerError::NotReady(_) => Reason::NotReady,
            BrokerError::MembershipConflict(_) => Reason::MembershipConflict,
            BrokerError::ReplicaFaulted { .. } => Reason::ReplicaFaulted,
            BrokerError::DuplicateSequence { .. } => Reason::DuplicateSequence,
            BrokerError::UnknownProducerId { .. } => Reason::UnknownProducerId,
            BrokerError::ProducerTableFull { .. } => Reason::ProducerTableFull,
            BrokerError::Storage(_) => Reason::StorageError,
            BrokerError::Internal(_) => Reason::Internal,
        }
    }

    /// Why a client's request stream broke: a message over the size limit,
    /// or bytes that do not decode. Transport failures land here too; the
    /// client is gone then and never sees the answer.
    pub fn from_inbound(status: &tonic::Status) -> BrokerError {
        match status.code() {
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
                BrokerError::RequestTooLarge(status.message().to_string())
            }
            _ => BrokerError::InvalidRequest(format!(
                "undecodable message in the request stream: {}",
                status.message()
            )),
        }
    }

    /// The message sent to clients: the error's text, cut to
    /// [`MAX_ERROR_MESSAGE_BYTES`] so an echoed name can never make the status
    /// too large for a client to read.
    pub fn message(&self) -> String {
        bounded(self.to_string())
    }

    /// The gRPC status for a failed call.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = reason::status(self.reason(), self.message());
        if let BrokerError::NotLeader { leader_hint } = self {
            if let Ok(v) = leader_hint.to_string().parse() {
                status
                    .metadata_mut()
                    .insert(reason::LEADER_HINT_METADATA_KEY, v);
            }
        }
        status
    }

    /// The in-stream error message for one failed request.
    pub fn to_api(&self) -> covet_protocol::api::Error {
        covet_protocol::api::Error {
            reason: self.reason().as_str().to_string(),
            message: self.message(),
            leader_hint: match self {
                BrokerError::NotLeader { leader_hint } => *leader_hint,
                _ => 0,
            },
        }
    }
}

impl From<BrokerError> for tonic::Status {
    fn from(e: BrokerError) -> Self {
        e.to_status()
    }
}

impl From<covet_raft_store::StoreError> for BrokerError {
    fn from(e: covet_raft_store::StoreError) -> Self {
        BrokerError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for BrokerError {
    fn from(e: std::io::Error) -> Self {
        BrokerError::Storage(e.to_string())
    }
}

impl From<sled::Error> for BrokerError {
    fn from(e: sled::Error) -> Self {
        BrokerError::Storage(format!("sled: {e}"))
    }
}

/// Result of broker operations.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_char_boundary_and_keep_their_reason() {
        let e = BrokerError::UnknownTopic("é".repeat(20_000));
        let status = e.to_status();
        assert!(status.message().len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(status.message().ends_with("bytes cut)"));
        assert_eq!(reason::reason_of(&status), Some(Reason::UnknownTopic));
        assert!(e.to_api().message.len() <= MAX_ERROR_MESSAGE_BYTES);
        let short = BrokerError::UnknownTopic("t".into());
        assert_eq!(short.message(), "unknown topic 't'");
    }
}
