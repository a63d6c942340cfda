//! [`Link`]: a device's current backend connection and, under a restart
//! policy, everything needed to replace a dead backend with a new
//! instance under the running guest (docs/architecture.md, "Restart").
//!
//! The link remembers every resource the frontend handed to the backend:
//! the memory table, the doorbell and interrupt eventfds (the *same* fds
//! go to the next instance, so KVM's ioeventfd and irqfd registrations
//! stay valid and a doorbell rung while no backend ran is still pending),
//! each placed region's SET_REGION, and the state area. A watcher thread
//! waits for the backend's control socket to hang up; then, after the
//! policy's backoff, it spawns the same program with the same arguments,
//! checks that it describes the same device, hands it everything again,
//! gives each placed region a fresh data socket (swapped into its
//! [`RemoteRegion`] under the region's lock) and sends RESTORE_STATE.
//! Accesses that fail meanwhile wait for the new generation, within their
//! deadline, and are sent again.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use outboard_protocol::control::{DeviceInfo, MemTable, RegionInfo, SetRegion, F_STATE};

use crate::backend::{self, Connection};
use crate::health::Health;
use crate::launch::Prepared;
use crate::remote::RemoteRegion;
use crate::restart::RestartPolicy;

/// Builds the command that starts the backend (again).
pub type Spawner = Box<dyn Fn() -> Result<Prepared, backend::Error> + Send + Sync>;

/// Size of the state area a restartable device gets.
pub const STATE_AREA_SIZE: usize = 64 << 10;

/// What was handed to the backend, to hand again.
#[derive(Default)]
struct Recipe {
    mem: Option<(MemTable, Vec<OwnedFd>)>,
    doorbells: Vec<(u32, Arc<EventFd>)>,
    irqs: Vec<(u32, OwnedFd, Option<OwnedFd>)>,
    regions: Vec<(SetRegion, Weak<RemoteRegion>)>,
    state_area: Option<OwnedFd>,
}

#[derive(Debug, Default)]
struct Progress {
    /// Bumped by every completed restart.
    generation: u64,
    /// Restarts done.
    restarts: u32,
    /// Live upgrades done.
    upgrades: u32,
    /// No more restarts: the device failed for good or is going away.
    over: bool,
}

/// A device's backend connection, replaceable under a restart policy.
pub struct Link {
    conn: Mutex<Arc<Connection>>,
    progress: Mutex<Progress>,
    changed: Condvar,
    recipe: Mutex<Recipe>,
    spawner: Mutex<Option<Arc<Spawner>>>,
    quiet: bool,
    policy: RestartPolicy,
    timeout: Duration,
    health: Arc<Health>,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("policy", &self.policy)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A close-on-exec duplicate of `fd`.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

impl Link {
    /// A link over `conn`; with a `spawner` and an `on-failure` policy it
    /// can replace the backend.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        conn: Connection,
        spawner: Option<Spawner>,
        quiet: bool,
        policy: RestartPolicy,
        timeout: Duration,
        health: Arc<Health>,
        info: DeviceInfo,
        regions: Vec<RegionInfo>,
    ) -> Arc<Self> {
        Arc::new(Link {
            conn: Mutex::new(Arc::new(conn)),
            progress: Mutex::default(),
            changed: Condvar::new(),
            recipe: Mutex::default(),
            spawner: Mutex::new(spawner.map(Arc::new)),
            quiet,
            policy,
            timeout,
            health,
            info,
            regions,
        })
    }

    /// The current connection.
    pub fn conn(&self) -> Arc<Connection> {
        Arc::clone(&lock(&self.conn))
    }

    /// True when a dead backend is replaced.
    pub fn restartable(&self) -> bool {
        lock(&self.spawner).is_some() && self.policy.allows(0)
    }

    /// True when the backend can be replaced at all (it was spawned): by a
    /// restart under the policy, or by a live upgrade.
    pub fn replaceable(&self) -> bool {
        lock(&self.spawner).is_some()
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        lock(&self.progress).restarts
    }

    /// The current generation (bumped by each restart).
    pub fn generation(&self) -> u64 {
        lock(&self.progress).generation
    }

    /// Creates the state area, if the backend negotiated F_STATE; returns
    /// its fd for SET_STATE_AREA.
    pub(crate) fn make_state_area(&self) -> std::io::Result<Option<RawFdHolder>> {
        if !self.replaceable() || self.conn().negotiated().features & F_STATE == 0 {
            return Ok(None);
        }
        let fd = crate::memory::sealed_area("outboard-state", STATE_AREA_SIZE as u64)?;
        let raw = fd.as_raw_fd();
        lock(&self.recipe).state_area = Some(fd);
        Ok(Some(RawFdHolder(raw)))
    }

    pub(crate) fn remember_mem(&self, table: &MemTable, fds: &[std::os::fd::RawFd]) {
        if !self.replaceable() {
            return;
        }
        let dups: Result<Vec<OwnedFd>, _> = fds
            .iter()
            // SAFETY: the caller passes fds that are open for the call.
            .map(|&fd| dup(unsafe { BorrowedFd::borrow_raw(fd) }))
            .collect();
        match dups {
            Ok(d) => lock(&self.recipe).mem = Some((table.clone(), d)),
            Err(e) => warn!(
                "{}: cannot keep the memory table for restarts: {e}",
                self.health.name()
            ),
        }
    }

    pub(crate) fn remember_doorbell(&self, index: u32, fd: &Arc<EventFd>) {
        let mut r = lock(&self.recipe);
        r.doorbells.retain(|(i, _)| *i != index);
        r.doorbells.push((index, Arc::clone(fd)));
    }

    pub(crate) fn remember_irq(&self, index: u32, fd: &EventFd, resample: Option<&EventFd>) {
        if !self.replaceable() {
            return;
        }
        // SAFETY: both eventfds are open for the duration of the call.
        let fd = dup(unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) });
        let resample = resample
            // SAFETY: as above.
            .map(|r| dup(unsafe { BorrowedFd::borrow_raw(r.as_raw_fd()) }))
            .transpose();
        match (fd, resample) {
            (Ok(fd), Ok(resample)) => {
                let mut r = lock(&self.recipe);
                r.irqs.retain(|(i, _, _)| *i != index);
                r.irqs.push((index, fd, resample));
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(
                    "{}: cannot keep interrupt line {index} for restarts: {e}",
                    self.health.name()
                )
            }
        }
    }

    pub(crate) fn remember_region(&self, set: SetRegion, region: &Arc<RemoteRegion>) {
        let mut r = lock(&self.recipe);
        r.regions.retain(|(s, _)| s.index != set.index);
        r.regions.push((set, Arc::downgrade(region)));
    }

    /// The placed region `index`, while it is on the bus.
    pub(crate) fn region(&self, index: u32) -> Option<Arc<RemoteRegion>> {
        lock(&self.recipe)
            .regions
            .iter()
            .find(|(s, _)| s.index == index)
            .and_then(|(_, r)| r.upgrade())
    }

    pub(crate) fn forget_region(&self, index: u32) {
        lock(&self.recipe).regions.retain(|(s, _)| s.index != index);
    }

    /// Starts the thread that replaces a dead backend.
    pub(crate) fn watch(self: &Arc<Self>) -> std::io::Result<()> {
        if !self.restartable() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(format!("restart-{}", self.health.name()))
            .spawn(move || watch(weak))
            .map(|_| ())
    }

    /// Stops restarting (the device is going away).
    pub(crate) fn close(&self) {
        lock(&self.progress).over = true;
        self.changed.notify_all();
    }

    /// After an access failed at `generation`: waits, until `deadline`,
    /// for a restart to complete. True when a newer generation serves.
    pub(crate) fn await_restart(&self, generation: u64, deadline: Instant) -> bool {
        let mut p = lock(&self.progress);
        loop {
            if p.generation > generation {
                return true;
            }
            if p.over {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            p = self
                .changed
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A backend that stopped answering: kill it, so the watcher restarts it.
    pub(crate) fn kill_hung(&self, generation: u64) {
        if self.generation() != generation {
            return;
        }
        if let Some(pid) = self.conn().spawned_pid() {
            warn!(
                "{}: backend (pid {pid}) does not answer; killing it",
                self.health.name()
            );
            let _ = self.conn().kill();
        }
    }

    /// One restart: a new backend, everything handed again, state restored.
    fn restart_once(&self) -> Result<(), backend::Error> {
        let spawner = lock(&self.spawner)
            .clone()
            .ok_or(backend::Error::NotRestartable)?;
        let (conn, swaps) = self.start_instance(&spawner)?;
        let served = self.served();
        let conn = Arc::new(conn);
        for (region, sock) in swaps {
            let n = served_of(&served, region.region());
            region.replace_socket(sock, Arc::downgrade(&conn), n);
        }
        let old = std::mem::replace(&mut *lock(&self.conn), conn);
        // The old backend is dead; reaping it must not hold anything up.
        drop(old);
        Ok(())
    }

    /// Spawns a backend with `spawner` and hands it everything the
    /// previous one had: the state area, the memory table, the same
    /// doorbell and interrupt eventfds, every placed region (fresh data
    /// sockets, returned for the caller to swap in) and RESTORE_STATE.
    #[allow(clippy::type_complexity)]
    fn start_instance(
        &self,
        spawner: &Spawner,
    ) -> Result<(Connection, Vec<(Arc<RemoteRegion>, UnixStream)>), backend::Error> {
        let (conn, swaps) = self.prepare_instance(spawner)?;
        self.finish_instance(&conn)?;
        Ok((conn, swaps))
    }

    /// The part of [`Link::start_instance`] that may run while the old
    /// backend still serves: everything but the doorbells (which the old
    /// one must go on reading) and RESTORE_STATE.
    #[allow(clippy::type_complexity)]
    fn prepare_instance(
        &self,
        spawner: &Spawner,
    ) -> Result<(Connection, Vec<(Arc<RemoteRegion>, UnixStream)>), backend::Error> {
        let conn = Connection::spawn(spawner()?, self.quiet, self.timeout)?;
        let info = conn.device_info()?;
        let regions = (0..info.num_regions)
            .map(|i| conn.region_info(i))
            .collect::<Result<Vec<_>, _>>()?;
        if info != self.info || regions != self.regions {
            return Err(backend::Error::OtherDevice(info.name));
        }
        let recipe = lock(&self.recipe);
        let state = conn.negotiated().features & F_STATE != 0;
        if let (true, Some(area)) = (state, &recipe.state_area) {
            conn.set_state_area(area.as_raw_fd())?;
        }
        if let Some((table, fds)) = &recipe.mem {
            let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            conn.set_mem_table(table, &raw)?;
        }
        for (index, fd, resample) in &recipe.irqs {
            conn.set_irq(
                *index,
                fd.as_raw_fd(),
                resample.as_ref().map(AsRawFd::as_raw_fd),
            )?;
        }
        let mut swaps = Vec::new();
        for (set, region) in &recipe.regions {
            let Some(region) = region.upgrade() else {
                continue;
            };
            let (ours, theirs) = UnixStream::pair().map_err(backend::Error::SocketPair)?;
            conn.set_region(set, theirs.as_raw_fd())?;
            drop(theirs);
            swaps.push((region, ours));
        }
        Ok((conn, swaps))
    }

    /// The doorbells, then RESTORE_STATE: from here on the new backend
    /// serves (a restored virtio device serves every queue at once).
    fn finish_instance(&self, conn: &Connection) -> Result<(), backend::Error> {
        let recipe = lock(&self.recipe);
        for (index, fd) in &recipe.doorbells {
            conn.set_doorbell(*index, fd.as_raw_fd())?;
        }
        if conn.negotiated().features & F_STATE != 0 && recipe.state_area.is_some() {
            conn.restore_state()?;
        }
        Ok(())
    }

    /// Live upgrade: replaces the running backend with one started by
    /// `spawner` (a new binary, or the same one when `None`), which also
    /// serves later restarts. Holds every region of the device for the
    /// whole switch, so no access is lost or reordered: the old backend
    /// serves what was queued, pauses (SAVE_STATE) and commits its state;
    /// the new one gets everything, restores and serves; then the old one
    /// is shut down. Returns the blackout: how long accesses were held.
    /// On failure the old backend resumes nothing (it is paused): the
    /// device then restarts under its policy, or fails.
    pub fn upgrade(&self, spawner: Option<Spawner>) -> Result<Duration, backend::Error> {
        let spawner = match spawner {
            Some(s) => Arc::new(s),
            None => lock(&self.spawner)
                .clone()
                .ok_or(backend::Error::NotRestartable)?,
        };
        let regions: Vec<Arc<RemoteRegion>> = lock(&self.recipe)
            .regions
            .iter()
            .filter_map(|(_, r)| r.upgrade())
            .collect();
        let old = self.conn();
        // The new backend starts and gets everything but the doorbells
        // while the old one still serves.
        let (conn, swaps) = self.prepare_instance(&spawner)?;
        let t = Instant::now();
        // Accesses wait here until the new backend has its sockets.
        let mut held: Vec<_> = regions.iter().map(|r| r.lock_socket()).collect();
        let stateful = old.negotiated().features & F_STATE != 0;
        if stateful {
            old.save_state()?;
        }
        match self.finish_instance(&conn) {
            Ok(()) => {}
            Err(e) => {
                // The old backend takes its saved state back and serves on.
                if stateful {
                    if let Err(e) = old.restore_state() {
                        warn!("{}: the old backend cannot resume: {e}", self.health.name());
                    }
                }
                return Err(e);
            }
        }
        let served = self.served();
        let conn = Arc::new(conn);
        for (region, sock) in swaps {
            let n = served_of(&served, region.region());
            match regions.iter().position(|r| Arc::ptr_eq(r, &region)) {
                Some(i) => region.swap_locked(&mut held[i], sock, Arc::downgrade(&conn), n),
                None => region.replace_socket(sock, Arc::downgrade(&conn), n),
            }
        }
        *lock(&self.conn) = Arc::clone(&conn);
        *lock(&self.spawner) = Some(spawner);
        {
            let mut p = lock(&self.progress);
            p.generation += 1;
            p.upgrades += 1;
        }
        drop(held);
        let blackout = t.elapsed();
        self.changed.notify_all();
        info!(
            "{}: backend upgraded; accesses held {blackout:?}",
            self.health.name()
        );
        old.shutdown(self.timeout);
        Ok(blackout)
    }

    /// Per region index, the commands the state area's newest record
    /// holds (what the restored backend has served); `None` when the
    /// device keeps no state.
    fn served(&self) -> Option<Vec<u64>> {
        let recipe = lock(&self.recipe);
        let area = recipe.state_area.as_ref()?;
        let mut bytes = vec![0u8; STATE_AREA_SIZE];
        let file = std::fs::File::from(area.try_clone().ok()?);
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).ok()?;
        match outboard_protocol::state::latest(&bytes)
            .and_then(outboard_protocol::state::Snapshot::decode)
        {
            Ok(s) => Some(s.served),
            // No record yet: the device served nothing that changed it.
            Err(outboard_protocol::state::Error::Empty) => Some(Vec::new()),
            Err(e) => {
                warn!("{}: state area: {e}", self.health.name());
                None
            }
        }
    }

    /// Live upgrades so far.
    pub fn upgrades(&self) -> u32 {
        lock(&self.progress).upgrades
    }
}

/// Region `index`'s count in `served` (0 when the record names fewer
/// regions); `None` when the device keeps no state.
fn served_of(served: &Option<Vec<u64>>, index: u32) -> Option<u64> {
    served
        .as_ref()
        .map(|s| s.get(index as usize).copied().unwrap_or(0))
}

/// An fd the caller passes on at once (the link keeps the owner).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawFdHolder(pub std::os::fd::RawFd);

/// Waits until the control socket of `conn` hangs up or `link` closes.
fn wait_dead(link: &Link, conn: &Connection) -> bool {
    loop {
        if lock(&link.progress).over {
            return false;
        }
        let mut p = libc::pollfd {
            fd: conn.control_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the call only.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
    }
}

fn watch(weak: Weak<Link>) {
    let mut quick = 0u32;
    loop {
        let Some(link) = weak.upgrade() else { return };
        let conn = link.conn();
        let started = Instant::now();
        if !wait_dead(&link, &conn) {
            return;
        }
        if !Arc::ptr_eq(&conn, &link.conn()) {
            // A live upgrade replaced this backend: not a death.
            continue;
        }
        // Why it ended is asked only once the new backend serves: the old
        // one's exit status and last stderr line can take a while to come.
        let why = || {
            conn.end_reason()
                .unwrap_or_else(|| "control socket closed".into())
        };
        quick = if started.elapsed() < Duration::from_secs(1) {
            quick + 1
        } else {
            0
        };
        loop {
            let done = link.restarts();
            if lock(&link.progress).over {
                return;
            }
            if !link.policy.allows(done) {
                error!(
                    "{}: restart limit ({}) reached",
                    link.health.name(),
                    link.policy.limit
                );
                link.health.fail(&backend::Error::RestartLimit(why()));
                link.close();
                return;
            }
            std::thread::sleep(link.policy.delay(quick.saturating_sub(1)));
            let t = Instant::now();
            let result = link.restart_once();
            let mut p = lock(&link.progress);
            p.restarts += 1;
            match result {
                Ok(()) => {
                    p.generation += 1;
                    let restarts = p.restarts;
                    drop(p);
                    link.changed.notify_all();
                    info!(
                        "{}: backend restarted in {:?} ({}); restart {restarts}",
                        link.health.name(),
                        t.elapsed(),
                        why()
                    );
                    break;
                }
                Err(e) => {
                    drop(p);
                    quick += 1;
                    warn!(
                        "{}: restart failed: {}",
                        link.health.name(),
                        outboard_protocol::error_chain(&e)
                    );
                }
            }
        }
    }
}
