//! Process-level mutation testing. Real backends get valid control sequences
//! and data commands with bytes, lengths, flags, fd counts and truncations
//! mutated by a seeded xorshift; the frontend library gets mutated replies
//! from a fake backend. Every outcome is checked against docs/protocol.md:
//! the exact status of the first failed check (section 5), the request's
//! documented statuses otherwise, which refusals are fatal (exit 2, never a
//! signal), that a backend keeps answering after a non-fatal refusal, and
//! that nothing hangs (a generous per-reply bound, a hang detector only).
//!
//! `OUTBOARD_MUTATION_ITERS` sets the iterations per backend (default
//! [`DEFAULT_ITERS`]; the frontend half makes 25 calls per iteration, see
//! tests/mutation_replies.rs); `OUTBOARD_MUTATION_SEED` the seed. A failure names
//! the seed, backend and iteration, so it reproduces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mutation_fake;
mod mutation_replies;
mod mutation_support;

use mutation_support::{
    backend_fd, cut_point, expect_of, Expect, FdKind, Msg, Mutator, ALWAYS_REPLIED,
};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::Duration;

use outboard_protocol::channel::{self, Channel};
use outboard_protocol::control::{
    DeviceInfo, DoorbellInfo, Header, Hello, IrqInfo, MemRegion, MemTable, ObjectIndex, Payload,
    RegionIndex, RegionInfo, Request, SetIrq, SetRegion, Status, StatusReply, FEATURES_SUPPORTED,
    F_POSTED_WRITES, REGION_POSTED_WRITES, SET_REGION_POSTED,
};
use outboard_protocol::ioregionfd::{Cmd, Resp, CMD_SIZE, RESP_SIZE};
use outboard_protocol::AccessSize;
use outboard_tests::{connect, spawn_listening, stderr_of, temp_image, wait_exit, Rand};

/// Iterations per backend when `OUTBOARD_MUTATION_ITERS` is unset.
const DEFAULT_ITERS: u64 = 2000;
/// Bound on any reply or response: reaching it is a hang.
const REPLY_BOUND: Duration = Duration::from_secs(10);

fn iters() -> u64 {
    std::env::var("OUTBOARD_MUTATION_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITERS)
}

fn seed() -> u64 {
    std::env::var("OUTBOARD_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0b0a_2d5e_ed00_0001)
}

/// A placed region we may send data commands to.
struct Placed {
    info: RegionInfo,
    set: SetRegion,
    sock: UnixStream,
}

/// One backend process and what we know of its state.
struct Session {
    child: Child,
    ch: Channel,
    features: Option<u64>,
    regions: Vec<RegionInfo>,
    placed: Vec<Placed>,
    /// Our ends of data sockets whose placement is unknown, kept open so the
    /// backend never sees EOF on a region that may still be placed.
    kept: Vec<UnixStream>,
    next_user_data: u64,
}

/// Counts for the final report line.
#[derive(Default, Debug)]
struct Stats {
    messages: u64,
    mutated: u64,
    refused: u64,
    fatal: u64,
    data_cmds: u64,
    sessions: u64,
}

fn start(program: &str, args: &[&str]) -> Session {
    let (child, path) = spawn_listening(program, args);
    let mut ch = connect(&path);
    ch.set_timeout(Some(REPLY_BOUND)).unwrap();
    Session {
        child,
        ch,
        features: None,
        regions: Vec::new(),
        placed: Vec::new(),
        kept: Vec::new(),
        next_user_data: 0x100,
    }
}

impl Session {
    /// A valid request for `code`, with the fds it needs.
    fn template(&mut self, r: &mut Rand, code: u32) -> Msg {
        let nregions = self.regions.len() as u32;
        let index = (r.next_u64() % u64::from(nregions + 1)) as u32;
        let req = Request::from_u32(code).ok();
        let (payload, fds): (Vec<u8>, Vec<FdKind>) = match req {
            Some(Request::Hello) => (Hello::ours(FEATURES_SUPPORTED).encode(), vec![]),
            Some(Request::GetRegionInfo) => (RegionIndex { index }.encode(), vec![]),
            Some(Request::SetRegion) => {
                self.next_user_data += 0x10;
                let posted = r.next_u64().is_multiple_of(2);
                let set = SetRegion {
                    index,
                    flags: if posted { SET_REGION_POSTED } else { 0 },
                    guest_addr: (r.next_u64() % 16) << 12,
                    user_data: self.next_user_data,
                };
                (set.encode(), vec![FdKind::Stream])
            }
            Some(Request::RemoveRegion) => {
                let set = match self.placed.first() {
                    Some(p) if r.next_u64().is_multiple_of(2) => p.set,
                    _ => SetRegion {
                        index,
                        flags: 0,
                        guest_addr: 0,
                        user_data: 1,
                    },
                };
                (set.encode(), vec![])
            }
            Some(Request::SetMemTable) => {
                let t = MemTable {
                    regions: vec![MemRegion {
                        guest_addr: 0,
                        size: 0x1000,
                        fd_offset: 0,
                    }],
                };
                (t.encode(), vec![FdKind::SealedMemfd])
            }
            Some(Request::SetDoorbell) => {
                (ObjectIndex { index: 0 }.encode(), vec![FdKind::Eventfd])
            }
            Some(Request::SetIrq) => (
                SetIrq { index: 0, flags: 0 }.encode(),
                vec![FdKind::Eventfd],
            ),
            Some(Request::GetDoorbellInfo | Request::GetIrqInfo) => {
                (ObjectIndex { index: index % 2 }.encode(), vec![])
            }
            _ => (Vec::new(), vec![]),
        };
        Msg {
            header: Header {
                size: payload.len() as u32,
                ..Header::request(Request::Reset, 0, true)
            }
            .encode(),
            payload,
            fds,
        }
        .with_code(code)
    }

    /// Sends `msg`, checks every reply against `expect`, then a probe.
    /// Returns false when the backend has (correctly) exited.
    fn exchange(&mut self, msg: &Msg, cut: Option<usize>, what: &str) -> bool {
        let (fds, mut peers): (Vec<OwnedFd>, Vec<Option<UnixStream>>) =
            msg.fds.iter().map(|k| backend_fd(*k)).unzip();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut bytes = msg.header.to_vec();
        bytes.extend_from_slice(&msg.payload);
        let expect = expect_of(msg, self.features);
        if let Some(n) = cut {
            self.ch.send_raw(&bytes[..n], &raw).unwrap();
            self.ch.socket().shutdown(Shutdown::Write).unwrap();
            // A whole header that is itself bad is still answered.
            let reply = match expect {
                Expect::Fatal { reply: Some(s) } if n >= 12 => Some((
                    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                    s,
                )),
                _ => None,
            };
            return self.expect_exit(2, reply, what);
        }
        self.ch.send_raw(&bytes, &raw).unwrap();
        let code = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        match expect {
            Expect::Fatal { reply } => return self.expect_exit(2, reply.map(|s| (code, s)), what),
            Expect::Refused(_) | Expect::Step8(..) | Expect::Hello(_) => {}
        }
        let need_reply = Header::decode(&msg.header).unwrap().need_reply();
        let replied = ALWAYS_REPLIED.contains(&code) || need_reply;
        if replied {
            let m = self.recv(what);
            assert!(
                m.header.is_reply() && m.fds.is_empty(),
                "{what}: {:?}",
                m.header
            );
            assert_eq!(m.header.request, code, "{what}: reply to another request");
            let status = if m.header.is_error() {
                let s = StatusReply::decode(&m.payload).unwrap().status;
                assert_ne!(s, Status::Ok, "{what}: error reply with status Ok");
                Some(s)
            } else {
                None
            };
            self.check_reply(&expect, status, &m.payload, msg, &mut peers, what);
            if status == Some(Status::NoCommonVersion) {
                return self.expect_exit(2, None, what);
            }
            if status.is_none() && matches!(expect, Expect::Step8(Request::Shutdown, _)) {
                return self.expect_exit(0, None, what);
            }
        } else {
            // No reply: the outcome is unknown, so keep our data socket ends
            // open and stop trusting the placements.
            self.kept.extend(peers.into_iter().flatten());
            if let Expect::Step8(req, _) = expect {
                match req {
                    Request::Shutdown => return self.expect_exit(0, None, what),
                    Request::RemoveRegion | Request::Reset => self.forget_all(),
                    _ => {}
                }
            }
        }
        drop(fds);
        self.probe(what)
    }

    fn recv(&self, what: &str) -> channel::Message {
        match self.ch.recv() {
            Ok(m) => m,
            Err(e) => panic!(
                "{what}: no reply ({e}); backend alive: {:?}",
                self.child.id()
            ),
        }
    }

    fn check_reply(
        &mut self,
        expect: &Expect,
        status: Option<Status>,
        payload: &[u8],
        msg: &Msg,
        peers: &mut [Option<UnixStream>],
        what: &str,
    ) {
        match (expect, status) {
            (Expect::Refused(want), got) => assert_eq!(got, Some(*want), "{what}"),
            (Expect::Step8(_, allowed), Some(s)) => {
                assert!(allowed.contains(&s), "{what}: undocumented status {s:?}")
            }
            (Expect::Hello(_), Some(s)) => assert!(
                matches!(s, Status::Unsupported | Status::NoCommonVersion),
                "{what}: HELLO refused with {s:?}"
            ),
            (Expect::Hello(peer), None) => {
                let theirs = Hello::decode(payload).unwrap();
                assert!(self.features.is_none(), "{what}: second HELLO accepted");
                self.features = Some(theirs.features & peer.features);
                if self.regions.is_empty() {
                    self.learn_regions();
                }
            }
            (Expect::Step8(req, _), None) => self.accepted(*req, payload, msg, peers, what),
            (Expect::Fatal { .. }, _) => unreachable!(),
        }
    }

    /// Checks a success reply's payload and records what it changed.
    fn accepted(
        &mut self,
        req: Request,
        payload: &[u8],
        msg: &Msg,
        peers: &mut [Option<UnixStream>],
        what: &str,
    ) {
        match req {
            Request::GetDeviceInfo => drop(DeviceInfo::decode(payload).unwrap()),
            Request::GetRegionInfo => {
                let info = RegionInfo::decode(payload).unwrap();
                assert_eq!(
                    info.index,
                    RegionIndex::decode(&msg.payload).unwrap().index,
                    "{what}"
                );
                assert!(info.size > 0, "{what}: empty region");
            }
            Request::GetDoorbellInfo => drop(DoorbellInfo::decode(payload).unwrap()),
            Request::GetIrqInfo => drop(IrqInfo::decode(payload).unwrap()),
            _ => {
                let s = StatusReply::decode(payload).unwrap();
                assert_eq!(s.status, Status::Ok, "{what}: acknowledgement is not Ok");
            }
        }
        match req {
            Request::SetRegion => {
                let set = SetRegion::decode(&msg.payload).unwrap();
                let info = self.regions[set.index as usize].clone();
                let sock = peers[0].take().expect("a stream socket was placed");
                self.placed.push(Placed { info, set, sock });
            }
            Request::RemoveRegion | Request::Reset => self.forget_all(),
            _ => {}
        }
    }

    fn forget_all(&mut self) {
        for p in self.placed.drain(..) {
            self.kept.push(p.sock);
        }
    }

    fn learn_regions(&mut self) {
        let m = self.call(Request::GetDeviceInfo, &[]);
        let info = DeviceInfo::decode(&m).unwrap();
        for index in 0..info.num_regions {
            let r = self.call(Request::GetRegionInfo, &RegionIndex { index }.encode());
            self.regions.push(RegionInfo::decode(&r).unwrap());
        }
        // Place region 0 right away, so data commands get exercised.
        if let Some(info) = self.regions.first().cloned() {
            let (ours, theirs) = UnixStream::pair().unwrap();
            self.next_user_data += 0x10;
            let posted = info.flags & REGION_POSTED_WRITES != 0
                && self.features.unwrap_or(0) & F_POSTED_WRITES != 0;
            let set = SetRegion {
                index: info.index,
                flags: if posted { SET_REGION_POSTED } else { 0 },
                guest_addr: 0x1000,
                user_data: self.next_user_data,
            };
            self.ch
                .send(
                    Header::request(Request::SetRegion, SetRegion::SIZE, true),
                    &set.encode(),
                    &[theirs.as_raw_fd()],
                )
                .unwrap();
            let m = self.recv("setup: SET_REGION");
            assert!(!m.header.is_error(), "setup: SET_REGION refused");
            self.placed.push(Placed {
                info,
                set,
                sock: ours,
            });
        }
    }

    fn call(&self, req: Request, payload: &[u8]) -> Vec<u8> {
        self.ch
            .send(Header::request(req, payload.len(), true), payload, &[])
            .unwrap();
        let m = self.recv("setup");
        assert!(!m.header.is_error(), "{req:?} refused");
        m.payload
    }

    /// A well-formed GET_DEVICE_INFO must still be answered.
    fn probe(&mut self, what: &str) -> bool {
        self.ch
            .send(Header::request(Request::GetDeviceInfo, 0, true), &[], &[])
            .unwrap();
        let m = self.recv(&format!("{what}, then the probe"));
        assert_eq!(
            m.header.request,
            Request::GetDeviceInfo as u32,
            "{what}: probe"
        );
        if self.features.is_some() {
            assert!(!m.header.is_error(), "{what}: probe refused");
            DeviceInfo::decode(&m.payload).unwrap();
        } else {
            let s = StatusReply::decode(&m.payload).unwrap().status;
            assert_eq!(s, Status::NotNegotiated, "{what}: probe before HELLO");
        }
        true
    }

    /// The backend must close the connection (after at most the one error
    /// reply `reply`) and exit with `code`, not by a signal.
    fn expect_exit(&mut self, code: i32, reply: Option<(u32, Status)>, what: &str) -> bool {
        loop {
            match self.ch.recv() {
                Ok(m) => {
                    let (c, s) = reply.unwrap_or_else(|| panic!("{what}: unexpected {m:?}"));
                    assert_eq!(m.header.request, c, "{what}: framing error reply code");
                    assert_eq!(StatusReply::decode(&m.payload).unwrap().status, s, "{what}");
                }
                Err(channel::Error::Closed | channel::Error::Io(_)) => break,
                Err(e) => panic!("{what}: expected the backend to close the connection: {e}"),
            }
        }
        let status = wait_exit(&mut self.child);
        let err = stderr_of(&mut self.child);
        assert_eq!(
            status.code(),
            Some(code),
            "{what}: exit {status:?}, stderr: {err}"
        );
        false
    }

    /// Sends a burst of (sometimes mutated) data commands on a placed region.
    fn data_burst(&mut self, r: &mut Rand, st: &mut Stats, what: &str) -> bool {
        let i = (r.next_u64() % self.placed.len() as u64) as usize;
        let p = &self.placed[i];
        for k in 0..1 + r.next_u64() % 8 {
            let sizes: Vec<AccessSize> = AccessSize::ALL
                .into_iter()
                .filter(|s| {
                    r.next_u64().is_multiple_of(4) || p.info.access_sizes & s.mask_bit() != 0
                })
                .collect();
            let size = sizes
                .get((r.next_u64() % sizes.len().max(1) as u64) as usize)
                .copied()
                .unwrap_or(AccessSize::B1);
            let offset = if r.next_u64().is_multiple_of(8) {
                r.next_u64()
            } else {
                r.next_u64() % p.info.size.max(1)
            };
            let cmd = if r.next_u64().is_multiple_of(2) {
                Cmd::read(p.set.user_data, offset, size)
            } else {
                Cmd::write(
                    p.set.user_data,
                    offset,
                    size,
                    r.next_u64(),
                    p.set.posted() && r.next_u64().is_multiple_of(2),
                )
            };
            let mut b = cmd.encode();
            let mutated = r.next_u64().is_multiple_of(6);
            if mutated {
                let at = (r.next_u64() % CMD_SIZE as u64) as usize;
                b[at] ^= 1 << (r.next_u64() % 8);
            }
            st.data_cmds += 1;
            let what = format!("{what}, data command {k} {b:02x?}");
            (&p.sock).write_all_nosig(&b);
            let fatal = match Cmd::decode(&b) {
                Err(_) => true,
                Ok(c) => {
                    let first = p.set.user_data;
                    !(first..=first + u64::from(p.set.vcpu_tokens())).contains(&c.user_data)
                }
            };
            if fatal {
                st.fatal += 1;
                return self.expect_exit(2, None, &what);
            }
            let c = Cmd::decode(&b).unwrap();
            if c.resp {
                let mut resp = [0u8; RESP_SIZE];
                let mut s = &p.sock;
                s.set_read_timeout(Some(REPLY_BOUND)).unwrap();
                std::io::Read::read_exact(&mut s, &mut resp)
                    .unwrap_or_else(|e| panic!("{what}: no response: {e}"));
                let data = Resp::decode(&resp)
                    .unwrap_or_else(|e| panic!("{what}: {e}"))
                    .data;
                if c.op == outboard_protocol::Op::Write {
                    assert_eq!(data, 0, "{what}: write response carries data");
                } else {
                    assert_eq!(data, c.size.truncate(data), "{what}: bits above the size");
                }
            }
        }
        true
    }
}

/// `write_all` on a data socket without SIGPIPE.
trait WriteNoSig {
    fn write_all_nosig(self, b: &[u8]);
}

impl WriteNoSig for &UnixStream {
    fn write_all_nosig(self, b: &[u8]) {
        // SAFETY: `b` is a live slice of `b.len()` bytes; the fd is open.
        let n = unsafe {
            libc::send(
                self.as_raw_fd(),
                b.as_ptr().cast(),
                b.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        assert_eq!(n, b.len() as isize, "data socket send");
    }
}

fn run(program: &str, args: &[&str], salt: u64) {
    let n = iters();
    let seed = seed() ^ salt;
    let mut r = Rand(seed | 1);
    let mut st = Stats::default();
    let mut s: Option<Session> = None;
    let started = std::time::Instant::now();
    for it in 0..n {
        let sess = s.get_or_insert_with(|| {
            st.sessions += 1;
            start(program, args)
        });
        let what = format!("{program} seed {seed:#x} iteration {it}");
        if sess.features.is_some() && !sess.placed.is_empty() && r.next_u64().is_multiple_of(3) {
            if !sess.data_burst(&mut r, &mut st, &what) {
                s = None;
            }
            continue;
        }
        let code = if sess.features.is_none() && !r.next_u64().is_multiple_of(4) {
            Request::Hello as u32
        } else {
            let c = r.next_u64() % 15;
            if c == 7 && !r.next_u64().is_multiple_of(8) {
                Request::GetDeviceInfo as u32
            } else {
                c as u32
            }
        };
        let mut msg = sess.template(&mut r, code);
        let mutated = !r.next_u64().is_multiple_of(4);
        if mutated {
            Mutator(&mut r).mutate(&mut msg);
            st.mutated += 1;
        }
        st.messages += 1;
        let cut = if mutated && r.next_u64().is_multiple_of(40) {
            Some(cut_point(&mut r, &msg))
        } else {
            None
        };
        let shown = &msg.payload[..msg.payload.len().min(48)];
        let what = format!(
            "{what}: header {:02x?} payload ({} bytes) {shown:02x?} fds {:?} cut {cut:?}",
            msg.header,
            msg.payload.len(),
            msg.fds
        );
        let expect = expect_of(&msg, sess.features);
        if matches!(expect, Expect::Refused(_)) {
            st.refused += 1;
        }
        if cut.is_some() || matches!(expect, Expect::Fatal { .. }) {
            st.fatal += 1;
        }
        if !sess.exchange(&msg, cut, &what) {
            s = None;
        }
    }
    eprintln!(
        "mutation {program}: {n} iterations in {:?}: {st:?}",
        started.elapsed()
    );
    assert!(st.refused > 0 && st.fatal > 0 && st.sessions > 1, "{st:?}");
}

#[test]
fn scratch_when_mutated_control_and_data_then_documented_outcomes_only() {
    run("outboard-scratch", &[], 1);
}

#[test]
fn uart_when_mutated_control_and_data_then_documented_outcomes_only() {
    run("outboard-uart", &[], 2);
}

#[test]
fn virtio_blk_when_mutated_control_and_data_then_documented_outcomes_only() {
    let img = temp_image("mutation", 256);
    run("outboard-virtio-blk", &["--path", img.to_str().unwrap()], 3);
    let _ = std::fs::remove_file(img);
}
