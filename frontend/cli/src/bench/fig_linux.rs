//! Figure 9: a real Linux guest (Debian's kernel under QEMU with TCG, see
//! `outboard_testkit::linux`) runs dd and Linux AIO on two vhost-user-blk
//! disks in one boot, `outboard-virtio-blk` and `qemu-storage-daemon`, the
//! tests interleaved (every repetition runs each test on one disk, then on
//! the other). Medians of the repetitions; ratio = Outboard / qsd.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use outboard_frontend::Options;
use outboard_testkit::linux::qemu::{qsd_blk_command, slot, wait_for_socket, Reaped as Child};
use outboard_testkit::linux::{self, Machine, Qemu, VhostDevice};

use super::*;

/// The guest's tests (`bench_one` in the guest's /init): name, what the
/// table calls it, and whether the figure is IOPS (4 KiB) or MB/s.
const TESTS: &[(&str, &str, bool)] = &[
    ("dd-read-1M", "dd 1 MiB direct seq read", false),
    ("dd-write-1M", "dd 1 MiB direct seq write", false),
    ("dd-read-4K", "dd 4 KiB direct seq read", true),
    ("dd-write-4K", "dd 4 KiB direct seq write", true),
    ("aio-read-4K-qd16", "AIO 4 KiB seq read QD16", true),
    ("aio-write-4K-qd16", "AIO 4 KiB seq write QD16", true),
];

const OURS: &str = "ob";
const QSD: &str = "qsd";
/// Size of each disk (sparse; the largest run writes 64 MiB).
const DISK: u64 = 128 << 20;

pub(super) fn linux_figures(
    r: &mut Report,
    plan: &Plan,
    options: &Options,
) -> Result<(), AnyError> {
    let (qemu, guest) = match Qemu::find().and_then(|q| Ok((q, linux::prepare()?))) {
        Ok(found) => found,
        Err(e) => {
            println!("  (9)  skipped: {}", outboard_frontend::error_chain(&e));
            return Ok(());
        }
    };
    let dir = temp_path("linux");
    std::fs::create_dir_all(&dir)?;
    let result = measure(r, plan, options, &qemu, &guest, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    r: &mut Report,
    plan: &Plan,
    options: &Options,
    qemu: &Qemu,
    guest: &linux::Guest,
    dir: &Path,
) -> Result<(), AnyError> {
    let ours_img = dir.join("ob.img");
    let qsd_img = dir.join("qsd.img");
    for img in [&ours_img, &qsd_img] {
        std::fs::File::create(img)?.set_len(DISK)?;
    }
    let ours_sock = dir.join("ob.sock");
    let qsd_sock = dir.join("qsd.sock");
    let args = [
        "--vhost-user".to_owned(),
        ours_sock.display().to_string(),
        "--path".to_owned(),
        ours_img.display().to_string(),
    ];
    let ours = Child(
        options
            .launcher
            .command("outboard-virtio-blk", &args)?
            .stdin(Stdio::null())
            .spawn()?,
    );
    let qsd = match qsd_blk_command(&qsd_img, &qsd_sock, 1, true).spawn() {
        Ok(c) => Child(c),
        Err(e) => {
            println!("  (9)  skipped: qemu-storage-daemon: {e}");
            return Ok(());
        }
    };
    for s in [&ours_sock, &qsd_sock] {
        wait_for_socket(s, Duration::from_secs(10))?;
    }
    // QEMU inherits this process's CPU; the backends go to the peers' CPU.
    pin_process(ours.0.id(), cpus().1);
    pin_process(qsd.0.id(), cpus().1);
    let machine = Machine {
        smp: 1,
        memory_mib: 256,
        devices: vec![
            VhostDevice::Blk(ours_sock.clone()),
            VhostDevice::Blk(qsd_sock.clone()),
        ],
        append: vec![
            "ob_mode=bench".into(),
            format!("ob_blk={OURS}:{}:rw:1:0/{QSD}:{}:rw:1:0", slot(0), slot(1)),
            format!("ob_reps={}", plan.linux_reps),
            format!("ob_bench_mib={}", plan.linux_mib),
        ],
        deadline: Duration::from_secs(600),
        work_dir: dir.to_path_buf(),
        reconnect_ms: None,
    };
    let run = machine.run(qemu, guest)?;
    drop(ours);
    drop(qsd);
    if run.timed_out || !run.done() {
        let tail: Vec<&str> = run.serial.lines().rev().take(20).collect();
        return Err(format!(
            "the Linux guest did not finish its benchmark ({:?}); QEMU: {} console: {}",
            run.status,
            run.stderr.trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
        .into());
    }
    println!(
        "  (9)  {}, {} ({}), -smp 1, TCG; one boot took {:.1} s; {} repetitions interleaved",
        qemu.version_line,
        guest.kernel_package,
        guest.release,
        run.elapsed.as_secs_f64(),
        plan.linux_reps
    );
    for l in run
        .serial
        .lines()
        .filter(|l| l.contains("OUTBOARD-BENCH-FAIL"))
    {
        println!("  (9)  the guest says: {}", l.trim());
    }
    // per (device, test): rates of every repetition
    let mut rates: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for s in run.bench() {
        let Some(&(_, _, iops)) = TESTS.iter().find(|t| t.0 == s.test) else {
            continue;
        };
        let per_s = if iops {
            s.bytes as f64 / 4096.0
        } else {
            s.bytes as f64 / 1e6
        } / (s.ns.max(1) as f64 / 1e9);
        rates
            .entry((s.device, s.test))
            .or_default()
            .push(per_s as u64);
    }
    let median = |dev: &str, test: &str| {
        rates
            .get(&(dev.to_owned(), test.to_owned()))
            .map(|v| stats(v.clone()).0)
    };
    for &(test, what, iops) in TESTS {
        let unit = if iops { "IOPS" } else { "MB/s" };
        let base = median(QSD, test);
        if let Some(q) = base {
            r.add(Figure {
                id: "9",
                name: format!("Linux guest {what}, qemu-storage-daemon"),
                value: q,
                unit,
                p99: None,
                baseline: None,
                ratio: Some(1.0),
                target: None,
            });
        }
        if let Some(o) = median(OURS, test) {
            r.add(Figure {
                id: "9",
                name: format!("Linux guest {what}, outboard-virtio-blk"),
                value: o,
                unit,
                p99: None,
                baseline: base.map(|q| ("qemu-storage-daemon".to_owned(), q)),
                ratio: base.map(|q| o / q.max(1.0)),
                target: None,
            });
        }
    }
    Ok(())
}
