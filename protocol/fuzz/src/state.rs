//! The state area and snapshot envelope (docs/protocol.md 5.14): what a
//! backend reads from memory the frontend owns.

use outboard_protocol::state::{self, Reader, Snapshot, MIN_AREA};

/// Treats the input as a state area (padded or cut to at least 4 KiB):
/// `open` and `latest` never panic whatever the bytes; a record `latest`
/// returns decodes or is refused without a panic; a decoded snapshot
/// re-encodes to the bytes it came from; committing into the area then
/// reads the committed record back, and the previous one survives a torn
/// newest slot. Then reads the input field by field with `Reader`.
pub fn state_area(data: &[u8]) {
    let mut area = data.to_vec();
    if area.len() < MIN_AREA {
        area.resize(MIN_AREA, 0);
    }
    area.truncate(2 * MIN_AREA);
    let before = area.clone();
    if let Ok(record) = state::latest(&area) {
        if let Ok(s) = Snapshot::decode(record) {
            let name_ok = s.name.len() <= usize::from(u16::MAX);
            if name_ok {
                assert_eq!(s.encode(), record, "snapshot is not canonical");
            }
            let _ = s.check_device("x", 1);
        }
    }
    assert_eq!(area, before, "latest must not write");
    if state::open(&mut area).is_ok() {
        let record = Snapshot {
            kind: 2,
            name: "fuzz".into(),
            version: 1,
            served: vec![],
            state: data.iter().take(64).copied().collect(),
        }
        .encode();
        if state::commit(&mut area, &record).is_ok() {
            assert_eq!(state::latest(&area), Ok(&record[..]));
            assert_eq!(Snapshot::decode(&record).map(|s| s.encode()), Ok(record));
        }
    }
    let mut r = Reader::new(data);
    while r.u16().is_ok() {
        let _ = r.u8();
    }
}
