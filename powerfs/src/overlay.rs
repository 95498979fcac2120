//! The volatile cache of one file: the writes and size changes made since the
//! file's last `fsync`/`fdatasync`, kept in memory on top of the backing file
//! (which holds only synced data).
//!
//! Two views of the same bytes share one append-only arena:
//! - `extents`, the current content that differs from the backing file
//!   (non-overlapping, keyed by file offset), which serves reads and is
//!   written through on sync;
//! - `ops`, every unsynced write and size change in order, which a power cut
//!   with faults replays a subset of (tear, reorder).
//!
//! Appends that follow each other coalesce into one extent without copying,
//! so a log written by many small appends costs one map entry per sync round.
//! A file rewritten in place without ever being synced (sled's files: sled
//! never calls `fsync`) would grow the arena without bound, so once the arena
//! is mostly overwritten bytes it is compacted: the arena keeps only live
//! bytes and the history becomes the equivalent coarser one (truncate, write
//! each extent, set the size), from which faults then choose.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::rng::SplitMix64;

/// Arena size below which overwritten bytes are never reclaimed.
const COMPACT_MIN: u64 = 16 << 20;

/// A run of overlay bytes: `len` bytes at arena offset `apos`.
#[derive(Clone, Copy, Debug)]
struct Extent {
    apos: u64,
    len: u64,
}

/// One unsynced operation, in the order the application issued it.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { offset: u64, apos: u64, len: u64 },
    SetLen(u64),
}

/// What a power cut did to one file's unsynced operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CutOutcome {
    pub writes_discarded: u64,
    pub writes_applied: u64,
    pub bytes_discarded: u64,
    pub torn: bool,
}

/// The unsynced state of one file.
#[derive(Debug)]
pub(crate) struct Overlay {
    /// Backing file, opened for writing, kept so a file forgotten by the
    /// kernel (or unlinked) can still be synced or cut.
    pub file: Arc<File>,
    /// Creation order among overlays, so a seeded cut visits files in an
    /// order that does not depend on inode numbers.
    pub seq: u64,
    arena: Vec<u8>,
    extents: BTreeMap<u64, Extent>,
    ops: Vec<Op>,
    /// Size readers see.
    size: u64,
    /// Backing bytes at or past this offset are hidden: a truncate since the
    /// last sync cut them off (a later extension must read zeros there).
    floor: u64,
    /// Arena size at which to check whether compaction pays.
    compact_at: u64,
}

impl Overlay {
    /// An empty overlay over a backing file of `backing_len` bytes.
    pub fn new(file: Arc<File>, seq: u64, backing_len: u64) -> Self {
        Overlay {
            file,
            seq,
            arena: Vec::new(),
            extents: BTreeMap::new(),
            ops: Vec::new(),
            size: backing_len,
            floor: backing_len,
            compact_at: COMPACT_MIN,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes held in memory for this file.
    pub fn pending_bytes(&self) -> u64 {
        self.arena.len() as u64
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let apos = self.arena.len() as u64;
        let len = data.len() as u64;
        self.arena.extend_from_slice(data);
        self.ops.push(Op::Write { offset, apos, len });
        self.cover(offset, len, apos);
        self.size = self.size.max(offset + len);
        if self.arena.len() as u64 >= self.compact_at {
            let live: u64 = self.extents.values().map(|e| e.len).sum();
            if live * 2 <= self.arena.len() as u64 {
                self.compact();
            }
            self.compact_at = (2 * self.arena.len() as u64).max(COMPACT_MIN);
        }
    }

    /// Keeps only live bytes; the history becomes: truncate to the floor,
    /// write each extent in offset order, set the size if that differs.
    fn compact(&mut self) {
        let mut arena = Vec::new();
        let mut ops = vec![Op::SetLen(self.floor)];
        let mut end = self.floor;
        for (&start, e) in self.extents.iter_mut() {
            let apos = arena.len() as u64;
            arena.extend_from_slice(&self.arena[e.apos as usize..(e.apos + e.len) as usize]);
            e.apos = apos;
            ops.push(Op::Write {
                offset: start,
                apos,
                len: e.len,
            });
            end = end.max(start + e.len);
        }
        if end != self.size {
            ops.push(Op::SetLen(self.size));
        }
        self.arena = arena;
        self.ops = ops;
    }

    pub fn set_len(&mut self, len: u64) {
        self.ops.push(Op::SetLen(len));
        if len < self.size {
            self.cut_extents_from(len);
            self.floor = self.floor.min(len);
        }
        self.size = len;
    }

    /// Reads `size` bytes at `offset` as the application sees them.
    pub fn read(&self, offset: u64, size: u64) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(size).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let backing_end = end.min(self.floor);
        if offset < backing_end {
            read_up_to(
                &self.file,
                &mut buf[..(backing_end - offset) as usize],
                offset,
            )?;
        }
        let first = self
            .extents
            .range(..offset)
            .next_back()
            .map(|(&k, _)| k)
            .unwrap_or(offset);
        for (&start, e) in self.extents.range(first..end) {
            let lo = start.max(offset);
            let hi = (start + e.len).min(end);
            if lo >= hi {
                continue;
            }
            let src = (e.apos + (lo - start)) as usize;
            let n = (hi - lo) as usize;
            let dst = (lo - offset) as usize;
            buf[dst..dst + n].copy_from_slice(&self.arena[src..src + n]);
        }
        Ok(buf)
    }

    /// Writes the current content through to the backing file (the caller
    /// syncs it). Afterwards the backing file equals what readers saw.
    pub fn write_through(&self) -> io::Result<()> {
        if self.floor < self.file.metadata()?.len() {
            self.file.set_len(self.floor)?;
        }
        for (&start, e) in &self.extents {
            let bytes = &self.arena[e.apos as usize..(e.apos + e.len) as usize];
            self.file.write_all_at(bytes, start)?;
        }
        if self.file.metadata()?.len() != self.size {
            self.file.set_len(self.size)?;
        }
        Ok(())
    }

    /// Applies what a power cut lets reach the disk: nothing by default; with
    /// `reorder` each operation independently (a seeded coin), so a later write
    /// can land without an earlier one; with `tear` every operation up to the
    /// last write (or, with `reorder`, the chosen ones), the last chosen write
    /// only up to a random byte.
    pub fn cut(&self, rng: &mut SplitMix64, tear: bool, reorder: bool) -> io::Result<CutOutcome> {
        let chosen: Vec<bool> = self
            .ops
            .iter()
            .map(|_| {
                if reorder {
                    rng.next_u64() & 1 == 1
                } else {
                    tear
                }
            })
            .collect();
        let last_write = if tear {
            self.ops
                .iter()
                .zip(&chosen)
                .rposition(|(op, &c)| c && matches!(op, Op::Write { .. }))
        } else {
            None
        };
        let mut out = CutOutcome::default();
        for (i, (op, &c)) in self.ops.iter().zip(&chosen).enumerate() {
            match *op {
                Op::SetLen(len) if c => self.file.set_len(len)?,
                Op::SetLen(_) => {}
                Op::Write { offset, apos, len } => {
                    if !c {
                        out.writes_discarded += 1;
                        out.bytes_discarded += len;
                        continue;
                    }
                    let keep = if Some(i) == last_write {
                        out.torn = true;
                        out.bytes_discarded += len;
                        let keep = rng.below(len);
                        out.bytes_discarded -= keep;
                        keep
                    } else {
                        len
                    };
                    out.writes_applied += 1;
                    let bytes = &self.arena[apos as usize..(apos + keep) as usize];
                    self.file.write_all_at(bytes, offset)?;
                }
            }
        }
        Ok(out)
    }

    /// Makes `[start, start + len)` read from arena offset `apos`, replacing
    /// whatever covered it, and merges with a directly preceding extent when
    /// both the file range and the arena range are contiguous (an append).
    fn cover(&mut self, start: u64, len: u64, apos: u64) {
        let end = start + len;
        // An extent that starts before `start` and reaches into the range.
        if let Some((&k, &e)) = self.extents.range(..start).next_back() {
            let kend = k + e.len;
            if kend > start {
                self.extents.insert(
                    k,
                    Extent {
                        apos: e.apos,
                        len: start - k,
                    },
                );
                if kend > end {
                    let tail = Extent {
                        apos: e.apos + (end - k),
                        len: kend - end,
                    };
                    self.extents.insert(end, tail);
                }
            }
        }
        // Extents that start inside the range.
        while let Some((&k, &e)) = self.extents.range(start..end).next() {
            self.extents.remove(&k);
            let kend = k + e.len;
            if kend > end {
                let tail = Extent {
                    apos: e.apos + (end - k),
                    len: kend - end,
                };
                self.extents.insert(end, tail);
            }
        }
        if let Some((&k, e)) = self.extents.range_mut(..start).next_back() {
            if k + e.len == start && e.apos + e.len == apos {
                e.len += len;
                return;
            }
        }
        self.extents.insert(start, Extent { apos, len });
    }

    /// Drops extent bytes at or past `len`.
    fn cut_extents_from(&mut self, len: u64) {
        if let Some((&k, e)) = self.extents.range_mut(..len).next_back() {
            if k + e.len > len {
                e.len = len - k;
            }
        }
        let _dropped = self.extents.split_off(&len);
    }
}

/// Fills `buf` from `file` at `offset`, leaving zeros past end of file.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn overlay_over(content: &[u8]) -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        f.write_all(content).expect("write");
        let len = content.len() as u64;
        (dir, Overlay::new(Arc::new(f), 0, len))
    }

    fn backing(o: &Overlay) -> Vec<u8> {
        let len = o.file.metadata().expect("stat").len();
        let mut buf = vec![0; len as usize];
        o.file.read_exact_at(&mut buf, 0).expect("read");
        buf
    }

    #[test]
    fn reads_see_writes_over_backing_and_backing_is_untouched() {
        let (_d, mut o) = overlay_over(b"0123456789");
        o.write(2, b"ab");
        o.write(8, b"xyz");
        assert_eq!(o.read(0, 100).expect("read"), b"01ab4567xyz");
        assert_eq!(o.read(3, 2).expect("read"), b"b4");
        assert_eq!(backing(&o), b"0123456789");
        o.write_through().expect("through");
        assert_eq!(backing(&o), b"01ab4567xyz");
    }

    #[test]
    fn overlapping_writes_keep_the_latest_bytes() {
        let (_d, mut o) = overlay_over(b"");
        o.write(0, b"aaaaaaaaaa");
        o.write(3, b"bbb");
        o.write(1, b"cc");
        o.write(5, b"dddd");
        assert_eq!(o.read(0, 10).expect("read"), b"accbbdddda");
        o.write(0, b"eeeeeeeeeeee");
        assert_eq!(o.read(0, 20).expect("read"), b"eeeeeeeeeeee");
        assert_eq!(o.extents.len(), 1);
    }

    #[test]
    fn appends_coalesce_into_one_extent() {
        let (_d, mut o) = overlay_over(b"");
        for i in 0..1000u64 {
            o.write(i * 4, &(i as u32).to_le_bytes());
        }
        assert_eq!(o.extents.len(), 1);
        assert_eq!(o.size(), 4000);
        assert_eq!(o.read(3996, 4).expect("read"), 999u32.to_le_bytes());
    }

    #[test]
    fn truncate_then_extend_reads_zeros_not_old_backing_bytes() {
        let (_d, mut o) = overlay_over(b"0123456789");
        o.write(6, b"zz");
        o.set_len(4);
        o.set_len(8);
        assert_eq!(o.read(0, 100).expect("read"), b"0123\0\0\0\0");
        o.write_through().expect("through");
        assert_eq!(backing(&o), b"0123\0\0\0\0");
    }

    #[test]
    fn rewriting_in_place_without_sync_keeps_memory_bounded() {
        let (_d, mut o) = overlay_over(b"");
        let block = |i: u32| vec![(i % 251) as u8; 4096];
        for i in 0..20_000u32 {
            o.write(u64::from(i % 16) * 4096, &block(i));
        }
        assert!(
            o.pending_bytes() <= 2 * COMPACT_MIN,
            "{}",
            o.pending_bytes()
        );
        for slot in 0..16u32 {
            let last = 20_000 - 16 + slot;
            let got = o.read(u64::from(slot) * 4096, 4096).expect("read");
            assert!(got == block(last), "slot {slot}");
        }
        let out = o.cut(&mut SplitMix64::new(5), true, false).expect("cut");
        assert!(out.torn);
        // Every slot but the last one written holds its latest block; that
        // one's last write was torn over its previous content.
        let b = backing(&o);
        assert_eq!(b.len(), 16 * 4096);
        for slot in 0..15 {
            let want = block(20_000 - 16 + slot as u32);
            assert!(b[slot * 4096..(slot + 1) * 4096] == want[..], "slot {slot}");
        }
    }

    #[test]
    fn cut_without_faults_writes_nothing() {
        let (_d, mut o) = overlay_over(b"synced");
        o.write(6, b"more");
        let out = o.cut(&mut SplitMix64::new(1), false, false).expect("cut");
        assert_eq!(out.writes_discarded, 1);
        assert_eq!(out.bytes_discarded, 4);
        assert_eq!(backing(&o), b"synced");
    }

    #[test]
    fn tear_keeps_earlier_writes_and_a_strict_prefix_of_the_last() {
        for seed in 0..20 {
            let (_d, mut o) = overlay_over(b"");
            o.write(0, b"first");
            o.write(5, b"0123456789");
            let out = o.cut(&mut SplitMix64::new(seed), true, false).expect("cut");
            assert!(out.torn);
            let b = backing(&o);
            assert!(b.len() >= 5 && b.len() < 15, "{b:?}");
            assert_eq!(&b[..5], b"first");
            assert_eq!(&b[5..], &b"0123456789"[..b.len() - 5]);
            assert_eq!(out.bytes_discarded, 15 - b.len() as u64);
        }
    }
}
