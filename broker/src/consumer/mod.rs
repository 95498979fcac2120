//! Consumer groups (see `docs/adr/0009-consumer-groups.md`): the
//! coordinator's assignment of partitions to members ([`assign`]) and the
//! leader's acknowledgement state per group and partition ([`cursor`]).
//! The groups' progress on each partition is partition state
//! ([`crate::state::groups`]).

pub mod admin;
pub mod assign;
pub mod coordinator;
pub mod cursor;
pub mod dead_letters;
pub mod session;
