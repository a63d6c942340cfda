//! [`VirtioMmio`]: a [`VirtioDevice`] behind the shared virtio-mmio
//! transport, with virtio-queue queues built at activation.

use std::io;
use std::sync::Arc;

use log::warn;
use outboard_protocol::control::DeviceKind;
use outboard_protocol::AccessSize;
use outboard_virtio_mmio::virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use outboard_virtio_mmio::virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_QUEUE_NOTIFY,
};
use outboard_virtio_mmio::{MmioTransport, QueueConfig, TransportDevice, MMIO_SIZE};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::saved::{self, Saved};
use super::worker::{QueueThread, Signals};
use super::{QueueError, VirtioDevice, RING_FEATURES};
use crate::device::{
    Device, DeviceDescription, Doorbell, GuestMemory, Interrupt, InterruptLine, Region,
};
use crate::events::EventOps;
use crate::state::{DeviceState, Error as StateError};
use outboard_protocol::Access;

/// A [`VirtioDevice`] behind the virtio-mmio transport.
pub struct VirtioMmio<D: VirtioDevice> {
    transport: MmioTransport,
    side: DeviceSide<D>,
    /// Counts register writes, resets and restores: the transport's part
    /// of [`Device::state_generation`].
    generation: u64,
}

/// What the transport drives: the device logic, its queues (built from the
/// driver's layout at DRIVER_OK), guest memory and the interrupt line
/// (shared with queue threads, see [`super::worker`]).
struct DeviceSide<D> {
    device: D,
    queues: Vec<Slot>,
    memory: Option<GuestMemory>,
    signals: Arc<Signals>,
    /// Set while a restore activates the queues: each starts at the used
    /// index in guest memory instead of 0.
    resuming: bool,
    /// The restored state predates DRIVER_OK, yet the previous instance
    /// may have run the rings after it committed (the frontend then replays
    /// the posted DRIVER_OK): the next activation, too, starts each queue
    /// at the used index in guest memory. A reset clears it.
    resume_next: bool,
    /// Per queue served in the event loop: the used index up to which the
    /// driver has been sent a used-buffer interrupt (saved, so a restored
    /// device raises exactly the interrupt its predecessor still owed).
    signalled: Vec<Option<u16>>,
}

/// One activated queue: served in the event loop, or on its own thread.
enum Slot {
    Inline(Queue),
    Thread(QueueThread),
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("device", &self.side.device.name())
            .field("status", &self.transport.status())
            .finish_non_exhaustive()
    }
}

/// A virtio-queue queue with the layout the driver programmed, or why not.
fn build_queue(index: usize, c: &QueueConfig, event_idx: bool) -> Result<Queue, QueueError> {
    let mut q = Queue::new(c.max_size).map_err(QueueError::Queue)?;
    q.set_size(c.size);
    q.set_event_idx(event_idx);
    q.set_desc_table_address(Some(c.desc as u32), Some((c.desc >> 32) as u32));
    q.set_avail_ring_address(Some(c.avail as u32), Some((c.avail >> 32) as u32));
    q.set_used_ring_address(Some(c.used as u32), Some((c.used >> 32) as u32));
    q.set_ready(c.ready);
    // virtio-queue ignores a misaligned address; a queue it would not take
    // as programmed must not run on stale addresses.
    let as_programmed = q.size() == c.size
        && q.desc_table() == c.desc
        && q.avail_ring() == c.avail
        && q.used_ring() == c.used;
    if c.ready && !as_programmed {
        return Err(QueueError::Layout(index));
    }
    Ok(q)
}

impl<D: VirtioDevice> TransportDevice for DeviceSide<D> {
    type Error = QueueError;

    fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn device_features(&self) -> u64 {
        self.device.features() | RING_FEATURES
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.device.queue_max_sizes()
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), QueueError> {
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut built = queues
            .iter()
            .enumerate()
            .map(|(i, c)| build_queue(i, c, event_idx))
            .collect::<Result<Vec<_>, _>>()?;
        if std::mem::take(&mut self.resume_next) || self.resuming {
            // Every chain the driver made available and the device had not
            // completed is served again: the used index is where the
            // previous instance stopped, because each queue completes its
            // chains in the order it pops them (docs/architecture.md, "Restart").
            let mem = self
                .memory
                .as_ref()
                .map(GuestAddressSpace::memory)
                .ok_or(QueueError::Chain("no guest memory to resume queues in"))?;
            for q in built.iter_mut().filter(|q| q.ready()) {
                let used = q
                    .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(QueueError::Queue)?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
            }
        }
        self.queues.clear();
        if !self.resuming {
            self.signalled = vec![None; queues.len()];
        }
        self.device.activate(features);
        // Threads pay off only when queues can run in parallel; a single
        // ready queue is served in the event loop without the extra hop.
        let parallel = built.iter().filter(|q| q.ready()).count() > 1;
        for (index, queue) in built.into_iter().enumerate() {
            let slot = match (&self.memory, parallel && queue.ready()) {
                (Some(memory), true) => match self.device.queue_worker(index) {
                    Some(worker) => Slot::Thread(
                        QueueThread::spawn(
                            self.device.name(),
                            index,
                            queue,
                            worker,
                            memory.clone(),
                            Arc::clone(&self.signals),
                        )
                        .map_err(QueueError::Backend)?,
                    ),
                    None => Slot::Inline(queue),
                },
                _ => Slot::Inline(queue),
            };
            self.queues.push(slot);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Joins every queue thread before the device forgets its state.
        self.resume_next = false;
        self.queues.clear();
        self.signalled.clear();
        self.signals.clear();
        self.device.reset();
    }

    fn queue_notify(&mut self, index: u16) -> Result<bool, QueueError> {
        let Some(mem) = self.memory.as_ref().map(GuestAddressSpace::memory) else {
            return Ok(false);
        };
        let queue = match self.queues.get_mut(usize::from(index)) {
            Some(Slot::Inline(queue)) => queue,
            Some(Slot::Thread(thread)) => {
                thread.kick();
                return Ok(false);
            }
            None => return Ok(false),
        };
        if !queue.ready() {
            return Ok(false);
        }
        if !queue.is_valid(&*mem) {
            return Err(QueueError::Chain("queue rings outside guest memory"));
        }
        let used = self.device.process_queue(usize::from(index), queue, &mem)?;
        let notify = used && queue.needs_notification(&*mem).unwrap_or(true);
        if notify {
            let at = queue.next_used();
            if let Some(s) = self.signalled.get_mut(usize::from(index)) {
                *s = Some(at);
            }
        }
        Ok(notify)
    }

    fn interrupt(&mut self, _bits: u32) {
        self.signals.trigger(self.device.name());
    }

    fn interrupt_status(&self) -> u32 {
        self.signals.isr()
    }

    fn interrupt_ack(&mut self, bits: u32) {
        self.signals.ack(bits);
    }

    fn device_status(&self) -> u32 {
        if self.signals.failed() {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        }
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Wraps `device`. Queue sizes that are zero, above 32768 or not a power
    /// of two are clamped to a valid size.
    pub fn new(device: D) -> Self {
        let side = DeviceSide {
            device,
            queues: Vec::new(),
            memory: None,
            signals: Arc::default(),
            resuming: false,
            resume_next: false,
            signalled: Vec::new(),
        };
        VirtioMmio {
            transport: MmioTransport::new(&side),
            side,
            generation: 0,
        }
    }

    /// The device logic.
    pub fn inner(&self) -> &D {
        &self.side.device
    }

    /// The transport's register state.
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// Serves queue `index` if the driver is ready; notifies on used buffers.
    fn kick(&mut self, index: usize) {
        match u16::try_from(index) {
            Ok(q) => self.transport.notify(&mut self.side, q),
            Err(_) => warn!("{}: no queue {index}", self.side.device.name()),
        }
    }
}

impl<D: VirtioDevice> Device for VirtioMmio<D> {
    fn syscalls(&self) -> &'static [i64] {
        self.side.device.syscalls()
    }

    fn describe(&self) -> DeviceDescription {
        let device = &self.side.device;
        let mut desc = DeviceDescription::new(device.name())
            .kind(DeviceKind(DeviceKind::VIRTIO_BASE + device.device_type()))
            .region(Region::mmio("virtio-mmio", MMIO_SIZE).posted_writes())
            .interrupt(Interrupt { level: false })
            .needs_memory();
        for q in 0..self.transport.queues().len() {
            desc = desc.doorbell(Doorbell {
                region: 0,
                offset: u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
                size: Some(AccessSize::B4),
                datamatch: Some(q as u64),
            });
        }
        desc
    }

    fn read(&mut self, access: Access) -> u64 {
        self.transport
            .read(&mut self.side, access.offset, access.size.bytes())
    }

    fn write(&mut self, access: Access, value: u64) {
        self.generation += 1;
        let was_active = self.transport.is_active(&self.side);
        self.transport
            .write(&mut self.side, access.offset, access.size.bytes(), value);
        if !was_active && self.transport.is_active(&self.side) {
            // A notify rides its own eventfd and may have overtaken the
            // posted DRIVER_OK write; serve whatever is already queued.
            for q in 0..self.transport.queues().len() {
                self.kick(q);
            }
        }
    }

    fn reset(&mut self) {
        self.generation += 1;
        self.transport.reset(&mut self.side);
    }

    fn save(&self) -> Option<DeviceState> {
        let mut registers = self.transport.registers();
        if self.side.signals.failed() {
            registers.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        let saved = Saved {
            signalled: (0..registers.queues.len())
                .map(|i| self.side.signalled.get(i).copied().flatten())
                .collect(),
            registers,
            device: self.side.device.save_state(),
        };
        Some(saved.encode())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let Saved {
            registers,
            device,
            signalled,
        } = Saved::decode(state)?;
        let (status, driver_features) = (registers.status, registers.driver_features);
        let queues = registers.queues.clone();
        // Back to the power-on state first: no queue of this instance runs
        // on the old layout.
        self.transport.reset(&mut self.side);
        self.transport
            .set_registers(registers)
            .map_err(StateError::Invalid)?;
        self.side.device.restore_state(&device)?;
        self.generation += 1;
        if status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return Ok(());
        }
        self.side.resume_next = status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.side.resuming = true;
            self.side.signalled = signalled;
            let activated = self.side.activate(driver_features, &queues);
            self.side.resuming = false;
            if let Err(e) = activated {
                warn!(
                    "{}: cannot resume the queues: {}",
                    self.side.device.name(),
                    outboard_protocol::error_chain(&e)
                );
                self.transport.set_needs_reset(&mut self.side);
                return Ok(());
            }
            // The previous instance may have used buffers without raising
            // the interrupt: raise it where the driver asked for one.
            let event_idx = driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            let owed = self.side.memory.as_ref().is_some_and(|m| {
                saved::interrupt_owed(&*m.memory(), &queues, &self.side.signalled, event_idx)
            });
            if owed {
                self.transport.raise(&mut self.side, VIRTIO_MMIO_INT_VRING);
            }
            // Then serve what queued up while no backend ran.
            for q in 0..queues.len() {
                self.kick(q);
            }
        }
        Ok(())
    }

    fn pause(&mut self) {
        // Joins every queue thread; chains they completed are in the used
        // ring, and the next instance starts at the used index.
        self.side.queues.clear();
    }

    fn state_generation(&self) -> u64 {
        // Each interrupt moves a queue's signalled index: part of the state.
        let signalled = self.side.signalled.iter().fold(0u64, |acc, s| {
            acc.wrapping_add(u64::from(s.map_or(0, |v| v)) + 1)
        });
        self.generation
            .wrapping_add(self.side.device.state_generation())
            .wrapping_add(signalled << 32)
    }

    fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        self.side.device.init(ops)
    }

    fn handle_event(&mut self, id: u32, ops: &EventOps) {
        if let Some(q) = self.side.device.handle_event(id, ops) {
            self.kick(q);
        }
    }

    fn doorbell(&mut self, index: usize, _count: u64) {
        // However many notifies were coalesced, one pass drains the queue.
        self.kick(index);
    }

    fn connect_interrupt(&mut self, index: usize, line: InterruptLine) {
        if index == 0 {
            self.side.signals.connect(line);
        }
    }

    fn set_memory(&mut self, mem: GuestMemory) {
        self.side.memory = Some(mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{desc, memory};
    use crate::virtio::{drain_queue, Memory};
    use outboard_virtio_mmio::virtio_bindings::virtio_config::*;
    use outboard_virtio_mmio::virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::eventfd::EventFd;

    /// Fills every writable buffer with 0xab; on queue threads if `workers`.
    struct Filler {
        workers: bool,
    }

    fn fill(queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
        drain_queue(queue, mem, |chain| {
            let mut w = chain.writer(mem).map_err(QueueError::Buffers)?;
            let n = w.available_bytes();
            std::io::Write::write_all(&mut w, &vec![0xab; n]).map_err(QueueError::Memory)?;
            Ok(n as u32)
        })
    }

    struct FillerWorker;

    impl crate::virtio::QueueWorker for FillerWorker {
        fn process(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
            fill(queue, mem)
        }
    }

    impl VirtioDevice for Filler {
        fn name(&self) -> &str {
            "filler"
        }
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn reset(&mut self) {}
        fn process_queue(
            &mut self,
            _index: usize,
            queue: &mut Queue,
            mem: &Memory,
        ) -> Result<bool, QueueError> {
            fill(queue, mem)
        }
        fn queue_worker(&mut self, _index: usize) -> Option<Box<dyn crate::virtio::QueueWorker>> {
            self.workers
                .then(|| Box::new(FillerWorker) as Box<dyn crate::virtio::QueueWorker>)
        }
    }

    struct Rig {
        dev: VirtioMmio<Filler>,
        irq: EventFd,
        mem: GuestMemory,
    }

    fn rig() -> Rig {
        rig_with(false)
    }

    fn rig_with(workers: bool) -> Rig {
        let mem = GuestMemoryAtomic::new(memory());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|e| panic!("{e}"));
        let line = irq.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut dev = VirtioMmio::new(Filler { workers });
        dev.set_memory(mem.clone());
        dev.connect_interrupt(0, InterruptLine::new(line));
        Rig { dev, irq, mem }
    }

    impl Rig {
        fn w(&mut self, reg: u32, v: u32) {
            self.dev
                .write(Access::new(0, u64::from(reg), AccessSize::B4), u64::from(v));
        }
        fn r(&mut self, reg: u32) -> u32 {
            self.dev
                .read(Access::new(0, u64::from(reg), AccessSize::B4)) as u32
        }
        /// Negotiates and sets queue 0 up at `base` with `chains` already
        /// available (a queue beyond guest memory when `base` is outside
        /// it); DRIVER_OK only if `start`.
        fn setup(&mut self, base: u64, chains: &[RawDescriptor], start: bool) {
            let (d, a, u) = if base < 0x10_0000 {
                let m = self.mem.memory();
                let mock = MockSplitQueue::create(&*m, GuestAddress(base), 16);
                mock.add_desc_chains(chains, 0)
                    .unwrap_or_else(|e| panic!("{e}"));
                (
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
            } else {
                (base, base + 0x100, base + 0x200)
            };
            self.w(VIRTIO_MMIO_STATUS, 3);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
            self.w(VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_FEATURES_OK);
            self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
            self.w(VIRTIO_MMIO_QUEUE_NUM, 16);
            for (reg, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, d),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, a),
                (VIRTIO_MMIO_QUEUE_USED_LOW, u),
            ] {
                self.w(reg, addr as u32);
                self.w(reg + 4, (addr >> 32) as u32);
            }
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
            if start {
                self.start();
            }
        }
        fn start(&mut self) {
            self.w(VIRTIO_MMIO_STATUS, 0xf);
        }
        fn used_idx(&self, used: u64) -> u16 {
            self.mem
                .memory()
                .read_obj(GuestAddress(used + 2))
                .unwrap_or_else(|e| panic!("{e}"))
        }
        fn interrupts(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
    }

    #[test]
    fn driver_ok_when_buffers_already_queued_then_served_and_interrupt_raised() {
        let mut r = rig();
        r.setup(0x1000, &[desc(0x8000, 64, VRING_DESC_F_WRITE, 0)], false);
        r.dev.doorbell(0, 1);
        assert_eq!(r.interrupts(), 0, "doorbell before DRIVER_OK is ignored");
        r.start();
        assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0xf);
        let used = r.dev.transport().queues()[0].used;
        assert_eq!(r.used_idx(used), 1);
        let mut buf = [0u8; 64];
        r.mem
            .memory()
            .read_slice(&mut buf, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buf, [0xab; 64]);
        assert_eq!(r.interrupts(), 1);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        r.w(VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn restore_when_state_predates_driver_ok_then_replayed_driver_ok_resumes_at_used_index() {
        // The state was committed before DRIVER_OK; then that instance
        // started and served both chains before it died.
        let mut old = rig();
        old.setup(
            0x1000,
            &[
                desc(0x8000, 64, VRING_DESC_F_WRITE, 0),
                desc(0x9000, 64, VRING_DESC_F_WRITE, 0),
            ],
            false,
        );
        let state = old.dev.save().unwrap_or_else(|| panic!("no state"));
        old.start();
        let used = old.dev.transport().queues()[0].used;
        assert_eq!(old.used_idx(used), 2);
        // The guest took the first buffer back and cleared it.
        let m = old.mem.memory();
        m.write_slice(&[0u8; 64], GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        // The next instance restores and the frontend replays DRIVER_OK.
        let mut new = VirtioMmio::new(Filler { workers: false });
        new.set_memory(old.mem.clone());
        new.restore(&state).unwrap_or_else(|e| panic!("{e}"));
        new.write(
            Access::new(0, u64::from(VIRTIO_MMIO_STATUS), AccessSize::B4),
            0xf,
        );
        let mut buf = [0xffu8; 64];
        m.read_slice(&mut buf, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buf, [0u8; 64], "a completed chain is not served again");
        assert_eq!(old.used_idx(used), 2);
    }

    #[test]
    fn doorbell_when_rings_outside_memory_then_needs_reset_and_config_interrupt_once() {
        let mut r = rig();
        r.setup(0x20_0000, &[], true);
        assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0xf | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        r.dev.doorbell(0, 3);
        assert_eq!(r.interrupts(), 1, "raised once until reset");
        r.dev.reset();
        assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn activation_when_ring_misaligned_then_needs_reset() {
        let mut r = rig();
        r.setup(0x1000, &[], false);
        r.w(VIRTIO_MMIO_QUEUE_USED_LOW, 0x3001);
        r.start();
        assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn chain_when_buffer_outside_memory_then_needs_reset() {
        let mut r = rig();
        r.setup(
            0x1000,
            &[desc(0xff000, 0x4000, VRING_DESC_F_WRITE, 0)],
            true,
        );
        assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);
    }

    #[test]
    fn description_when_two_queues_then_region_doorbells_edge_line_and_memory() {
        let mut r = rig();
        let desc = r.dev.describe();
        assert!(desc.validate().is_ok());
        assert!(desc.needs_memory);
        assert_eq!(desc.name, "filler");
        let regions = desc.regions;
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].size, MMIO_SIZE);
        assert!(regions[0].posted_writes);
        let bells = desc.doorbells;
        assert_eq!(bells.len(), 2);
        assert_eq!(bells[1].offset, 0x50);
        assert_eq!(bells[1].datamatch, Some(1));
        assert_eq!(desc.interrupts, vec![Interrupt { level: false }]);
        assert_eq!(desc.kind, DeviceKind(0x1004));
        assert_eq!(r.dev.read(Access::new(0, 0x100, AccessSize::B2)), 0x5a5a);
        assert_eq!(r.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    }

    /// Reads the interrupt eventfd until it counts, or panics after 10 s.
    fn wait_irq(r: &Rig) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(n) = r.irq.read() {
                return n;
            }
            assert!(std::time::Instant::now() < deadline, "no interrupt");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Queue `q` at `base` with one 64-byte writable chain at `buf`.
    fn ready_queue(r: &mut Rig, q: u32, base: u64, buf: u64) -> u64 {
        let m = r.mem.memory();
        let mock = MockSplitQueue::create(&*m, GuestAddress(base), 16);
        mock.add_desc_chains(&[desc(buf, 64, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap_or_else(|e| panic!("{e}"));
        r.w(VIRTIO_MMIO_QUEUE_SEL, q);
        r.w(VIRTIO_MMIO_QUEUE_NUM, 16);
        for (reg, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, mock.desc_table_addr().0),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, mock.avail_addr().0),
            (VIRTIO_MMIO_QUEUE_USED_LOW, mock.used_addr().0),
        ] {
            r.w(reg, addr as u32);
        }
        r.w(VIRTIO_MMIO_QUEUE_READY, 1);
        mock.used_addr().0
    }

    #[test]
    fn two_queues_when_device_has_workers_then_served_on_threads_with_isr_and_reset() {
        let mut r = rig_with(true);
        r.w(VIRTIO_MMIO_STATUS, 3);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        r.w(VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_FEATURES_OK);
        let used0 = ready_queue(&mut r, 0, 0x1000, 0x8000);
        let used1 = ready_queue(&mut r, 1, 0x4000, 0x9000);
        r.start();
        let mut seen = 0;
        while seen < 2 && (r.used_idx(used0) == 0 || r.used_idx(used1) == 0) {
            seen += wait_irq(&r);
        }
        while r.used_idx(used0) == 0 || r.used_idx(used1) == 0 {
            std::thread::yield_now();
        }
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 1, "set by the threads");
        r.w(VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        let mut buf = [0u8; 64];
        r.mem
            .memory()
            .read_slice(&mut buf, GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buf, [0xab; 64]);
        // A broken chain on queue 1's thread: DEVICE_NEEDS_RESET, config interrupt.
        let m = r.mem.memory();
        let bad = desc(0xff000, 0x4000, VRING_DESC_F_WRITE, 0);
        m.write_obj(bad, GuestAddress(0x4000))
            .unwrap_or_else(|e| panic!("{e}"));
        let avail1 = r.dev.transport().queues()[1].avail;
        m.write_obj(0u16, GuestAddress(avail1 + 4 + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        m.write_obj(2u16, GuestAddress(avail1 + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        r.dev.doorbell(1, 1);
        wait_irq(&r);
        assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);
        // Reset joins the threads and clears what they latched.
        r.dev.reset();
        assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }
}
