//! The [`Payload`] trait and the fixed-layout payloads of negotiation,
//! device and region description, region placement and status replies.

use super::{
    check_size, decode_name, encode_name, le_u32, le_u64, Error, Status, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};
#[cfg(doc)]
use super::{Request, FLAG_ERROR, F_DOORBELL, F_IRQ, F_VCPU_TOKENS};

/// A fixed-layout payload.
pub trait Payload: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Encodes into exactly [`Self::SIZE`] bytes.
    fn encode(&self) -> Vec<u8>;
    /// Decodes from exactly [`Self::SIZE`] bytes.
    fn decode(b: &[u8]) -> Result<Self, Error>;
}

/// Checks that a name fits a fixed-width field.
pub fn check_name(name: &str, width: usize) -> Result<(), Error> {
    if name.len() > width || name.contains('\0') {
        return Err(Error::NameTooLong(width));
    }
    Ok(())
}

/// [`Request::Hello`] payload, sent by the frontend and answered by the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u32,
    /// Newest protocol version the sender speaks.
    pub max_version: u32,
    /// `F_*` feature bits the sender offers.
    pub features: u64,
}

/// The outcome of version and feature negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version both sides use.
    pub version: u32,
    /// Features both sides offered.
    pub features: u64,
}

impl Hello {
    /// What this implementation offers.
    pub fn ours(features: u64) -> Self {
        Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            features,
        }
    }

    /// Negotiates with a peer: the highest version in both ranges (the lower
    /// of the two maxima) and the intersection of the features.
    pub fn negotiate(&self, peer: &Hello) -> Result<Negotiated, Error> {
        if peer.min_version > peer.max_version {
            return Err(Error::EmptyVersionRange(peer.min_version, peer.max_version));
        }
        let version = self.max_version.min(peer.max_version);
        if version < self.min_version.max(peer.min_version) {
            return Err(Error::NoCommonVersion {
                our_min: self.min_version,
                our_max: self.max_version,
                peer_min: peer.min_version,
                peer_max: peer.max_version,
            });
        }
        Ok(Negotiated {
            version,
            features: self.features & peer.features,
        })
    }
}

impl Payload for Hello {
    const SIZE: usize = 16;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.min_version.to_le_bytes());
        v.extend_from_slice(&self.max_version.to_le_bytes());
        v.extend_from_slice(&self.features.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        Ok(Hello {
            min_version: le_u32(b, 0),
            max_version: le_u32(b, 4),
            features: le_u64(b, 8),
        })
    }
}

/// Device kinds reported in [`DeviceInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceKind(pub u32);

impl DeviceKind {
    /// Anything not listed.
    pub const OTHER: DeviceKind = DeviceKind(0);
    /// A 16550-compatible UART.
    pub const UART: DeviceKind = DeviceKind(1);
    /// The `outboard-scratch` test device.
    pub const SCRATCH: DeviceKind = DeviceKind(2);
    /// Base of virtio devices: `VIRTIO_BASE + virtio device id`.
    pub const VIRTIO_BASE: u32 = 0x1000;
}

/// Width of [`DeviceInfo::name`] on the wire.
pub const DEVICE_NAME_LEN: usize = 64;
/// Width of [`RegionInfo::name`] on the wire.
pub const REGION_NAME_LEN: usize = 32;

/// Reply to [`Request::GetDeviceInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// What the device is.
    pub kind: DeviceKind,
    /// Number of regions, indexed `0..num_regions`.
    pub num_regions: u32,
    /// Number of doorbells, indexed `0..num_doorbells` (zero unless [`F_DOORBELL`]).
    pub num_doorbells: u32,
    /// Number of interrupt lines, indexed `0..num_irqs` (zero unless [`F_IRQ`]).
    pub num_irqs: u32,
    /// Human-readable name, at most [`DEVICE_NAME_LEN`] bytes.
    pub name: String,
}

impl Payload for DeviceInfo {
    const SIZE: usize = 16 + DEVICE_NAME_LEN;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.kind.0.to_le_bytes());
        v.extend_from_slice(&self.num_regions.to_le_bytes());
        v.extend_from_slice(&self.num_doorbells.to_le_bytes());
        v.extend_from_slice(&self.num_irqs.to_le_bytes());
        encode_name(&self.name, DEVICE_NAME_LEN, &mut v);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        Ok(DeviceInfo {
            kind: DeviceKind(le_u32(b, 0)),
            num_regions: le_u32(b, 4),
            num_doorbells: le_u32(b, 8),
            num_irqs: le_u32(b, 12),
            name: decode_name(&b[16..])?,
        })
    }
}

/// [`Request::GetRegionInfo`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIndex {
    /// Region index.
    pub index: u32,
}

impl Payload for RegionIndex {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("region index"));
        }
        Ok(RegionIndex {
            index: le_u32(b, 0),
        })
    }
}

/// Region flag: port I/O space (clear: MMIO).
pub const REGION_PIO: u32 = 1 << 0;
/// Region flag: the guest may read.
pub const REGION_READ: u32 = 1 << 1;
/// Region flag: the guest may write.
pub const REGION_WRITE: u32 = 1 << 2;
/// Region flag: the device accepts posted writes.
pub const REGION_POSTED_WRITES: u32 = 1 << 3;
/// Region flag: a FAST_MMIO sizeless doorbell region (write-only, data ignored).
pub const REGION_FAST_MMIO: u32 = 1 << 4;
/// Region flag: `preferred_addr` is meaningful.
pub const REGION_PREFERRED_ADDR: u32 = 1 << 5;
const REGION_FLAGS_KNOWN: u32 = REGION_PIO
    | REGION_READ
    | REGION_WRITE
    | REGION_POSTED_WRITES
    | REGION_FAST_MMIO
    | REGION_PREFERRED_ADDR;

/// Reply to [`Request::GetRegionInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `REGION_*` flags.
    pub flags: u32,
    /// Size in bytes (nonzero).
    pub size: u64,
    /// Guest address the device would like (a UART at 0x3f8), if `REGION_PREFERRED_ADDR`.
    pub preferred_addr: u64,
    /// Allowed access sizes: bit n set = `1 << n` bytes allowed (bits 0..=3).
    pub access_sizes: u8,
    /// Human-readable name, at most [`REGION_NAME_LEN`] bytes.
    pub name: String,
}

impl RegionInfo {
    /// True for port I/O regions.
    pub fn is_pio(&self) -> bool {
        self.flags & REGION_PIO != 0
    }
}

impl Payload for RegionInfo {
    const SIZE: usize = 32 + REGION_NAME_LEN;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.preferred_addr.to_le_bytes());
        v.push(self.access_sizes);
        v.extend_from_slice(&[0u8; 7]);
        encode_name(&self.name, REGION_NAME_LEN, &mut v);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !REGION_FLAGS_KNOWN != 0 || b[25..32].iter().any(|&x| x != 0) {
            return Err(Error::Reserved("region info"));
        }
        let access_sizes = b[24];
        if access_sizes == 0 || access_sizes & !0x0f != 0 {
            return Err(Error::AccessSizes(access_sizes));
        }
        Ok(RegionInfo {
            index: le_u32(b, 0),
            flags,
            size: le_u64(b, 8),
            preferred_addr: le_u64(b, 16),
            access_sizes,
            name: decode_name(&b[32..])?,
        })
    }
}

/// Set-region flag: writes to this region are posted (sent without the resp bit).
pub const SET_REGION_POSTED: u32 = 1 << 0;
/// Set-region flags bits 16..=31: number of per-vCPU tokens (needs [`F_VCPU_TOKENS`]).
pub const SET_REGION_VCPUS_SHIFT: u32 = 16;
const SET_REGION_FLAGS_KNOWN: u32 = SET_REGION_POSTED | (0xffff << SET_REGION_VCPUS_SHIFT);

/// [`Request::SetRegion`] and [`Request::RemoveRegion`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetRegion {
    /// Region index.
    pub index: u32,
    /// `SET_REGION_*` flags.
    pub flags: u32,
    /// Guest address the frontend placed the region at.
    pub guest_addr: u64,
    /// Token that every command for this region carries.
    pub user_data: u64,
}

impl SetRegion {
    /// True when writes are posted.
    pub fn posted(&self) -> bool {
        self.flags & SET_REGION_POSTED != 0
    }

    /// Number `n` of per-vCPU tokens: the region answers to `user_data`
    /// (an access by no particular vCPU) and to `user_data + 1 + i` for an
    /// access by vCPU `i < n`.
    pub fn vcpu_tokens(&self) -> u32 {
        self.flags >> SET_REGION_VCPUS_SHIFT
    }
}

impl Payload for SetRegion {
    const SIZE: usize = 24;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.guest_addr.to_le_bytes());
        v.extend_from_slice(&self.user_data.to_le_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        let flags = le_u32(b, 4);
        if flags & !SET_REGION_FLAGS_KNOWN != 0 {
            return Err(Error::Reserved("set region flags"));
        }
        Ok(SetRegion {
            index: le_u32(b, 0),
            flags,
            guest_addr: le_u64(b, 8),
            user_data: le_u64(b, 16),
        })
    }
}

/// Payload of an acknowledgement (status [`Status::Ok`]) or of any reply with
/// [`FLAG_ERROR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusReply {
    /// The result.
    pub status: Status,
}

impl Payload for StatusReply {
    const SIZE: usize = 8;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&(self.status as u32).to_le_bytes());
        v.extend_from_slice(&[0u8; 4]);
        v
    }
    fn decode(b: &[u8]) -> Result<Self, Error> {
        check_size(b, Self::SIZE)?;
        if le_u32(b, 4) != 0 {
            return Err(Error::Reserved("status"));
        }
        Ok(StatusReply {
            status: Status::from_u32(le_u32(b, 0))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_when_wrong_size_then_error() {
        assert_eq!(
            Hello::decode(&[0u8; 15]),
            Err(Error::PayloadSize {
                expected: 16,
                got: 15
            })
        );
        assert!(matches!(
            SetRegion::decode(&[0u8; 25]),
            Err(Error::PayloadSize { .. })
        ));
    }

    #[test]
    fn hello_negotiate_when_overlap_then_lower_max_wins() {
        let ours = Hello {
            min_version: 1,
            max_version: 3,
            features: 0b111,
        };
        let peer = Hello {
            min_version: 2,
            max_version: 5,
            features: 0b101,
        };
        assert_eq!(
            ours.negotiate(&peer),
            Ok(Negotiated {
                version: 3,
                features: 0b101
            })
        );
        assert_eq!(Hello::decode(&ours.encode()), Ok(ours));
    }

    #[test]
    fn hello_negotiate_when_disjoint_then_no_common_version() {
        let ours = Hello::ours(0);
        let peer = Hello {
            min_version: 2,
            max_version: 2,
            features: 0,
        };
        assert!(matches!(
            ours.negotiate(&peer),
            Err(Error::NoCommonVersion { .. })
        ));
        let empty = Hello {
            min_version: 3,
            max_version: 1,
            features: 0,
        };
        assert_eq!(ours.negotiate(&empty), Err(Error::EmptyVersionRange(3, 1)));
    }

    #[test]
    fn device_info_roundtrip_when_name_fits_then_identical() {
        let d = DeviceInfo {
            kind: DeviceKind::UART,
            num_regions: 1,
            num_doorbells: 2,
            num_irqs: 1,
            name: "uart".into(),
        };
        assert_eq!(DeviceInfo::decode(&d.encode()), Ok(d));
    }

    #[test]
    fn name_when_not_utf8_or_not_padded_then_error() {
        let mut b = DeviceInfo {
            kind: DeviceKind::OTHER,
            num_regions: 0,
            num_doorbells: 0,
            num_irqs: 0,
            name: "ab".into(),
        }
        .encode();
        b[16] = 0xff;
        assert_eq!(DeviceInfo::decode(&b), Err(Error::BadName));
        b[16] = b'a';
        b[20] = b'x';
        assert_eq!(DeviceInfo::decode(&b), Err(Error::BadName));
        assert_eq!(check_name(&"x".repeat(65), 64), Err(Error::NameTooLong(64)));
        let mut r = [0u8; 8];
        r[4] = 1;
        assert_eq!(
            RegionIndex::decode(&r),
            Err(Error::Reserved("region index"))
        );
    }

    #[test]
    fn region_info_when_bad_fields_then_error() {
        let r = RegionInfo {
            index: 0,
            flags: REGION_READ | REGION_WRITE,
            size: 8,
            preferred_addr: 0,
            access_sizes: 1,
            name: "regs".into(),
        };
        assert_eq!(RegionInfo::decode(&r.encode()), Ok(r.clone()));
        let mut b = r.encode();
        b[24] = 0;
        assert_eq!(RegionInfo::decode(&b), Err(Error::AccessSizes(0)));
        b[24] = 0x10;
        assert_eq!(RegionInfo::decode(&b), Err(Error::AccessSizes(0x10)));
        let mut b = r.encode();
        b[6] = 1;
        assert_eq!(RegionInfo::decode(&b), Err(Error::Reserved("region info")));
    }

    #[test]
    fn set_region_when_reserved_flags_then_error() {
        let s = SetRegion {
            index: 1,
            flags: SET_REGION_POSTED,
            guest_addr: 0x1000,
            user_data: 42,
        };
        assert_eq!(SetRegion::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[4] = 2;
        assert_eq!(
            SetRegion::decode(&b),
            Err(Error::Reserved("set region flags"))
        );
    }

    #[test]
    fn status_reply_when_reserved_nonzero_then_error() {
        let s = StatusReply {
            status: Status::RegionBusy,
        };
        assert_eq!(StatusReply::decode(&s.encode()), Ok(s));
        let mut b = s.encode();
        b[7] = 1;
        assert_eq!(StatusReply::decode(&b), Err(Error::Reserved("status")));
        assert_eq!(
            Status::for_error(&Error::PayloadSize {
                expected: 1,
                got: 2
            }),
            Status::BadPayload
        );
    }
}
