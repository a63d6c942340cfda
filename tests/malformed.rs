//! A corpus of malformed control messages and data commands, sent by hand to
//! real backend processes: each gets its documented error, and nothing crashes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Child;

use outboard::cli::{EXIT_OK, EXIT_PROTOCOL};
use outboard_protocol::channel::Channel;
use outboard_protocol::control::{
    DeviceInfo, Header, Hello, Payload, RegionIndex, Request, SetRegion, Status,
    FEATURES_SUPPORTED, FLAG_REPLY, HEADER_VERSION, MAX_FDS, MAX_PAYLOAD, SET_REGION_POSTED,
};
use outboard_protocol::ioregionfd::{Cmd, Resp, RESP_SIZE};
use outboard_protocol::AccessSize;
use outboard_tests::{call, connect, error_status, hello, spawn_listening, stderr_of, wait_exit};

struct Peer {
    child: Child,
    ch: Channel,
}

fn start(backend: &str) -> Peer {
    let (child, path) = spawn_listening(backend, &[]);
    let ch = connect(&path);
    Peer { child, ch }
}

impl Peer {
    fn call(&self, req: Request, payload: &[u8], fds: &[i32]) -> Option<Status> {
        error_status(&call(&self.ch, req, payload, fds))
    }

    /// Places region `index` with a fresh data socket; returns our end.
    fn set_region(&self, index: u32, user_data: u64, flags: u32) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let set = SetRegion {
            index,
            flags,
            guest_addr: 0x1000,
            user_data,
        };
        assert_eq!(
            self.call(Request::SetRegion, &set.encode(), &[theirs.as_raw_fd()]),
            None
        );
        ours
    }

    /// Expects the backend to exit with `code` and `needle` on stderr.
    fn expect_exit(mut self, code: u8, needle: &str) {
        let status = wait_exit(&mut self.child);
        let err = stderr_of(&mut self.child);
        assert_eq!(status.code(), Some(i32::from(code)), "stderr: {err}");
        assert!(err.contains(needle), "{needle:?} not in stderr: {err}");
    }
}

/// A memory table of one 4 KiB entry at guest address 0, fd offset 0.
fn one_page_table() -> outboard_protocol::control::MemTable {
    outboard_protocol::control::MemTable {
        regions: vec![outboard_protocol::control::MemRegion {
            guest_addr: 0,
            size: 0x1000,
            fd_offset: 0,
        }],
    }
}

fn raw_header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    Header {
        request,
        flags,
        size,
    }
    .encode()
    .to_vec()
}

#[test]
fn control_corpus_when_recoverable_then_error_reply_and_backend_keeps_serving() {
    let p = start("outboard-scratch");
    // Before HELLO, nothing else is served.
    assert_eq!(
        p.call(Request::GetDeviceInfo, &[], &[]),
        Some(Status::NotNegotiated)
    );
    hello(&p.ch);
    assert_eq!(
        p.call(
            Request::Hello,
            &Hello::ours(FEATURES_SUPPORTED).encode(),
            &[]
        ),
        Some(Status::Unsupported),
        "a second HELLO"
    );
    // Unknown request code, answered because NEED_REPLY is set.
    p.ch.send(
        Header {
            request: 99,
            flags: HEADER_VERSION,
            size: 0,
        },
        &[],
        &[],
    )
    .unwrap();
    p.ch.send(Header::request(Request::GetDeviceInfo, 0, true), &[], &[])
        .unwrap();
    let info = p.ch.recv().unwrap();
    assert_eq!(
        info.header.request,
        Request::GetDeviceInfo as u32,
        "no reply without NEED_REPLY"
    );
    let m = call(&p.ch, Request::Hello, &[], &[]);
    assert_eq!(
        error_status(&m),
        Some(Status::BadPayload),
        "HELLO with an empty payload"
    );
    let unknown = {
        p.ch.send(
            Header {
                request: 99,
                ..Header::request(Request::Reset, 0, true)
            },
            &[],
            &[],
        )
        .unwrap();
        error_status(&p.ch.recv().unwrap())
    };
    assert_eq!(unknown, Some(Status::UnknownRequest));
    // Wrong fd counts.
    let set = SetRegion {
        index: 0,
        flags: 0,
        guest_addr: 0,
        user_data: 1,
    };
    assert_eq!(
        p.call(Request::SetRegion, &set.encode(), &[]),
        Some(Status::BadFdCount)
    );
    let (a, b) = UnixStream::pair().unwrap();
    assert_eq!(
        p.call(
            Request::SetRegion,
            &set.encode(),
            &[a.as_raw_fd(), b.as_raw_fd()]
        ),
        Some(Status::BadFdCount)
    );
    assert_eq!(
        p.call(Request::Reset, &[], &[a.as_raw_fd()]),
        Some(Status::BadFdCount)
    );
    // Payload size and layout.
    assert_eq!(
        p.call(Request::GetRegionInfo, &[0, 0, 0], &[]),
        Some(Status::BadPayload)
    );
    assert_eq!(p.call(Request::Reset, &[0], &[]), Some(Status::BadPayload));
    let mut bad_flags = set.encode();
    bad_flags[4] = 0x80;
    assert_eq!(
        p.call(Request::SetRegion, &bad_flags, &[a.as_raw_fd()]),
        Some(Status::BadPayload)
    );
    assert_eq!(
        p.call(
            Request::GetRegionInfo,
            &RegionIndex { index: 7 }.encode(),
            &[]
        ),
        Some(Status::BadRegionIndex)
    );
    // A data "socket" that is a pipe.
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) writes two fds into the two-element array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    assert_eq!(
        p.call(Request::SetRegion, &set.encode(), &[pipe[0]]),
        Some(Status::BadFd)
    );
    // SAFETY: both fds were just created by pipe(2) and are closed once.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    // Placing twice, reusing a user_data, and removing what is not there exactly.
    let _data = p.set_region(0, 1, SET_REGION_POSTED);
    assert_eq!(
        p.call(Request::SetRegion, &set.encode(), &[a.as_raw_fd()]),
        Some(Status::RegionBusy)
    );
    let same_token = SetRegion { index: 1, ..set };
    assert_eq!(
        p.call(Request::SetRegion, &same_token.encode(), &[a.as_raw_fd()]),
        Some(Status::BadPayload)
    );
    let not_exact = SetRegion {
        guest_addr: 0x2000,
        flags: SET_REGION_POSTED,
        ..set
    };
    assert_eq!(
        p.call(Request::RemoveRegion, &not_exact.encode(), &[]),
        Some(Status::NoSuchRegion)
    );
    // A request dressed as a reply, and reserved request codes.
    p.ch.send(
        Header {
            request: Request::Reset as u32,
            flags: HEADER_VERSION | FLAG_REPLY | (1 << 9),
            size: 0,
        },
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(
        error_status(&p.ch.recv().unwrap()),
        Some(Status::UnexpectedReply)
    );
    assert_eq!(
        p.call(Request::SetDirectMap, &[], &[]),
        Some(Status::Unsupported),
        "reserved code"
    );
    // Malformed memory, doorbell and interrupt requests.
    assert_eq!(
        p.call(Request::SetMemTable, &[0u8; 8], &[a.as_raw_fd()]),
        Some(Status::BadPayload),
        "zero entries"
    );
    assert_eq!(
        p.call(Request::SetMemTable, &[], &[]),
        Some(Status::BadFdCount)
    );
    let one = one_page_table();
    assert_eq!(
        p.call(Request::SetMemTable, &one.encode(), &[a.as_raw_fd()]),
        Some(Status::BadFd),
        "a socket is not mappable memory"
    );
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    assert_eq!(
        p.call(
            Request::SetDoorbell,
            &RegionIndex { index: 0 }.encode(),
            &[a.as_raw_fd()]
        ),
        Some(Status::BadFd),
        "a doorbell must be an eventfd"
    );
    assert_eq!(
        p.call(
            Request::SetDoorbell,
            &RegionIndex { index: 9 }.encode(),
            &[efd.as_raw_fd()]
        ),
        Some(Status::BadRegionIndex)
    );
    let resample = outboard_protocol::control::SetIrq { index: 0, flags: 1 };
    assert_eq!(
        p.call(
            Request::SetIrq,
            &resample.encode(),
            &[efd.as_raw_fd(), efd.as_raw_fd()]
        ),
        Some(Status::Unsupported),
        "line 0 is edge-triggered: no resample"
    );
    assert_eq!(
        p.call(Request::SetIrq, &resample.encode(), &[efd.as_raw_fd()]),
        Some(Status::BadFdCount)
    );
    assert_eq!(
        p.call(Request::GetIrqInfo, &RegionIndex { index: 2 }.encode(), &[]),
        Some(Status::BadRegionIndex)
    );
    // Still fully alive.
    let m = call(&p.ch, Request::GetDeviceInfo, &[], &[]);
    assert_eq!(DeviceInfo::decode(&m.payload).unwrap().name, "scratch");
    assert_eq!(p.call(Request::Shutdown, &[], &[]), None);
    p.expect_exit(EXIT_OK, "");
}

#[test]
fn control_corpus_when_framing_lost_then_error_reply_and_exit_2() {
    let v = HEADER_VERSION | (1 << 9);
    let cases: Vec<(&str, Vec<u8>, Option<Status>, &str)> = vec![
        (
            "bad version",
            raw_header(6, (v & !0xff) | 2, 0),
            Some(Status::BadVersion),
            "unsupported header version 2",
        ),
        (
            "oversized payload",
            raw_header(6, v, MAX_PAYLOAD + 1),
            Some(Status::PayloadTooLarge),
            "payload of 4097 bytes exceeds the limit of 4096",
        ),
        (
            "reserved flags",
            raw_header(6, v | (1 << 30), 0),
            Some(Status::ReservedFlags),
            "reserved header flag bits",
        ),
        (
            "truncated header",
            raw_header(6, v, 0)[..5].to_vec(),
            None,
            "connection closed in the middle of a message",
        ),
        (
            "truncated payload",
            [raw_header(1, v, 16), vec![1, 0, 0, 0]].concat(),
            None,
            "connection closed in the middle of a message",
        ),
    ];
    for (what, bytes, status, needle) in cases {
        let p = start("outboard-scratch");
        p.ch.send_raw(&bytes, &[]).unwrap();
        p.ch.socket().shutdown(std::net::Shutdown::Write).unwrap();
        match status {
            Some(s) => assert_eq!(error_status(&p.ch.recv().unwrap()), Some(s), "{what}"),
            None => assert!(p.ch.recv().is_err(), "{what}: no reply expected"),
        }
        eprintln!("case: {what}");
        p.expect_exit(EXIT_PROTOCOL, needle);
    }
    // More fds than a message may carry.
    let p = start("outboard-uart");
    let (a, _b) = UnixStream::pair().unwrap();
    let fds = vec![a.as_raw_fd(); MAX_FDS + 1];
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    p.ch.socket()
        .send_with_fds(&[&raw_header(6, v, 0)[..]], &fds)
        .unwrap();
    p.expect_exit(EXIT_PROTOCOL, "more than 8 fds");
}

#[test]
fn hello_when_no_common_version_then_refused_with_clear_error() {
    for (min, max) in [(2, 5), (3, 1)] {
        let p = start("outboard-uart");
        let peer = Hello {
            min_version: min,
            max_version: max,
            features: 0,
        };
        assert_eq!(
            p.call(Request::Hello, &peer.encode(), &[]),
            Some(Status::NoCommonVersion)
        );
        p.expect_exit(
            EXIT_PROTOCOL,
            if min > max {
                "version range 3..=1 is empty"
            } else {
                "no common protocol version: ours 1..=1, peer 2..=5"
            },
        );
    }
}

#[test]
fn data_corpus_when_malformed_command_then_backend_exits_2_naming_it() {
    let good = Cmd::read(7, 0, AccessSize::B4).encode();
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut c = good;
    c[0] = 2;
    cases.push((c.to_vec(), "unknown command 2"));
    let mut c = good;
    c[1] = 0x10 | 4;
    cases.push((c.to_vec(), "size exponent 4 exceeds 3"));
    let mut c = good;
    c[1] |= 0x20;
    cases.push((c.to_vec(), "reserved bits 0x20 set in the size byte"));
    let mut c = good;
    c[3] = 1;
    cases.push((c.to_vec(), "nonzero padding byte at offset 3"));
    let mut c = good;
    c[1] &= !0x10;
    cases.push((c.to_vec(), "read command without the resp bit"));
    cases.push((
        Cmd::read(0xbad, 0, AccessSize::B4).encode().to_vec(),
        "unknown user_data 0xbad",
    ));
    for (bytes, needle) in cases {
        let p = start("outboard-scratch");
        hello(&p.ch);
        let mut data = p.set_region(0, 7, 0);
        // A valid command first: served normally.
        data.write_all(&good).unwrap();
        let mut r = [0u8; RESP_SIZE];
        data.read_exact(&mut r).unwrap();
        assert_eq!(
            Resp::decode(&r).unwrap().data,
            u64::from(u32::from_le_bytes(*b"OBSC"))
        );
        data.write_all(&bytes).unwrap();
        p.expect_exit(EXIT_PROTOCOL, needle);
    }
}

#[test]
fn data_when_access_outside_region_rules_then_all_ones_and_backend_continues() {
    let p = start("outboard-uart");
    hello(&p.ch);
    let mut data = p.set_region(0, 42, 0);
    let mut ask = |cmd: Cmd| -> Option<u64> {
        data.write_all(&cmd.encode()).unwrap();
        if !cmd.resp {
            return None;
        }
        let mut r = [0u8; RESP_SIZE];
        data.read_exact(&mut r).unwrap();
        Some(Resp::decode(&r).unwrap().data)
    };
    // The UART takes 1-byte accesses in 8 ports: these are refused, not fatal.
    assert_eq!(ask(Cmd::read(42, 0, AccessSize::B4)), Some(0xffff_ffff));
    assert_eq!(ask(Cmd::read(42, 8, AccessSize::B1)), Some(0xff));
    assert_eq!(ask(Cmd::read(42, u64::MAX, AccessSize::B1)), Some(0xff));
    assert_eq!(
        ask(Cmd::write(42, 7, AccessSize::B2, 0x1234, false)),
        Some(0)
    );
    assert_eq!(ask(Cmd::write(42, 7, AccessSize::B1, 0x99, false)), Some(0));
    assert_eq!(
        ask(Cmd::read(42, 7, AccessSize::B1)),
        Some(0x99),
        "scratch register"
    );
    assert_eq!(p.call(Request::Shutdown, &[], &[]), None);
    p.expect_exit(EXIT_OK, "");
}

#[test]
fn control_eof_then_backend_exits_cleanly() {
    let p = start("outboard-scratch");
    hello(&p.ch);
    let _data = p.set_region(2, 5, 0);
    p.ch.socket().shutdown(std::net::Shutdown::Both).unwrap();
    p.expect_exit(EXIT_OK, "");
}

#[test]
fn data_when_user_data_of_another_region_then_backend_exits_2() {
    let p = start("outboard-scratch");
    hello(&p.ch);
    let mut regs = p.set_region(0, 10, 0);
    let _aux = p.set_region(1, 11, 0);
    regs.write_all(&Cmd::read(11, 0, AccessSize::B4).encode())
        .unwrap();
    p.expect_exit(
        EXIT_PROTOCOL,
        "unknown user_data 0xb on the data socket of region 0",
    );
}

#[test]
fn reserved_request_when_payload_or_fds_then_still_unsupported() {
    let p = start("outboard-scratch");
    hello(&p.ch);
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(
        p.call(Request::SetDirectMap, &[0u8; 24], &[a.as_raw_fd()]),
        Some(Status::Unsupported)
    );
}

#[test]
fn remove_when_other_region_reused_closed_socket_slot_then_other_region_keeps_serving() {
    let p = start("outboard-scratch");
    hello(&p.ch);
    // Region 0's socket closes (its slot is freed) but region 0 stays placed.
    drop(p.set_region(0, 20, 0));
    // Region 1 takes the freed slot.
    let mut aux = p.set_region(1, 21, 0);
    let remove0 = SetRegion {
        index: 0,
        flags: 0,
        guest_addr: 0x1000,
        user_data: 20,
    };
    assert_eq!(p.call(Request::RemoveRegion, &remove0.encode(), &[]), None);
    aux.write_all(&Cmd::write(21, 0, AccessSize::B4, 77, false).encode())
        .unwrap();
    aux.write_all(&Cmd::read(21, 0, AccessSize::B4).encode())
        .unwrap();
    let mut r = [0u8; 2 * RESP_SIZE];
    aux.read_exact(&mut r).unwrap();
    let mut second = [0u8; RESP_SIZE];
    second.copy_from_slice(&r[RESP_SIZE..]);
    assert_eq!(Resp::decode(&second).unwrap().data, 77);
}

#[test]
fn feature_requests_when_not_negotiated_then_unsupported() {
    let p = start("outboard-scratch");
    let posted_only = Hello {
        features: outboard_protocol::control::F_POSTED_WRITES,
        ..Hello::ours(FEATURES_SUPPORTED)
    };
    assert_eq!(p.call(Request::Hello, &posted_only.encode(), &[]), None);
    let info = call(&p.ch, Request::GetDeviceInfo, &[], &[]);
    let info = DeviceInfo::decode(&info.payload).unwrap();
    assert_eq!(
        (info.num_doorbells, info.num_irqs),
        (0, 0),
        "hidden without the features"
    );
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    assert_eq!(
        p.call(
            Request::SetDoorbell,
            &RegionIndex { index: 0 }.encode(),
            &[efd.as_raw_fd()]
        ),
        Some(Status::Unsupported)
    );
    assert_eq!(
        p.call(Request::GetIrqInfo, &RegionIndex { index: 0 }.encode(), &[]),
        Some(Status::Unsupported)
    );
}

#[test]
fn mem_table_when_file_that_can_still_shrink_then_bad_fd_and_backend_unharmed() {
    // A regular file on a disk file system (the build directory, not a
    // tmpfs /tmp): no seals at all, so nothing stops the peer truncating it
    // under the backend's mapping (issue 11, item 1: SIGBUS).
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("outboard-memfile-{}", std::process::id()));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(0x1000).unwrap();
    let p = start("outboard-scratch");
    hello(&p.ch);
    let one = one_page_table();
    assert_eq!(
        p.call(Request::SetMemTable, &one.encode(), &[file.as_raw_fd()]),
        Some(Status::BadFd),
        "a file that is not sealed against shrinking is refused"
    );
    file.set_len(0).unwrap();
    assert_eq!(
        p.call(Request::GetDeviceInfo, &[], &[]),
        None,
        "still serving"
    );
    drop(p.ch);
    let mut child = p.child;
    assert_eq!(wait_exit(&mut child).code(), Some(i32::from(EXIT_OK)));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn mem_table_when_entry_ends_at_2_pow_64_or_unaligned_then_bad_payload_before_mapping() {
    // Sealed memfds, as a well-behaved frontend sends them, so only the
    // entries' addresses are wrong (issue 11 item 8: fd_offset 0x100 used to
    // fail inside mmap as DeviceError; an entry ending exactly at 2^64 was
    // accepted by the decoder and then failed to map).
    let ram = outboard_frontend::memory::GuestRam::new(&[(0, 0x2000)]).unwrap();
    let (_, fds) = ram.table();
    let p = start("outboard-scratch");
    hello(&p.ch);
    let entry = |guest_addr: u64, size: u64, fd_offset: u64| {
        outboard_protocol::control::MemTable {
            regions: vec![outboard_protocol::control::MemRegion {
                guest_addr,
                size,
                fd_offset,
            }],
        }
        .encode()
    };
    for (what, table) in [
        (
            "ends exactly at 2^64",
            entry(0u64.wrapping_sub(0x1000), 0x1000, 0),
        ),
        ("fd_offset not page-aligned", entry(0, 0x1000, 0x100)),
        ("guest_addr not page-aligned", entry(0x100, 0x1000, 0)),
        ("size not page-aligned", entry(0, 0x1800, 0)),
    ] {
        assert_eq!(
            p.call(Request::SetMemTable, &table, &fds),
            Some(Status::BadPayload),
            "{what}"
        );
    }
    // Alignment is a payload check: it comes before the fd count.
    assert_eq!(
        p.call(
            Request::SetMemTable,
            &entry(0, 0x1000, 0x100),
            &[fds[0], fds[0]]
        ),
        Some(Status::BadPayload)
    );
    assert_eq!(
        p.call(Request::SetMemTable, &entry(0, 0x2000, 0), &fds),
        None,
        "the aligned table below 2^64 is mapped"
    );
    assert_eq!(p.call(Request::Shutdown, &[], &[]), None);
    p.expect_exit(EXIT_OK, "");
}
