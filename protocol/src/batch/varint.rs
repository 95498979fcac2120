//! LEB128 varints and zigzag, and a bounds-checked reader over a byte slice.
//!
//! Decoding rejects overlong encodings (a final byte of 0 after a
//! continuation) so that every value has one encoding and a batch's bytes
//! are a function of its contents.

use bytes::BufMut;

use super::BatchError;

/// Bytes in the longest `u32` varint.
const MAX_U32_BYTES: usize = 5;
/// Bytes in the longest `u64` varint.
const MAX_U64_BYTES: usize = 10;

/// Maps signed to unsigned so that small magnitudes encode short.
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
pub(super) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Number of bytes `v` takes as a varint.
pub(super) fn uvarint_len(v: u64) -> usize {
    // One byte per started group of 7 significant bits, at least one.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `v` as a varint.
pub(super) fn put_uvarint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// A cursor over untrusted bytes: every read is bounds-checked and fails
/// with [`BatchError::Malformed`] instead of panicking.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn u8(&mut self) -> Result<u8, BatchError> {
        let (&b, rest) = self.buf.split_first().ok_or(BatchError::Malformed(
            "field runs past the end of its record",
        ))?;
        self.buf = rest;
        Ok(b)
    }

    /// The next `n` bytes.
    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if n > self.buf.len() {
            return Err(BatchError::Malformed(
                "length runs past the end of its record",
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A varint in the `u32` range.
    pub(super) fn uvarint32(&mut self) -> Result<u32, BatchError> {
        let v = self.uvarint(MAX_U32_BYTES, u64::from(u32::MAX))?;
        // `uvarint` bounded the value by u32::MAX.
        Ok(v as u32)
    }

    /// A varint in the `u32` range used as a length.
    pub(super) fn len(&mut self) -> Result<usize, BatchError> {
        let v = self.uvarint32()?;
        usize::try_from(v).map_err(|_| BatchError::Malformed("length does not fit in memory"))
    }

    /// A zigzag varint `i64`.
    pub(super) fn zigzag64(&mut self) -> Result<i64, BatchError> {
        self.uvarint(MAX_U64_BYTES, u64::MAX).map(unzigzag)
    }

    /// A varint of at most `max_bytes` bytes whose value is at most `max`.
    fn uvarint(&mut self, max_bytes: usize, max: u64) -> Result<u64, BatchError> {
        let mut value: u64 = 0;
        for i in 0..max_bytes {
            let byte = self.u8()?;
            let group = u64::from(byte & 0x7f);
            // max_bytes <= 10, so the shift is at most 63; bits pushed out of
            // the top of a u64 would be silently lost, so refuse them.
            let shift = 7 * i as u32;
            if (group << shift) >> shift != group {
                return Err(BatchError::Malformed("varint overflows its type"));
            }
            value |= group << shift;
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(BatchError::Malformed("varint is not minimally encoded"));
                }
                if value > max {
                    return Err(BatchError::Malformed("varint overflows its type"));
                }
                return Ok(value);
            }
        }
        Err(BatchError::Malformed("varint is too long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(v: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        put_uvarint(&mut buf, v);
        buf
    }

    #[test]
    fn known_encodings() {
        assert_eq!(encoded(0), [0x00]);
        assert_eq!(encoded(1), [0x01]);
        assert_eq!(encoded(127), [0x7f]);
        assert_eq!(encoded(128), [0x80, 0x01]);
        assert_eq!(encoded(300), [0xac, 0x02]);
        assert_eq!(encoded(u64::from(u32::MAX)), [0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(-2), 3);
        assert_eq!(zigzag(i64::MAX), u64::MAX - 1);
        assert_eq!(zigzag(i64::MIN), u64::MAX);
    }

    #[test]
    fn round_trips_and_lengths_agree() {
        let samples = [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ];
        for v in samples {
            let buf = encoded(v);
            assert_eq!(buf.len(), uvarint_len(v), "{v}");
            let mut r = Reader::new(&buf);
            assert_eq!(r.uvarint(MAX_U64_BYTES, u64::MAX), Ok(v));
            assert!(r.is_empty());
        }
        for v in [0, -1, 1, i64::MIN, i64::MAX, -300, 300] {
            let buf = encoded(zigzag(v));
            assert_eq!(Reader::new(&buf).zigzag64(), Ok(v));
        }
    }

    #[test]
    fn rejects_bad_varints() {
        let bad: [&[u8]; 6] = [
            &[],                                   // empty
            &[0x80],                               // continuation, then nothing
            &[0x80, 0x00],                         // overlong zero
            &[0xff, 0xff, 0xff, 0xff, 0x1f],       // u32::MAX + more
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // six bytes
            &[0x81, 0x80, 0x80, 0x80, 0x10],       // bit 32 set
        ];
        for b in bad {
            assert!(Reader::new(b).uvarint32().is_err(), "{b:x?}");
        }
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&too_big).zigzag64().is_err());
        let eleven = [0xff; 11];
        assert!(Reader::new(&eleven).zigzag64().is_err());
    }
}
