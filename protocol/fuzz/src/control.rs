//! The control channel: the header and every payload decoder.

use std::fmt::Debug;

use outboard_protocol::control::{
    check_name, DeviceInfo, DoorbellInfo, Error, Header, Hello, IrqInfo, MemTable, Payload,
    RegionIndex, RegionInfo, Request, SetCmdRing, SetIrq, SetRegion, Status, StatusReply,
    DEVICE_NAME_LEN, DOORBELL_DATAMATCH, FLAG_ERROR, FLAG_NEED_REPLY, FLAG_REPLY,
    FLAG_VERSION_MASK, HEADER_SIZE, HEADER_VERSION, IRQ_LEVEL, IRQ_RESAMPLE, MAX_FDS,
    MAX_MEM_REGIONS, MAX_PAYLOAD, REGION_NAME_LEN, SET_REGION_POSTED, SET_REGION_VCPUS_SHIFT,
};
use outboard_protocol::ring::{area_size, valid_entries};

const FLAGS_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY | FLAG_ERROR;

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// `Header::decode` on the first 12 bytes, plus the request and status code
/// tables on its `request` field. An accepted header is canonical, has
/// version 1, only known flags and a payload within [`MAX_PAYLOAD`]; each
/// rejection reports the real version, flag bits or size, and maps to the
/// status section 3.6 names. A known request code round-trips and its fd
/// range and payload size respect the framing limits.
pub fn control_header(data: &[u8]) {
    let Some(b) = data
        .get(..HEADER_SIZE)
        .and_then(|s| <[u8; HEADER_SIZE]>::try_from(s).ok())
    else {
        return;
    };
    let (request, flags, size) = (le_u32(&b, 0), le_u32(&b, 4), le_u32(&b, 8));
    match Header::decode(&b) {
        Ok(h) => {
            assert_eq!(h.encode(), b);
            assert_eq!((h.request, h.flags, h.size), (request, flags, size));
            assert_eq!(h.flags & FLAG_VERSION_MASK, HEADER_VERSION);
            assert_eq!(h.flags & !FLAGS_KNOWN, 0);
            assert!(h.size <= MAX_PAYLOAD);
            assert_eq!(h.is_reply(), flags & FLAG_REPLY != 0);
            assert_eq!(h.need_reply(), flags & FLAG_NEED_REPLY != 0);
            assert_eq!(h.is_error(), flags & FLAG_ERROR != 0);
            if let Ok(r) = Request::from_u32(h.request) {
                let built = Header::request(r, h.size as usize, h.need_reply());
                assert_eq!(Header::decode(&built.encode()), Ok(built));
            }
            let reply = Header::reply(h.request, h.size as usize, h.is_error());
            assert_eq!(Header::decode(&reply.encode()), Ok(reply));
            assert!(reply.is_reply() && !reply.need_reply());
        }
        Err(e) => {
            match &e {
                Error::BadVersion(v) => assert!(*v == flags & FLAG_VERSION_MASK && *v != 1),
                Error::ReservedFlags(f) => {
                    assert_eq!(flags & FLAG_VERSION_MASK, HEADER_VERSION);
                    assert!(*f != 0 && *f == flags & !FLAGS_KNOWN);
                }
                Error::PayloadTooLarge(s) => {
                    assert_eq!(flags & !FLAGS_KNOWN, 0);
                    assert!(*s == size && *s > MAX_PAYLOAD);
                }
                other => panic!("Header::decode cannot fail with {other:?}"),
            }
            let status = Status::for_error(&e);
            assert!(matches!(
                status,
                Status::BadVersion | Status::ReservedFlags | Status::PayloadTooLarge
            ));
        }
    }
    match Request::from_u32(request) {
        Ok(r) => {
            assert_eq!(r as u32, request);
            let (min, max) = r.fd_range();
            assert!(min <= max && max <= MAX_FDS);
            if let Some(s) = r.payload_size() {
                assert!(s <= MAX_PAYLOAD as usize);
            }
        }
        Err(e) => assert_eq!(e, Error::UnknownRequest(request)),
    }
    match Status::from_u32(request) {
        Ok(s) => assert_eq!(s as u32, request),
        Err(e) => assert_eq!(e, Error::UnknownStatus(request)),
    }
}

/// The properties every fixed-size payload shares: wrong sizes are
/// `PayloadSize` errors naming both sizes, and an accepted payload is the
/// canonical encoding of its value. Returns the value for the type's own
/// checks.
fn fixed<P: Payload + PartialEq + Debug>(b: &[u8]) -> Result<P, Error> {
    let r = P::decode(b);
    if b.len() != P::SIZE {
        assert_eq!(
            r,
            Err(Error::PayloadSize {
                expected: P::SIZE,
                got: b.len()
            })
        );
    }
    if let Ok(v) = &r {
        let enc = v.encode();
        assert_eq!(enc, b, "accepted payload is not canonical: {v:?}");
        assert_eq!(enc.len(), P::SIZE);
        assert_eq!(P::decode(&enc).as_ref(), Ok(v));
    }
    r
}

/// HELLO: any 16 bytes are a Hello; negotiation with our own Hello either
/// agrees on a version inside both ranges and a subset of both feature sets,
/// or fails because the ranges are empty or disjoint.
pub fn hello(data: &[u8]) {
    let Ok(peer) = fixed::<Hello>(data) else {
        return;
    };
    let ours = Hello::ours(u64::MAX);
    match ours.negotiate(&peer) {
        Ok(n) => {
            assert!(n.version >= peer.min_version && n.version <= peer.max_version);
            assert!(n.version >= ours.min_version && n.version <= ours.max_version);
            assert_eq!(n.features, peer.features);
        }
        Err(Error::EmptyVersionRange(lo, hi)) => {
            assert!(lo == peer.min_version && hi == peer.max_version && lo > hi);
        }
        Err(Error::NoCommonVersion { .. }) => {
            assert!(
                peer.max_version < ours.min_version || peer.min_version > ours.max_version,
                "refused an overlapping range {peer:?}"
            );
        }
        Err(e) => panic!("negotiate cannot fail with {e:?}"),
    }
}

/// DeviceInfo: an accepted name is valid UTF-8 without NUL that fits 64 bytes.
pub fn device_info(data: &[u8]) {
    if let Ok(d) = fixed::<DeviceInfo>(data) {
        assert_eq!(check_name(&d.name, DEVICE_NAME_LEN), Ok(()));
    }
}

/// RegionIndex (and ObjectIndex): the reserved word is zero.
pub fn region_index(data: &[u8]) {
    if let Ok(r) = fixed::<RegionIndex>(data) {
        assert_eq!(data[4..8], [0u8; 4]);
        assert_eq!(r.index, le_u32(data, 0));
    }
}

/// RegionInfo: known flags, zero reserved bytes, an access-size mask in
/// 1..=15, a valid name.
pub fn region_info(data: &[u8]) {
    if let Ok(r) = fixed::<RegionInfo>(data) {
        assert_eq!(r.flags & !0x3f, 0);
        assert!((1..=0x0f).contains(&r.access_sizes));
        assert_eq!(check_name(&r.name, REGION_NAME_LEN), Ok(()));
        assert_eq!(r.is_pio(), r.flags & 1 != 0);
    }
}

/// SetRegion: only the POSTED and VCPUS flag bits.
pub fn set_region(data: &[u8]) {
    if let Ok(s) = fixed::<SetRegion>(data) {
        assert_eq!(
            s.flags & !(SET_REGION_POSTED | 0xffff << SET_REGION_VCPUS_SHIFT),
            0
        );
        assert_eq!(s.posted(), s.flags & SET_REGION_POSTED != 0);
        assert!(s.vcpu_tokens() <= 0xffff);
    }
}

/// StatusReply: a known status and a zero reserved word.
pub fn status_reply(data: &[u8]) {
    if let Ok(s) = fixed::<StatusReply>(data) {
        assert_eq!(Status::from_u32(s.status as u32), Ok(s.status));
        assert_eq!(data[4..8], [0u8; 4]);
        assert!(!s.status.to_string().is_empty());
    }
}

/// DoorbellInfo: size 0, 1, 2, 4 or 8, only DATAMATCH, and no DATAMATCH on a
/// sizeless doorbell.
pub fn doorbell_info(data: &[u8]) {
    if let Ok(d) = fixed::<DoorbellInfo>(data) {
        assert!(matches!(d.size, 0 | 1 | 2 | 4 | 8));
        assert_eq!(d.flags & !DOORBELL_DATAMATCH, 0);
        assert!(d.size != 0 || d.flags & DOORBELL_DATAMATCH == 0);
    }
}

/// IrqInfo: only the LEVEL flag.
pub fn irq_info(data: &[u8]) {
    if let Ok(i) = fixed::<IrqInfo>(data) {
        assert_eq!(i.flags & !IRQ_LEVEL, 0);
    }
}

/// SetIrq: only the RESAMPLE flag.
pub fn set_irq(data: &[u8]) {
    if let Ok(s) = fixed::<SetIrq>(data) {
        assert_eq!(s.flags & !IRQ_RESAMPLE, 0);
    }
}

/// SetCmdRing: accepted entries are a valid ring size (a power of two in
/// 8..=4096), and the ring they describe has a size.
pub fn set_cmd_ring(data: &[u8]) {
    if let Ok(s) = fixed::<SetCmdRing>(data) {
        assert!(valid_entries(s.entries), "{s:?}");
        assert!(area_size(s.entries).is_ok());
    }
}

/// MemTable: accepted iff 1..=8 entries, exact size, every entry non-empty
/// and not wrapping (in guest space and in the fd), entries sorted and
/// disjoint; canonical; size errors name the real length.
pub fn mem_table(data: &[u8]) {
    match MemTable::decode(data) {
        Ok(t) => {
            let n = t.regions.len();
            assert!((1..=MAX_MEM_REGIONS).contains(&n));
            assert_eq!(data.len(), MemTable::HEADER + MemTable::ENTRY * n);
            assert_eq!(t.encode(), data, "accepted table is not canonical");
            assert_eq!(MemTable::decode(&t.encode()).as_ref(), Ok(&t));
            let mut prev_last: Option<u64> = None;
            for r in &t.regions {
                assert!(r.size > 0);
                let last = r.guest_addr.checked_add(r.size - 1);
                assert!(last.is_some(), "wrapping entry accepted: {r:?}");
                assert!(r.fd_offset.checked_add(r.size).is_some());
                if let Some(p) = prev_last {
                    assert!(p < r.guest_addr, "unsorted or overlapping entries accepted");
                }
                prev_last = last;
            }
        }
        Err(Error::PayloadSize { expected, got }) => {
            assert_eq!(got, data.len());
            if got < MemTable::HEADER {
                assert_eq!(expected, MemTable::HEADER);
            } else {
                let count = le_u32(data, 0) as usize;
                assert!((1..=MAX_MEM_REGIONS).contains(&count));
                assert_eq!(expected, MemTable::HEADER + MemTable::ENTRY * count);
                assert_ne!(expected, got);
            }
        }
        Err(Error::Reserved(_)) => assert_ne!(le_u32(data, 4), 0),
        Err(Error::MemTable(_)) => {}
        Err(e) => panic!("MemTable::decode cannot fail with {e:?}"),
    }
}
