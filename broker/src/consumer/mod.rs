//! Consumer groups (see `docs/adr/0009-consumer-groups.md`): the
//! coordinator's assignment of partitions to members ([`assign`]).
//! The groups' progress on each partition is partition state
//! ([`crate::state::groups`]).

pub mod assign;
