//! Choosing a partition for a record.
//!
//! Keyed records go to `fnv1a64(key) mod partitions`, so every client (the
//! Python one will be built on this crate) sends a key to the same partition.
//! Unkeyed records stick to one partition until its batch is sent, then move
//! to the next: batches fill up instead of being spread thin.

/// 64-bit FNV-1a: small, stable across versions and platforms.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The partition of a keyed record.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (fnv1a64(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn keys_spread_and_stay_put() {
        let mut seen = [0u32; 4];
        for i in 0..1000 {
            let k = format!("key-{i}");
            let p = partition_for_key(k.as_bytes(), 4);
            assert_eq!(p, partition_for_key(k.as_bytes(), 4));
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }
}
