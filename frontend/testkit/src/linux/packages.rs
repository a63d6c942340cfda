//! Debian packages for the guest, never installed: the version is the
//! candidate `apt-cache` knows, the `.deb` comes from `apt-get download` and
//! is unpacked with `dpkg-deb -x` into `<cache>/pkg/<name>_<version>/` (the
//! `.deb` is then deleted). Once unpacked (a `.complete` marker is written
//! last) a package is reused without asking apt for anything but the
//! version.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{output, Error};

/// The metapackage whose dependency names the kernel, unless
/// `OUTBOARD_LINUX_KERNEL_PACKAGE` names one.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// The static busybox package.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// An unpacked package.
#[derive(Debug, Clone)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Where its files are (the root of `dpkg-deb -x`).
    pub root: PathBuf,
}

/// The guest kernel: an unpacked `linux-image-*` package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The package.
    pub package: Package,
    /// `boot/vmlinuz-<release>`.
    pub vmlinuz: PathBuf,
    /// The kernel release (`uname -r`).
    pub release: String,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// A kernel module and the file that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name with `-` as `_` (as `depends=` names it).
    pub name: String,
    /// Its file (`.ko`, or compressed `.ko.xz` / `.ko.zst` / `.ko.gz`).
    pub file: PathBuf,
}

/// An exclusive lock on the cache, held while it is filled (flock, released on drop).
#[derive(Debug)]
pub struct CacheLock(#[allow(dead_code)] File);

impl CacheLock {
    /// Creates `dir` if needed and locks `dir/.lock`, waiting for other holders.
    pub fn acquire(dir: &Path) -> Result<CacheLock, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
        let path = dir.join(".lock");
        let f = File::create(&path).map_err(Error::io("cannot create", &path))?;
        // SAFETY: flock takes a file descriptor we own for the duration of the
        // call and an integer; it touches no memory of ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::Io {
                what: "cannot lock",
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(CacheLock(f))
    }
}

/// The candidate version of `name` (`apt-cache show --no-all-versions`).
pub fn candidate_version(name: &str) -> Result<String, Error> {
    let out = output(Command::new("apt-cache").args(["show", "--no-all-versions", name]))
        .map_err(|e| Error::Unavailable(format!("apt does not know {name}: {e}")))?;
    out.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| Error::Unexpected {
            command: format!("apt-cache show --no-all-versions {name}"),
            output: out.chars().take(300).collect(),
        })
}

/// The kernel package: `OUTBOARD_LINUX_KERNEL_PACKAGE`, else the
/// `linux-image-*` that [`KERNEL_METAPACKAGE`] depends on.
pub fn kernel_package_name() -> Result<String, Error> {
    if let Ok(name) = std::env::var("OUTBOARD_LINUX_KERNEL_PACKAGE") {
        return Ok(name);
    }
    let out = output(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))
        .map_err(|e| Error::Unavailable(format!("cannot resolve {KERNEL_METAPACKAGE}: {e}")))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .map(str::to_owned)
        .ok_or_else(|| Error::Unexpected {
            command: format!("apt-cache depends {KERNEL_METAPACKAGE}"),
            output: out.chars().take(300).collect(),
        })
}

/// `name`'s candidate version unpacked under `cache/pkg`, downloading it
/// into `cache/debs` first if needed. The caller holds the [`CacheLock`].
pub fn unpack(cache: &Path, name: &str) -> Result<Package, Error> {
    let version = candidate_version(name)?;
    let root = cache
        .join("pkg")
        .join(format!("{name}_{}", version.replace(':', "%3a")));
    let marker = root.join(".complete");
    if marker.exists() {
        return Ok(Package {
            name: name.to_owned(),
            version,
            root,
        });
    }
    let deb = download(cache, name, &version)?;
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&partial).map_err(Error::io("cannot create", &partial))?;
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &root).map_err(Error::io("cannot rename into", &root))?;
    std::fs::write(&marker, &version).map_err(Error::io("cannot write", &marker))?;
    // the unpacked tree is what later runs use
    let _ = std::fs::remove_file(&deb);
    Ok(Package {
        name: name.to_owned(),
        version,
        root,
    })
}

/// `cache/debs/<name>_<version>.deb`, fetched with `apt-get download`.
fn download(cache: &Path, name: &str, version: &str) -> Result<PathBuf, Error> {
    let debs = cache.join("debs");
    let file = debs.join(format!("{name}_{}.deb", version.replace(':', "%3a")));
    if file.exists() {
        return Ok(file);
    }
    let tmp = debs.join(format!("download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(Error::io("cannot create", &tmp))?;
    output(
        Command::new("apt-get")
            .args(["download", "-q"])
            .arg(format!("{name}={version}"))
            .current_dir(&tmp),
    )
    .map_err(|e| Error::Unavailable(format!("cannot download {name}: {e}")))?;
    let got = std::fs::read_dir(&tmp)
        .map_err(Error::io("cannot list", &tmp))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Unexpected {
            command: format!("apt-get download {name}"),
            output: "no .deb file appeared".into(),
        })?;
    std::fs::rename(&got, &file).map_err(Error::io("cannot rename into", &file))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(file)
}

/// The kernel package unpacked, with its image, release and module tree.
pub fn kernel(cache: &Path) -> Result<Kernel, Error> {
    let package = unpack(cache, &kernel_package_name()?)?;
    let boot = package.root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(Error::io("cannot list", &boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| Error::Unexpected {
            command: format!("dpkg-deb -x {}", package.name),
            output: "no boot/vmlinuz-* in the package".into(),
        })?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules = package.root.join("lib/modules").join(&release);
    Ok(Kernel {
        package,
        vmlinuz,
        release,
        modules,
    })
}

/// `name` as `depends=` spells it.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a module file (`virtio-rng.ko.xz` → `virtio_rng`).
fn module_name(file: &Path) -> Option<String> {
    let n = file.file_name()?.to_str()?;
    let stem = n.split(".ko").next()?;
    (n.len() > stem.len()).then(|| normalize(stem))
}

fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) -> Result<(), Error> {
    for entry in std::fs::read_dir(dir).map_err(Error::io("cannot list", dir))? {
        let path = entry.map_err(Error::io("cannot list", dir))?.path();
        if path.is_dir() {
            index_modules(&path, into)?;
        } else if let Some(name) = module_name(&path) {
            into.insert(name, path);
        }
    }
    Ok(())
}

/// The module's bytes, decompressed (`xz`, `zstd` or `gzip` for compressed modules).
pub fn module_bytes(file: &Path) -> Result<Vec<u8>, Error> {
    let name = file.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(file).map_err(Error::io("cannot read", file));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .map_err(|source| Error::Spawn {
            command: format!("{tool} -dc {name}"),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{tool} -dc {name}"),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// The `depends=` list of a module's `.modinfo`.
pub fn module_depends(bytes: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = bytes.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &bytes[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(normalize)
        .collect()
}

/// `wanted` and every module they depend on, dependencies first (the order
/// `insmod` needs), found under `modules/kernel`. Built-in modules (listed in
/// `modules.builtin`) are left out.
pub fn module_closure(modules: &Path, wanted: &[&str]) -> Result<Vec<Module>, Error> {
    let mut index = BTreeMap::new();
    index_modules(&modules.join("kernel"), &mut index)?;
    let builtin: HashSet<String> = std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for w in wanted {
        visit(&normalize(w), &index, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<(), Error> {
    if !seen.insert(name.to_owned()) || builtin.contains(name) {
        return Ok(());
    }
    let file = index.get(name).ok_or_else(|| {
        Error::Unavailable(format!(
            "the kernel package has no module {name} (built in or missing)"
        ))
    })?;
    if depth > 32 {
        return Err(Error::Unexpected {
            command: "module dependencies".into(),
            output: format!("a dependency loop through {name}"),
        });
    }
    for dep in module_depends(&module_bytes(file)?) {
        visit(&dep, index, builtin, seen, order, depth + 1)?;
    }
    order.push(Module {
        name: name.to_owned(),
        file: file.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_depends_when_modinfo_lists_modules_then_names_are_normalized() {
        let bytes = b"\x7fELF junk\0license=GPL\0depends=virtio_ring,virtio-pci-lib\0name=x\0";
        assert_eq!(module_depends(bytes), vec!["virtio_ring", "virtio_pci_lib"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn module_name_when_compressed_then_the_stem_with_underscores() {
        assert_eq!(
            module_name(Path::new("a/virtio-rng.ko.xz")).as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(
            module_name(Path::new("virtio_blk.ko")).as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name(Path::new("README")), None);
    }
}
