//! `outboard-uart`: a 16550A UART (vm-superio's `Serial`) on one PIO region.
//!
//! The region is 8 ports wide, accepts 1-byte accesses only, prefers PIO
//! 0x3f8 (COM1) and accepts posted writes: the guest's transmit writes never
//! wait for the backend. Guest output goes to this process's stdout or to a
//! file (`--output PATH`). The interrupt line is an eventfd the device raises
//! on the UART's interrupt conditions; routing it to the guest is the
//! interrupt protocol feature's job.

use std::ffi::OsString;
use std::io;
use std::process::ExitCode;

use log::error;
use outboard::{Access, AccessSize, Device, DeviceDescription, DeviceKind, Region};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The conventional COM1 base port.
pub const COM1: u64 = 0x3f8;

/// `outboard-uart`: a 16550A UART on one PIO region.
#[derive(Debug, clap::Args)]
pub struct UartArgs {
    /// Where the guest's output goes: "stdout" or a file path (appended to).
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub output: String,
}

/// The interrupt line: an eventfd signalled on every UART interrupt condition.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

use crate::Output;

/// The UART device model.
pub struct Uart {
    serial: Option<Serial<IrqLine, vm_superio::serial::NoEvents, Output>>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart").finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART writing the guest's output to `out`.
    pub fn new(out: Output) -> io::Result<Self> {
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Uart {
            serial: Some(Serial::new(irq, out)),
        })
    }

    /// A UART configured from the command line.
    pub fn from_args(args: UartArgs) -> io::Result<Self> {
        Uart::new(crate::open_output(&args.output)?)
    }
}

impl Device for Uart {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("uart-16550a")
            .kind(DeviceKind::UART)
            .region(
                Region::pio("com", 8)
                    .access_sizes(&[AccessSize::B1])
                    .posted_writes()
                    .preferred_addr(COM1),
            )
    }

    fn read(&mut self, access: Access) -> u64 {
        match self.serial.as_mut() {
            Some(s) => u64::from(s.read(access.offset as u8)),
            None => u64::MAX,
        }
    }

    fn write(&mut self, access: Access, value: u64) {
        let offset = access.offset;
        if let Some(s) = self.serial.as_mut() {
            if let Err(e) = s.write(offset as u8, value as u8) {
                error!("uart write at offset {offset}: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if let Some(old) = self.serial.take() {
            let irq = match old.interrupt_evt().0.try_clone() {
                Ok(fd) => IrqLine(fd),
                Err(e) => {
                    error!("uart reset: cannot keep the interrupt line: {e}");
                    self.serial = Some(old);
                    return;
                }
            };
            self.serial = Some(Serial::new(irq, old.into_writer()));
        }
    }
}

/// `main` of `outboard-uart`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run("outboard-uart", args, Uart::from_args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_thr_when_bytes_then_output_and_reset_keeps_writer() {
        let out = Shared::default();
        let mut u = Uart::new(Box::new(out.clone())).unwrap_or_else(|e| panic!("{e}"));
        for b in b"hi" {
            u.write(Access::new(0, 0, AccessSize::B1), u64::from(*b));
        }
        u.write(Access::new(0, 7, AccessSize::B1), 0x5a);
        assert_eq!(
            u.read(Access::new(0, 7, AccessSize::B1)),
            0x5a,
            "scratch register"
        );
        u.reset();
        assert_eq!(
            u.read(Access::new(0, 7, AccessSize::B1)),
            0,
            "reset clears scratch"
        );
        u.write(Access::new(0, 0, AccessSize::B1), u64::from(b'!'));
        assert_eq!(&*out.0.lock().unwrap_or_else(|p| p.into_inner()), b"hi!");
    }
}
