//! Shared-memory command rings (docs/protocol.md section 7.11) across real
//! backend processes: ordering, idle cost, a backend killed mid-spin,
//! hostile indices and the fallback to data sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_backends::scratch::{self, ID};
use outboard_frontend::{AccessError, AccessSize, DeviceSpec};
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);

/// Clock ticks a process has run (user + system), from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn ring_when_idle_for_a_second_after_a_burst_then_backend_uses_under_one_percent_cpu() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    let base = d.placed(0).unwrap().addr;
    let pid = d.pid().unwrap();
    let mmio = fe.mmio().clone();
    for v in 0..20_000u64 {
        mmio.try_write(base + scratch::REG_ACCUM, AccessSize::B4, v & 1)
            .unwrap();
        assert_eq!(
            mmio.try_read(base, AccessSize::B4).unwrap(),
            ID & 0xffff_ffff
        );
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(pid);
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = (cpu_ticks(pid) - before) as f64 / hz;
    let share = used / t.elapsed().as_secs_f64();
    eprintln!("idle backend: {:.2}% of a CPU", share * 100.0);
    assert!(
        share < 0.01,
        "idle backend used {:.1}% of a CPU",
        share * 100.0
    );
}

/// Attaches `spec` (a scratch backend), checks its first two regions are
/// on command rings, and returns their addresses.
fn ring_device(fe: &mut outboard_frontend::Frontend, name: &str, spec: DeviceSpec) -> (u64, u64) {
    let d = fe.attach(&spec).unwrap();
    for i in 0..2 {
        assert!(d.on_ring(i), "{name}: region {i} is on its ring");
    }
    (d.placed(0).unwrap().addr, d.placed(1).unwrap().addr)
}

/// What one vCPU thread of a test does on the bus.
type VcpuWork = Box<dyn FnOnce(&outboard_frontend::Bus, u32) + Send>;

#[test]
fn ring_when_two_vcpus_post_10000_writes_each_then_each_region_reads_them_all_in_order() {
    let mut fe = frontend(T);
    let (regs, aux) = ring_device(
        &mut fe,
        "s",
        DeviceSpec::spawn("s", "outboard-scratch", &[]),
    );
    let bus = fe.mmio().clone();
    let vcpu = |v: u32, work: VcpuWork| {
        let bus = bus.clone();
        std::thread::spawn(move || work(&bus, v))
    };
    // vCPU 0: region 0 (ACCUM sums, BANK keeps the last value written).
    let a = vcpu(
        0,
        Box::new(move |bus, v| {
            for x in 1..=10_000u64 {
                bus.try_write_by(Some(v), regs + scratch::REG_ACCUM, AccessSize::B8, x)
                    .unwrap();
                bus.try_write_by(Some(v), regs + scratch::BANK, AccessSize::B8, x)
                    .unwrap();
            }
            assert_eq!(
                bus.try_read_by(Some(v), regs + scratch::REG_ACCUM, AccessSize::B8)
                    .unwrap(),
                50_005_000
            );
            assert_eq!(
                bus.try_read_by(Some(v), regs + scratch::BANK, AccessSize::B8)
                    .unwrap(),
                10_000,
                "the last write in order wins"
            );
        }),
    );
    // vCPU 1 at the same time: region 1, each byte of a 16-byte window
    // rewritten in turn; a read after the last write sees exactly it.
    let b = vcpu(
        1,
        Box::new(move |bus, v| {
            for x in 0..10_000u64 {
                bus.try_write_by(Some(v), aux + x % 16, AccessSize::B1, x & 0xff)
                    .unwrap();
            }
            for off in 0..16u64 {
                let last = (0..10_000u64).filter(|x| x % 16 == off).max().unwrap();
                assert_eq!(
                    bus.try_read_by(Some(v), aux + off, AccessSize::B1).unwrap(),
                    last & 0xff,
                    "aux byte {off}"
                );
            }
        }),
    );
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(
        bus.try_read(regs + scratch::REG_WRITE_COUNT, AccessSize::B8)
            .unwrap(),
        30_000,
        "exact count of posted writes, both regions"
    );
}

/// Hammers reads of a scratch register at `addr` from another thread and,
/// once 1000 were served (both sides spinning on the ring), calls `kill`.
/// Returns the error the hammering thread's access ended with.
fn kill_mid_spin(
    bus: &std::sync::Arc<outboard_frontend::Bus>,
    addr: u64,
    kill: impl FnOnce(),
) -> AccessError {
    use std::sync::atomic::{AtomicU64, Ordering};
    let served = std::sync::Arc::new(AtomicU64::new(0));
    let hammer = {
        let (bus, served) = (bus.clone(), served.clone());
        std::thread::spawn(move || loop {
            match bus.try_read(addr, AccessSize::B8) {
                Ok(v) => {
                    assert_eq!(v, ID, "a served read is never garbage");
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return e,
            }
        })
    };
    while served.load(Ordering::Relaxed) < 1000 {
        assert!(!hammer.is_finished(), "the reads failed before the kill");
        std::thread::yield_now();
    }
    kill();
    let t = std::time::Instant::now();
    let why = hammer.join().unwrap();
    // Hang detector only: the wait is bounded by the access deadline.
    assert!(t.elapsed() < outboard_tests::HANG_GUARD * 2);
    why
}

#[test]
fn ring_when_backend_sigkilled_mid_spin_then_device_fails_within_deadline_and_others_serve() {
    let mut fe = frontend(Duration::from_secs(2));
    let (victim, _) = ring_device(
        &mut fe,
        "victim",
        DeviceSpec::spawn("victim", "outboard-scratch", &[]),
    );
    let (other, _) = ring_device(
        &mut fe,
        "other",
        DeviceSpec::spawn("other", "outboard-scratch", &[]),
    );
    let pid = fe.device("victim").unwrap().pid().unwrap();
    let bus = fe.mmio().clone();
    let why = kill_mid_spin(&bus, victim, || outboard_tests::signal(pid, libc::SIGKILL));
    assert!(
        matches!(why, AccessError::BackendGone),
        "the access failed for the backend's death, not its deadline: {}",
        outboard_protocol::error_chain(&why)
    );
    let d = fe.device("victim").unwrap();
    assert!(d.is_failed(), "the device failed once");
    assert_eq!(
        bus.read(victim, AccessSize::B4),
        0xffff_ffff,
        "all-ones after"
    );
    assert_eq!(
        bus.try_read(other, AccessSize::B8).unwrap(),
        ID,
        "others serve"
    );
}

#[test]
fn ring_when_connected_backend_sigkilled_mid_spin_then_its_socket_hang_up_fails_the_device() {
    // A backend the frontend did not spawn: no pidfd to watch, so only the
    // data socket's hang-up can wake the sleeping access. The deadline is
    // long, so an access that noticed nothing would end in Timeout instead.
    let (mut child, path) = outboard_tests::spawn_listening("outboard-scratch", &[]);
    let mut fe = frontend(outboard_tests::HANG_GUARD);
    let (far, _) = ring_device(&mut fe, "far", DeviceSpec::connect("far", &path));
    assert_eq!(fe.device("far").unwrap().pid(), None, "not spawned here");
    let (other, _) = ring_device(
        &mut fe,
        "other",
        DeviceSpec::spawn("other", "outboard-scratch", &[]),
    );
    let bus = fe.mmio().clone();
    let why = kill_mid_spin(&bus, far, || child.kill().unwrap());
    assert!(
        matches!(why, AccessError::BackendGone),
        "the hang-up, not the deadline: {}",
        outboard_protocol::error_chain(&why)
    );
    assert!(fe.device("far").unwrap().is_failed());
    assert!(matches!(
        bus.try_read(far, AccessSize::B8),
        Err(AccessError::DeviceFailed(_))
    ));
    assert_eq!(bus.try_read(other, AccessSize::B8).unwrap(), ID);
    let _ = child.wait();
}

#[test]
fn ring_when_backend_sigkilled_under_restart_policy_then_resumes_on_a_new_ring_with_writes_in_order(
) {
    let mut fe = frontend(T);
    let spec = DeviceSpec::spawn("r", "outboard-scratch", &[])
        .restart(outboard_frontend::restart::RestartPolicy::on_failure());
    let (regs, _) = ring_device(&mut fe, "r", spec);
    let bus = fe.mmio().clone();
    for round in 0..5u64 {
        let pid = fe.device("r").unwrap().pid().unwrap();
        for x in 0..1000u64 {
            bus.try_write(
                regs + scratch::BANK + 8 * (x % 8),
                AccessSize::B8,
                round * 1000 + x,
            )
            .unwrap();
        }
        outboard_tests::signal(pid, libc::SIGKILL);
        // The next access waits for the restarted backend (scratch keeps no
        // state, so it starts over) and is served there, on a new ring.
        assert_eq!(bus.try_read(regs, AccessSize::B8).unwrap(), ID);
        for x in 0..100u64 {
            bus.try_write(regs + scratch::BANK, AccessSize::B8, x)
                .unwrap();
        }
        assert_eq!(
            bus.try_read(regs + scratch::BANK, AccessSize::B8).unwrap(),
            99,
            "round {round}: posted writes after the restart arrive in order"
        );
        assert!(
            fe.device("r").unwrap().on_ring(0),
            "round {round}: on a ring again"
        );
        assert!(!fe.device("r").unwrap().is_failed());
    }
}

#[test]
fn ring_when_stateful_backend_sigkilled_after_posted_writes_then_state_and_replay_restore_the_last_value(
) {
    // The UART keeps its registers in a state area and takes posted writes.
    // Round 0 kills it right after a burst (the state holds what it served);
    // round 1 stops it first, so not one of the burst leaves the ring and
    // every write reaches the new backend by the replay on its data socket,
    // before its new ring carries the read.
    let mut g = outboard_tests::guest(T);
    g.fe.attach(
        &DeviceSpec::spawn("com1", "outboard-uart", &["--output", "/dev/null"])
            .restart(outboard_frontend::restart::RestartPolicy::on_failure()),
    )
    .unwrap();
    let d = g.fe.device("com1").unwrap();
    assert!(d.on_ring(0), "the UART's registers are on a ring");
    assert!(d.placed(0).unwrap().posted, "its writes are posted");
    let scr = d.placed(0).unwrap().addr + 7;
    let pio = g.fe.pio().clone();
    for (round, stop) in [false, true].into_iter().enumerate() {
        let pid = g.fe.device("com1").unwrap().pid().unwrap();
        if stop {
            outboard_tests::signal(pid, libc::SIGSTOP);
        }
        // Fewer than the ring's entries: none waits for room.
        for x in 1..=200u64 {
            pio.try_write(scr, AccessSize::B1, (x + 17 * round as u64) & 0xff)
                .unwrap();
        }
        outboard_tests::signal(pid, libc::SIGKILL);
        assert_eq!(
            pio.try_read(scr, AccessSize::B1).unwrap(),
            (200 + 17 * round as u64) & 0xff,
            "stopped first: {stop}"
        );
        let d = g.fe.device("com1").unwrap();
        assert_ne!(d.pid().unwrap(), pid, "a new backend");
        assert!(d.on_ring(0), "on a new ring");
        assert!(!d.is_failed());
    }
}

#[test]
fn ring_when_device_asks_for_none_then_commands_stay_on_the_data_socket() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]).cmd_ring(0))
        .unwrap();
    assert!(!d.on_ring(0));
    let base = d.placed(0).unwrap().addr;
    let bus = fe.mmio().clone();
    for x in 1..=100u64 {
        bus.try_write(base + scratch::REG_ACCUM, AccessSize::B8, x)
            .unwrap();
    }
    assert_eq!(
        bus.try_read(base + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        5050
    );
}

/// A backend written from docs/protocol.md that offers command rings
/// (or not) and, once it has one, lies in it as `lie` says. Its one
/// region takes posted writes.
mod fake {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use outboard_protocol::channel::Channel;
    use outboard_protocol::control::{
        DeviceInfo, DeviceKind, Header, Hello, Payload, RegionInfo, Request, SetCmdRing, Status,
        StatusReply, FEATURES_SUPPORTED, F_CMD_RING, REGION_POSTED_WRITES, REGION_READ,
        REGION_WRITE,
    };
    use outboard_protocol::ioregionfd::{Cmd, Resp, CMD_SIZE};
    use outboard_protocol::ring::Ring;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Lie {
        /// Offers no F_CMD_RING, serves the data socket honestly.
        NoRing,
        /// Answers honestly on the ring.
        Honest,
        /// Moves `head` past `tail`.
        HeadPastTail,
        /// Answers with a sequence that is neither the last nor the expected.
        WrongSequence,
        /// Takes the ring, stays connected, and never consumes a command.
        Silent,
    }

    pub const VALUE: u64 = 0x5a;

    pub fn start(lie: Lie) -> (PathBuf, JoinHandle<()>) {
        let path = outboard_tests::socket_path("fake-ring");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            serve(Channel::new(s), lie);
        });
        (path, t)
    }

    fn serve(ch: Channel, lie: Lie) {
        let mut data: Option<UnixStream> = None;
        let mut workers = Vec::new();
        loop {
            let Ok(m) = ch.recv() else { break };
            let req = m.header.request;
            let reply = |p: &[u8]| {
                let _ = ch.send(Header::reply(req, p.len(), false), p, &[]);
            };
            let ok = || reply(&StatusReply { status: Status::Ok }.encode());
            match Request::from_u32(req).unwrap() {
                Request::Hello => {
                    let features = if lie == Lie::NoRing {
                        FEATURES_SUPPORTED & !F_CMD_RING
                    } else {
                        FEATURES_SUPPORTED
                    };
                    reply(&Hello::ours(features).encode());
                }
                Request::GetDeviceInfo => reply(
                    &DeviceInfo {
                        kind: DeviceKind::OTHER,
                        num_regions: 1,
                        num_doorbells: 0,
                        num_irqs: 0,
                        name: "liar".into(),
                    }
                    .encode(),
                ),
                Request::GetRegionInfo => reply(
                    &RegionInfo {
                        index: 0,
                        flags: REGION_READ | REGION_WRITE | REGION_POSTED_WRITES,
                        size: 16,
                        preferred_addr: 0,
                        access_sizes: 0x0f,
                        name: "r".into(),
                    }
                    .encode(),
                ),
                Request::SetRegion => {
                    let sock = UnixStream::from(m.fds.into_iter().next().unwrap());
                    if lie == Lie::NoRing {
                        let s = sock.try_clone().unwrap();
                        workers.push(std::thread::spawn(move || serve_socket(s)));
                    }
                    data = Some(sock);
                    ok();
                }
                Request::SetCmdRing => {
                    let set = SetCmdRing::decode(&m.payload).unwrap();
                    let mut fds = m.fds.into_iter();
                    let ring = Ring::open(&fds.next().unwrap(), set.entries).unwrap();
                    let _kick = fds.next().unwrap();
                    let notify = fds.next().unwrap();
                    if lie != Lie::Silent {
                        workers.push(std::thread::spawn(move || serve_ring(ring, notify, lie)));
                    }
                    ok();
                }
                Request::Shutdown => {
                    ok();
                    break;
                }
                _ => ok(),
            }
        }
        drop(data);
        drop(workers);
    }

    fn serve_socket(mut s: UnixStream) {
        use std::io::{Read, Write};
        let mut b = [0u8; CMD_SIZE];
        while s.read_exact(&mut b).is_ok() {
            let cmd = Cmd::decode(&b).unwrap();
            if cmd.resp {
                let data = if cmd.op == outboard_protocol::Op::Read {
                    VALUE
                } else {
                    0
                };
                if s.write_all(&Resp { data }.encode()).is_err() {
                    return;
                }
            }
        }
    }

    /// Polls the ring (no sleeping: the frontend never needs a kick then),
    /// for a while, answering as `lie` says.
    fn serve_ring(ring: Ring, notify: std::os::fd::OwnedFd, lie: Lie) {
        let mut head = 0u32;
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < end {
            let Ok(tail) = ring.published(head) else {
                return;
            };
            if tail == head {
                std::thread::yield_now();
                continue;
            }
            let mut answer = None;
            while head != tail {
                let cmd = Cmd::decode(&ring.take(head)).unwrap();
                if cmd.resp {
                    answer = Some((
                        head,
                        if cmd.op == outboard_protocol::Op::Read {
                            VALUE
                        } else {
                            0
                        },
                    ));
                }
                head = head.wrapping_add(1);
            }
            let (new_head, answer) = match lie {
                Lie::HeadPastTail => (tail.wrapping_add(5), answer),
                Lie::WrongSequence => (tail, answer.map(|(p, d)| (p.wrapping_add(7), d))),
                _ => (tail, answer),
            };
            if ring.complete(new_head, answer) {
                let one = 1u64.to_ne_bytes();
                // SAFETY: an 8-byte write from a live array to an fd we own.
                unsafe { libc::write(notify.as_raw_fd(), one.as_ptr().cast(), 8) };
            }
        }
    }
}

#[test]
fn ring_when_backend_offers_none_then_frontend_stays_on_the_socket() {
    let (path, fake) = fake::start(fake::Lie::NoRing);
    let mut fe = frontend(T);
    let d = fe.attach(&DeviceSpec::connect("liar", &path)).unwrap();
    assert!(!d.on_ring(0), "no F_CMD_RING from the backend: no ring");
    let base = d.placed(0).unwrap().addr;
    assert_eq!(
        fe.mmio().try_read(base, AccessSize::B4).unwrap(),
        fake::VALUE
    );
    fe.detach("liar").unwrap();
    fake.join().unwrap();
}

#[test]
fn ring_when_backend_lies_about_indices_then_corrupt_ring_fails_only_that_device() {
    let mut fe = frontend(Duration::from_secs(2));
    let other = fe
        .attach(&DeviceSpec::spawn("other", "outboard-scratch", &[]))
        .unwrap()
        .placed(0)
        .unwrap()
        .addr;
    // The honest fake first: the fake itself is right.
    let (path, _honest) = fake::start(fake::Lie::Honest);
    let d = fe.attach(&DeviceSpec::connect("honest", &path)).unwrap();
    assert!(d.on_ring(0));
    let base = d.placed(0).unwrap().addr;
    for _ in 0..100 {
        assert_eq!(
            fe.mmio().try_read(base, AccessSize::B4).unwrap(),
            fake::VALUE
        );
    }
    for (i, lie) in [fake::Lie::HeadPastTail, fake::Lie::WrongSequence]
        .into_iter()
        .enumerate()
    {
        let name = format!("liar{i}");
        let (path, _fake) = fake::start(lie);
        let d = fe.attach(&DeviceSpec::connect(&name, &path)).unwrap();
        assert!(d.on_ring(0));
        let base = d.placed(0).unwrap().addr;
        let mut err = None;
        for _ in 0..3 {
            match fe.mmio().try_read(base, AccessSize::B4) {
                Ok(v) => assert_eq!(v, fake::VALUE, "{lie:?}: a value is never garbage"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err.unwrap_or_else(|| panic!("{lie:?}: the lie went unnoticed"));
        assert!(
            matches!(err, AccessError::CorruptRing(_)),
            "{lie:?}: {}",
            outboard_protocol::error_chain(&err)
        );
        let failure = fe.device(&name).unwrap().failure().unwrap();
        assert!(failure.contains("corrupt"), "{lie:?}: {failure}");
        assert!(
            matches!(
                fe.mmio().try_read(base, AccessSize::B4),
                Err(AccessError::DeviceFailed(_))
            ),
            "{lie:?}: later accesses fail fast"
        );
        assert_eq!(fe.mmio().read(base, AccessSize::B4), 0xffff_ffff);
        assert_eq!(
            fe.mmio().try_read(other, AccessSize::B8).unwrap(),
            ID,
            "others serve"
        );
    }
}

#[test]
fn ring_when_backend_never_consumes_then_posted_writes_fill_it_and_the_next_times_out() {
    let mut fe = frontend(Duration::from_millis(500));
    let other = fe
        .attach(&DeviceSpec::spawn("other", "outboard-scratch", &[]))
        .unwrap()
        .placed(0)
        .unwrap()
        .addr;
    let (path, _fake) = fake::start(fake::Lie::Silent);
    let d = fe
        .attach(&DeviceSpec::connect("mute", &path).cmd_ring(8))
        .unwrap();
    assert!(d.on_ring(0));
    let base = d.placed(0).unwrap().addr;
    // Posted writes need no answer: exactly as many as the ring holds go in.
    for x in 0..8u64 {
        fe.mmio().try_write(base, AccessSize::B4, x).unwrap();
    }
    // The ninth waits for room that never comes, until its deadline.
    let e = fe.mmio().try_write(base, AccessSize::B4, 8).unwrap_err();
    assert!(
        matches!(e, AccessError::Timeout),
        "{}",
        outboard_protocol::error_chain(&e)
    );
    assert!(fe.device("mute").unwrap().is_failed());
    assert!(matches!(
        fe.mmio().try_write(base, AccessSize::B4, 9),
        Err(AccessError::DeviceFailed(_))
    ));
    assert_eq!(fe.mmio().try_read(other, AccessSize::B8).unwrap(), ID);
}

/// A raw frontend on a real scratch backend: HELLO (with `features`), one
/// placed region, and the data socket's frontend end.
fn raw_scratch(
    features: u64,
) -> (
    std::process::Child,
    outboard_protocol::channel::Channel,
    std::os::unix::net::UnixStream,
) {
    raw_backend("outboard-scratch", features, |_| {})
}

/// [`raw_scratch`] for any backend `program`; `setup` runs on the control
/// channel right after HELLO.
fn raw_backend(
    program: &str,
    features: u64,
    setup: impl FnOnce(&outboard_protocol::channel::Channel),
) -> (
    std::process::Child,
    outboard_protocol::channel::Channel,
    std::os::unix::net::UnixStream,
) {
    use outboard_protocol::control::{Hello, Payload, Request, SetRegion};
    use std::os::fd::AsRawFd;
    let (child, path) = outboard_tests::spawn_listening(program, &[]);
    let ch = outboard_tests::connect(&path);
    let m = outboard_tests::call(&ch, Request::Hello, &Hello::ours(features).encode(), &[]);
    assert_eq!(outboard_tests::error_status(&m), None);
    setup(&ch);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let set = SetRegion {
        index: 0,
        flags: 0,
        guest_addr: 0x1000,
        user_data: 1,
    };
    let m = outboard_tests::call(
        &ch,
        Request::SetRegion,
        &set.encode(),
        &[theirs.as_raw_fd()],
    );
    assert_eq!(outboard_tests::error_status(&m), None);
    (child, ch, ours)
}

/// A read on the raw data socket is still answered.
fn assert_socket_serves(data: &mut std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    data.write_all(&outboard_protocol::Cmd::read(1, 0, AccessSize::B8).encode())
        .unwrap();
    let mut resp = [0u8; 32];
    data.read_exact(&mut resp).unwrap();
    assert_eq!(outboard_protocol::Resp::decode(&resp).unwrap().data, ID);
}

/// Sends SET_CMD_RING for region 0 with a fresh 8-entry ring; the reply,
/// the frontend's half of the ring and its kick eventfd.
fn offer_ring(
    ch: &outboard_protocol::channel::Channel,
) -> (
    outboard_protocol::channel::Message,
    outboard_protocol::ring::Ring,
    vmm_sys_util::eventfd::EventFd,
) {
    use outboard_protocol::control::{Payload, Request, SetCmdRing};
    use std::os::fd::AsRawFd;
    let (ring, memfd) = outboard_protocol::ring::Ring::create(8).unwrap();
    let (kick, notify) = (eventfd(), eventfd());
    let set = SetCmdRing {
        index: 0,
        entries: 8,
    };
    let fds = [memfd.as_raw_fd(), kick.as_raw_fd(), notify.as_raw_fd()];
    let m = outboard_tests::call(ch, Request::SetCmdRing, &set.encode(), &fds);
    (m, ring, kick)
}

fn eventfd() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

#[test]
fn set_cmd_ring_when_fds_or_region_wrong_then_spec_status_and_backend_serves_on() {
    use outboard_protocol::control::{Payload, Request, SetCmdRing, Status, FEATURES_SUPPORTED};
    use outboard_protocol::ring::Ring;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut child, ch, mut data) = raw_scratch(FEATURES_SUPPORTED);
    let set = SetCmdRing {
        index: 0,
        entries: 8,
    };
    let (_ring, memfd) = Ring::create(8).unwrap();
    let (_big, big) = Ring::create(16).unwrap();
    // SAFETY: a valid name; the fd is owned at once.
    let plain = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"plain".as_ptr(), 0)) };
    // SAFETY: an fd we own.
    assert_eq!(unsafe { libc::ftruncate(plain.as_raw_fd(), 8192) }, 0);
    let (k, n) = (eventfd(), eventfd());
    let cases: [(&str, SetCmdRing, [i32; 3], Status); 5] = [
        (
            "unsealed memfd",
            set,
            [plain.as_raw_fd(), k.as_raw_fd(), n.as_raw_fd()],
            Status::BadFd,
        ),
        (
            "header for another size",
            set,
            [big.as_raw_fd(), k.as_raw_fd(), n.as_raw_fd()],
            Status::BadFd,
        ),
        (
            "memfd shorter than the ring",
            SetCmdRing {
                index: 0,
                entries: 16,
            },
            [memfd.as_raw_fd(), k.as_raw_fd(), n.as_raw_fd()],
            Status::BadFd,
        ),
        (
            "kick not an eventfd",
            set,
            [memfd.as_raw_fd(), memfd.as_raw_fd(), n.as_raw_fd()],
            Status::BadFd,
        ),
        (
            "region not placed",
            SetCmdRing {
                index: 1,
                entries: 8,
            },
            [memfd.as_raw_fd(), k.as_raw_fd(), n.as_raw_fd()],
            Status::NoSuchRegion,
        ),
    ];
    for (what, set, fds, status) in cases {
        let m = outboard_tests::call(&ch, Request::SetCmdRing, &set.encode(), &fds);
        assert_eq!(outboard_tests::error_status(&m), Some(status), "{what}");
    }
    // Still serving on the data socket.
    assert_socket_serves(&mut data);
    drop(ch);
    assert!(outboard_tests::wait_exit(&mut child).success());
}

#[test]
fn set_cmd_ring_when_not_negotiated_then_unsupported_and_socket_serves() {
    use outboard_protocol::control::{Status, FEATURES_SUPPORTED, F_CMD_RING};
    let (mut child, ch, mut data) = raw_scratch(FEATURES_SUPPORTED & !F_CMD_RING);
    let (m, _ring, _kick) = offer_ring(&ch);
    assert_eq!(outboard_tests::error_status(&m), Some(Status::Unsupported));
    assert_socket_serves(&mut data);
    drop(ch);
    assert!(outboard_tests::wait_exit(&mut child).success());
}

#[test]
fn ring_when_frontend_publishes_past_the_ring_then_backend_exits_naming_the_corrupt_ring() {
    use outboard_protocol::control::FEATURES_SUPPORTED;
    let (mut child, ch, _data) = raw_scratch(FEATURES_SUPPORTED);
    let (m, ring, k) = offer_ring(&ch);
    assert_eq!(outboard_tests::error_status(&m), None);
    // An honest command first, answered on the ring.
    ring.put(
        0,
        &outboard_protocol::Cmd::read(1, 0, AccessSize::B8).encode(),
    );
    if ring.publish(1) {
        k.write(1).unwrap();
    }
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Some(v) = ring.response(0, 0).unwrap() {
            assert_eq!(v, ID);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on the ring"
        );
        std::thread::yield_now();
    }
    // Then a tail 100 commands ahead of an 8-entry ring.
    ring.publish(101);
    k.write(1).unwrap();
    let status = outboard_tests::wait_exit(&mut child);
    let stderr = outboard_tests::stderr_of(&mut child);
    assert_eq!(status.code(), Some(2), "a protocol violation: {stderr}");
    assert!(
        stderr.contains("command ring of region 0 is corrupt"),
        "{stderr}"
    );
    drop(ch);
}

#[test]
fn ring_when_command_published_without_a_kick_then_a_control_request_serves_it_first() {
    use outboard_protocol::control::{Request, FEATURES_SUPPORTED};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // The UART keeps state, so SAVE_STATE can pause it: after that reply
    // the backend serves control only, and a ring command it had not
    // taken before the reply would stay unconsumed for good.
    let (mut child, ch, _data) = raw_backend("outboard-uart", FEATURES_SUPPORTED, |ch| {
        // SAFETY: (test) a NUL-terminated name, plain flags; owned at once.
        let area = unsafe {
            OwnedFd::from_raw_fd(libc::memfd_create(
                c"state".as_ptr(),
                libc::MFD_ALLOW_SEALING,
            ))
        };
        std::fs::File::from(area.try_clone().unwrap())
            .set_len(64 << 10)
            .unwrap();
        // SAFETY: (test) adds a seal to our memfd.
        let rc = unsafe { libc::fcntl(area.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
        let m = outboard_tests::call(ch, Request::SetStateArea, &[], &[area.as_raw_fd()]);
        assert_eq!(outboard_tests::error_status(&m), None);
    });
    let (m, ring, kick) = offer_ring(&ch);
    assert_eq!(outboard_tests::error_status(&m), None);
    // A first read, kicked and answered: the ring works.
    let scratch_reg = 7; // the 16550's scratch register
    ring.put(
        0,
        &outboard_protocol::Cmd::read(1, scratch_reg, AccessSize::B1).encode(),
    );
    if ring.publish(1) {
        kick.write(1).unwrap();
    }
    let deadline = std::time::Instant::now() + T;
    while ring.response(0, 0).unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer on the ring"
        );
        std::thread::yield_now();
    }
    // Let the backend's spin run out so that it sleeps in epoll_wait, then
    // publish a write and do not kick: only the control request wakes it.
    std::thread::sleep(Duration::from_millis(50));
    let write = outboard_protocol::Cmd::write(1, scratch_reg, AccessSize::B1, 0x5a, true);
    ring.put(1, &write.encode());
    assert!(ring.publish(2), "the backend slept");
    let m = outboard_tests::call(&ch, Request::SaveState, &[], &[]);
    assert_eq!(outboard_tests::error_status(&m), None);
    // Paused now: what it consumed, it consumed before answering.
    assert_eq!(
        ring.consumed(1, 2).unwrap(),
        2,
        "the write was served before SAVE_STATE"
    );
    drop(ch);
    assert!(outboard_tests::wait_exit(&mut child).success());
}
