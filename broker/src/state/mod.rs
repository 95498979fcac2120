//! The replicated state machines and their applied state in sled.
//!
//! Each Raft group has one state machine: group 0 holds the metadata
//! ([`meta::MetaState`]), every other group one partition
//! ([`partition::PartitionState`]). A state machine keeps its applied view in
//! a sled tree of its own, written once per apply round with the applied
//! index in the same atomic batch and without a sync: after a crash sled
//! holds some prefix of the applied history, and the Raft log (which is
//! synced) is re-applied from the index sled recorded. sled is never the
//! only copy of an acknowledged fact.

pub mod confs;
pub mod groups;
pub mod meta;
pub mod offsets;
pub mod partition;
pub mod producers;
