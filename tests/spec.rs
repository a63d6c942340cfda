//! docs/protocol.md against the code: the statements a peer written from
//! the specification relies on (feature bits, which failures are answered,
//! check orders, the sequence example), read from the document and checked
//! against the constants, the decoder and real backend processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use outboard_frontend::memory::GuestRam;
use outboard_frontend::DeviceSpec;
use outboard_protocol::channel::{Channel, Error as ChannelError};
use outboard_protocol::control::{
    DeviceInfo, Header, Hello, Payload, Request, SetRegion, Status, FEATURES_SUPPORTED, F_CMD_RING,
    F_DIRECT_MAP, F_DOORBELL, F_FAST_MMIO, F_IRQ, F_MEM_TABLE, F_POSTED_WRITES, F_STATE,
    F_VCPU_TOKENS,
};
use outboard_protocol::ioregionfd::{Cmd, CMD_SIZE};
use outboard_tests::{
    call, connect, connect_stream, error_status, frontend, hello, socket_path, spawn_listening,
};

const SPEC: &str = include_str!("../docs/protocol.md");

/// The text of the section whose heading starts with `heading` (such as
/// `"## 4."` or `"### 5.4 "`), up to the next heading of the same or a
/// higher level.
fn section(heading: &str) -> &'static str {
    let level = heading.split(' ').next().unwrap();
    let start = SPEC
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("no section {heading}"))
        + 1;
    let body = &SPEC[start + heading.len()..];
    let end = body
        .match_indices("\n#")
        .find(|(i, _)| {
            let line = &body[i + 1..];
            let hashes = line.chars().take_while(|&c| c == '#').count();
            hashes <= level.len() && line[hashes..].starts_with(' ')
        })
        .map_or(body.len(), |(i, _)| i);
    &SPEC[start..start + heading.len() + end]
}

/// Whitespace collapsed to single spaces, so that phrases survive line breaks.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The cells of the table rows of `text`.
fn rows(text: &str) -> Vec<Vec<&str>> {
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

fn number(token: &str) -> u64 {
    let t = token.trim_matches('`').replace('_', "");
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => t.parse().unwrap(),
    }
}

/// Every number that follows `key` in `text` (`feat=0x5f` gives 0x5f).
fn values(text: &str, key: &str) -> Vec<u64> {
    text.match_indices(key)
        .map(|(i, _)| {
            let rest = &text[i + key.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_hexdigit() || c == 'x' || c == '_'))
                .unwrap_or(rest.len());
            number(&rest[..end])
        })
        .collect()
}

#[test]
fn feature_table_when_read_from_spec_then_matches_constants_and_offers() {
    let text = section("## 4.");
    let mut highest = 0;
    let mut reserved = None;
    for row in rows(text) {
        let Some(name) = row.get(2).map(|n| n.trim_matches('`')) else {
            continue;
        };
        let constant = match name {
            "F_POSTED_WRITES" => F_POSTED_WRITES,
            "F_FAST_MMIO" => F_FAST_MMIO,
            "F_MEM_TABLE" => F_MEM_TABLE,
            "F_DOORBELL" => F_DOORBELL,
            "F_IRQ" => F_IRQ,
            "F_DIRECT_MAP" => F_DIRECT_MAP,
            "F_VCPU_TOKENS" => F_VCPU_TOKENS,
            "F_STATE" => F_STATE,
            "F_CMD_RING" => F_CMD_RING,
            "reserved" => {
                reserved = Some(row[0].to_owned());
                continue;
            }
            _ => continue,
        };
        let bit = number(row[0]);
        assert_eq!(1u64 << bit, number(row[1]), "{name}: bit and mask");
        assert_eq!(constant, 1 << bit, "{name}: the constant");
        highest = highest.max(bit);
    }
    assert_eq!(
        reserved.as_deref(),
        Some(format!("{}..63", highest + 1).as_str()),
        "the reserved range starts after the last assigned bit"
    );
    let text = flat(text);
    let offered = values(&text, "The reference frontend offers `");
    assert_eq!(offered, vec![FEATURES_SUPPORTED], "the frontend's offer");
    let uart = values(&text, "guest memory nor doorbells, offers `");
    assert_eq!(
        uart,
        vec![FEATURES_SUPPORTED & !(F_MEM_TABLE | F_DOORBELL)],
        "least privilege: no memory, no doorbells"
    );
    assert_eq!(
        FEATURES_SUPPORTED & F_DIRECT_MAP,
        0,
        "bit 5 is never offered"
    );
    // What real backends offer: the UART needs no guest memory and has no
    // doorbells; scratch has all three.
    // Scratch keeps no state: no F_STATE.
    for (backend, expected) in [
        ("outboard-uart", uart[0]),
        ("outboard-scratch", offered[0] & !F_STATE),
    ] {
        let (mut child, path) = spawn_listening(backend, &[]);
        let ch = connect(&path);
        let m = call(
            &ch,
            Request::Hello,
            &Hello::ours(FEATURES_SUPPORTED).encode(),
            &[],
        );
        assert_eq!(Hello::decode(&m.payload).unwrap().features, expected);
        drop(ch);
        child.wait().unwrap();
    }
}

#[test]
fn always_answered_requests_when_read_from_spec_then_error_replies_without_need_reply() {
    // Section 5's table marks the requests answered "(always)".
    let always: Vec<u32> = rows(section("## 5."))
        .iter()
        .filter(|r| r.len() > 4 && r[4].contains("(always)"))
        .map(|r| number(r[0]) as u32)
        .collect();
    assert_eq!(always, vec![1, 2, 3, 12, 13]);
    // No request section may contradict it.
    for sub in ["### 5.1 ", "### 5.2 ", "### 5.3 ", "### 5.12 ", "### 5.13 "] {
        let text = flat(section(sub));
        assert!(
            !text.contains("only with NEED_REPLY"),
            "{sub}says a failure is answered only with NEED_REPLY: {text}"
        );
        assert!(text.contains("- Reply: always"), "{sub}");
    }
    // The backend: a failure of each request without NEED_REPLY (a payload
    // of the wrong size) is answered exactly for those codes.
    let (mut child, path) = spawn_listening("outboard-scratch", &[]);
    let ch = connect(&path);
    hello(&ch);
    for code in 1..=13u32 {
        let h = Header {
            request: code,
            flags: 1,
            size: 3,
        };
        ch.send(h, &[0; 3], &[]).unwrap();
        let marker = call(&ch, Request::GetDeviceInfo, &[], &[]);
        // The marker itself succeeds: an error reply answers `code`.
        let answered = marker.header.is_error();
        assert_eq!(answered, always.contains(&code), "request {code}");
        if answered {
            assert_eq!(marker.header.request, code);
            assert_eq!(error_status(&marker), Some(Status::BadPayload));
            ch.recv().unwrap();
        }
    }
    drop(ch);
    child.wait().unwrap();
}

/// The error list of a request section: its `- Errors` bullet, and the
/// table that follows it when the bullet introduces one.
fn errors_of(sub: &str) -> String {
    let text = section(sub);
    let start = text
        .find("- Errors")
        .unwrap_or_else(|| panic!("{sub}: no errors"));
    let rest = &text[start..];
    let bullet = &rest[..rest.find("\n\n").unwrap_or(rest.len())];
    if !bullet.contains("NotNegotiated") {
        let table: Vec<&str> = rest
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .collect();
        return flat(&table.join("\n"));
    }
    flat(bullet)
}

#[test]
fn reserved_fields_when_sent_before_hello_then_not_negotiated_as_spec_lists() {
    // Every request section that lists both must list NotNegotiated before
    // the reserved-field check (section 5, step 8).
    for sub in [
        "### 5.3 ",
        "### 5.4 ",
        "### 5.5 ",
        "### 5.8 ",
        "### 5.9 ",
        "### 5.10 ",
        "### 5.12 ",
        "### 5.13 ",
    ] {
        let errors = errors_of(sub).to_lowercase();
        let not_negotiated = errors.find("notnegotiated").unwrap();
        let reserved = errors.find("reserved").unwrap();
        assert!(not_negotiated < reserved, "{sub}: {errors}");
    }
    // The backend agrees: right size and fd count, reserved bits set.
    let (mut child, path) = spawn_listening("outboard-scratch", &[]);
    let ch = connect(&path);
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let set = SetRegion {
        index: 0,
        flags: 1 << 1,
        guest_addr: 0x1000,
        user_data: 1,
    };
    let index = [0, 0, 0, 0, 1, 0, 0, 0];
    let cases: [(Request, &[u8], &[i32]); 3] = [
        (Request::SetRegion, &set.encode(), &[theirs.as_raw_fd()]),
        (Request::RemoveRegion, &set.encode(), &[]),
        (Request::GetRegionInfo, &index, &[]),
    ];
    for (req, payload, fds) in cases {
        let m = call(&ch, req, payload, fds);
        assert_eq!(error_status(&m), Some(Status::NotNegotiated), "{req:?}");
    }
    hello(&ch);
    for (req, payload, fds) in cases {
        let m = call(&ch, req, payload, fds);
        assert_eq!(error_status(&m), Some(Status::BadPayload), "{req:?}");
    }
    drop(ch);
    child.wait().unwrap();
}

/// Makes a command break the rule of a row of section 7.6's table.
fn break_rule(message: &str, b: &mut [u8; CMD_SIZE]) {
    if message.starts_with("unknown command") {
        b[0] = 2;
    } else if message.starts_with("reserved bits") {
        b[1] |= 0x20;
    } else if message.starts_with("size exponent") {
        b[1] = (b[1] & 0xf0) | 5;
    } else if message.starts_with("nonzero padding") {
        b[3] = 1;
    } else if message.starts_with("read command without") {
        b[0] = 0;
        b[1] &= !0x10;
    } else {
        panic!("unknown rule {message}");
    }
}

#[test]
fn data_command_checks_when_read_from_spec_then_decoder_reports_first_in_table_order() {
    let messages: Vec<String> = rows(section("### 7.6 "))
        .iter()
        .skip(1)
        .take(5)
        .map(|r| r[1].trim_matches('`').to_owned())
        .collect();
    let prefix = |m: &str| {
        m.split(" N")
            .next()
            .unwrap()
            .split(" 0xNN")
            .next()
            .unwrap()
            .to_owned()
    };
    let valid = Cmd::write(1, 0, outboard_protocol::AccessSize::B8, 0, true).encode();
    for (i, first) in messages.iter().enumerate() {
        for later in &messages[i + 1..] {
            let mut b = valid;
            break_rule(later, &mut b);
            break_rule(first, &mut b);
            let got = Cmd::decode(&b).err().map(|e| e.to_string());
            let got = got.unwrap_or_default();
            assert!(
                got.starts_with(&prefix(first)),
                "breaking {first:?} and {later:?} reported {got:?}"
            );
        }
    }
}

/// Relays control messages between a frontend and a backend, recording
/// each request and its reply.
fn relay(listener: UnixListener, backend: Channel) -> Vec<(Header, Vec<u8>)> {
    let (front, _) = listener.accept().unwrap();
    let front = Channel::new(front);
    let mut log = Vec::new();
    loop {
        let m = match front.recv() {
            Ok(m) => m,
            Err(ChannelError::Closed) => return log,
            Err(e) => panic!("{e}"),
        };
        let fds: Vec<i32> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
        backend.send(m.header, &m.payload, &fds).unwrap();
        log.push((m.header, m.payload));
        let r = backend.recv().unwrap();
        front.send(r.header, &r.payload, &[]).unwrap();
        log.push((r.header, r.payload));
    }
}

#[test]
fn sequence_example_when_scratch_attached_then_matches_recorded_messages() {
    let example = section("## 9.");
    let (mut child, backend_path) = spawn_listening("outboard-scratch", &[]);
    let backend = Channel::new(connect_stream(&backend_path));
    let relay_path = socket_path("relay");
    let listener = UnixListener::bind(&relay_path).unwrap();
    let recorder = std::thread::spawn(move || relay(listener, backend));
    let mut fe = frontend(Duration::from_secs(5));
    fe.set_memory(GuestRam::new(&[(0, 0x1000_0000)]).unwrap())
        .unwrap();
    fe.attach(&DeviceSpec::connect("scratch", &relay_path))
        .unwrap();
    fe.reset("scratch").unwrap();
    fe.remove_region("scratch", 1, 0xd000_1000).unwrap();
    fe.detach("scratch").unwrap();
    let log = recorder.join().unwrap();
    child.wait().unwrap();

    let requests: Vec<&(Header, Vec<u8>)> = log.iter().filter(|(h, _)| !h.is_reply()).collect();
    // The order in which the request codes first appear.
    let mut recorded_codes: Vec<u32> = Vec::new();
    for (h, _) in &requests {
        if !recorded_codes.contains(&h.request) {
            recorded_codes.push(h.request);
        }
    }
    let mut example_codes: Vec<u32> = Vec::new();
    for (i, _) in example.match_indices('[') {
        let rest = &example[i + 1..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let is_request = rest[digits.len()..]
            .split_whitespace()
            .nth(1)
            .is_some_and(|f| f == "0x201");
        if !digits.is_empty() && is_request {
            let code = number(&digits) as u32;
            if !example_codes.contains(&code) {
                example_codes.push(code);
            }
        }
    }
    assert_eq!(example_codes, recorded_codes, "request order");
    // Negotiation: what each side offers.
    let hellos: Vec<u64> = log
        .iter()
        .filter(|(h, _)| h.request == Request::Hello as u32)
        .map(|(_, p)| Hello::decode(p).unwrap().features)
        .collect();
    assert_eq!(values(example, "feat="), hellos, "offered features");
    let (_, info) = log
        .iter()
        .find(|(h, _)| h.is_reply() && h.request == Request::GetDeviceInfo as u32)
        .unwrap();
    let info = DeviceInfo::decode(info).unwrap();
    assert_eq!(
        values(example, "num_regions="),
        vec![u64::from(info.num_regions)]
    );
    assert_eq!(
        values(example, "num_doorbells="),
        vec![u64::from(info.num_doorbells)]
    );
    assert_eq!(values(example, "num_irqs="), vec![u64::from(info.num_irqs)]);
    // Placements: tokens, in order, and the vCPU tokens of each.
    let placements: Vec<SetRegion> = requests
        .iter()
        .filter(|(h, _)| {
            h.request == Request::SetRegion as u32 || h.request == Request::RemoveRegion as u32
        })
        .map(|(_, p)| SetRegion::decode(p).unwrap())
        .collect();
    let tokens: Vec<u64> = placements.iter().map(|s| s.user_data).collect();
    assert_eq!(values(example, "user_data="), tokens, "user_data tokens");
    let example_vcpus = values(example, "VCPUS=");
    assert!(
        !example_vcpus.is_empty(),
        "the example shows the vCPU tokens"
    );
    for s in &placements {
        for &v in &example_vcpus {
            assert_eq!(v, u64::from(s.vcpu_tokens()), "vCPU tokens of {s:?}");
        }
    }
    // Data commands on region 0 carry its token.
    for ud in values(example, "ud=") {
        assert_eq!(ud, tokens[0], "data commands of region 0");
    }
}

#[test]
fn host_stream_when_spec_read_then_header_and_kinds_match_the_protocol_crate() {
    use outboard_protocol::host_stream as hs;
    let text = section("### 11.2 ");
    let fields: Vec<(u64, &str, &str)> = rows(text)
        .iter()
        .filter(|r| r.len() == 4 && r[0] != "Offset")
        .map(|r| (number(r[0]), r[1], r[2]))
        .collect();
    assert_eq!(
        fields,
        [
            (0, "`kind`", "u32"),
            (4, "`flags`", "u32"),
            (8, "`a`", "u64"),
            (16, "`b`", "u64")
        ]
    );
    let flat = flat(text);
    assert!(flat.contains(&format!("a {}-byte header", hs::HEADER_LEN)));
    assert!(flat.contains(&format!("at most {} bytes", hs::MAX_PAYLOAD)));
    assert!(flat.contains(&format!("at most {} bytes)", hs::MAX_MESSAGE)));
    let kinds = format!(
        "{} OUT, {} ACK, {} IN",
        hs::KIND_OUT,
        hs::KIND_ACK,
        hs::KIND_IN
    );
    assert!(flat.contains(&kinds), "{kinds}");
    assert_eq!((hs::FLAG_LAST, hs::FLAG_FRESH), (1 << 0, 1 << 1));
    assert!(flat.contains("bit 0 LAST, bit 1 FRESH"));
}
