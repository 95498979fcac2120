//! The client's error type.

use covet_protocol::reason::{reason_of, Reason};

/// A failed client operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The broker refused the request with a stable reason.
    #[error("{reason}: {message}")]
    Broker {
        reason: Reason,
        message: String,
        leader_hint: u64,
    },
    /// No seed broker could be reached.
    #[error("cannot reach any broker ({seeds}): {message}")]
    Connect { seeds: String, message: String },
    /// The call failed below Covet's protocol (connection lost, a proxy).
    #[error("transport error: {0}")]
    Transport(String),
    /// The caller passed something unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The broker sent something this client cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The producer or subscription was closed.
    #[error("closed")]
    Closed,
}

impl Error {
    /// The broker's reason, if the broker gave one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Error::Broker { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Broker { reason, .. } => reason.is_retriable(),
            Error::Connect { .. } | Error::Transport(_) => true,
            _ => false,
        }
    }

    pub(crate) fn from_api(e: &covet_protocol::api::Error) -> Error {
        match Reason::parse(&e.reason) {
            Some(reason) => Error::Broker {
                reason,
                message: e.message.clone(),
                leader_hint: e.leader_hint,
            },
            None => Error::Protocol(format!("unknown reason {}: {}", e.reason, e.message)),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        match reason_of(&status) {
            Some(reason) => {
                let leader_hint = status
                    .metadata()
                    .get(covet_protocol::reason::LEADER_HINT_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Error::Broker {
                    reason,
                    message: status.message().to_string(),
                    leader_hint,
                }
            }
            None => Error::Transport(format!("{}: {}", status.code(), status.message())),
        }
    }
}

/// Result of client operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
