//! The Covet broker node.
//!
//! This crate owns the node: the Raft driver over many groups ([`driver`],
//! [`group`]), the state machines and their applied state in sled
//! ([`state`]), retention ([`retention`]), the client gRPC service
//! ([`service`], [`subscribe`]) and the process around them ([`server`]).
//! The `covet` binary adds the command line.
//!
//! Invariants:
//! - every write goes through Raft, also on a single node (one voter per
//!   group); there is no second write path;
//! - a produce is answered only after its entry is committed (synced by a
//!   quorum; on one node, by this node) and applied;
//! - sled holds applied state only; the Raft log is replayed from the
//!   applied index sled recorded.
//!
//! Known limits: only nodes named in `--peers` can be members (they can be
//! removed and added back); the offset index keeps one sled key per batch.

pub mod catalog;
pub mod consumer;
pub mod driver;
#[cfg(test)]
mod durability_tests;
pub mod error;
mod faults;
pub mod group;
mod logging;
pub mod membership;
pub mod retention;
pub mod server;
pub mod service;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod snapshot_tests;
pub mod state;
mod status;
pub mod subscribe;
mod topics;
pub mod transport;

pub use covet_protocol::now_ms;
