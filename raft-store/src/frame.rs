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
//! looks for sync markers after a bad frame.

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
    /// A length of zero: no record is empty, so this is unwritten space
    /// (zeros), never a frame, whatever the salt.
    Empty,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::ShortHeader => "truncated frame header",
            FrameError::ShortPayload => "frame runs past the end of the data",
            FrameError::Checksum => "frame checksum mismatch",
            FrameError::Empty => "empty frame (unwritten space)",
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
    if len == 0 {
        return Err(FrameError::Empty);
    }
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

/// Finds every intact frame in `buf` whose payload is `payload_len`
/// bytes long and starts with `kind`, wherever it starts (after a bad
/// frame, frame boundaries are unknown). Returns where each one starts.
///
/// Recovery uses it to find the sync markers past a bad frame. Their
/// payload has a fixed length, so the cost is linear: a length and kind
/// comparison per byte, and a checksum of `payload_len + 4` bytes only
/// where both match. The salt keeps entry data, which producers control,
/// from passing for a marker (a forged frame would need the salt).
pub(crate) fn find_fixed_frames(buf: &[u8], salt: u32, payload_len: usize, kind: u8) -> Vec<usize> {
    let frame_len = FRAME_HEADER_LEN + payload_len;
    let Some(last_start) = buf.len().checked_sub(frame_len) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for start in 0..=last_start {
        let frame = &buf[start..start + frame_len];
        let Some(header) = frame.first_chunk::<FRAME_HEADER_LEN>() else {
            continue;
        };
        let (len, crc) = split_header(*header);
        if len as usize != payload_len || frame[FRAME_HEADER_LEN] != kind {
            continue;
        }
        if checksum(salt, len, &frame[FRAME_HEADER_LEN..]) == crc {
            found.push(start);
        }
    }
    found
}

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
    fn finds_fixed_frames_anywhere() {
        let marker = frame(7, b"m12345678");
        let mut buf = vec![0xff, 0x01, 0x02];
        assert!(find_fixed_frames(&buf, 7, 9, b'm').is_empty());
        buf.extend(&marker);
        buf.extend(frame(7, b"x"));
        buf.extend([0; 5]);
        buf.extend(&marker);
        assert_eq!(find_fixed_frames(&buf, 7, 9, b'm'), vec![3, 3 + 17 + 9 + 5]);
        // Another salt, kind or length finds nothing.
        assert!(find_fixed_frames(&buf, 9, 9, b'm').is_empty());
        assert!(find_fixed_frames(&buf, 7, 9, b'x').is_empty());
        assert!(find_fixed_frames(&buf, 7, 1, b'm').is_empty());
        // A marker cut short is not found.
        assert!(find_fixed_frames(&marker[..16], 7, 9, b'm').is_empty());
        assert!(find_fixed_frames(&[0; 4096], 7, 9, 0).is_empty());
    }
}
