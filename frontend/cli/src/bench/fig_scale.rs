//! Figure 8: footprint and scale.

use crate::AnyError;
use outboard_backends::scratch::{self};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{AccessSize, DeviceSpec, Frontend, Options};
use std::time::Instant;

use super::*;

pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks `pid` has run (user + system), from /proc/PID/stat.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised name: state, then utime and stime are the
    // 12th and 13th fields.
    let mut f = stat.rsplit(')').next()?.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

pub(super) fn scale_figures(r: &mut Report, plan: &Plan, options: Options) -> Result<(), AnyError> {
    let mut fe = Frontend::new(options);
    fe.set_memory(GuestRam::new(&[(0, 16 << 20)])?)?;
    let mut spawn_ns = Vec::new();
    for i in 0..plan.backends {
        let t = Instant::now();
        fe.attach(&DeviceSpec::spawn(
            &format!("s{i}"),
            "outboard-scratch",
            &[],
        ))?;
        spawn_ns.push(t.elapsed().as_nanos() as u64);
    }
    let mut answering = 0;
    let mut addrs = Vec::new();
    let mut on_ring = 0;
    for i in 0..plan.backends {
        let d = fe.device(&format!("s{i}"))?;
        let addr = d.placed(0).ok_or("not placed")?.addr;
        on_ring += usize::from(d.on_ring(0));
        addrs.push(addr);
        if fe.mmio().try_read(addr, AccessSize::B8)? == scratch::ID {
            answering += 1;
        }
    }
    // Round-robin reads over every backend, all on the peers' CPU, each
    // on its command ring: nobody starves while the others spin.
    pin_backends(&fe);
    let rounds = (plan.latency_iters / 20).max(50);
    let mut answered = vec![0usize; addrs.len()];
    let mut rr_ns = Vec::new();
    for _ in 0..rounds {
        for (i, &addr) in addrs.iter().enumerate() {
            let t = Instant::now();
            let v = fe.mmio().try_read(addr, AccessSize::B8)?;
            rr_ns.push(t.elapsed().as_nanos() as u64);
            if v == scratch::ID {
                answered[i] += 1;
            }
        }
    }
    let fewest = answered.iter().copied().min().unwrap_or(0);
    let rss: Vec<u64> = fe
        .devices()
        .iter()
        .filter_map(|d| d.pid().and_then(rss_kib))
        .collect();
    let (rss_med, rss_max) = {
        let mut v = rss.clone();
        v.sort_unstable();
        (
            v.get(v.len() / 2).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0),
        )
    };
    let (spawn_med, spawn_p99) = stats(spawn_ns);
    let (rr_med, rr_p99) = stats(rr_ns);
    r.add(Figure {
        id: "8r",
        name: format!(
            "{} backends ({on_ring} on a ring) on one CPU, round-robin reads",
            plan.backends
        ),
        value: rr_med,
        unit: "ns",
        p99: Some(rr_p99),
        baseline: None,
        ratio: None,
        target: Some((
            format!("all answer all {rounds} rounds"),
            fewest == rounds && on_ring == plan.backends,
        )),
    });
    r.add(Figure {
        id: "8s",
        name: "spawn + negotiate + place, per scratch backend".into(),
        value: spawn_med,
        unit: "ns",
        p99: Some(spawn_p99),
        baseline: None,
        ratio: None,
        target: Some(("<= 10 ms".into(), spawn_med <= 10e6)),
    });
    r.add(Figure {
        id: "8m",
        name: "RSS per scratch backend after setup (median; max in p99 column)".into(),
        value: rss_med as f64,
        unit: "KiB",
        p99: Some(rss_max as f64),
        baseline: None,
        ratio: None,
        target: Some(("<= 4 MiB".into(), rss_max <= 4096)),
    });
    r.add(Figure {
        id: "8n",
        name: format!(
            "{} scratch backends attached at once, answering",
            plan.backends
        ),
        value: f64::from(answering),
        unit: "",
        p99: None,
        baseline: None,
        ratio: None,
        target: Some(("all answer".into(), answering as usize == plan.backends)),
    });
    fe.shutdown();
    Ok(())
}
