//! The frontend's TOML configuration.
//!
//! ```toml
//! timeout_ms = 1000            # optional: longest wait for a backend reply
//! ram_mb = 64                  # optional: guest RAM shared with backends (0: none)
//! guest = "hello"              # optional: run a guest on KVM (a built-in program
//!                              # name or a flat binary loaded at 0x10000)
//! vcpus = 1                    # optional, with `guest`
//!
//! [[device]]
//! name = "com1"
//! backend = "outboard-uart"    # program path or name, spawned by the frontend
//! args = ["--output", "com1.log"]
//!
//! [[device]]
//! name = "disk1"
//! vhost-user = { socket = "/run/qsd.sock", device = "blk" }   # a vhost-user backend
//!
//! [[device]]
//! name = "scratch"
//! socket = "/run/scratch.sock" # or: connect to a backend listening here
//! posted_writes = false        # optional, default true
//! sandbox = false              # optional, default true: confine a spawned
//!                              # backend (false: --no-sandbox, for debugging)
//! restart = "on-failure"       # optional, default "never": replace a dead
//!                              # backend under the running guest
//! restart_backoff_ms = 10      # optional: wait before a restart (doubles
//!                              # for quick deaths in a row, at most 5 s)
//! restart_limit = 1000         # optional: most restarts, then the device fails
//! host_stream = "/run/con.sock" # optional, spawned backends: the frontend owns
//!                              # the device's terminal (a console's) and
//!                              # relays it to one client of this socket at
//!                              # a time, with nothing lost or repeated
//!                              # across restarts and upgrades
//! cmd_ring = 0                 # optional, default 256: entries of each
//!                              # region's shared-memory command ring (a
//!                              # power of two, 8..=4096); 0: data sockets only
//! [[device.region]]
//! index = 0
//! addr = 0xd0000000            # optional; default: backend's preference, else next free
//! [[device.region]]
//! index = 2
//! skip = true                  # leave region 2 unplaced
//! ```
//!
//! Configuration is read once at start-up; nothing here is on the data path.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use outboard_frontend::launch::Source;
use outboard_frontend::{DeviceSpec, Placement, RestartPolicy};

/// Errors reading a configuration.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot read {0}
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// invalid configuration
    #[error("invalid configuration")]
    Parse(#[source] toml::de::Error),
    /// device {0}: give exactly one of `backend`, `socket` and `vhost-user`
    #[error("device {0}: give exactly one of `backend`, `socket` and `vhost-user`")]
    Source(String),
    /// device {0}: `args` only apply to a spawned backend
    #[error("device {0}: `args` only apply to a spawned backend")]
    ArgsWithSocket(String),
    /// device {0}: region {1} listed twice
    #[error("device {0}: region {1} listed twice")]
    DuplicateRegion(String, u32),
    /// device name {0} used twice
    #[error("device name {0} used twice")]
    DuplicateName(String),
    /// device {0}: `host_stream` needs a spawned backend (`backend`)
    #[error("device {0}: `host_stream` needs a spawned backend (`backend`)")]
    HostStream(String),
    /// device {0}: `cmd_ring` must be 0 or a power of two in 8..=4096
    #[error("device {0}: `cmd_ring` must be 0 or a power of two in 8..=4096")]
    CmdRing(String),
    /// device {0}: bad restart policy
    #[error("device {0}: bad restart policy")]
    Restart(String, #[source] outboard_frontend::restart::Error),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    timeout_ms: Option<u64>,
    ram_mb: Option<u64>,
    guest: Option<String>,
    vcpus: Option<usize>,
    #[serde(default, rename = "device")]
    devices: Vec<DeviceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: String,
    backend: Option<String>,
    socket: Option<PathBuf>,
    #[serde(rename = "vhost-user")]
    vhost_user: Option<VhostUserEntry>,
    #[serde(default)]
    args: Vec<String>,
    posted_writes: Option<bool>,
    sandbox: Option<bool>,
    restart: Option<String>,
    restart_backoff_ms: Option<u64>,
    restart_limit: Option<u32>,
    host_stream: Option<PathBuf>,
    cmd_ring: Option<u32>,
    #[serde(default, rename = "region")]
    regions: Vec<RegionEntry>,
    #[serde(default)]
    gsi: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VhostUserEntry {
    socket: PathBuf,
    device: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionEntry {
    index: u32,
    addr: Option<u64>,
    #[serde(default)]
    skip: bool,
}

/// A parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Reply timeout, if set.
    pub timeout: Option<Duration>,
    /// Guest RAM in MiB, if set.
    pub ram_mb: Option<u64>,
    /// Guest program to run on KVM: a built-in name or a file path.
    pub guest: Option<String>,
    /// vCPUs for the guest.
    pub vcpus: Option<usize>,
    /// KVM GSIs of each device's interrupt lines, by device name.
    pub gsis: Vec<(String, Vec<u32>)>,
    /// Devices in attach order.
    pub devices: Vec<DeviceSpec>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read(path.to_path_buf(), e))?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let file: File = toml::from_str(text).map_err(Error::Parse)?;
        let mut devices: Vec<DeviceSpec> = Vec::new();
        let mut gsis = Vec::new();
        for d in file.devices {
            if !d.gsi.is_empty() {
                gsis.push((d.name.clone(), d.gsi.clone()));
            }
            if devices.iter().any(|x| x.name == d.name) {
                return Err(Error::DuplicateName(d.name));
            }
            let source = match (d.backend, d.socket, d.vhost_user) {
                (Some(program), None, None) => Source::Spawn {
                    program,
                    args: d.args,
                },
                (None, Some(socket), None) if d.args.is_empty() => Source::Connect { socket },
                (None, None, Some(v)) if d.args.is_empty() => Source::VhostUser {
                    socket: v.socket,
                    device: v.device,
                },
                (None, _, _) if !d.args.is_empty() => return Err(Error::ArgsWithSocket(d.name)),
                _ => return Err(Error::Source(d.name)),
            };
            if d.host_stream.is_some() && !matches!(source, Source::Spawn { .. }) {
                return Err(Error::HostStream(d.name));
            }
            let cmd_ring = d
                .cmd_ring
                .unwrap_or(outboard_protocol::ring::DEFAULT_ENTRIES);
            if cmd_ring != 0 && !outboard_protocol::ring::valid_entries(cmd_ring) {
                return Err(Error::CmdRing(d.name));
            }
            let mut regions: Vec<Placement> = Vec::new();
            for r in d.regions {
                if regions.iter().any(|p| p.index == r.index) {
                    return Err(Error::DuplicateRegion(d.name, r.index));
                }
                regions.push(Placement {
                    index: r.index,
                    addr: r.addr,
                    skip: r.skip,
                });
            }
            let mut restart = RestartPolicy::default();
            if let Some(mode) = &d.restart {
                restart.mode = mode
                    .parse()
                    .map_err(|e| Error::Restart(d.name.clone(), e))?;
            }
            if let Some(ms) = d.restart_backoff_ms {
                restart.backoff = Duration::from_millis(ms);
            }
            if let Some(limit) = d.restart_limit {
                restart.limit = limit;
            }
            devices.push(DeviceSpec {
                name: d.name,
                source,
                regions,
                posted_writes: d.posted_writes.unwrap_or(true),
                sandbox: d.sandbox.unwrap_or(true),
                restart,
                host_stream: d.host_stream,
                cmd_ring,
            });
        }
        Ok(Config {
            timeout: file.timeout_ms.map(Duration::from_millis),
            ram_mb: file.ram_mb,
            guest: file.guest,
            vcpus: file.vcpus,
            gsis,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_when_full_example_then_specs() {
        let c = Config::parse(
            r#"
            timeout_ms = 250
            [[device]]
            name = "com1"
            backend = "outboard-uart"
            args = ["--output", "x.log"]
            [[device]]
            name = "s"
            socket = "/tmp/s.sock"
            posted_writes = false
            [[device.region]]
            index = 0
            addr = 0xd0000000
            [[device.region]]
            index = 2
            skip = true
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.timeout, Some(Duration::from_millis(250)));
        assert_eq!(c.devices.len(), 2);
        assert_eq!(
            c.devices[1].regions[0],
            Placement {
                index: 0,
                addr: Some(0xd000_0000),
                skip: false
            }
        );
        assert!(c.devices[1].regions[1].skip);
        assert!(!c.devices[1].posted_writes);
    }

    #[test]
    fn parse_when_both_sources_or_none_then_error() {
        let both = "[[device]]\nname='a'\nbackend='x'\nsocket='/y'\n";
        let vu = "[[device]]\nname='v'\nvhost-user = { socket = '/q.sock', device = 'blk' }\n";
        let c = Config::parse(vu).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.devices[0].source,
            Source::VhostUser {
                socket: "/q.sock".into(),
                device: "blk".into()
            }
        );
        let vu_and_backend =
            "[[device]]\nname='v'\nbackend='x'\nvhost-user = { socket = '/q', device = 'rng' }\n";
        assert!(matches!(
            Config::parse(vu_and_backend),
            Err(Error::Source(_))
        ));
        assert!(matches!(Config::parse(both), Err(Error::Source(_))));
        let none = "[[device]]\nname='a'\n";
        assert!(matches!(Config::parse(none), Err(Error::Source(_))));
    }

    #[test]
    fn parse_when_unknown_key_or_duplicates_then_error() {
        assert!(matches!(
            Config::parse("[[device]]\nname='a'\nbackend='x'\ncolour='red'\n"),
            Err(Error::Parse(_))
        ));
        let dup = "[[device]]\nname='a'\nbackend='x'\n[[device]]\nname='a'\nbackend='y'\n";
        assert!(matches!(Config::parse(dup), Err(Error::DuplicateName(_))));
        let dup_region = "[[device]]\nname='a'\nbackend='x'\n[[device.region]]\nindex=1\n[[device.region]]\nindex=1\n";
        assert!(matches!(
            Config::parse(dup_region),
            Err(Error::DuplicateRegion(_, 1))
        ));
    }

    #[test]
    fn parse_when_restart_given_then_policy_else_never_and_bad_mode_refused() {
        let c = Config::parse(
            "[[device]]\nname='d'\nbackend='x'\nrestart='on-failure'\nrestart_backoff_ms=50\nrestart_limit=3\n",
        )
        .unwrap();
        let p = c.devices[0].restart;
        assert_eq!(p.mode, outboard_frontend::RestartMode::OnFailure);
        assert_eq!((p.backoff, p.limit), (Duration::from_millis(50), 3));
        let c = Config::parse("[[device]]\nname='d'\nbackend='x'\n").unwrap();
        assert_eq!(c.devices[0].restart, RestartPolicy::default());
        assert!(matches!(
            Config::parse("[[device]]\nname='d'\nbackend='x'\nrestart='always'\n"),
            Err(Error::Restart(_, _))
        ));
    }

    #[test]
    fn parse_when_host_stream_given_then_spawned_only() {
        let c = Config::parse(
            "[[device]]\nname='con'\nbackend='outboard-virtio-console'\nhost_stream='/tmp/con.sock'\n",
        )
        .unwrap();
        assert_eq!(
            c.devices[0].host_stream.as_deref(),
            Some(Path::new("/tmp/con.sock"))
        );
        assert!(matches!(
            Config::parse("[[device]]\nname='con'\nsocket='/tmp/b'\nhost_stream='/tmp/c'\n"),
            Err(Error::HostStream(_))
        ));
    }
}
