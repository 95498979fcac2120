//! Frames: how records are laid out in a segment file.
//!
//! Wire format (integers little-endian):
//!
//! ```text
//! len u32 | crc u32 | payload (len bytes)
//! crc = CRC32C over (len as 4 LE bytes ++ payload), seeded with the segment's salt
//! ```
//!
//! The salt is a random value stored in the segment header. Seeding the CRC
//! with it means bytes inside an entry's data (which producers control) can
//! never pass for a frame of this segment, which recovery relies on when it
//! looks for intact frames after a bad one.

use std::fmt;
use std::ops::Range;

use crate::error::StoreError;

/// Bytes before a frame's payload.
pub(crate) const FRAME_HEADER_LEN: usize = 8;

/// Why a frame is not intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Fewer than `FRAME_HEADER_LEN` bytes are left.
    ShortHeader,
    /// The length field points past the end of the available bytes.
    ShortPayload,
    /// The checksum does not match.
    Checksum,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::ShortHeader => "truncated frame header",
            FrameError::ShortPayload => "frame runs past the end of the data",
            FrameError::Checksum => "frame checksum mismatch",
        })
    }
}

/// The frame checksum.
pub(crate) fn checksum(salt: u32, len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c_append(salt, &len.to_le_bytes()), payload)
}

/// Appends one frame to `buf`; `write_payload` appends the payload.
pub(crate) fn put_frame<F>(buf: &mut Vec<u8>, salt: u32, write_payload: F) -> Result<(), StoreError>
where
    F: FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
{
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if let Err(err) = write_payload(buf) {
        buf.truncate(start);
        return Err(err);
    }
    let payload_len = buf.len() - start - FRAME_HEADER_LEN;
    let Ok(len) = u32::try_from(payload_len) else {
        buf.truncate(start);
        return Err(StoreError::TooLarge {
            what: "record",
            size: payload_len as u64,
            limit: u64::from(u32::MAX),
        });
    };
    let crc = checksum(salt, len, &buf[start + FRAME_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Splits a frame header into (payload length, checksum).
pub(crate) fn split_header(header: [u8; FRAME_HEADER_LEN]) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = header;
    (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    )
}

/// Checks the frame at the start of `buf`. On success returns the payload's
/// range in `buf`; the frame's total length is `range.end`.
pub(crate) fn parse_frame(buf: &[u8], salt: u32) -> Result<Range<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(FrameError::ShortHeader);
    };
    let (len, crc) = split_header(*header);
    let end = FRAME_HEADER_LEN.saturating_add(len as usize);
    if end > buf.len() {
        return Err(FrameError::ShortPayload);
    }
    let payload = &buf[FRAME_HEADER_LEN..end];
    if checksum(salt, len, payload) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(FRAME_HEADER_LEN..end)
}

/// What follows a bad frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follows {
    /// An intact frame starts after it: the bad frame is corruption.
    Intact,
    /// No intact frame follows: the bad frame is a torn tail.
    Nothing,
    /// Checking would cost more than the budget; it cannot be ruled out.
    Unknown,
}

/// Looks for an intact frame starting anywhere in `buf` after its first
/// byte (`buf` starts at a bad frame). Recovery uses this to tell a torn
/// tail (nothing intact follows) from damage in the middle of the log,
/// whatever the damage did to length fields.
///
/// Cost: a length check per byte, and a checksum for each position whose
/// length fits and whose payload starts with a byte `plausible` accepts.
/// Entry data could be crafted to make that quadratic, so the checksummed
/// bytes are capped; past the cap the answer is `Unknown`.
pub(crate) fn look_for_intact_frame(buf: &[u8], salt: u32, plausible: fn(u8) -> bool) -> Follows {
    let mut budget = SCAN_BUDGET_BASE.saturating_add(buf.len().saturating_mul(SCAN_BUDGET_FACTOR));
    for start in 1..buf.len() {
        let rest = &buf[start..];
        let Some(header) = rest.first_chunk::<FRAME_HEADER_LEN>() else {
            break;
        };
        let end = FRAME_HEADER_LEN.saturating_add(split_header(*header).0 as usize);
        // No empty payloads are ever written.
        if end == FRAME_HEADER_LEN || end > rest.len() || !plausible(rest[FRAME_HEADER_LEN]) {
            continue;
        }
        let Some(left) = budget.checked_sub(end) else {
            return Follows::Unknown;
        };
        budget = left;
        if parse_frame(rest, salt).is_ok() {
            return Follows::Intact;
        }
    }
    Follows::Nothing
}

const SCAN_BUDGET_BASE: usize = 64 << 20;
const SCAN_BUDGET_FACTOR: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(salt: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        put_frame(&mut buf, salt, |b| {
            b.extend_from_slice(payload);
            Ok(())
        })
        .expect("small frame");
        buf
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        let buf = frame(7, b"abc");
        assert_eq!(&buf[..4], &3u32.to_le_bytes());
        assert_eq!(&buf[4..8], &checksum(7, 3, b"abc").to_le_bytes());
        assert_eq!(parse_frame(&buf, 7), Ok(8..11));
    }

    #[test]
    fn every_truncation_and_wrong_salt_fail() {
        let buf = frame(7, b"hello");
        for cut in 0..buf.len() {
            assert!(parse_frame(&buf[..cut], 7).is_err(), "prefix {cut}");
        }
        assert_eq!(parse_frame(&buf, 8), Err(FrameError::Checksum));
    }

    #[test]
    fn every_single_bit_flip_fails() {
        let buf = frame(7, b"hello");
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(parse_frame(&bad, 7).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn finds_intact_frame_after_garbage() {
        let any = |_| true;
        let mut buf = vec![0xff, 0x01, 0x02];
        assert_eq!(look_for_intact_frame(&buf, 7, any), Follows::Nothing);
        buf.extend(frame(7, b"x"));
        assert_eq!(look_for_intact_frame(&buf, 7, any), Follows::Intact);
        assert_eq!(look_for_intact_frame(&buf, 9, any), Follows::Nothing);
        assert_eq!(
            look_for_intact_frame(&buf, 7, |b| b != b'x'),
            Follows::Nothing
        );
        assert_eq!(look_for_intact_frame(&[0; 4096], 7, any), Follows::Nothing);
    }

    #[test]
    fn crafted_lengths_exhaust_the_budget() {
        // Every fourth position claims a payload of 256 KiB.
        let pattern = [0x00, 0x00, 0x04, 0x00];
        let buf: Vec<u8> = pattern.iter().copied().cycle().take(4 << 20).collect();
        assert_eq!(look_for_intact_frame(&buf, 7, |_| true), Follows::Unknown);
    }
}
