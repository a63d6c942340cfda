//! The other half of the mutation test: hostile replies to the frontend.
//! A fake backend (tests/mutation_fake.rs) gets a device attached with
//! [`RemoteDevice::connect`], then answers control requests and data
//! commands with seeded mutations. Every call must return (no hang: the
//! fake never makes the frontend wait, so a timeout is a failure), and its
//! outcome must be exactly what docs/protocol.md says of the bytes sent:
//! sections 3.5 and 3.6 for control replies (a value only if the decoders
//! accept the reply, a refusal only for a well-formed error reply, and any
//! other malformed reply fails the request and, once attached, the device),
//! sections 7.2 and 8.1 for data responses (a value only if it decodes and
//! fits the access; otherwise the device fails, and later reads are all-ones
//! without touching the socket).

use std::sync::mpsc;
use std::sync::Arc;

use outboard_frontend::backend::Error as BackendError;
use outboard_frontend::device::Error as DeviceError;
use outboard_frontend::{AccessError, AccessSize, Bus, DeviceOptions, RemoteDevice, Space};
use outboard_protocol::control::{
    DeviceInfo, DoorbellInfo, Header, Hello, IrqInfo, MemRegion, MemTable, Payload, RegionIndex,
    RegionInfo, Request, Status, StatusReply, FEATURES_SUPPORTED, F_DOORBELL, F_IRQ, MAX_FDS,
    REGION_WRITE,
};
use outboard_protocol::error_chain;
use outboard_protocol::ioregionfd::{Op, Resp, RESP_SIZE};
use outboard_tests::Rand;
use vmm_sys_util::eventfd::EventFd;

use crate::mutation_fake::{region_info, DataSent, Fake, Sent};
use crate::mutation_support::{backend_fd, FdKind};
use crate::{iters, seed, DEFAULT_ITERS, REPLY_BOUND};

/// What the frontend must make of one control reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok(Value),
    Refused(Status),
    Fails,
}

/// A reply the decoders accept.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Hello(Hello),
    Info(DeviceInfo),
    Region(RegionInfo),
    Doorbell(DoorbellInfo),
    Irq(IrqInfo),
    Ack,
}

/// Section 3.5's checks, in order, on the bytes the frontend receives
/// (framed by the header's size field).
pub fn verdict(s: &Sent) -> Verdict {
    let r = &s.reply;
    let mut bytes = r.header.to_vec();
    bytes.extend_from_slice(&r.payload);
    bytes.truncate(r.cut.unwrap_or(bytes.len()));
    if r.fds > MAX_FDS || bytes.len() < 12 {
        return Verdict::Fails;
    }
    let Ok(h) = Header::decode(&r.header) else {
        return Verdict::Fails;
    };
    let Some(body) = bytes[12..].get(..h.size as usize) else {
        return Verdict::Fails; // EOF inside the payload
    };
    if !h.is_reply() || h.request != s.request.request || r.fds > 0 {
        return Verdict::Fails;
    }
    if h.is_error() {
        return match StatusReply::decode(body) {
            Ok(StatusReply { status }) if status != Status::Ok => Verdict::Refused(status),
            _ => Verdict::Fails,
        };
    }
    let asked = RegionIndex::decode(&s.request_payload)
        .map(|i| i.index)
        .ok();
    let value = match Request::from_u32(s.request.request).unwrap() {
        Request::Hello => Hello::decode(body).map(Value::Hello).map_err(drop),
        Request::GetDeviceInfo => DeviceInfo::decode(body).map(Value::Info).map_err(drop),
        Request::GetRegionInfo => RegionInfo::decode(body)
            .ok()
            .filter(|i| Some(i.index) == asked && i.size > 0)
            .map(Value::Region)
            .ok_or(()),
        Request::GetDoorbellInfo => DoorbellInfo::decode(body)
            .ok()
            .filter(|i| Some(i.index) == asked)
            .map(Value::Doorbell)
            .ok_or(()),
        Request::GetIrqInfo => IrqInfo::decode(body)
            .ok()
            .filter(|i| Some(i.index) == asked)
            .map(Value::Irq)
            .ok_or(()),
        _ => match StatusReply::decode(body) {
            Ok(StatusReply { status: Status::Ok }) => Ok(Value::Ack),
            Ok(StatusReply { status }) => return Verdict::Refused(status),
            Err(_) => return Verdict::Fails,
        },
    };
    value.map_or(Verdict::Fails, Verdict::Ok)
}

/// Sections 7.2 and 8.1: the value, or which transport failure.
pub fn data_verdict(d: &DataSent) -> Result<u64, &'static str> {
    let Ok(b) = <[u8; RESP_SIZE]>::try_from(&d.bytes[..]) else {
        return Err(if d.bytes.is_empty() { "gone" } else { "short" });
    };
    let data = Resp::decode(&b).map_err(|_| "garbled")?.data;
    match d.cmd.op {
        Op::Read if d.cmd.size.truncate(data) != data => Err("overwide"),
        Op::Write if data != 0 => Err("write data"),
        _ => Ok(data),
    }
}

fn kind_of(e: &AccessError) -> &'static str {
    match e {
        AccessError::BackendGone => "gone",
        AccessError::ShortResponse(_) => "short",
        AccessError::Garbled(_) => "garbled",
        AccessError::Overwide { .. } => "overwide",
        AccessError::WriteData(_) => "write data",
        _ => "other",
    }
}

/// Outcome counts, for the report line and the coverage check.
#[derive(Default, Debug)]
pub struct Stats {
    pub calls: u64,
    pub sessions: u64,
    pub attached: u64,
    pub values: u64,
    pub refused: u64,
    pub failed: u64,
    pub error_with_ok: u64,
    pub data_values: u64,
    pub data_failed: u64,
    pub overwide: u64,
}

fn no_timeout(e: &dyn std::error::Error, what: &str) {
    let text = error_chain(e);
    assert!(
        !text.contains("timed out") && !text.contains("timeout"),
        "{what}: the frontend waited for its timeout: {text}"
    );
}

fn options() -> DeviceOptions {
    DeviceOptions {
        timeout: REPLY_BOUND,
        // The fake serves data sockets; a mutated HELLO that offers
        // F_CMD_RING must not move the accesses to a ring it never reads.
        cmd_ring: 0,
        ..DeviceOptions::default()
    }
}

/// Checks an attach against the replies it got; the device if it attached.
fn check_attach(
    res: Result<RemoteDevice, DeviceError>,
    log: &[Sent],
    st: &mut Stats,
    what: &str,
) -> Option<RemoteDevice> {
    let verdicts: Vec<Verdict> = log.iter().map(verdict).collect();
    if let Some(k) = log.iter().position(|s| s.reply.closes()) {
        if matches!(verdicts[k], Verdict::Ok(_)) {
            // An accepted reply with bytes after it, then EOF: whatever the
            // frontend makes of those bytes, it must not hang.
            if let Err(e) = &res {
                no_timeout(e, what);
            }
            return None;
        }
    }
    let (last, before) = verdicts.split_last().expect("HELLO was sent");
    for (i, v) in before.iter().enumerate() {
        assert!(
            matches!(v, Verdict::Ok(_)),
            "{what}: went on after {i}: {v:?}"
        );
    }
    let value = |i: usize| match &verdicts[i] {
        Verdict::Ok(v) => v.clone(),
        other => panic!("{what}: reply {i}: {other:?}"),
    };
    let dev = match res {
        Ok(dev) => dev,
        Err(e) => {
            no_timeout(&e, what);
            match (last, &e) {
                (
                    Verdict::Refused(s),
                    DeviceError::Backend(BackendError::Refused { status, .. }),
                ) => {
                    assert_eq!(s, status, "{what}");
                    st.refused += 1;
                }
                (Verdict::Fails, DeviceError::Backend(b)) => {
                    assert!(!matches!(b, BackendError::Refused { .. }), "{what}: {b:?}");
                    st.error_with_ok += u64::from(matches!(b, BackendError::ErrorWithOk(_)));
                    st.failed += 1;
                }
                (
                    Verdict::Ok(Value::Hello(h)),
                    DeviceError::Backend(BackendError::Negotiation(_)),
                ) => {
                    assert!(
                        Hello::ours(FEATURES_SUPPORTED).negotiate(h).is_err(),
                        "{what}"
                    )
                }
                (Verdict::Ok(Value::Info(i)), DeviceError::TooMany(_)) => {
                    assert!(
                        i.num_regions.max(i.num_doorbells).max(i.num_irqs) > 256,
                        "{what}"
                    )
                }
                (Verdict::Ok(Value::Doorbell(d)), DeviceError::DoorbellRegion { .. }) => {
                    let Value::Info(i) = value(1) else {
                        panic!("{what}")
                    };
                    assert!(d.region >= i.num_regions, "{what}");
                }
                (v, e) => panic!("{what}: reply judged {v:?}, attach failed with {e:?}"),
            }
            return None;
        }
    };
    // Attached: every reply was accepted, and the device is what they said.
    assert!(
        matches!(last, Verdict::Ok(_)),
        "{what}: attached after {last:?}"
    );
    let Value::Hello(h) = value(0) else {
        panic!("{what}: {:?}", value(0))
    };
    let Value::Info(info) = value(1) else {
        panic!("{what}: {:?}", value(1))
    };
    let features = FEATURES_SUPPORTED & h.features;
    assert_eq!(dev.features(), features, "{what}");
    assert_eq!(dev.info(), &info, "{what}");
    let (mut regions, mut bells, mut irqs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 2..log.len() {
        match value(i) {
            Value::Region(r) => regions.push(r),
            Value::Doorbell(d) => bells.push(d),
            Value::Irq(q) => irqs.push(q),
            other => panic!("{what}: reply {i} is {other:?}"),
        }
    }
    assert_eq!(dev.regions(), &regions[..], "{what}");
    assert_eq!(regions.len() as u32, info.num_regions, "{what}");
    let want = |f: u64, n: u32| if features & f != 0 { n as usize } else { 0 };
    assert_eq!(bells.len(), want(F_DOORBELL, info.num_doorbells), "{what}");
    assert_eq!(irqs.len(), want(F_IRQ, info.num_irqs), "{what}");
    let got: Vec<DoorbellInfo> = dev.doorbells().iter().map(|d| d.info).collect();
    assert_eq!(got, bells, "{what}");
    assert_eq!(dev.irqs(), &irqs[..], "{what}");
    st.attached += 1;
    Some(dev)
}

/// An attached device, its bus and the fake behind it.
struct Session {
    fake: Fake,
    dev: RemoteDevice,
    bus: Bus,
    placed: Vec<(u32, u64, u64)>,
    /// The regions are the fake's own, so which accesses travel is known.
    faithful: bool,
}

impl Session {
    /// One control call with a (perhaps mutated) reply. False ends the session.
    fn control(&mut self, r: &mut Rand, st: &mut Stats, what: &str) -> bool {
        if r.next_u64().is_multiple_of(4) {
            self.fake
                .control
                .lock()
                .unwrap()
                .push_back(Some(r.next_u64()));
        }
        let unplaced =
            (0..self.dev.regions().len() as u32).find(|i| self.placed.iter().all(|p| p.0 != *i));
        let eventfd = Arc::new(EventFd::new(0).unwrap());
        let (res, placing) = match r.next_u64() % 7 {
            0 if unplaced.is_some() && self.faithful => {
                let index = unplaced.unwrap();
                let addr = 0x10000 * (u64::from(index) + 1);
                match self.dev.place(index, addr, None) {
                    Ok(region) => {
                        let size = self.dev.regions()[index as usize].size;
                        self.bus.insert(addr, size, region).unwrap();
                        self.placed.push((index, addr, size));
                        (Ok(()), true)
                    }
                    Err(e) => (Err(e), true),
                }
            }
            1 if !self.placed.is_empty() => {
                let (index, addr, size) = self.placed.remove(0);
                let region = self.bus.remove(addr, size).unwrap();
                let res = self.dev.remove(index, addr, None);
                drop(region);
                (res, false)
            }
            2 => (self.dev.reset(), false),
            3 if !self.dev.irqs().is_empty() => (self.dev.connect_irq(0, &eventfd, None), false),
            4 if !self.dev.doorbells().is_empty() => (self.dev.connect_doorbell(0, eventfd), false),
            5 if self.dev.wants_memory() => {
                let (fd, _) = backend_fd(FdKind::SealedMemfd);
                let table = MemTable {
                    regions: vec![MemRegion {
                        guest_addr: 0,
                        size: 0x1000,
                        fd_offset: 0,
                    }],
                };
                use std::os::fd::AsRawFd;
                (self.dev.set_memory_table(&table, &[fd.as_raw_fd()]), false)
            }
            _ => (self.dev.barrier(), false),
        };
        self.fake.control.lock().unwrap().clear();
        let log = self.fake.drain();
        assert_eq!(log.len(), 1, "{what}: {res:?}, {log:?}");
        let v = verdict(&log[0]);
        let what = format!("{what}: reply {:?} judged {v:?}", log[0]);
        let failed = self.dev.health().is_failed();
        match (&v, res) {
            (Verdict::Ok(_), Ok(())) => {
                assert!(!failed, "{what}");
                st.values += 1;
            }
            (
                Verdict::Refused(s),
                Err(DeviceError::Backend(BackendError::Refused { status, .. })),
            ) => {
                assert_eq!(*s, status, "{what}");
                assert!(!failed, "{what}: a refusal failed the device");
                st.refused += 1;
            }
            (Verdict::Fails, Err(DeviceError::Backend(b))) => {
                no_timeout(&b, &what);
                assert!(!matches!(b, BackendError::Refused { .. }), "{what}: {b:?}");
                assert!(failed, "{what}: {b:?} did not fail the device");
                st.error_with_ok += u64::from(matches!(b, BackendError::ErrorWithOk(_)));
                st.failed += 1;
                self.failed_fast(&what);
                return false;
            }
            (v, res) => panic!("{what}: judged {v:?}, got {res:?} (placing: {placing})"),
        }
        !log[0].reply.closes()
    }

    /// A failed device: no control request, no data command, reads all-ones.
    fn failed_fast(&self, what: &str) {
        assert!(
            matches!(self.dev.reset(), Err(DeviceError::Failed)),
            "{what}"
        );
        for &(_, addr, _) in &self.placed {
            assert_eq!(self.bus.read(addr, AccessSize::B4), 0xffff_ffff, "{what}");
            assert!(matches!(
                self.bus.try_read(addr, AccessSize::B1),
                Err(AccessError::DeviceFailed(_))
            ));
        }
        assert!(
            self.fake.drain().is_empty(),
            "{what}: a failed device sent a request"
        );
        assert!(
            self.fake.data_log.try_recv().is_err(),
            "{what}: a failed device sent a command"
        );
    }

    /// One data access with a (perhaps mutated) response. False ends the session.
    fn data(&mut self, r: &mut Rand, st: &mut Stats, what: &str) -> bool {
        let (index, addr, len) = self.placed[(r.next_u64() % self.placed.len() as u64) as usize];
        let size = AccessSize::ALL[(r.next_u64() % 4) as usize];
        let at = addr + r.next_u64() % (len - size.bytes() + 1);
        let write = self.dev.regions()[index as usize].flags & REGION_WRITE != 0
            && r.next_u64().is_multiple_of(2);
        if r.next_u64().is_multiple_of(3) {
            self.fake.data.lock().unwrap().push_back(Some(r.next_u64()));
        }
        let res = if write {
            self.bus.try_write(at, size, r.next_u64()).map(|()| 0)
        } else {
            self.bus.try_read(at, size)
        };
        self.fake.data.lock().unwrap().clear();
        let sent: Vec<DataSent> = self.fake.data_log.try_iter().collect();
        assert_eq!(sent.len(), 1, "{what}: {res:?}");
        let v = data_verdict(&sent[0]);
        let what = format!(
            "{what}: {} {size:?} at {at:#x}: sent {:02x?}, judged {v:?}",
            if write { "write" } else { "read" },
            sent[0].bytes
        );
        match (v, res) {
            (Ok(want), Ok(got)) => {
                assert_eq!(got, want, "{what}: a value the backend did not send");
                assert!(!self.dev.health().is_failed(), "{what}");
                st.data_values += 1;
                true
            }
            (Err(kind), Err(e)) => {
                assert_eq!(kind_of(&e), kind, "{what}: {e}");
                assert!(
                    self.dev.health().is_failed(),
                    "{what}: {e} did not fail the device"
                );
                st.data_failed += 1;
                st.overwide += u64::from(kind == "overwide");
                assert_eq!(self.bus.read(at, size), size.all_ones(), "{what}");
                self.failed_fast(&what);
                false
            }
            (_, res) => panic!("{what}: got {res:?}"),
        }
    }
}

/// Runs `n` frontend calls against fake backends; reports progress on `beat`.
fn drive(n: u64, seed: u64, beat: &mpsc::Sender<String>) -> Stats {
    let mut r = Rand(seed | 1);
    let mut st = Stats::default();
    while st.calls < n {
        st.sessions += 1;
        let fake = Fake::start();
        // Mutate one of the attach replies (HELLO, GET_DEVICE_INFO, two
        // GET_REGION_INFO, GET_DOORBELL_INFO, GET_IRQ_INFO), or none.
        let at = r.next_u64() % 12;
        {
            let mut plan = fake.control.lock().unwrap();
            plan.extend((0..at.min(6)).map(|_| None));
            if at < 6 {
                plan.push_back(Some(r.next_u64()));
            }
        }
        let what = format!("seed {seed:#x} call {}", st.calls);
        let _ = beat.send(what.clone());
        let res = RemoteDevice::connect("fake", &fake.path, options());
        st.calls += 1;
        fake.control.lock().unwrap().clear();
        let log = fake.drain();
        let dev = check_attach(res, &log, &mut st, &format!("{what} (attach)"));
        // A reply followed by bytes its size did not cover, or cut short,
        // ends the stream: the fake closed it.
        let Some(dev) = dev.filter(|_| log.iter().all(|s| !s.reply.closes())) else {
            fake.join();
            continue;
        };
        let mut s = Session {
            fake,
            dev,
            bus: Bus::new(Space::Mmio),
            placed: Vec::new(),
            faithful: false,
        };
        s.faithful = s
            .dev
            .regions()
            .iter()
            .enumerate()
            .all(|(i, r)| region_info(i as u32).as_ref() == Some(r));
        while st.calls < n {
            let what = format!("seed {seed:#x} call {}", st.calls);
            let _ = beat.send(what.clone());
            st.calls += 1;
            let go_on = if !s.placed.is_empty() && r.next_u64() % 5 < 3 {
                s.data(&mut r, &mut st, &what)
            } else {
                s.control(&mut r, &mut st, &what)
            };
            if !go_on {
                break;
            }
        }
        let Session { fake, dev, bus, .. } = s;
        drop(bus);
        drop(dev);
        fake.join();
    }
    st
}

#[test]
fn frontend_when_replies_and_responses_mutated_then_documented_errors_never_wrong_values() {
    // Frontend calls are cheap: 25 per iteration of a backend run.
    let n = iters() * 25;
    let seed = seed() ^ 0x05e9_11e5;
    let started = std::time::Instant::now();
    let (tx, rx) = mpsc::channel();
    let driver = std::thread::spawn(move || drive(n, seed, &tx));
    let mut last = String::from("start");
    loop {
        match rx.recv_timeout(REPLY_BOUND * 3) {
            Ok(what) => last = what,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the frontend hung at {last}"),
        }
    }
    let st = driver
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    eprintln!(
        "mutation replies: {n} calls in {:?}: {st:?}",
        started.elapsed()
    );
    if n >= DEFAULT_ITERS * 25 {
        assert!(
            st.attached > 0
                && st.values > 0
                && st.refused > 0
                && st.failed > 0
                && st.error_with_ok > 0
                && st.data_values > 0
                && st.data_failed > 0
                && st.overwide > 0,
            "{st:?}"
        );
    }
}
