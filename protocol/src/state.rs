//! The state area: a frontend-owned memfd in which a backend keeps its
//! device's state, so that the next backend instance of the same device
//! (after a crash or a live upgrade) continues where this one stopped
//! (docs/protocol.md, section 5.14).
//!
//! Layout (host byte order, like every Outboard structure):
//!
//! ```text
//! 0   magic        8 bytes "OBSTATE\0"
//! 8   layout       u32, 1
//! 12  reserved     u32, 0
//! 16  reserved     48 bytes, 0
//! 64  slot 0       slot_size bytes
//! 64 + slot_size   slot 1
//!
//! slot: seq u64 | len u32 | crc32 u32 | record (len bytes)
//! ```
//!
//! `slot_size` is `(area size - 64) / 2` rounded down to 8 bytes. A writer
//! commits a record into the slot that does not hold the newest one, then
//! writes its sequence number last: a writer killed half-way leaves the
//! other slot, the previous record, intact, and a torn slot fails its CRC.
//! A reader takes the valid slot with the highest sequence number.
//!
//! A record is a [`Snapshot`]: the device kind, its name, the device's own
//! state format version and the state bytes, all checked on restore.

use thiserror::Error;

/// Magic at the start of an initialised area.
pub const MAGIC: [u8; 8] = *b"OBSTATE\0";
/// Layout version of the area.
pub const LAYOUT: u32 = 1;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 64;
/// Bytes before a slot's record.
pub const SLOT_HEADER: usize = 16;
/// Smallest area a frontend may hand over.
pub const MIN_AREA: usize = 4096;
/// Largest area a backend maps.
pub const MAX_AREA: usize = 16 << 20;
/// Magic at the start of a [`Snapshot`].
pub const SNAPSHOT_MAGIC: [u8; 4] = *b"OBSN";
/// Format version of the [`Snapshot`] envelope.
pub const SNAPSHOT_FORMAT: u16 = 1;

/// Why an area or a snapshot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// area of {0} bytes is outside the 4 KiB..16 MiB limits
    #[error("area of {0} bytes is outside the 4 KiB..16 MiB limits")]
    AreaSize(usize),
    /// area carries layout {0}, expected 1
    #[error("area carries layout {0}, expected 1")]
    Layout(u32),
    /// record of {0} bytes does not fit a slot of {1}
    #[error("record of {0} bytes does not fit a slot of {1}")]
    TooLarge(usize, usize),
    /// the area holds no committed record
    #[error("the area holds no committed record")]
    Empty,
    /// snapshot is corrupt: {0}
    #[error("snapshot is corrupt: {0}")]
    Corrupt(&'static str),
    /// snapshot format {0} is not supported (this side reads 1)
    #[error("snapshot format {0} is not supported (this side reads 1)")]
    Format(u16),
    /// snapshot is of device {found:?} (kind {found_kind}), not {expected:?} (kind {expected_kind})
    #[error("snapshot is of device {found:?} (kind {found_kind}), not {expected:?} (kind {expected_kind})")]
    OtherDevice {
        /// The restoring device's name.
        expected: String,
        /// The restoring device's kind.
        expected_kind: u32,
        /// The name in the snapshot.
        found: String,
        /// The kind in the snapshot.
        found_kind: u32,
    },
}

fn slot_size(area: usize) -> usize {
    (area.saturating_sub(HEADER_SIZE) / 2) & !7
}

fn check_size(area: usize) -> Result<(), Error> {
    if (MIN_AREA..=MAX_AREA).contains(&area) {
        Ok(())
    } else {
        Err(Error::AreaSize(area))
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(v)
}

/// Prepares `area` for use: a fresh (all-zero) area gets its header; an
/// initialised one is checked and kept, records included. Returns whether
/// the area already held a committed record.
pub fn open(area: &mut [u8]) -> Result<bool, Error> {
    check_size(area.len())?;
    if area[..8] != MAGIC {
        area[..HEADER_SIZE].fill(0);
        area[..8].copy_from_slice(&MAGIC);
        area[8..12].copy_from_slice(&LAYOUT.to_ne_bytes());
        // Both slots invalid: sequence 0 never counts as committed.
        let s = slot_size(area.len());
        for slot in 0..2 {
            let at = HEADER_SIZE + slot * s;
            area[at..at + SLOT_HEADER].fill(0);
        }
        return Ok(false);
    }
    let layout = u32_at(area, 8);
    if layout != LAYOUT {
        return Err(Error::Layout(layout));
    }
    Ok(newest(area).is_some())
}

/// The valid slot with the highest sequence number: (slot, seq).
fn newest(area: &[u8]) -> Option<(usize, u64)> {
    let s = slot_size(area.len());
    (0..2)
        .filter_map(|slot| {
            let at = HEADER_SIZE + slot * s;
            let seq = u64_at(area, at);
            let len = u32_at(area, at + 8) as usize;
            let crc = u32_at(area, at + 12);
            let body = area.get(at + SLOT_HEADER..at + SLOT_HEADER + len)?;
            (seq != 0 && len <= s - SLOT_HEADER && crc32fast::hash(body) == crc)
                .then_some((slot, seq))
        })
        .max_by_key(|&(_, seq)| seq)
}

/// Commits `record` into the slot not holding the newest record; returns
/// its sequence number. The sequence number is written last.
pub fn commit(area: &mut [u8], record: &[u8]) -> Result<u64, Error> {
    check_size(area.len())?;
    let s = slot_size(area.len());
    if record.len() > s - SLOT_HEADER {
        return Err(Error::TooLarge(record.len(), s - SLOT_HEADER));
    }
    let (slot, seq) = match newest(area).map(|(slot, seq)| (slot, seq.checked_add(1))) {
        Some((slot, Some(next))) => (1 - slot, next),
        // Sequence numbers only a peer could have written: start over.
        Some((_, None)) => {
            for other in 0..2 {
                let at = HEADER_SIZE + other * s;
                area[at..at + 8].fill(0);
            }
            (0, 1)
        }
        None => (0, 1),
    };
    let at = HEADER_SIZE + slot * s;
    // Invalidate first, so a half-written slot never carries a sequence.
    area[at..at + 8].fill(0);
    area[at + SLOT_HEADER..at + SLOT_HEADER + record.len()].copy_from_slice(record);
    let len = u32::try_from(record.len()).map_err(|_| Error::TooLarge(record.len(), s))?;
    area[at + 8..at + 12].copy_from_slice(&len.to_ne_bytes());
    area[at + 12..at + 16].copy_from_slice(&crc32fast::hash(record).to_ne_bytes());
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    area[at..at + 8].copy_from_slice(&seq.to_ne_bytes());
    Ok(seq)
}

/// The newest committed record.
pub fn latest(area: &[u8]) -> Result<&[u8], Error> {
    check_size(area.len())?;
    if area[..8] != MAGIC {
        return Err(Error::Empty);
    }
    let (slot, _) = newest(area).ok_or(Error::Empty)?;
    let at = HEADER_SIZE + slot * slot_size(area.len());
    let len = u32_at(area, at + 8) as usize;
    // Checked again: whoever else maps the area may have changed it.
    area.get(at + SLOT_HEADER..at + SLOT_HEADER + len)
        .ok_or(Error::Corrupt("record length changed under the reader"))
}

/// A device's saved state with what identifies it.
///
/// ```text
/// 0  magic "OBSN"   4 bytes
/// 4  format         u16, 1
/// 6  name length    u16
/// 8  kind           u32 (the device kind of GET_DEVICE_INFO)
/// 12 version        u32 (the device's own state format version)
/// 16 name           name length bytes of UTF-8
///    regions        u16: the number of served counts that follow
///    served         u64 per region index: data commands served on the
///                   region's current placement, state included
///    state          the rest
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The device's kind.
    pub kind: u32,
    /// The device's name.
    pub name: String,
    /// The device's own state format version.
    pub version: u32,
    /// Per region index: the data commands the device had served on that
    /// region's placement when this state was taken, so a frontend knows
    /// which posted writes the state already holds.
    pub served: Vec<u64>,
    /// The device's state.
    pub state: Vec<u8>,
}

impl Snapshot {
    /// Encodes the snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let name = &name[..name.len().min(usize::from(u16::MAX))];
        let mut out = Vec::with_capacity(16 + name.len() + self.state.len());
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT.to_ne_bytes());
        out.extend_from_slice(&(name.len() as u16).to_ne_bytes());
        out.extend_from_slice(&self.kind.to_ne_bytes());
        out.extend_from_slice(&self.version.to_ne_bytes());
        out.extend_from_slice(name);
        let regions = &self.served[..self.served.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&(regions.len() as u16).to_ne_bytes());
        for n in regions {
            out.extend_from_slice(&n.to_ne_bytes());
        }
        out.extend_from_slice(&self.state);
        out
    }

    /// Decodes a snapshot, checking its envelope.
    pub fn decode(b: &[u8]) -> Result<Snapshot, Error> {
        if b.len() < 16 || b[..4] != SNAPSHOT_MAGIC {
            return Err(Error::Corrupt("no snapshot header"));
        }
        let format = u16::from_ne_bytes([b[4], b[5]]);
        if format != SNAPSHOT_FORMAT {
            return Err(Error::Format(format));
        }
        let name_len = usize::from(u16::from_ne_bytes([b[6], b[7]]));
        let name = b
            .get(16..16 + name_len)
            .ok_or(Error::Corrupt("name runs past the end"))?;
        let name = std::str::from_utf8(name).map_err(|_| Error::Corrupt("name is not UTF-8"))?;
        let mut r = Reader::new(&b[16 + name_len..]);
        let count = r.u16()?;
        let served = (0..count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            kind: u32_at(b, 8),
            name: name.to_owned(),
            version: u32_at(b, 12),
            served,
            state: r.rest().to_vec(),
        })
    }

    /// Checks that the snapshot belongs to device `name` of `kind`.
    pub fn check_device(&self, name: &str, kind: u32) -> Result<(), Error> {
        if self.name == name && self.kind == kind {
            return Ok(());
        }
        Err(Error::OtherDevice {
            expected: name.to_owned(),
            expected_kind: kind,
            found: self.name.clone(),
            found_kind: self.kind,
        })
    }
}

/// Reads state bytes field by field, every read checked.
#[derive(Debug)]
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.b.len() < n {
            return Err(Error::Corrupt("state is cut short"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes(1)?[0])
    }

    /// The next u16.
    pub fn u16(&mut self) -> Result<u16, Error> {
        let b = self.bytes(2)?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    }

    /// The next u32.
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32_at(self.bytes(4)?, 0))
    }

    /// The next u64.
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64_at(self.bytes(8)?, 0))
    }

    /// Every byte not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.b
    }

    /// Fails unless every byte was read.
    pub fn end(&self) -> Result<(), Error> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt("trailing bytes after the state"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area() -> Vec<u8> {
        vec![0u8; MIN_AREA]
    }

    #[test]
    fn open_when_fresh_then_initialised_and_empty() {
        let mut a = area();
        assert_eq!(open(&mut a), Ok(false));
        assert_eq!(latest(&a), Err(Error::Empty));
        assert_eq!(open(&mut [0u8; 100]), Err(Error::AreaSize(100)));
    }

    #[test]
    fn commit_when_repeated_then_newest_wins_and_survives_reopen() {
        let mut a = area();
        open(&mut a).unwrap();
        assert_eq!(commit(&mut a, b"one"), Ok(1));
        assert_eq!(commit(&mut a, b"two"), Ok(2));
        assert_eq!(commit(&mut a, b"three"), Ok(3));
        assert_eq!(latest(&a), Ok(&b"three"[..]));
        assert_eq!(open(&mut a), Ok(true));
        assert_eq!(latest(&a), Ok(&b"three"[..]));
    }

    #[test]
    fn latest_when_newest_slot_torn_then_previous_record() {
        let mut a = area();
        open(&mut a).unwrap();
        commit(&mut a, b"good").unwrap();
        commit(&mut a, b"newer").unwrap();
        // Tear the newest (slot 1): one byte of its record changes.
        let at = HEADER_SIZE + slot_size(a.len()) + SLOT_HEADER;
        a[at] ^= 0xff;
        assert_eq!(latest(&a), Ok(&b"good"[..]));
        // The next commit replaces the torn slot, not the good one.
        assert_eq!(commit(&mut a, b"next"), Ok(2));
        assert_eq!(latest(&a), Ok(&b"next"[..]));
    }

    #[test]
    fn commit_when_newest_sequence_is_the_largest_then_starts_over_without_overflow() {
        let mut a = area();
        open(&mut a).unwrap();
        commit(&mut a, b"old").unwrap();
        // A peer writes the largest sequence number into the valid slot.
        a[HEADER_SIZE..HEADER_SIZE + 8].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(latest(&a), Ok(&b"old"[..]));
        assert_eq!(commit(&mut a, b"new"), Ok(1));
        assert_eq!(latest(&a), Ok(&b"new"[..]));
    }

    #[test]
    fn commit_when_record_too_large_or_layout_unknown_then_error() {
        let mut a = area();
        open(&mut a).unwrap();
        let big = vec![0u8; MIN_AREA];
        assert!(matches!(commit(&mut a, &big), Err(Error::TooLarge(..))));
        a[8] = 9;
        assert_eq!(open(&mut a), Err(Error::Layout(9)));
    }

    #[test]
    fn snapshot_when_round_tripped_then_equal_and_checked() {
        let s = Snapshot {
            kind: 2,
            name: "virtio-blk".into(),
            version: 1,
            served: vec![7, 0],
            state: vec![1, 2, 3],
        };
        let d = Snapshot::decode(&s.encode()).unwrap();
        assert_eq!(d, s);
        assert!(d.check_device("virtio-blk", 2).is_ok());
        assert!(matches!(
            d.check_device("uart", 2),
            Err(Error::OtherDevice { .. })
        ));
        let mut bad = s.encode();
        bad[4] = 7;
        assert_eq!(Snapshot::decode(&bad), Err(Error::Format(7)));
        assert!(matches!(
            Snapshot::decode(&bad[..10]),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn reader_when_cut_short_or_trailing_then_corrupt() {
        let mut r = Reader::new(&[1, 0, 0, 0, 9]);
        assert_eq!(r.u32(), Ok(1));
        assert!(r.end().is_err());
        assert_eq!(r.u8(), Ok(9));
        assert!(r.end().is_ok());
        assert!(r.u16().is_err());
    }
}
