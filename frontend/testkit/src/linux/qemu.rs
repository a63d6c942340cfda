//! QEMU for the Linux guest: finding `qemu-system-x86_64`, building the
//! command line (TCG, a shared memfd RAM backend for vhost-user, q35, the
//! kernel and initramfs, one `vhost-user-*-pci` device per socket with
//! QEMU's default device settings) and running it under a deadline.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{output, Error, Guest, Run};

/// The oldest QEMU this module is known to work with.
pub const MIN_MAJOR: u32 = 8;

/// A `qemu-system-x86_64` binary and its version.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The binary.
    pub path: PathBuf,
    /// Major, minor and micro version.
    pub version: (u32, u32, u32),
    /// The first line of `--version`.
    pub version_line: String,
}

impl Qemu {
    /// `$OUTBOARD_QEMU`, else `qemu-system-x86_64` in `PATH`, at least
    /// version [`MIN_MAJOR`].
    pub fn find() -> Result<Qemu, Error> {
        let path = std::env::var_os("OUTBOARD_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let out = output(Command::new(&path).arg("--version")).map_err(|e| {
            Error::Unavailable(format!(
                "{} is not usable ({e}); .ci/linux-guest-deps installs it",
                path.display()
            ))
        })?;
        let version_line = out.lines().next().unwrap_or_default().trim().to_owned();
        let version = parse_version(&version_line).ok_or_else(|| Error::Unexpected {
            command: format!("{} --version", path.display()),
            output: version_line.clone(),
        })?;
        if version.0 < MIN_MAJOR {
            return Err(Error::Unavailable(format!(
                "{version_line}: QEMU {MIN_MAJOR} or later is needed"
            )));
        }
        Ok(Qemu {
            path,
            version,
            version_line,
        })
    }
}

/// `(10, 0, 2)` from "QEMU emulator version 10.0.2 (Debian ...)".
pub fn parse_version(line: &str) -> Option<(u32, u32, u32)> {
    let v = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// A vhost-user device of the guest: its kind and the backend's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostDevice {
    /// `vhost-user-blk-pci`.
    Blk(PathBuf),
    /// `vhost-user-rng-pci`.
    Rng(PathBuf),
}

/// PCI slot of the first vhost-user device; the next ones follow.
pub const FIRST_SLOT: u8 = 0x10;

/// One guest run: the machine's shape and its devices.
#[derive(Debug, Clone)]
pub struct Machine {
    /// vCPUs (`-smp`).
    pub smp: u32,
    /// Guest RAM in MiB (a shared memfd, as vhost-user needs).
    pub memory_mib: u32,
    /// The devices, at PCI slots [`FIRST_SLOT`], `FIRST_SLOT + 1`, ...
    pub devices: Vec<VhostDevice>,
    /// Extra kernel command-line words (`ob_blk=...` and friends for `/init`).
    pub append: Vec<String>,
    /// QEMU is killed when the guest has not powered off by then.
    pub deadline: Duration,
    /// Where the serial log and QEMU's stderr are written.
    pub work_dir: PathBuf,
    /// Reconnect every vhost-user-blk chardev this long after its backend
    /// hangs up (`reconnect-ms`; QEMU before 9.2 takes whole seconds,
    /// rounded up), or None for QEMU's default (no reconnection). Not for
    /// vhost-user-rng: its realize does not wait for a chardev that
    /// connects in the background, as one with a reconnect interval does,
    /// and fails (QEMU 10: "Failed to set msg fds").
    pub reconnect_ms: Option<u32>,
}

/// The PCI slot (hex, as `/init` takes it) of device `index`.
pub fn slot(index: usize) -> String {
    format!("{:02x}", usize::from(FIRST_SLOT) + index)
}

/// A QEMU option value with its commas doubled, as QEMU's parser wants.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Machine {
    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut s = String::from("console=ttyS0 panic=-1 loglevel=5");
        for a in &self.append {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// QEMU's arguments (without the binary), the serial console going to `serial`.
    pub fn args(&self, qemu: &Qemu, guest: &Guest, serial: &Path) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-smp".into(),
            self.smp.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-object".into(),
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.memory_mib
            ),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-nic".into(),
            "none".into(),
            "-no-reboot".into(),
            // -serial file:, -kernel, -initrd and -append take their
            // argument verbatim; only option lists (-chardev) double commas.
            "-serial".into(),
            format!("file:{}", serial.to_string_lossy()),
            "-kernel".into(),
            guest.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            guest.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            self.kernel_cmdline(),
        ];
        for (i, d) in self.devices.iter().enumerate() {
            let (driver, socket) = match d {
                VhostDevice::Blk(s) => ("vhost-user-blk-pci", s),
                VhostDevice::Rng(s) => ("vhost-user-rng-pci", s),
            };
            a.push("-chardev".into());
            let reconnect = match self.reconnect_ms {
                _ if driver != "vhost-user-blk-pci" => String::new(),
                None => String::new(),
                Some(ms) if qemu.version >= (9, 2, 0) => format!(",reconnect-ms={ms}"),
                Some(ms) => format!(",reconnect={}", ms.div_ceil(1000).max(1)),
            };
            a.push(format!(
                "socket,id=vu{i},path={}{reconnect}",
                escape(socket)
            ));
            a.push("-device".into());
            a.push(format!("{driver},chardev=vu{i},addr={}.0", slot(i)));
        }
        a.into_iter().map(OsString::from).collect()
    }

    /// The whole command line as a shell would show it (for logs and docs).
    pub fn command_line(&self, qemu: &Qemu, guest: &Guest) -> String {
        let serial = self.work_dir.join("serial.log");
        let mut s = qemu.path.display().to_string();
        for a in self.args(qemu, guest, &serial) {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                s.push_str(&format!(" '{a}'"));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }

    /// Boots the guest and waits until it powers off or the deadline passes
    /// (then QEMU is killed and the run says `timed_out`). Every device's
    /// socket must be listening already.
    pub fn run(&self, qemu: &Qemu, guest: &Guest) -> Result<Run, Error> {
        std::fs::create_dir_all(&self.work_dir)
            .map_err(Error::io("cannot create", &self.work_dir))?;
        let serial = self.work_dir.join("serial.log");
        let stderr_path = self.work_dir.join("qemu.stderr");
        let _ = std::fs::remove_file(&serial);
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(Error::io("cannot create", &stderr_path))?;
        let start = Instant::now();
        let mut child = Command::new(&qemu.path)
            .args(self.args(qemu, guest, &serial))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: qemu.path.display().to_string(),
                source,
            })?;
        let (status, timed_out) = wait_until(&mut child, start + self.deadline)?;
        let read =
            |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        Ok(Run {
            serial: read(&serial),
            stderr: read(&stderr_path),
            status,
            timed_out,
            elapsed: start.elapsed(),
        })
    }
}

/// Waits for `child` until `deadline`; kills it then. Returns its status
/// (None when killed) and whether it was killed.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<(Option<String>, bool), Error> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Ok((Some(s.to_string()), false)),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok((None, true));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => {
                let _ = child.kill();
                return Err(Error::Spawn {
                    command: "waiting for QEMU".into(),
                    source,
                });
            }
        }
    }
}

/// True when `/proc/net/unix` lists a listening socket bound to `path`
/// (flags `00010000`, `__SO_ACCEPTCON`). Connecting to find out would use
/// up the one connection a vhost-user backend serves.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7..].join(" ") == want
    })
}

/// Waits until something listens on the Unix socket `path` (without connecting).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if is_listening(path) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("a listener on {}", path.display()),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Reaped {
    /// Waits up to `timeout` for the process to exit by itself; its status,
    /// or None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `qemu-storage-daemon` command exporting `image` as a vhost-user-blk
/// device on `socket` with `queues` queues (writable, discard passed down
/// to the file as hole punching).
pub fn qsd_blk_command(image: &Path, socket: &Path, queues: u32, writable: bool) -> Command {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={},discard=unmap",
            escape(image)
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable={},num-queues={queues}",
            escape(socket),
            if writable { "on" } else { "off" }
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_version_when_debian_line_then_three_numbers() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some((10, 0, 2))
        );
        assert_eq!(parse_version("QEMU emulator version 8.2"), Some((8, 2, 0)));
        assert_eq!(parse_version("nothing"), None);
    }

    #[test]
    fn args_when_two_devices_then_each_gets_a_chardev_and_a_slot_and_reconnects_as_qemu_spells_it()
    {
        let m = Machine {
            smp: 2,
            memory_mib: 256,
            devices: vec![
                VhostDevice::Blk("/tmp/a,b.sock".into()),
                VhostDevice::Rng("/tmp/r.sock".into()),
            ],
            append: vec!["ob_mode=check".into()],
            deadline: Duration::from_secs(1),
            work_dir: "/tmp".into(),
            reconnect_ms: Some(100),
        };
        let g = Guest {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            kernel_package: String::new(),
            release: String::new(),
            busybox_package: String::new(),
            built: false,
        };
        let qemu = Qemu {
            path: "qemu-system-x86_64".into(),
            version: (10, 0, 2),
            version_line: String::new(),
        };
        let args: Vec<String> = m
            .args(&qemu, &g, Path::new("/tmp/s.log"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-chardev socket,id=vu0,path=/tmp/a,,b.sock,reconnect-ms=100"));
        let old = Qemu {
            version: (8, 2, 0),
            ..qemu.clone()
        };
        let old_args = m.args(&old, &g, Path::new("/tmp/s.log"));
        assert!(old_args
            .iter()
            .any(|a| a.to_string_lossy().ends_with("b.sock,reconnect=1")));
        assert!(
            joined.contains("path=/tmp/r.sock -device"),
            "rng: no reconnect"
        );
        assert!(joined.contains("-device vhost-user-blk-pci,chardev=vu0,addr=10.0"));
        assert!(joined.contains("-device vhost-user-rng-pci,chardev=vu1,addr=11.0"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(!joined.contains("num-queues") && !joined.contains("queue-size"));
        assert!(joined.ends_with("addr=11.0"));
        assert!(m.kernel_cmdline().ends_with("ob_mode=check"));
    }
}
