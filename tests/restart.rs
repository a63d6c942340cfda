//! Devices that survive their backend: a spawned backend under an
//! `on-failure` restart policy is SIGKILLed at random moments while the
//! test guest keeps requests in flight; the frontend replaces it under the
//! running guest (same fds, same regions, state restored from the state
//! area) and nothing the guest sees goes wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_frontend::{AccessSize, DeviceSpec, RestartMode, RestartPolicy};
use outboard_testkit::guest::{blk, Buffer, DriverOptions, F_EVENT_IDX, F_INDIRECT_DESC};
use outboard_tests::{guest, temp_image, Rand, HANG_GUARD};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);

/// Restart at once, however often: the test kills on purpose.
fn eager() -> RestartPolicy {
    RestartPolicy {
        mode: RestartMode::OnFailure,
        backoff: Duration::ZERO,
        limit: 10_000,
    }
}

/// How the backend is replaced under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disruption {
    /// SIGKILL the serving process; the restart policy replaces it.
    Kill,
    /// Live upgrade to the same binary.
    Upgrade,
}

/// Replaces the device's backend `times` times, each a random 0-15 ms
/// after the previous replacement completed; returns restarts + upgrades.
fn disrupter(
    link: Arc<outboard_frontend::device::Link>,
    how: Disruption,
    times: u32,
    seed: u64,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut r = Rand(seed);
        for _ in 0..times {
            std::thread::sleep(Duration::from_micros(r.next_u64() % 15_000));
            if how == Disruption::Upgrade {
                link.upgrade(None).unwrap();
                continue;
            }
            let generation = link.generation();
            let pid = link.conn().pid().expect("serving pid");
            // SAFETY: (test) a signal to the backend this frontend spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let deadline = Instant::now() + HANG_GUARD;
            while link.generation() == generation {
                assert!(Instant::now() < deadline, "no restart after killing {pid}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        done.store(true, Ordering::Release);
        link.restarts() + link.upgrades()
    })
}

struct Slot {
    hdr: u64,
    data: u64,
    st: u64,
    /// In flight: (head, block, is a write).
    busy: Option<(u16, u64, bool)>,
}

fn blk_under(how: Disruption, times: u32, sandbox: bool) {
    const SECTORS: u64 = 8192; // 4 MiB: 1024 blocks of 4 KiB
    const QD: usize = 16;
    // One image per test: tests run in parallel in one process.
    let img = temp_image(&format!("restart-blk-{how:?}-{sandbox}"), SECTORS);
    let mut g = guest(T);
    let mut spec = DeviceSpec::spawn(
        "blk",
        "outboard-virtio-blk",
        &["--path", img.to_str().unwrap()],
    )
    .restart(eager());
    if !sandbox {
        spec = spec.without_sandbox();
    }
    g.fe.attach(&spec).unwrap();
    let mut d = g.driver_with(
        "blk",
        DriverOptions::new(blk::F_FLUSH | F_EVENT_IDX | F_INDIRECT_DESC, 64),
    );
    d.set_timeout(HANG_GUARD);
    let link = Arc::clone(g.fe.device("blk").unwrap().remote().unwrap().link());
    let first_pid = link.conn().pid().unwrap();
    let mut slots: Vec<Slot> = (0..QD)
        .map(|_| Slot {
            hdr: g.alloc.alloc(16, 16).unwrap(),
            data: g.alloc.alloc(4096, 4096).unwrap(),
            st: g.alloc.alloc(1, 1).unwrap(),
            busy: None,
        })
        .collect();
    let ram = Arc::clone(d.ram());
    let mem = ram.memory();
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    let mut rand = Rand(0x5eed_1234);
    let mut in_flight: HashSet<u64> = HashSet::new();
    let done = Arc::new(AtomicBool::new(false));
    let kill = disrupter(
        Arc::clone(&link),
        how,
        times,
        0xdead_beef,
        Arc::clone(&done),
    );
    let (mut reads, mut writes) = (0u64, 0u64);
    let mut after_done = 0;
    loop {
        // Every idle slot gets a new request on a block no request in
        // flight touches, so the model is exact whatever the order.
        let stop = done.load(Ordering::Acquire) && after_done >= 2 * QD;
        if !stop {
            for s in slots.iter_mut().filter(|s| s.busy.is_none()) {
                let block = loop {
                    let b = rand.next_u64() % (SECTORS / 8);
                    if in_flight.insert(b) {
                        break b;
                    }
                };
                let write = rand.next_u64().is_multiple_of(2);
                let mut h = [0u8; 16];
                let kind = if write { blk::T_OUT } else { blk::T_IN };
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                h[8..16].copy_from_slice(&(block * 8).to_le_bytes());
                mem.write_slice(&h, GuestAddress(s.hdr)).unwrap();
                mem.write_obj(0xffu8, GuestAddress(s.st)).unwrap();
                if write {
                    let data: Vec<u8> = (0..4096).map(|_| rand.next_u64() as u8).collect();
                    mem.write_slice(&data, GuestAddress(s.data)).unwrap();
                    let at = (block * 4096) as usize;
                    model[at..at + 4096].copy_from_slice(&data);
                }
                let bufs = [
                    Buffer::readable(s.hdr, 16),
                    Buffer {
                        addr: s.data,
                        len: 4096,
                        device_writes: !write,
                    },
                    Buffer::writable(s.st, 1),
                ];
                let head = d.submit(0, &bufs).unwrap();
                s.busy = Some((head, block, write));
            }
            d.notify(0).unwrap();
        }
        // The oldest request completes first (one queue, served in order).
        let Some(oldest) = slots.iter().filter_map(|s| s.busy.map(|b| b.0)).next() else {
            break;
        };
        if let Err(e) = d.wait(0, oldest) {
            let pid = link.conn().pid();
            panic!(
                "request {oldest} not completed ({e:?}): generation {}, restarts {}, \
                 backend {pid:?} alive {:?}, avail {:?}, used {:?}, status {:?}",
                link.generation(),
                link.restarts(),
                pid.map(outboard_tests::alive),
                d.avail_idx(0),
                d.used_idx(0),
                d.status(),
            );
        }
        let mut completed = vec![oldest];
        for s in &slots {
            if let Some((head, _, _)) = s.busy {
                if head != oldest && d.poll(0, head).unwrap().is_some() {
                    completed.push(head);
                }
            }
        }
        for s in slots.iter_mut() {
            let Some((head, block, write)) = s.busy else {
                continue;
            };
            if !completed.contains(&head) {
                continue;
            }
            let st: u8 = mem.read_obj(GuestAddress(s.st)).unwrap();
            assert_eq!(st, blk::S_OK, "status of the request on block {block}");
            if write {
                writes += 1;
            } else {
                let mut got = vec![0u8; 4096];
                mem.read_slice(&mut got, GuestAddress(s.data)).unwrap();
                let at = (block * 4096) as usize;
                assert!(got[..] == model[at..at + 4096], "read of block {block}");
                reads += 1;
            }
            in_flight.remove(&block);
            s.busy = None;
            if done.load(Ordering::Acquire) {
                after_done += 1;
            }
        }
    }
    let restarts = kill.join().unwrap();
    assert_eq!(restarts, times, "one replacement each time");
    assert_ne!(link.conn().pid().unwrap(), first_pid);
    assert!(!g.fe.device("blk").unwrap().is_failed());
    // A flush through the last backend, then the file is the model.
    let flush_hdr = slots[0].hdr;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&blk::T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(flush_hdr)).unwrap();
    d.request(
        0,
        &[
            Buffer::readable(flush_hdr, 16),
            Buffer::writable(slots[0].st, 1),
        ],
    )
    .unwrap();
    let disk = std::fs::read(&img).unwrap();
    let differ: Vec<usize> = (0..disk.len() / 4096)
        .filter(|b| disk[b * 4096..(b + 1) * 4096] != model[b * 4096..(b + 1) * 4096])
        .collect();
    assert!(
        differ.is_empty(),
        "after {reads} reads and {writes} writes, blocks {differ:?} differ from the model"
    );
    assert!(
        reads + writes > u64::from(times),
        "{reads} reads, {writes} writes"
    );
    let _ = std::fs::remove_file(&img);
}

#[test]
fn blk_when_backend_killed_100_times_under_16_requests_in_flight_then_each_completes_once_and_image_matches(
) {
    blk_under(Disruption::Kill, 100, true);
}

#[test]
fn blk_when_unconfined_backend_killed_100_times_then_each_completes_once_and_image_matches() {
    blk_under(Disruption::Kill, 100, false);
}

#[test]
fn blk_when_live_upgraded_30_times_under_16_requests_in_flight_then_no_error_and_image_matches() {
    blk_under(Disruption::Upgrade, 30, true);
}

/// Byte `i` of a test stream: position-dependent, so a lost, repeated or
/// misplaced byte shows.
fn stream_byte(seed: u64, i: u64) -> u8 {
    ((i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

/// The console under `times` replacements while the guest keeps 16
/// transmit chains and 16 receive buffers in flight and a client types
/// without pause: both directions arrive exactly once, in order.
fn console_under(how: Disruption, times: u32) {
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    const QD: usize = 16;
    const OUT_SEED: u64 = 0x0ff;
    const IN_SEED: u64 = 0x1f1;
    let path = outboard_tests::socket_path(&format!("restart-con-{how:?}"));
    let mut g = guest(T);
    let spec = DeviceSpec::spawn("con", "outboard-virtio-console", &[])
        .host_stream(&path)
        .restart(eager());
    g.fe.attach(&spec).unwrap();
    let mut d = g.driver_with("con", DriverOptions::new(F_EVENT_IDX | F_INDIRECT_DESC, 64));
    d.set_timeout(HANG_GUARD);
    let link = Arc::clone(g.fe.device("con").unwrap().remote().unwrap().link());
    let client = outboard_tests::connect_stream(&path);
    // The client types until the disruptions are over; returns the count.
    let done = Arc::new(AtomicBool::new(false));
    let mut typist = Some({
        let mut w = client.try_clone().unwrap();
        w.set_write_timeout(Some(HANG_GUARD)).unwrap();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut r = Rand(7);
            let mut sent = 0u64;
            while !done.load(Ordering::Acquire) {
                let n = 1 + r.next_u64() % 700;
                let chunk: Vec<u8> = (sent..sent + n).map(|i| stream_byte(IN_SEED, i)).collect();
                w.write_all(&chunk).unwrap();
                sent += n;
                if r.next_u64().is_multiple_of(4) {
                    std::thread::sleep(Duration::from_micros(r.next_u64() % 500));
                }
            }
            sent
        })
    });
    // The client's screen.
    let screen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let _reader = {
        let mut c = client.try_clone().unwrap();
        let screen = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let kill = disrupter(Arc::clone(&link), how, times, 0xc0_501e, Arc::clone(&done));
    let ram = Arc::clone(d.ram());
    let mem = ram.memory();
    let tx_bufs: Vec<u64> = (0..QD).map(|_| g.alloc.alloc(1024, 8).unwrap()).collect();
    let rx_bufs: Vec<u64> = (0..QD).map(|_| g.alloc.alloc(512, 8).unwrap()).collect();
    let mut tx_free: Vec<u64> = tx_bufs.clone();
    let mut rx_free: Vec<u64> = rx_bufs.clone();
    // In flight, in submission order (each queue completes in order).
    let mut tx: VecDeque<(u16, u64)> = VecDeque::new();
    let mut rx: VecDeque<(u16, u64)> = VecDeque::new();
    let mut rand = Rand(0x5eed_c0de);
    let (mut written, mut typed) = (0u64, Vec::<u8>::new());
    let mut input_total: Option<u64> = None;
    let mut last_progress = Instant::now();
    loop {
        let disrupted = done.load(Ordering::Acquire);
        if let (true, Some(t)) = (disrupted, typist.take_if(|_| disrupted)) {
            input_total = Some(t.join().unwrap());
        }
        if let Some(total) = input_total {
            if tx.is_empty() && typed.len() as u64 == total {
                break;
            }
        }
        let mut submitted = [false; 2];
        // Output until the disruptions are over.
        while let Some(buf) = tx_free.pop_if(|_| !disrupted) {
            let n = 1 + rand.next_u64() % 1024;
            let bytes: Vec<u8> = (written..written + n)
                .map(|i| stream_byte(OUT_SEED, i))
                .collect();
            mem.write_slice(&bytes, GuestAddress(buf)).unwrap();
            let head = d.submit(1, &[Buffer::readable(buf, n as u32)]).unwrap();
            written += n;
            tx.push_back((head, buf));
            submitted[1] = true;
        }
        while let Some(buf) = rx_free.pop() {
            let n = 1 + rand.next_u64() % 512;
            let head = d.submit(0, &[Buffer::writable(buf, n as u32)]).unwrap();
            rx.push_back((head, buf));
            submitted[0] = true;
        }
        for (q, s) in submitted.iter().enumerate() {
            if *s {
                d.notify(q).unwrap();
            }
        }
        let mut progress = false;
        while let Some(&(head, buf)) = tx.front() {
            let polled = d.poll(1, head).unwrap_or_else(|e| {
                panic!(
                    "transmit queue ({e:?}): waiting for head {head}, in flight {:?}, \
                     used index {:?}, avail index {:?}, generation {}",
                    tx.iter().map(|t| t.0).collect::<Vec<_>>(),
                    d.used_idx(1),
                    d.avail_idx(1),
                    link.generation()
                )
            });
            if polled.is_none() {
                break;
            }
            tx.pop_front();
            tx_free.push(buf);
            progress = true;
        }
        while let Some(&(head, buf)) = rx.front() {
            let Some(len) = d.poll(0, head).unwrap_or_else(|e| {
                panic!(
                    "receive queue ({e:?}): used index {:?}, avail index {:?}, generation {}",
                    d.used_idx(0),
                    d.avail_idx(0),
                    link.generation()
                )
            }) else {
                break;
            };
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
            typed.extend_from_slice(&got);
            rx.pop_front();
            rx_free.push(buf);
            progress = true;
        }
        if progress {
            last_progress = Instant::now();
        } else {
            assert!(
                last_progress.elapsed() < HANG_GUARD,
                "no progress: generation {}, {} of {input_total:?} typed bytes in, {written} written, \
                 {} on screen, tx in flight {}, stats {:?}",
                link.generation(),
                typed.len(),
                screen.lock().unwrap().len(),
                tx.len(),
                g.fe.device("con").unwrap().host_stream().unwrap().stats(),
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let replaced = kill.join().unwrap();
    assert_eq!(replaced, times, "one replacement each time");
    // Input: every typed byte once, in order.
    let first_bad = typed
        .iter()
        .enumerate()
        .position(|(i, &b)| b != stream_byte(IN_SEED, i as u64));
    assert_eq!(
        first_bad,
        None,
        "input differs at byte {first_bad:?} of {}",
        typed.len()
    );
    // Output: every written byte once, in order, and nothing more.
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let shown = screen.lock().unwrap().clone();
        if shown.len() as u64 >= written {
            break;
        }
        let first_bad = shown
            .iter()
            .enumerate()
            .position(|(i, &b)| b != stream_byte(OUT_SEED, i as u64));
        assert!(
            Instant::now() < deadline,
            "output short: {} of {written}, first difference at {first_bad:?} ({:?})",
            shown.len(),
            g.fe.device("con").unwrap().host_stream().unwrap().stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let device = g.fe.device("con").unwrap();
    let stats = device.host_stream().unwrap().stats();
    let screen = screen.lock().unwrap().clone();
    assert_eq!(screen.len() as u64, written, "output length ({stats:?})");
    let first_bad = screen
        .iter()
        .enumerate()
        .position(|(i, &b)| b != stream_byte(OUT_SEED, i as u64));
    assert_eq!(
        first_bad, None,
        "output differs at byte {first_bad:?} ({stats:?})"
    );
    assert!(!device.is_failed());
    assert!(
        written > 0 && !typed.is_empty(),
        "{written} out, {} in",
        typed.len()
    );
    eprintln!(
        "console under {times} {how:?}s: {written} bytes out, {} in; {stats:?}",
        typed.len()
    );
}

#[test]
fn console_when_backend_killed_100_times_under_traffic_both_ways_then_each_byte_arrives_once() {
    console_under(Disruption::Kill, 100);
}

#[test]
fn console_when_live_upgraded_30_times_under_traffic_both_ways_then_each_byte_arrives_once() {
    console_under(Disruption::Upgrade, 30);
}

#[test]
fn uart_when_live_upgraded_then_registers_and_posted_writes_kept() {
    let mut g = guest(T);
    g.fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", "/dev/null"],
    ))
    .unwrap();
    let base = g.fe.device("com1").unwrap().placed(0).unwrap().addr;
    let pio = g.fe.pio().clone();
    let pid = g.fe.device("com1").unwrap().pid().unwrap();
    // Posted writes right before the upgrade: the old backend serves them
    // before it saves its state, so none is lost.
    pio.try_write(base + 7, AccessSize::B1, 0xa5).unwrap();
    pio.try_write(base + 3, AccessSize::B1, 0x03).unwrap();
    let held = g.fe.upgrade("com1", None).unwrap();
    assert!(held < HANG_GUARD);
    assert_ne!(g.fe.device("com1").unwrap().pid().unwrap(), pid);
    assert_eq!(pio.try_read(base + 7, AccessSize::B1).unwrap(), 0xa5);
    assert_eq!(pio.try_read(base + 3, AccessSize::B1).unwrap(), 0x03);
    // The old backend exited cleanly.
    assert!(!outboard_tests::alive(pid));
    // A program that is not a UART is refused and the UART keeps serving.
    assert!(g.fe.upgrade("com1", Some("outboard-scratch")).is_err());
}

#[test]
fn uart_when_backend_killed_right_after_posted_writes_then_registers_preserved() {
    let mut g = guest(T);
    g.fe.attach(
        &DeviceSpec::spawn("com1", "outboard-uart", &["--output", "/dev/null"]).restart(eager()),
    )
    .unwrap();
    let base = g.fe.device("com1").unwrap().placed(0).unwrap().addr;
    let link = Arc::clone(g.fe.device("com1").unwrap().remote().unwrap().link());
    let pio = g.fe.pio().clone();
    let w = |off: u64, v: u64| pio.try_write(base + off, AccessSize::B1, v).unwrap();
    // Divisor latch 0x0c03 (DLAB), then 8N1 with a break bit off, scratch,
    // modem control with loop-back off, interrupt enable.
    w(3, 0x80);
    w(0, 0x03);
    w(1, 0x0c);
    w(3, 0x1b);
    w(7, 0x5a);
    w(4, 0x0b);
    w(1, 0x01);
    // The writes are posted and the kill follows at once: those the dead
    // backend never read are sent again to the next one (its state says
    // how many it had served).
    let generation = link.generation();
    let pid = link.conn().pid().unwrap();
    // SAFETY: (test) a signal to the backend this frontend spawned.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    // The first access after the kill waits for the new backend.
    let r = |off: u64| pio.try_read(base + off, AccessSize::B1).unwrap();
    assert_eq!(r(7), 0x5a, "scratch");
    assert!(link.generation() > generation, "restarted");
    assert_ne!(link.conn().pid().unwrap(), pid);
    assert_eq!(r(3), 0x1b, "line control");
    assert_eq!(r(4), 0x0b, "modem control");
    assert_eq!(r(1), 0x01, "interrupt enable");
    w(3, 0x9b);
    assert_eq!((r(0), r(1)), (0x03, 0x0c), "divisor latch");
    w(3, 0x1b);
    assert!(!g.fe.device("com1").unwrap().is_failed());
}

#[test]
fn restart_when_policy_never_then_device_fails_as_before() {
    let mut g = guest(T);
    g.fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", "/dev/null"],
    ))
    .unwrap();
    let base = g.fe.device("com1").unwrap().placed(0).unwrap().addr;
    let pid = g.fe.device("com1").unwrap().pid().unwrap();
    // SAFETY: (test) a signal to the backend this frontend spawned.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let pio = g.fe.pio().clone();
    assert!(pio.try_read(base + 7, AccessSize::B1).is_err());
    assert!(g.fe.device("com1").unwrap().is_failed());
}

#[test]
fn outboard_run_when_script_kills_and_upgrades_the_uart_then_registers_survive_both() {
    let dir = std::env::temp_dir().join(format!("outboard-restart-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("uart.toml");
    std::fs::write(
        &config,
        "[[device]]\nname = \"com1\"\nbackend = \"outboard-uart\"\n\
         args = [\"--output\", \"/dev/null\"]\nrestart = \"on-failure\"\n",
    )
    .unwrap();
    let script = dir.join("script.txt");
    std::fs::write(
        &script,
        "write pio 0x3ff 1 0x5a\nexpect pio 0x3ff 1 0x5a\nkill com1\n\
         expect pio 0x3ff 1 0x5a\nupgrade com1\nexpect pio 0x3ff 1 0x5a\n\
         write pio 0x3ff 1 0x42\nupgrade com1 outboard-uart\nexpect pio 0x3ff 1 0x42\n",
    )
    .unwrap();
    let out = std::process::Command::new(outboard_tests::bin("outboard"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--script")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("com1 upgraded; accesses held").count(),
        2,
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A memfd of `len` bytes, sealed against shrinking if `seal`.
fn memfd(len: u64, seal: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: (test) a NUL-terminated name, plain flags.
    let fd = unsafe { libc::memfd_create(c"state".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: (test) memfd_create returned it; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(len)
        .unwrap();
    if seal {
        // SAFETY: (test) adds a seal to our memfd.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
    }
    fd
}

#[test]
fn state_requests_when_area_bad_missing_or_corrupt_then_refused_and_backend_serves_on() {
    use outboard_protocol::control::{Request, Status};
    use outboard_tests::{call, connect, error_status, hello, spawn_listening};
    use std::os::fd::AsRawFd;

    let (mut child, path) = spawn_listening("outboard-uart", &["--output", "/dev/null"]);
    let ch = connect(&path);
    hello(&ch);
    // No area yet: nothing to restore from, nothing to save into.
    let m = call(&ch, Request::RestoreState, &[], &[]);
    assert_eq!(error_status(&m), Some(Status::DeviceError));
    let m = call(&ch, Request::SaveState, &[], &[]);
    assert_eq!(error_status(&m), Some(Status::DeviceError));
    // An area that could shrink under the backend, or is too small.
    let unsealed = memfd(65536, false);
    let m = call(&ch, Request::SetStateArea, &[], &[unsealed.as_raw_fd()]);
    assert_eq!(error_status(&m), Some(Status::BadFd));
    let small = memfd(1024, true);
    let m = call(&ch, Request::SetStateArea, &[], &[small.as_raw_fd()]);
    assert_eq!(error_status(&m), Some(Status::BadFd));
    // An area whose newest record is corrupt: the slot fails its CRC, so
    // the area reads as holding no record and the device stays fresh.
    let area = memfd(65536, true);
    let mut bytes = vec![0u8; 65536];
    bytes[..8].copy_from_slice(b"OBSTATE\0");
    bytes[8..12].copy_from_slice(&1u32.to_ne_bytes());
    bytes[64..72].copy_from_slice(&5u64.to_ne_bytes());
    bytes[72..76].copy_from_slice(&4u32.to_ne_bytes());
    bytes[76..80].copy_from_slice(&0xdead_beefu32.to_ne_bytes());
    bytes[80..84].copy_from_slice(b"OBSN");
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::from(area.try_clone().unwrap()),
        &bytes,
        0,
    )
    .unwrap();
    let m = call(&ch, Request::SetStateArea, &[], &[area.as_raw_fd()]);
    assert_eq!(error_status(&m), None);
    let m = call(&ch, Request::RestoreState, &[], &[]);
    assert_eq!(error_status(&m), None, "no valid record: a fresh device");
    // The backend commits its fresh state after answering; one more round
    // trip makes sure that commit is done before the area is overwritten.
    let m = call(&ch, Request::GetDeviceInfo, &[], &[]);
    assert_eq!(error_status(&m), None);
    // A valid record of another device: refused with DeviceError.
    let record = outboard_protocol::state::Snapshot {
        kind: 2,
        name: "virtio-blk".into(),
        version: 1,
        served: vec![],
        state: vec![],
    }
    .encode();
    outboard_protocol::state::commit(&mut bytes, &record).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::from(area.try_clone().unwrap()),
        &bytes,
        0,
    )
    .unwrap();
    let m = call(&ch, Request::RestoreState, &[], &[]);
    assert_eq!(error_status(&m), Some(Status::DeviceError));
    // The backend serves on.
    let m = call(&ch, Request::GetDeviceInfo, &[], &[]);
    assert_eq!(error_status(&m), None);
    let m = call(&ch, Request::Shutdown, &[], &[]);
    assert_eq!(error_status(&m), None);
    assert!(child.wait().unwrap().success());
}
