//! The command ring (docs/protocol.md section 7.11) beside the data socket
//! and beside a device in this process: figures 2q, 2t, 3q, 3t, 5, 5s and
//! 9i.
//!
//! Ring and socket backends share the peers' CPU, and a ring backend spins
//! after each command while a socket backend needs that CPU to wake: so
//! the two paths are compared in alternating blocks, never access by
//! access, and each block starts after the other path's backend has had
//! its spin budget to go to sleep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard::inprocess::InProcessRegion;
use outboard_backends::scratch::{self, Scratch};
use outboard_frontend::{AccessSize, Bus, DeviceSpec, Frontend};

use super::fig_scale::cpu_ticks;
use super::*;
use crate::AnyError;

/// Blocks each path's samples come in.
const BLOCKS: usize = 10;
/// Reads at the start of a block left out of its steady mean.
const WARM: usize = 10;

/// What the socket figures measured in this run, for the ratios.
pub(super) struct SocketPath {
    /// Scratch region 0 (posted writes, data socket, confined).
    pub base: u64,
    /// Median read round trip (figure 2r), ns.
    pub read_ns: f64,
}

/// Latency samples of `n` reads of `addr`; returns the block's steady
/// mean in ns: without its first [`WARM`] reads (the backend may have to
/// wake for them) and without samples above 10x the block's median (the
/// host took the CPU). A mean, because this clock rounds each sample to
/// tens of ns, too coarse for a 5% comparison of 200 ns medians.
fn reads(bus: &Bus, addr: u64, n: usize, into: &mut Vec<u64>) -> Result<f64, AnyError> {
    let from = into.len();
    for _ in 0..n {
        let t = Instant::now();
        bus.try_read(addr + scratch::REG_ID, AccessSize::B4)?;
        into.push(t.elapsed().as_nanos() as u64);
    }
    let steady = into.get(from + WARM..).unwrap_or_default();
    let mut sorted = steady.to_vec();
    sorted.sort_unstable();
    let cap = sorted.get(sorted.len() / 2).copied().unwrap_or(0) * 10;
    let kept: Vec<u64> = steady.iter().copied().filter(|&v| v <= cap).collect();
    Ok(kept.iter().sum::<u64>() as f64 / kept.len().max(1) as f64)
}

/// Posted writes per second to `addr`: `n` of them, then a read barrier.
fn posted(bus: &Bus, addr: u64, n: u64) -> Result<f64, AnyError> {
    let t = Instant::now();
    for v in 0..n {
        bus.try_write(addr + scratch::REG_ACCUM, AccessSize::B4, v & 1)?;
    }
    bus.try_read(addr + scratch::REG_ACCUM, AccessSize::B8)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Lets every ring backend's spin budget run out, so the next block
/// starts with the CPU to itself.
fn settle() {
    std::thread::sleep(Duration::from_millis(2));
}

pub(super) fn ring_figures(
    r: &mut Report,
    plan: &Plan,
    fe: &mut Frontend,
    socket: &SocketPath,
    local: Arc<InProcessRegion<Scratch>>,
) -> Result<(), AnyError> {
    let ring = fe.attach(&DeviceSpec::spawn("scratch-ring", "outboard-scratch", &[]))?;
    let ring_pid = ring.pid();
    let on_ring = ring.on_ring(0);
    let ring_base = ring.placed(0).ok_or("scratch not placed")?.addr;
    let open_base = fe
        .attach(&DeviceSpec::spawn("scratch-ring-open", "outboard-scratch", &[]).without_sandbox())?
        .placed(0)
        .ok_or("scratch not placed")?
        .addr;
    pin_backends(fe);
    if !on_ring {
        println!("  (2q)  the scratch backend did not take a command ring");
    }
    let bus = fe.mmio().clone();
    let block = (plan.latency_iters / BLOCKS).max(100);

    // 2q / 2t: read round trips, ring vs socket and confined vs not.
    let (mut ring_ns, mut sock_ns, mut open_ns) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ring_means, mut open_means) = (Vec::new(), Vec::new());
    for b in 0..BLOCKS {
        let mut order = [
            (ring_base, &mut ring_ns, Some(&mut ring_means)),
            (socket.base, &mut sock_ns, None),
            (open_base, &mut open_ns, Some(&mut open_means)),
        ];
        order.rotate_left(b % 3);
        for (addr, into, means) in order {
            settle();
            let mean = reads(&bus, addr, block, into)?;
            if let Some(m) = means {
                m.push(mean);
            }
        }
    }
    let (ring_med, ring_p99) = stats(ring_ns);
    let (sock_med, _) = stats(sock_ns);
    let (ring_mean, open_mean) = (median(ring_means), median(open_means));
    r.add(Figure {
        id: "2q",
        name: "MMIO read round trip on the command ring (blocks vs socket)".into(),
        value: ring_med,
        unit: "ns",
        p99: Some(ring_p99),
        baseline: Some(("the same on the data socket".into(), sock_med)),
        ratio: Some(ring_med / sock_med.max(1.0)),
        target: None,
    });
    r.add(Figure {
        id: "2t",
        name: "ring read, confined vs --no-sandbox (block steady means)".into(),
        value: ring_mean,
        unit: "ns",
        p99: None,
        baseline: Some(("the same, --no-sandbox".into(), open_mean)),
        ratio: Some(ring_mean / open_mean.max(1.0)),
        target: Some(("within 5%".into(), ring_mean <= 1.05 * open_mean)),
    });

    // 3q / 3t: posted writes, ring vs socket and confined vs not.
    let (mut ring_rate, mut sock_rate, mut open_rate) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..3 {
        let mut order = [
            (ring_base, &mut ring_rate),
            (socket.base, &mut sock_rate),
            (open_base, &mut open_rate),
        ];
        order.rotate_left(b % 3);
        for (addr, into) in order {
            settle();
            into.push(posted(&bus, addr, plan.posted_writes)?);
        }
    }
    let (ring_rate, sock_rate, open_rate) =
        (median(ring_rate), median(sock_rate), median(open_rate));
    r.add(Figure {
        id: "3q",
        name: format!(
            "posted writes on the ring, {} then a read",
            plan.posted_writes
        ),
        value: ring_rate,
        unit: "/s",
        p99: None,
        baseline: Some(("the same on the data socket".into(), sock_rate)),
        ratio: Some(ring_rate / sock_rate.max(1.0)),
        target: Some((">= 10x socket".into(), ring_rate >= 10.0 * sock_rate)),
    });
    r.add(Figure {
        id: "3t",
        name: "posted writes on the ring, confined vs --no-sandbox".into(),
        value: ring_rate,
        unit: "/s",
        p99: None,
        baseline: Some(("the same, --no-sandbox".into(), open_rate)),
        ratio: Some(ring_rate / open_rate.max(1.0)),
        target: Some(("within 5%".into(), ring_rate >= 0.95 * open_rate)),
    });

    // 5 / 5s: the same device model in this process vs out of process,
    // interleaved access by access (the in-process read needs no peer CPU).
    let local_bus = Bus::new(outboard_frontend::Space::Mmio);
    local_bus.insert(0x1000, scratch::REGS_SIZE, local)?;
    let (mut inproc_ns, mut remote_ns) = (Vec::new(), Vec::new());
    settle();
    for _ in 0..plan.latency_iters {
        let t = Instant::now();
        local_bus.try_read(0x1000 + scratch::REG_ID, AccessSize::B4)?;
        inproc_ns.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        bus.try_read(ring_base + scratch::REG_ID, AccessSize::B4)?;
        remote_ns.push(t.elapsed().as_nanos() as u64);
    }
    let (remote_med, remote_p99) = stats(remote_ns);
    let (inproc_med, _) = stats(inproc_ns);
    r.add(Figure {
        id: "5",
        name: "Outboard read on the ring vs the device in process".into(),
        value: remote_med,
        unit: "ns",
        p99: Some(remote_p99),
        baseline: Some(("scratch in process, interleaved".into(), inproc_med)),
        ratio: Some(remote_med / inproc_med.max(1.0)),
        target: Some(("<= 10x in process".into(), remote_med <= 10.0 * inproc_med)),
    });
    r.add(Figure {
        id: "5s",
        name: "Outboard read on the data socket vs the device in process".into(),
        value: socket.read_ns,
        unit: "ns",
        p99: None,
        baseline: Some(("scratch in process (5)".into(), inproc_med)),
        ratio: Some(socket.read_ns / inproc_med.max(1.0)),
        target: None,
    });

    // 9i: what a ring backend costs once the guest stops.
    if let Some(pid) = ring_pid {
        posted(&bus, ring_base, plan.posted_writes / 10)?;
        let _ = reads(&bus, ring_base, block, &mut Vec::new())?;
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let before = cpu_ticks(pid).ok_or("no /proc stat for the ring backend")?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let after = cpu_ticks(pid).ok_or("no /proc stat for the ring backend")?;
        let share = (after - before) as f64 / hz / t.elapsed().as_secs_f64() * 100.0;
        r.add(Figure {
            id: "9i",
            name: "ring backend CPU while idle for 1 s after a burst".into(),
            value: share,
            unit: "%",
            p99: None,
            baseline: None,
            ratio: None,
            target: Some(("< 1%".into(), share < 1.0)),
        });
    }
    Ok(())
}
