//! The host stream's message decoder (docs/protocol.md, section 11).

use outboard_protocol::host_stream::{Message, MAX_MESSAGE};

/// Decoding never panics; a message that decodes re-encodes to exactly
/// the bytes it came from (the encoding is canonical), and whatever
/// decodes keeps its payload within the limits.
pub fn host_stream(data: &[u8]) {
    let Ok(m) = Message::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_MESSAGE);
    let mut again = Vec::new();
    m.encode(&mut again);
    assert_eq!(again, data, "message is not canonical");
    if let Message::Out {
        offset, data: d, ..
    }
    | Message::In { offset, data: d } = m
    {
        assert!(offset.checked_add(d.len() as u64).is_some());
    }
}
