//! Failure semantics: dead, hung and lying backends, and a dead frontend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use outboard_backends::scratch::{self, ID};
use outboard_frontend::backend::Error as BackendError;
use outboard_frontend::Error as MachineError;
use outboard_frontend::{AccessError, AccessSize, DeviceSpec};
use outboard_protocol::channel::Channel;
use outboard_protocol::control::{
    DeviceInfo, DeviceKind, Header, Hello, Payload, RegionInfo, Request, Status, StatusReply,
    FEATURES_SUPPORTED, F_CMD_RING, REGION_READ, REGION_WRITE,
};
use outboard_protocol::ioregionfd::{Resp, CMD_SIZE};
use outboard_tests::{alive, bin, frontend, signal, socket_path, HANG_GUARD};

#[test]
fn backend_sigkilled_while_read_pending_then_all_ones_failed_and_others_served() {
    // A long timeout: the read must be completed by the backend's death, not by the clock.
    let mut fe = frontend(Duration::from_secs(60));
    fe.attach(&DeviceSpec::spawn("victim", "outboard-scratch", &[]))
        .unwrap();
    fe.attach(&DeviceSpec::spawn("other", "outboard-scratch", &[]))
        .unwrap();
    let victim = fe.device("victim").unwrap();
    let (pid, addr) = (victim.pid().unwrap(), victim.placed(0).unwrap().addr);
    let other = fe.device("other").unwrap().placed(0).unwrap().addr;

    signal(pid, libc::SIGSTOP);
    let mmio = fe.mmio().clone();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let started = Instant::now();
        let r = mmio.try_read(addr, AccessSize::B8);
        let _ = tx.send((mmio.read(addr, AccessSize::B4), started.elapsed()));
        r
    });
    thread::sleep(Duration::from_millis(50));
    signal(pid, libc::SIGKILL);
    let (fast_fail, took) = rx
        .recv_timeout(HANG_GUARD)
        .expect("pending read never completed");
    let first = reader.join().unwrap();
    assert!(matches!(first, Err(AccessError::BackendGone)), "{first:?}");
    assert_eq!(fast_fail, 0xffff_ffff, "later reads are all-ones");
    eprintln!("pending read completed {took:?} after it started");

    let victim = fe.device("victim").unwrap();
    assert!(victim.is_failed());
    assert!(
        victim
            .failure()
            .unwrap()
            .contains("backend closed the data socket"),
        "{:?}",
        victim.failure()
    );
    assert_eq!(fe.mmio().read(addr, AccessSize::B8), u64::MAX);
    assert!(matches!(
        fe.mmio().try_read(addr + scratch::BANK, AccessSize::B1),
        Err(AccessError::DeviceFailed(_))
    ));
    fe.mmio().write(addr + scratch::BANK, AccessSize::B1, 1);
    assert!(matches!(
        fe.reset("victim"),
        Err(MachineError::Device {
            source: outboard_frontend::device::Error::Failed,
            ..
        })
    ));
    // The other device never noticed.
    assert_eq!(fe.mmio().try_read(other, AccessSize::B8).unwrap(), ID);
    fe.mmio()
        .try_write(other + scratch::REG_ACCUM, AccessSize::B8, 3)
        .unwrap();
    assert_eq!(
        fe.mmio()
            .try_read(other + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        3
    );
}

#[test]
fn backend_hung_then_read_times_out_to_all_ones_and_device_failed() {
    let mut fe = frontend(Duration::from_millis(300));
    fe.attach(&DeviceSpec::spawn("hung", "outboard-scratch", &[]))
        .unwrap();
    let d = fe.device("hung").unwrap();
    let (pid, addr) = (d.pid().unwrap(), d.placed(0).unwrap().addr);
    signal(pid, libc::SIGSTOP);
    assert!(matches!(
        fe.mmio().try_read(addr, AccessSize::B8),
        Err(AccessError::Timeout)
    ));
    assert!(fe.device("hung").unwrap().is_failed());
    assert!(fe
        .device("hung")
        .unwrap()
        .failure()
        .unwrap()
        .contains("no response within the timeout"));
    assert_eq!(fe.mmio().read(addr, AccessSize::B2), 0xffff);
    signal(pid, libc::SIGCONT);
    // Shutting down a failed device still reaps its process.
    assert!(fe.detach("hung").is_ok());
    assert!(!alive(pid));
}

#[test]
fn frontend_killed_then_every_spawned_backend_exits() {
    let mut fe = Command::new(bin("outboard"))
        .args([
            "run",
            "--device",
            "outboard-scratch",
            "--device",
            "outboard-uart",
            "--device",
            "outboard-scratch",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut pids = Vec::new();
    let mut lines = BufReader::new(fe.stdout.take().unwrap()).lines();
    while pids.len() < 3 {
        let line = lines.next().expect("frontend printed its map").unwrap();
        if let Some(rest) = line.split(" pid ").nth(1) {
            pids.push(
                rest.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .split(')')
                    .next()
                    .unwrap()
                    .parse::<u32>()
                    .unwrap(),
            );
        }
    }
    assert!(pids.iter().all(|&p| alive(p)));
    // One backend is stopped: it cannot act on its control socket closing,
    // so only PR_SET_PDEATHSIG can end it.
    signal(pids[0], libc::SIGSTOP);
    let stdin = fe.stdin.take();
    signal(fe.id(), libc::SIGKILL);
    let _ = fe.wait();
    let t = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            t.elapsed() < HANG_GUARD,
            "backends {pids:?} outlived the frontend"
        );
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "all {} backends gone {:?} after the frontend died",
        pids.len(),
        t.elapsed()
    );
    drop(stdin);
}

/// How the fake backend misbehaves.
#[derive(Clone, Copy, Debug)]
enum Lie {
    HelloWrongCode,
    HelloShortPayload,
    HelloNoCommonVersion,
    Silent,
    RegionInfoZeroSize,
    GarbledResponse,
    ShortResponse,
}

/// A backend written by hand that lies in one specific way; it runs in a
/// thread of this process and talks over a real listening socket.
fn fake_backend(lie: Lie) -> std::path::PathBuf {
    let path = socket_path("fake");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let ch = Channel::new(sock);
        let mut data: Option<UnixStream> = None;
        while let Ok(m) = ch.recv() {
            let req = m.header.request;
            let reply = |p: &[u8]| ch.send(Header::reply(req, p.len(), false), p, &[]);
            match Request::from_u32(req).unwrap() {
                Request::Hello => match lie {
                    Lie::HelloWrongCode => {
                        ch.send(Header::reply(99, 16, false), &[0; 16], &[])
                            .unwrap();
                    }
                    Lie::HelloShortPayload => reply(&[1, 2, 3]).unwrap(),
                    Lie::HelloNoCommonVersion => {
                        let h = Hello {
                            min_version: 9,
                            max_version: 9,
                            features: 0,
                        };
                        reply(&h.encode()).unwrap()
                    }
                    Lie::Silent => thread::sleep(Duration::from_secs(5)),
                    // A socket fake: it serves no command ring.
                    _ => reply(&Hello::ours(FEATURES_SUPPORTED & !F_CMD_RING).encode()).unwrap(),
                },
                Request::GetDeviceInfo => {
                    let d = DeviceInfo {
                        kind: DeviceKind::OTHER,
                        num_regions: 1,
                        num_doorbells: 0,
                        num_irqs: 0,
                        name: "liar".into(),
                    };
                    reply(&d.encode()).unwrap()
                }
                Request::GetRegionInfo => {
                    let r = RegionInfo {
                        index: 0,
                        flags: REGION_READ | REGION_WRITE,
                        size: if matches!(lie, Lie::RegionInfoZeroSize) {
                            0
                        } else {
                            16
                        },
                        preferred_addr: 0,
                        access_sizes: 0x0f,
                        name: "r".into(),
                    };
                    reply(&r.encode()).unwrap()
                }
                Request::SetRegion => {
                    data = Some(UnixStream::from(m.fds.into_iter().next().unwrap()));
                    reply(&StatusReply { status: Status::Ok }.encode()).unwrap();
                    let mut d = data.take().unwrap();
                    thread::spawn(move || {
                        use std::io::Read;
                        let mut cmd = [0u8; CMD_SIZE];
                        d.read_exact(&mut cmd).unwrap();
                        match lie {
                            Lie::GarbledResponse => {
                                let mut r = Resp { data: 1 }.encode();
                                r[20] = 0xee;
                                d.write_all(&r).unwrap();
                            }
                            _ => d.write_all(&[0u8; 10]).unwrap(),
                        }
                        thread::sleep(Duration::from_millis(200));
                    });
                }
                _ => reply(&StatusReply { status: Status::Ok }.encode()).unwrap(),
            }
        }
        drop(data);
    });
    path
}

#[test]
fn attach_when_backend_replies_malformed_then_typed_error_and_no_panic() {
    type Check = fn(&BackendError) -> bool;
    let cases: [(Lie, Check); 5] = [
        (Lie::HelloWrongCode, |e| {
            matches!(e, BackendError::UnexpectedReply { got: 99, .. })
        }),
        (Lie::HelloShortPayload, |e| {
            matches!(
                e,
                BackendError::BadReply {
                    request: Request::Hello,
                    ..
                }
            )
        }),
        (Lie::HelloNoCommonVersion, |e| {
            matches!(e, BackendError::Negotiation(_))
        }),
        (Lie::Silent, |e| {
            matches!(
                e,
                BackendError::Channel(outboard_protocol::channel::Error::Timeout)
            )
        }),
        (Lie::RegionInfoZeroSize, |e| {
            matches!(
                e,
                BackendError::BadReply {
                    request: Request::GetRegionInfo,
                    ..
                }
            )
        }),
    ];
    for (lie, expected) in cases {
        let path = fake_backend(lie);
        let mut fe = frontend(Duration::from_millis(300));
        match fe.attach(&DeviceSpec::connect("liar", &path)) {
            Err(MachineError::Device {
                source: outboard_frontend::device::Error::Backend(source),
                ..
            }) => {
                assert!(expected(&source), "{lie:?}: {source:?}")
            }
            other => panic!("{lie:?}: {other:?}"),
        }
        assert!(fe.mmio().ranges().is_empty());
    }
}

#[test]
fn data_response_garbled_or_short_then_all_ones_and_device_failed() {
    for (lie, want) in [
        (Lie::GarbledResponse, "garbled response"),
        (Lie::ShortResponse, "short response: 10 of 32 bytes"),
    ] {
        let path = fake_backend(lie);
        let mut fe = frontend(Duration::from_secs(5));
        let addr = fe
            .attach(&DeviceSpec::connect("liar", &path))
            .unwrap()
            .placed(0)
            .unwrap()
            .addr;
        assert_eq!(fe.mmio().read(addr, AccessSize::B4), 0xffff_ffff, "{lie:?}");
        let d = fe.device("liar").unwrap();
        assert!(d.is_failed());
        assert!(d.failure().unwrap().contains(want), "{:?}", d.failure());
        assert!(matches!(
            fe.mmio().try_write(addr, AccessSize::B4, 0),
            Err(AccessError::DeviceFailed(_))
        ));
    }
}
