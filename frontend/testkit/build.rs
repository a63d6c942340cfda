//! Assembles the guest programs in `guests/` with GNU `as` and `ld` into flat
//! 32-bit binaries loaded at [`LOAD_ADDR`]; the frontend includes them with
//! `include_bytes!`. No binary blob is kept in the repository.

use std::path::PathBuf;
use std::process::Command;

const LOAD_ADDR: &str = "0x10000";
const PROGRAMS: &[&str] = &[
    "hello",
    "registers",
    "virtio",
    "doorbells",
    "interrupts",
    "smp",
    "bench",
    "relocate",
    "echo",
];

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (GNU binutils must be installed)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_else(|| panic!("OUT_DIR unset")));
    println!("cargo:rerun-if-changed=guests");
    for p in PROGRAMS {
        let src = format!("guests/{p}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{p}.o"));
        let bin = out.join(format!("{p}.bin"));
        run(Command::new("as")
            .args(["--32", "-I", "guests", "-o"])
            .arg(&obj)
            .arg(&src));
        run(Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-nostdlib",
                "--oformat",
                "binary",
                "-e",
                "_start",
            ])
            .arg(format!("-Ttext={LOAD_ADDR}"))
            .arg("-o")
            .arg(&bin)
            .arg(&obj));
    }
}
