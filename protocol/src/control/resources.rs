//! Payloads that hand resources to a backend: the guest memory table,
//! doorbells and interrupt lines.

#[cfg(doc)]
use super::Request;
use super::{check_size, le_u32, le_u64, Error, Payload, RegionIndex, MAX_FDS};

/// [`Request::SetDoorbell`], [`Request::GetDoorbellInfo`] and [`Request::GetIrqInfo`] payload.
pub type ObjectIndex = RegionIndex;

/// One entry of a [`MemTable`]: a memfd mapping of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes (nonzero).
    pub size: u64,
    /// Offset of the first byte in the entry's fd.
    pub fd_offset: u64,
}

/// Why [`MemTable::decode`] refuses an entry that is empty or does not end
/// below 2^64.
const EMPTY_OR_TOP: &str = "empty entry, or one that ends at or past 2^64";

/// Most entries in one [`MemTable`] (one fd each).
pub const MAX_MEM_REGIONS: usize = MAX_FDS;

/// [`Request::SetMemTable`] payload: `count` (u32), reserved (u32, zero), then
/// `count` entries of 24 bytes (`guest_addr`, `size`, `fd_offset`, each u64).
/// The message carries one fd per entry, in entry order. Entries are sorted
/// by `guest_addr` and do not overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemTable {
    /// The guest RAM regions.
    pub regions: Vec<MemRegion>,
}

impl MemTable {
    /// Header bytes before the entries.
    pub const HEADER: usize = 8;
    /// Bytes per entry.
    pub const ENTRY: usize = 24;

    /// Encodes the table.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::HEADER + Self::ENTRY * self.regions.len());
        v.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        for r in &self.regions {
            v.extend_from_slice(&r.guest_addr.to_le_bytes());
            v.extend_from_slice(&r.size.to_le_bytes());
            v.extend_from_slice(&r.fd_offset.to_le_bytes());
        }
        v
    }

    /// Decodes a table and checks its shape: size matches `count`, `count` is
    /// 1..=[`MAX_MEM_REGIONS`], sizes are nonzero, entries are sorted, do not
    /// overlap and end below 2^64.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() < Self::HEADER {
            return Err(Error::PayloadSize {
                expected: Self::HEADER,
                got: b.len(),
            });
        }
        let count = le_u32(b, 0) as usize;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("memory table"));
        }
        if count == 0 || count > MAX_MEM_REGIONS {
            return Err(Error::MemTable("entry count out of range"));
        }
        check_size(b, Self::HEADER + Self::ENTRY * count)?;
        let mut regions: Vec<MemRegion> = Vec::with_capacity(count);
        for i in 0..count {
            let at = Self::HEADER + Self::ENTRY * i;
            let r = MemRegion {
                guest_addr: le_u64(b, at),
                size: le_u64(b, at + 8),
                fd_offset: le_u64(b, at + 16),
            };
            // The end (exclusive) must fit in 64 bits: no backend can map an
            // entry that ends exactly at 2^64 (docs/protocol.md section 5.8).
            if r.size == 0 || r.guest_addr.checked_add(r.size).is_none() {
                return Err(Error::MemTable(EMPTY_OR_TOP));
            }
            r.fd_offset
                .checked_add(r.size)
                .ok_or(Error::MemTable("fd offset wraps"))?;
            if let Some(prev) = regions.last() {
                if prev.guest_addr + prev.size > r.guest_addr {
                    return Err(Error::MemTable("entries unsorted or overlapping"));
                }
            }
            regions.push(r);
        }
        Ok(MemTable { regions })
    }

    /// Checks that every entry's `guest_addr`, `size` and `fd_offset` are
    /// multiples of `page_size` (the host's page size, a power of two), as
    /// docs/protocol.md section 5.8 requires before anything is mapped.
    pub fn check_page_alignment(&self, page_size: u64) -> Result<(), Error> {
        let mask = page_size.wrapping_sub(1);
        let aligned = |r: &MemRegion| (r.guest_addr | r.size | r.fd_offset) & mask == 0;
        if self.regions.iter().all(aligned) {
            Ok(())
        } else {
            Err(Error::MemTable("entry not aligned to the page size"))
        }
    }
}

/// Doorbell flag: the doorbell fires only when the written value equals `datamatch`.
pub const DOORBELL_DATAMATCH: u32 = 1 << 0;

/// Reply to [`Request::GetDoorbellInfo`]: a write the frontend turns into an
/// eventfd signal instead of a data command (ioeventfd semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorbellInfo {
    /// Doorbell index.
    pub index: u32,
    /// Region the doorbell lives in.
    pub region: u32,
    /// Offset of the doorbell in the region.
    pub offset: u64,
    /// Access size that matches: 1, 2, 4 or 8; 0 matches any size and
    /// ignores the data (a FAST_MMIO-style doorbell).
    pub size: u32,
    /// `DOORBELL_*` flags.
    pub flags: u32,
    /// Value a write must carry when [`DOORBELL_DATAMATCH`] is set.
    pub datamatch: u64,
}

impl Payload for DoorbellInfo {
    const SIZE: usize = 32;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.region.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.datamatch.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let d = DoorbellInfo {
            index: le_u32(b, 0),
            region: le_u32(b, 4),
            offset: le_u64(b, 8),
            size: le_u32(b, 16),
            flags: le_u32(b, 20),
            datamatch: le_u64(b, 24),
        };
        if d.flags & !DOORBELL_DATAMATCH != 0 {
            return Err(Error::Reserved("doorbell flags"));
        }
        if !matches!(d.size, 0 | 1 | 2 | 4 | 8) {
            return Err(Error::Doorbell("size is not 0, 1, 2, 4 or 8"));
        }
        if d.size == 0 && d.flags & DOORBELL_DATAMATCH != 0 {
            return Err(Error::Doorbell("a sizeless doorbell cannot match data"));
        }
        Ok(d)
    }
}

/// Interrupt flag: a level-triggered line, resampled after the guest's EOI.
pub const IRQ_LEVEL: u32 = 1 << 0;

/// Reply to [`Request::GetIrqInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Line index.
    pub index: u32,
    /// `IRQ_*` flags.
    pub flags: u32,
}

/// The 8-byte layout IrqInfo and SetIrq share: le32 index, le32 flags.
fn encode_index_flags(index: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// Decodes (index, flags), refusing flags outside `known` as `what`.
fn decode_index_flags(b: &[u8], known: u32, what: &'static str) -> Result<(u32, u32), Error> {
    check_size(b, 8)?;
    let flags = le_u32(b, 4);
    if flags & !known != 0 {
        return Err(Error::Reserved(what));
    }
    Ok((le_u32(b, 0), flags))
}

impl Payload for IrqInfo {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        encode_index_flags(self.index, self.flags)
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        let (index, flags) = decode_index_flags(b, IRQ_LEVEL, "irq flags")?;
        Ok(IrqInfo { index, flags })
    }
}

/// Set-irq flag: a second fd follows, the resample eventfd (level lines).
pub const IRQ_RESAMPLE: u32 = 1 << 0;

/// [`Request::SetIrq`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetIrq {
    /// Line index.
    pub index: u32,
    /// `IRQ_RESAMPLE` or zero.
    pub flags: u32,
}

impl Payload for SetIrq {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        encode_index_flags(self.index, self.flags)
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        let (index, flags) = decode_index_flags(b, IRQ_RESAMPLE, "set irq flags")?;
        Ok(SetIrq { index, flags })
    }
}

/// [`Request::SetCmdRing`](super::Request::SetCmdRing) payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetCmdRing {
    /// Index of a placed region.
    pub index: u32,
    /// Ring entries: a power of two in
    /// [`MIN_ENTRIES`](crate::ring::MIN_ENTRIES)..=[`MAX_ENTRIES`](crate::ring::MAX_ENTRIES).
    pub entries: u32,
}

impl Payload for SetCmdRing {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        encode_index_flags(self.index, self.entries)
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        let (index, entries) = decode_index_flags(b, u32::MAX, "ring entries")?;
        if !crate::ring::valid_entries(entries) {
            return Err(Error::Reserved("ring entries"));
        }
        Ok(SetCmdRing { index, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_table_when_valid_then_roundtrip_and_bad_shapes_rejected() {
        let t = MemTable {
            regions: vec![
                MemRegion {
                    guest_addr: 0,
                    size: 0x1000,
                    fd_offset: 0,
                },
                MemRegion {
                    guest_addr: 0x10_0000,
                    size: 0x2000,
                    fd_offset: 0x1000,
                },
            ],
        };
        assert_eq!(MemTable::decode(&t.encode()), Ok(t.clone()));
        let mut b = t.encode();
        b.pop();
        assert!(matches!(
            MemTable::decode(&b),
            Err(Error::PayloadSize { .. })
        ));
        assert!(matches!(
            MemTable::decode(&[0u8; 4]),
            Err(Error::PayloadSize { .. })
        ));
        let mut b = t.encode();
        b[0] = 0;
        assert_eq!(
            MemTable::decode(&b[..8]),
            Err(Error::MemTable("entry count out of range"))
        );
        let mut b = t.encode();
        b[4] = 1;
        assert_eq!(MemTable::decode(&b), Err(Error::Reserved("memory table")));
        let overlap = MemTable {
            regions: vec![
                MemRegion {
                    guest_addr: 0,
                    size: 0x2000,
                    fd_offset: 0,
                },
                MemRegion {
                    guest_addr: 0x1000,
                    size: 0x1000,
                    fd_offset: 0,
                },
            ],
        };
        assert_eq!(
            MemTable::decode(&overlap.encode()),
            Err(Error::MemTable("entries unsorted or overlapping"))
        );
        let empty = MemTable {
            regions: vec![MemRegion {
                guest_addr: 0,
                size: 0,
                fd_offset: 0,
            }],
        };
        assert_eq!(
            MemTable::decode(&empty.encode()),
            Err(Error::MemTable(EMPTY_OR_TOP))
        );
        let wrap = MemTable {
            regions: vec![MemRegion {
                guest_addr: 0,
                size: 8,
                fd_offset: u64::MAX,
            }],
        };
        assert_eq!(
            MemTable::decode(&wrap.encode()),
            Err(Error::MemTable("fd offset wraps"))
        );
    }

    #[test]
    fn mem_table_when_entry_ends_exactly_at_2_pow_64_then_rejected() {
        let top = |size: u64| MemTable {
            regions: vec![MemRegion {
                guest_addr: 0u64.wrapping_sub(size),
                size,
                fd_offset: 0,
            }],
        };
        assert_eq!(
            MemTable::decode(&top(0x1000).encode()),
            Err(Error::MemTable(EMPTY_OR_TOP))
        );
        let below = MemTable {
            regions: vec![MemRegion {
                guest_addr: 0u64.wrapping_sub(0x2000),
                ..top(0x1000).regions[0]
            }],
        };
        assert_eq!(MemTable::decode(&below.encode()), Ok(below));
    }

    #[test]
    fn mem_table_page_alignment_when_any_field_unaligned_then_error() {
        let entry = MemRegion {
            guest_addr: 0x10_0000,
            size: 0x2000,
            fd_offset: 0x1000,
        };
        let table = |r: MemRegion| MemTable { regions: vec![r] };
        assert_eq!(table(entry).check_page_alignment(0x1000), Ok(()));
        for bad in [
            MemRegion {
                guest_addr: 0x10_0100,
                ..entry
            },
            MemRegion {
                size: 0x1800,
                ..entry
            },
            MemRegion {
                fd_offset: 0x100,
                ..entry
            },
        ] {
            assert_eq!(
                table(bad).check_page_alignment(0x1000),
                Err(Error::MemTable("entry not aligned to the page size"))
            );
        }
    }

    #[test]
    fn doorbell_info_when_bad_size_or_flags_then_error() {
        let d = DoorbellInfo {
            index: 1,
            region: 0,
            offset: 0x50,
            size: 4,
            flags: DOORBELL_DATAMATCH,
            datamatch: 3,
        };
        assert_eq!(DoorbellInfo::decode(&d.encode()), Ok(d));
        let bad = DoorbellInfo { size: 3, ..d };
        assert_eq!(
            DoorbellInfo::decode(&bad.encode()),
            Err(Error::Doorbell("size is not 0, 1, 2, 4 or 8"))
        );
        let sizeless = DoorbellInfo { size: 0, ..d };
        assert_eq!(
            DoorbellInfo::decode(&sizeless.encode()),
            Err(Error::Doorbell("a sizeless doorbell cannot match data"))
        );
        let flags = DoorbellInfo { flags: 2, ..d };
        assert_eq!(
            DoorbellInfo::decode(&flags.encode()),
            Err(Error::Reserved("doorbell flags"))
        );
    }

    #[test]
    fn irq_payloads_when_reserved_flags_then_error() {
        let i = IrqInfo {
            index: 0,
            flags: IRQ_LEVEL,
        };
        assert_eq!(IrqInfo::decode(&i.encode()), Ok(i));
        assert_eq!(
            IrqInfo::decode(&IrqInfo { index: 0, flags: 2 }.encode()),
            Err(Error::Reserved("irq flags"))
        );
        let s = SetIrq {
            index: 1,
            flags: IRQ_RESAMPLE,
        };
        assert_eq!(SetIrq::decode(&s.encode()), Ok(s));
        assert_eq!(
            SetIrq::decode(&SetIrq { index: 1, flags: 4 }.encode()),
            Err(Error::Reserved("set irq flags"))
        );
    }
}
