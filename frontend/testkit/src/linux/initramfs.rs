//! The guest's initramfs: a newc cpio archive (gzip-compressed when `gzip`
//! is installed) with `/init`, busybox, `/bin/obio` and the virtio modules
//! in load order (`/lib/modules/load`), built once per set of inputs and
//! kept in the cache as `initramfs-<hash>.cpio.gz`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::packages::{self, CacheLock, Kernel, Module};
use super::{cache_dir, fnv1a, output, Error, INIT_SCRIPT, OBIO_SOURCE};

/// The modules the guest loads (their dependencies come along).
pub const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "virtio_rng"];

/// Bump when the archive's layout changes, so cached archives are rebuilt.
const FORMAT: &str = "outboard-linux-guest-1";

/// A guest ready to boot: the kernel image and the initramfs.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The kernel image (`vmlinuz-*`).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel package and version, e.g. `linux-image-6.1.0-56-amd64 6.1.192-2`.
    pub kernel_package: String,
    /// The kernel release (`uname -r`).
    pub release: String,
    /// The busybox package and version.
    pub busybox_package: String,
    /// True when this call built the initramfs, false when it came from the cache.
    pub built: bool,
}

/// Finds or fetches the kernel and busybox packages and builds (or reuses)
/// the initramfs, in [`cache_dir`]. The cache is locked meanwhile, so
/// concurrent callers (tests, the bench) wait for one another.
pub fn prepare() -> Result<Guest, Error> {
    let cache = cache_dir()?;
    let _lock = CacheLock::acquire(&cache)?;
    let kernel = packages::kernel(&cache)?;
    let busybox = packages::unpack(&cache, packages::BUSYBOX_PACKAGE)?;
    let busybox_bin = busybox.root.join("bin/busybox");
    let modules = packages::module_closure(&kernel.modules, MODULES)?;
    let module_names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
    let key = fnv1a(&[
        FORMAT.as_bytes(),
        INIT_SCRIPT.as_bytes(),
        OBIO_SOURCE.as_bytes(),
        kernel.package.name.as_bytes(),
        kernel.package.version.as_bytes(),
        busybox.version.as_bytes(),
        module_names.join(",").as_bytes(),
    ]);
    let initramfs = cache.join(format!("initramfs-{key:016x}.cpio.gz"));
    let mut guest = Guest {
        kernel: kernel.vmlinuz.clone(),
        initramfs: initramfs.clone(),
        kernel_package: format!("{} {}", kernel.package.name, kernel.package.version),
        release: kernel.release.clone(),
        busybox_package: format!("{} {}", busybox.name, busybox.version),
        built: false,
    };
    if initramfs.exists() {
        return Ok(guest);
    }
    let obio = compile_obio(&cache, key)?;
    let archive = build_archive(&kernel, &busybox_bin, &obio, &modules)?;
    if let Some(build) = obio.parent() {
        let _ = std::fs::remove_dir_all(build);
    }
    let packed = gzip(&archive).unwrap_or(archive);
    let partial = initramfs.with_extension("partial");
    std::fs::write(&partial, packed).map_err(Error::io("cannot write", &partial))?;
    std::fs::rename(&partial, &initramfs).map_err(Error::io("cannot rename into", &initramfs))?;
    guest.built = true;
    Ok(guest)
}

/// Builds `/bin/obio` with `gcc -static` (or `$CC`).
fn compile_obio(cache: &Path, key: u64) -> Result<PathBuf, Error> {
    let dir = cache.join(format!("build-{key:016x}"));
    std::fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
    let src = dir.join("obio.c");
    std::fs::write(&src, OBIO_SOURCE).map_err(Error::io("cannot write", &src))?;
    let bin = dir.join("obio");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".to_owned());
    output(
        Command::new(&cc)
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .map_err(|e| match e {
        Error::Unavailable(_) => Error::Unavailable(format!("{cc} is needed to build obio.c")),
        other => other,
    })?;
    Ok(bin)
}

fn build_archive(
    kernel: &Kernel,
    busybox: &Path,
    obio: &Path,
    modules: &[Module],
) -> Result<Vec<u8>, Error> {
    let read = |p: &Path| std::fs::read(p).map_err(Error::io("cannot read", p));
    let mut a = Cpio::default();
    for d in ["bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp"] {
        a.dir(d);
    }
    a.char_device("dev/console", 5, 1);
    a.file("init", 0o755, INIT_SCRIPT.as_bytes());
    a.file("bin/busybox", 0o755, &read(busybox)?);
    a.file("bin/obio", 0o755, &read(obio)?);
    let mut load = String::new();
    for m in modules {
        a.file(
            &format!("lib/modules/{}.ko", m.name),
            0o644,
            &packages::module_bytes(&m.file)?,
        );
        load.push_str(&m.name);
        load.push('\n');
    }
    a.file("lib/modules/load", 0o644, load.as_bytes());
    a.file(
        "lib/modules/release",
        0o644,
        format!("{}\n", kernel.release).as_bytes(),
    );
    Ok(a.finish())
}

/// `data` compressed with `gzip -n -6`, or `None` if gzip is not there (the
/// kernel takes an uncompressed archive too).
fn gzip(data: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().ok()?;
    writer.join().ok()?.ok()?;
    out.status.success().then_some(out.stdout)
}

/// A newc ("070701") cpio archive writer, enough for an initramfs.
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name_len,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory (mode 0755).
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    /// A character device node (mode 0600).
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_when_finished_then_entries_are_aligned_and_end_with_the_trailer() {
        let mut a = Cpio::default();
        a.dir("bin");
        a.file("init", 0o755, b"#!/bin/sh\n");
        let out = a.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin\0"));
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // the file's header: mode 0100755, size 10
        assert!(text.contains("000081ed"));
        assert!(text.contains("0000000a"));
    }
}
