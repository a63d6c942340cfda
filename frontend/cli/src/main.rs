//! `outboard`: the Outboard frontend command line.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use clap::{Parser, Subcommand};
use outboard_frontend::backend::{Builtin, Launcher, Source};
use outboard_frontend::error_chain;
use outboard_frontend::kvm;
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend, Options};
use outboard_testkit::loader;

mod bench;
mod config;
mod demo;
mod script;

#[derive(Debug, Parser)]
#[command(
    name = "outboard",
    version,
    about = "Run emulated devices in their own processes"
)]
struct Cli {
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, global = true, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Spawn the uart and scratch backends, drive them as a guest would, print a summary.
    Demo {
        /// Longest wait for a backend reply, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Attach the configured devices and run a test-guest script against them.
    Run(RunArgs),
    /// Measure Outboard beside its baselines and print the table (docs/performance.md).
    Bench {
        /// A shorter run (under a minute).
        #[arg(long)]
        quick: bool,
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// The echo peer of the benchmark's raw ping-pong.
    #[command(hide = true)]
    BenchEcho {
        /// Socket to connect to.
        path: PathBuf,
        /// Wait in epoll_wait before each read.
        #[arg(long)]
        epoll: bool,
    },
    /// Run a built-in backend in this process (used when its binary is not installed).
    #[command(hide = true)]
    Backend {
        /// Backend binary name, such as outboard-uart.
        name: String,
        /// The backend's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Options of `outboard run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML configuration listing the devices.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Spawn a backend: program name or path, then its arguments, space-separated.
    #[arg(long = "device", value_name = "PROGRAM [ARGS]")]
    devices: Vec<String>,
    /// Connect to a backend listening on this socket path.
    #[arg(long = "connect", value_name = "PATH")]
    sockets: Vec<PathBuf>,
    /// Attach a vhost-user backend: device type (blk, rng, console) and socket path.
    #[arg(long = "vhost-user", value_name = "TYPE:PATH")]
    vhost_user: Vec<String>,
    /// Test-guest script to run (see `outboard_frontend::script`); default: standard input.
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
    /// Longest wait for a backend reply, in milliseconds (overrides the config).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Guest RAM shared with the backends, in MiB at guest address 0 (overrides the config).
    #[arg(long)]
    ram_mb: Option<u64>,
    /// Run spawned backends unconfined (for debugging; see docs/security.md).
    #[arg(long)]
    no_sandbox: bool,
    /// Restart policy for every spawned backend: "never" or "on-failure"
    /// (overrides the config; see docs/architecture.md, "Restart").
    #[arg(long, value_name = "never|on-failure")]
    restart: Option<outboard_frontend::RestartMode>,
}

pub(crate) fn options(timeout: Duration) -> Options {
    let mut launcher = Launcher::beside_current_exe();
    if let Ok(exe) = std::env::current_exe() {
        launcher.builtin = Some(Builtin {
            exe,
            prefix: vec!["backend".into()],
            names: outboard_backends::BUILTIN
                .iter()
                .map(|(n, _)| (*n).to_owned())
                .collect(),
        });
    }
    Options {
        timeout,
        launcher,
        ..Options::default()
    }
}

fn init_logging(level: log::LevelFilter) {
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .format(|buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "outboard: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // `outboard: error: MESSAGE` and a hint, exit 1; --help/--version exit 0.
        Err(e) => return outboard::cli::parse_failed("outboard", &e),
    };
    if let Command::Backend { name, args } = cli.command {
        return match outboard_backends::builtin(&name) {
            Some(main) => main(std::iter::once(OsString::from(&name)).chain(args).collect()),
            None => {
                eprintln!("outboard: error: no built-in backend {name}");
                ExitCode::from(1)
            }
        };
    }
    init_logging(cli.log_level);
    let result = match cli.command {
        Command::Demo { timeout_ms } => demo::run(options(Duration::from_millis(timeout_ms))),
        Command::Run(args) => run(args),
        Command::Bench { quick, json } => bench::run(options(Duration::from_secs(10)), quick, json),
        Command::BenchEcho { path, epoll } => bench::echo(&path, epoll),
        Command::Backend { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboard: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

type AnyError = Box<dyn std::error::Error>;

fn run(args: RunArgs) -> Result<(), AnyError> {
    let RunArgs {
        config,
        devices,
        sockets,
        vhost_user,
        script: script_path,
        timeout_ms,
        ram_mb,
        no_sandbox,
        restart,
    } = args;
    let mut cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config {
            timeout: None,
            ram_mb: None,
            guest: None,
            vcpus: None,
            gsis: Vec::new(),
            devices: Vec::new(),
        },
    };
    for (i, d) in devices.iter().enumerate() {
        let mut words = d.split_whitespace();
        let program = words.next().ok_or("empty --device")?;
        cfg.devices.push(DeviceSpec {
            source: Source::Spawn {
                program: program.to_owned(),
                args: words.map(str::to_owned).collect(),
            },
            ..DeviceSpec::spawn(&format!("dev{i}"), program, &[])
        });
    }
    for (i, s) in sockets.into_iter().enumerate() {
        cfg.devices
            .push(DeviceSpec::connect(&format!("sock{i}"), s));
    }
    for (i, v) in vhost_user.iter().enumerate() {
        let (device, socket) = v
            .split_once(':')
            .ok_or("--vhost-user takes TYPE:PATH, e.g. blk:/run/qsd.sock")?;
        cfg.devices.push(DeviceSpec {
            source: Source::VhostUser {
                socket: socket.into(),
                device: device.to_owned(),
            },
            ..DeviceSpec::connect(&format!("vhost{i}"), socket)
        });
    }
    if cfg.devices.is_empty() {
        return Err("no devices: give --config, --device, --connect or --vhost-user".into());
    }
    if no_sandbox {
        for d in &mut cfg.devices {
            d.sandbox = false;
        }
    }
    if let Some(mode) = restart {
        for d in &mut cfg.devices {
            d.restart.mode = mode;
        }
    }
    let timeout = timeout_ms
        .map(Duration::from_millis)
        .or(cfg.timeout)
        .unwrap_or(Duration::from_secs(1));
    let mut fe = Frontend::new(options(timeout));
    let ram_mb = ram_mb.or(cfg.ram_mb).unwrap_or(64);
    if ram_mb > 0 {
        fe.set_memory(GuestRam::new(&[(0, ram_mb << 20)])?)?;
    }
    for spec in &cfg.devices {
        fe.attach(spec)?;
    }
    let stdout = io::stdout();
    script::print_map(&fe, &mut stdout.lock())?;
    if let Some(guest) = &cfg.guest {
        match kvm::available() {
            Ok(()) => return run_guest(&mut fe, &cfg, guest),
            Err(e) => println!(
                "run: {}; running the test-guest script instead of {guest}",
                error_chain(&e)
            ),
        }
    }
    let result = match script_path {
        Some(p) => {
            let f = File::open(&p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            script::run(&mut fe, &mut BufReader::new(f), &mut stdout.lock())
        }
        None => script::run(&mut fe, &mut io::stdin().lock(), &mut stdout.lock()),
    };
    let statuses = fe.shutdown();
    let done = result?;
    println!("run: {done} commands, {} devices shut down", statuses.len());
    Ok(())
}

/// Runs the configured guest program on KVM; the process exits with the
/// guest's exit code.
fn run_guest(fe: &mut Frontend, cfg: &Config, guest: &str) -> Result<(), AnyError> {
    let program: Vec<u8> = match loader::programs::by_name(guest) {
        Some(p) => p.to_vec(),
        None => std::fs::read(guest).map_err(|e| format!("cannot read guest {guest}: {e}"))?,
    };
    let irqs: Vec<(&str, u32, u32)> = cfg
        .gsis
        .iter()
        .flat_map(|(dev, gsis)| {
            gsis.iter()
                .enumerate()
                .map(move |(line, &gsi)| (dev.as_str(), line as u32, gsi))
        })
        .collect();
    let vcpus = cfg.vcpus.unwrap_or(1).max(1);
    println!("run: /dev/kvm is usable: running {guest} on {vcpus} vCPU(s)");
    let r = loader::run_program(fe, &program, vcpus, &irqs, Duration::from_secs(600))?;
    let statuses = fe.shutdown();
    println!(
        "run: guest exited with code {} after {:?}; {} devices shut down",
        r.exit_code,
        r.elapsed,
        statuses.len()
    );
    if r.exit_code != 0 {
        std::process::exit(i32::try_from(r.exit_code).unwrap_or(255).clamp(1, 255));
    }
    Ok(())
}
