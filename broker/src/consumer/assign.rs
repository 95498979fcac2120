//! Sticky, cooperative assignment of partitions to a group's members.
