//! Covet's wire formats, shared by the broker and every client.
//!
//! This crate owns:
//! - the `covet.v1` gRPC API ([`api`]) and the broker's internal log records
//!   ([`internal`]), generated from `proto/` by protox + tonic-prost-build;
//! - the record-batch binary format ([`batch`]): encode, decode, validate,
//!   and stamping of the base offset;
//! - topic-name rules ([`topic`]);
//! - the stable error reasons carried by gRPC statuses ([`reason`]).
//!
//! It does no I/O. Decoding outside bytes returns an error and never panics,
//! and never allocates more than the input's length allows.

pub mod batch;
pub mod reason;
pub mod topic;

/// Generated code, laid out by protobuf package so that cross-package
/// references (`covet.internal.v1` → `covet.v1`) resolve.
#[allow(missing_docs, clippy::all)]
mod generated {
    pub mod v1 {
        tonic::include_proto!("covet.v1");
    }
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("covet.internal.v1");
        }
    }
}

/// The client API, package `covet.v1`.
pub use generated::v1 as api;

/// Records the broker keeps in its own Raft logs and state, package
/// `covet.internal.v1`.
pub use generated::internal::v1 as internal;

pub use reason::Reason;

/// A group session's batch memory: the broker does not send again a batch
/// among the last this many it sent on the stream, and the client keeps
/// that many (see `Deliveries` in `covet.proto`). A delivery of one record
/// out of a large batch then costs the record's listing, not the batch.
pub const GROUP_BATCH_MEMORY: usize = 4;

/// The current time as record timestamps count it: milliseconds since the
/// Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
