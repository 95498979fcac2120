//! placeholder, replaced by the batch format
